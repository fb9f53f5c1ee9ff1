"""Fault injection for resilience tests and chaos drills, off unless asked for.

REFINERY_FAIL_ONCE=<stage>:<marker path> makes the next attempt of that stage's task
raise once (the marker file records that it did), across processes, so tests and
operators can watch a real retry happen.

REFINERY_KILL_AT=<point>[:<n>][,<point>[:<n>]...] SIGKILLs the process the n-th time
(default: the first) it reaches a named point, as `kill -9` or the OOM killer would: no
exception handler, `finally` or atexit hook runs. The points:

    <task name>      in the flow, once the n-th run of that map task has finished
                     (`extract-shard`, `curate-filter`, `shard-tokenize`, ...: see
                     flows/caching.map_shards); the shards after it are pending or mid-write
    dedup-spill      inside the dedup reduce, once the n-th key column is spilled to disk
                     (spill files written, nothing of the reduce's output yet)
    train-step       in the trainer (models/train.py) once n optimizer steps are done: it
                     SIGKILLs the process that launched it (`refinery run`, `refinery train`)
                     and then dies with it (the launcher asks the kernel to kill its trainer
                     when it dies; see `die_with_parent`). One device: under torchrun the
                     parent is torchrun

REFINERY_KILL_AT_STEP=<n> (models/train.py) SIGKILLs only the trainer: the flow sees its
trainer crash, and Prefect's retry resumes from the last checkpoint.
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from pathlib import Path

KILL_ENV = "REFINERY_KILL_AT"


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


def kill_points() -> dict[str, int]:
    """{point: n} from REFINERY_KILL_AT; empty when unset."""
    out = {}
    for item in filter(None, (s.strip() for s in os.environ.get(KILL_ENV, "").split(","))):
        point, _, n = item.partition(":")
        out[point] = int(n) if n else 1
    return out


_hits: dict[str, int] = {}
_hits_lock = threading.Lock()  # map tasks finish on several threads; each arrival counts once


def maybe_kill(point: str) -> None:
    """SIGKILL this process the n-th time it gets here, if REFINERY_KILL_AT names `point`."""
    n = kill_points().get(point)
    if n is None:
        return
    with _hits_lock:
        _hits[point] = _hits.get(point, 0) + 1
        hit = _hits[point] == n
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)


def kill_parent_and_wait(grace_s: float = 60.0) -> None:
    """SIGKILL our parent (the `refinery` process that launched this trainer), then wait for the
    kernel to kill us too (`die_with_parent`). A process still here after `grace_s` is an orphan
    the launcher failed to tie to itself: it carries on, and a drill watching for orphans sees it."""
    os.kill(os.getppid(), signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        time.sleep(0.1)


_PR_SET_PDEATHSIG = 1


def die_with_parent():
    """A `preexec_fn` for `subprocess.Popen`: the child gets SIGKILL when the thread that started
    it exits, so a killed `refinery` process never leaves a trainer running on its own (it would
    hold the device and keep writing the checkpoints a rerun is about to resume from). The thread
    matters: start the child from one that waits for it. Linux only; elsewhere a no-op. The
    returned function runs between fork and exec: one libc call and a check, nothing else."""
    parent = os.getpid()

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the parent died before the line above took effect
                os.kill(os.getpid(), signal.SIGKILL)
    return preexec


try:  # resolved now, not in the forked child, where loading a library is unsafe
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None
