"""``python -m meshagent.agent.datapath.build``: compile, pin and attach the datapath, exit.

The agent runs this (`loader.install`) only when no pinned datapath of its key is in place,
so that bcc and LLVM (~130 MiB resident once a program is compiled) live only as long as the
compile does, never in the long-lived agent. The settings come as JSON on stdin; log lines
go to stderr (the agent's log); the exit status says whether the datapath is in place.
"""

from __future__ import annotations

import logging
import sys

from meshagent.agent.datapath import loader

log = logging.getLogger(__name__)


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s [%(process)d] datapath-build %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = loader.DatapathSettings.from_json(sys.stdin.read())
        loader.build(settings)
    except Exception:
        log.exception("datapath: build failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
