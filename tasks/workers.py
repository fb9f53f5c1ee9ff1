"""A small process pool with a hard per-item deadline.

Some pages hang parsers for minutes (pathological nesting, regex blow-ups inside
C code) and a thread cannot be interrupted there, so every item runs in a worker
process and a worker that overruns its deadline is killed and replaced. Only the
offending item is lost, and it is reported, not dropped.

Workers are plain `python -m tasks.workers` subprocesses talking over a socketpair:
unlike multiprocessing they never re-import the caller's __main__, never fork a
process that runs Prefect's threads, and may be started from daemonic processes
(Dask workers). Pools are kept and reused across shards, so start-up is paid once.
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable, Iterator


class ItemFailed:
    """Marks an item the worker could not finish: reason is 'timeout' or 'worker error'."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail

    def __repr__(self) -> str:
        return f"ItemFailed({self.reason!r}, {self.detail!r})"


def _resolve(path: str) -> Callable:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _orphan_watch(parent: int) -> None:
    """A worker busy on one page never reads its pipe, so it would not notice a SIGKILLed parent
    until the page ends: exit as soon as we are re-parented. (Not PR_SET_PDEATHSIG: that fires
    when the creating thread exits, and pools outlive the task thread that started them.)"""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _worker_main(fd: int, fn_path: str) -> None:
    threading.Thread(target=_orphan_watch, args=(os.getppid(),), daemon=True).start()
    conn = Connection(fd)
    fn = _resolve(fn_path)
    options, warmup = conn.recv()
    if warmup is not None:  # pay lazy initialisation before the first real deadline starts
        try:
            fn(*warmup, options)
        except Exception:  # noqa: BLE001 - a failing warm-up only costs speed
            pass
    conn.send("ready")  # imports done: deadlines count from here, not from process start
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if msg is None:
            return
        key, args = msg
        try:
            result = fn(*args, options)
        except Exception as e:  # noqa: BLE001 - one item's failure is reported, not fatal
            result = ItemFailed("worker error", f"{type(e).__name__}: {e}"[:500])
        conn.send((key, result))


class _Worker:
    def __init__(self, fn_path: str, options: Any, warmup: tuple | None = None):
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.workers", str(theirs.fileno()), fn_path],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send((options, warmup))
        self.ready = False
        self.key: Any = None
        self.deadline = 0.0
        self.done = 0

    def wait_ready(self, timeout: float = 120.0) -> None:
        if not self.ready:
            if not self.conn.poll(timeout) or self.conn.recv() != "ready":
                raise OSError(f"worker did not start within {timeout:g}s")
            self.ready = True

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        self.conn.close()


