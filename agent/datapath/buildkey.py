"""The key a built datapath is known by: what its programs were compiled from.

A restarted agent reuses the pinned programs and maps only when their key is its own
(agent/datapath/loader.py). The key covers everything the compiled programs depend on:
the BPF sources and headers (any byte changed), the compile options (the proxy's address
and port are compiled in), the kernel release (and the headers compiled against), and the
layout the loader expects (which programs, which attach points, which maps). The bcc and
LLVM versions are not in it: a restart of the same image has the same ones, and a new
image that changes them but no source keeps programs that the kernel already verified.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

SOURCE_SUFFIXES = (".c", ".h")
KEY_FORMAT = 1  # bump when what goes into the key changes meaning


def datapath_key(
    sources: Mapping[str, bytes], options: Sequence[str], release: str, layout: Sequence[str]
) -> str:
    """A sha256 (hex) of the sources (name -> content), compile options, kernel release and
    loader layout; the order of ``sources`` does not matter, that of the rest does."""
    document = {
        "format": KEY_FORMAT,
        "sources": {name: hashlib.sha256(sources[name]).hexdigest() for name in sorted(sources)},
        "options": list(options),
        "kernel": release,
        "layout": list(layout),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
