"""Fault injection for resilience tests and chaos drills, off unless asked for.

REFINERY_FAIL_ONCE=<stage>:<marker path> makes the next attempt of that stage's task
raise once (the marker file records that it did), across processes, so tests and
operators can watch a real retry happen.
"""
from __future__ import annotations

import os
from pathlib import Path


class InjectedFault(RuntimeError):
    pass


def maybe_fail(stage: str) -> None:
    spec = os.environ.get("REFINERY_FAIL_ONCE", "")
    if not spec.startswith(f"{stage}:"):
        return
    marker = Path(spec.split(":", 1)[1])
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: exactly one attempt fails
    except FileExistsError:
        return
    os.close(fd)
    raise InjectedFault(f"injected fault in {stage} (REFINERY_FAIL_ONCE)")