class TimeoutPool:
    """`imap_unordered` with a per-item timeout. `fn_path` is 'module:function', called
    as fn(*args, options) in a worker. One caller at a time; see `borrow_pool`."""

    def __init__(self, fn_path: str, options: Any, workers: int = 1, timeout_s: float = 30.0,
                 max_items_per_worker: int = 2000, warmup: tuple | None = None):
        self.fn_path, self.options, self.warmup = fn_path, options, warmup
        self.n, self.timeout_s, self.max_items = workers, timeout_s, max_items_per_worker
        self.idle: list[_Worker] = []
        self.restarts = 0

    def imap_unordered(self, items: Iterable[tuple[Any, tuple]]) -> Iterator[tuple[Any, Any]]:
        """Yield (key, result or ItemFailed) as items finish. At most one item per worker is
        in flight and one more per worker prepared, so memory stays flat whatever the input."""
        it = iter(items)
        self.start()
        idle, busy = self.idle, {}
        ready: deque = deque()  # items prepared while workers are busy: the parent's reading and
        exhausted = False        # decoding overlaps the workers' parsing instead of alternating
        try:
            while True:
                while idle and (ready or not exhausted):
                    nxt = ready.popleft() if ready else next(it, None)
                    if nxt is None:
                        exhausted = True
                        break
                    w = idle.pop()
                    try:
                        w.wait_ready()
                        w.key, w.deadline = nxt[0], time.monotonic() + self.timeout_s
                        w.conn.send(nxt)
                    except (OSError, EOFError) as e:  # worker died while idle: report the item, replace it
                        w.kill()
                        idle.append(self._replace())
                        yield nxt[0], ItemFailed("worker error", f"worker unavailable: {e}")
                        continue
                    busy[w.conn] = w
                if busy and not exhausted and len(ready) < self.n:
                    nxt = next(it, None)
                    if nxt is None:
                        exhausted = True
                    else:
                        ready.append(nxt)
                    if not wait(list(busy), timeout=0) and not exhausted and len(ready) < self.n:
                        continue  # nothing finished yet: prepare another item
                if not busy:
                    if ready:
                        continue
                    return
                timeout = max(0.0, min(w.deadline for w in busy.values()) - time.monotonic())
                for conn in wait(list(busy), timeout=timeout):
                    w = busy.pop(conn)
                    try:
                        key, result = conn.recv()
                    except (EOFError, OSError):  # the worker died (segfault, OOM kill)
                        key, result = w.key, ItemFailed("worker error", f"worker exited with {w.proc.poll()}")
                        w.kill()
                        w = self._replace()
                    else:
                        w.done += 1
                        if w.done >= self.max_items:  # bound memory growth of long-lived workers
                            w.stop()
                            w = self._replace()
                    idle.append(w)
                    yield key, result
                now = time.monotonic()
                for conn, w in list(busy.items()):
                    if now >= w.deadline:
                        del busy[conn]
                        w.kill()
                        idle.append(self._replace())
                        yield w.key, ItemFailed("timeout", f"over {self.timeout_s:g}s")
        finally:
            for w in busy.values():  # abandoned mid-item (caller stopped early): results unknown
                w.kill()
            while len(idle) > self.n:
                idle.pop().stop()

    def start(self) -> None:
        """Spawn the missing workers without waiting for them: they import and warm up meanwhile."""
        while len(self.idle) < self.n:
            self.idle.append(_Worker(self.fn_path, self.options, self.warmup))

    def _replace(self) -> _Worker:
        self.restarts += 1
        return _Worker(self.fn_path, self.options, self.warmup)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().stop()


_lock = threading.Lock()
_free: dict[str, list[TimeoutPool]] = {}


def _key(fn_path: str, options: Any, workers: int, timeout_s: float, max_items_per_worker: int) -> str:
    return json.dumps([fn_path, options, workers, timeout_s, max_items_per_worker], sort_keys=True, default=str)


def prestart(fn_path: str, options: Any, workers: int, timeout_s: float,
             max_items_per_worker: int = 2000, warmup: tuple | None = None) -> None:
    """Start the pool that the next `borrow_pool` with these arguments will get, and return at once:
    its workers import and warm up while the caller does something else (Prefect's API start)."""
    pool = TimeoutPool(fn_path, options, workers, timeout_s, max_items_per_worker, warmup)
    pool.start()
    with _lock:
        _free.setdefault(_key(fn_path, options, workers, timeout_s, max_items_per_worker), []).append(pool)


@contextmanager
def borrow_pool(fn_path: str, options: Any, workers: int, timeout_s: float,
                max_items_per_worker: int = 2000, warmup: tuple | None = None) -> Iterator[TimeoutPool]:
    """A warm pool for exclusive use; returned for reuse by the next shard."""
    key = _key(fn_path, options, workers, timeout_s, max_items_per_worker)
    with _lock:
        pool = _free.get(key, []).pop() if _free.get(key) else None
    pool = pool or TimeoutPool(fn_path, options, workers, timeout_s, max_items_per_worker, warmup)
    try:
        yield pool
    except BaseException:
        pool.close()
        raise
    with _lock:
        _free.setdefault(key, []).append(pool)


@atexit.register
def close_all() -> None:
    """Stop every idle pool (borrowed ones are left to their borrower)."""
    with _lock:
        pools = [p for ps in _free.values() for p in ps]
        _free.clear()
    for p in pools:
        p.close()


if __name__ == "__main__":
    # run from the importable module, so pickled classes (ItemFailed) resolve in the parent
    from tasks.workers import _worker_main as main

    main(int(sys.argv[1]), sys.argv[2])
