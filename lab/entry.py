"""The `meshlab` command: a plain `meshlab exec` takes the light path (podexec), everything
else the click CLI, imported only then (it costs about 0.2 s of imports)."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["exec"]:
        from meshagent.lab.podexec import run_plain_exec

        run_plain_exec(sys.argv[2:])
    from meshagent.lab.cli import main as cli_main

    cli_main()
