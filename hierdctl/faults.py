"""Deterministic fault injection for the fault suite (tests/test_faults.py).

`HIERDCTL_FAULT=PATTERN[@N][=SIG]` makes the process kill itself with SIGKILL (or the signal
SIG: TERM, INT, ...) the N-th time (default: the first) it passes a point whose name matches
PATTERN (fnmatch: `*` and `?`).
A kill at a named moment replaces "sleep, then kill" in tests: it lands exactly where the
test says, every time. Unset (the normal case), a point costs one dictionary lookup.

Points (see docs/reliability.md):
    write:FILENAME:before-rename    an atomic write has its temporary file complete, not yet renamed
    write:FILENAME:after-rename     the file is in place
    cache-teacher:unit-done:U       unit U's shard and done-marker are written
    distill:step:S                  optimizer step S is taken, before its metrics and checkpoint
    publish:NAME:before-exchange    a folder (export DIR, --save-index) is complete under its temporary
                                    name; the previous one is still in place
    publish:NAME:after-exchange     the new folder is in place; the previous one not yet removed
"""

from __future__ import annotations

import fnmatch
import os
import signal

_hits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("HIERDCTL_FAULT")
    if not spec:
        return
    spec_, _, sig = spec.partition("=")
    pattern, _, nth = spec_.partition("@")
    if fnmatch.fnmatchcase(name, pattern):
        _hits[spec] = _hits.get(spec, 0) + 1
        if _hits[spec] == int(nth or 1):
            os.kill(os.getpid(), getattr(signal, f"SIG{sig}") if sig else signal.SIGKILL)
