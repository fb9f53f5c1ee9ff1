"""Hand freed heap back to the operating system between phases of a run.

The flow process allocates from many threads (Prefect's task threads, the API client, Rust
pools), so glibc keeps one arena per thread, each holding the free space a phase left behind.
A run's peak is then the sum of every phase's leftovers: trimming after each phase cut the
flow process's resident memory by 60-110 MiB on bench/e2e.py's 4x corpus.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, macOS): nothing to trim
        return None


def release() -> bool:
    """malloc_trim(0) where glibc has it; True when memory was returned."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
