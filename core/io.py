"""Atomic file writes and content hashes: the two things every stage relies on.

A killed run must never leave a half-written file under its final name, so every
writer goes through `atomic_path`: write to a hidden temporary beside the target,
fsync, then rename (atomic on POSIX within one filesystem). What a killed run leaves
are temporaries (`is_temporary`); a stage deletes them when it starts, and only while
it holds its output folder's lock (`exclusive_dir`), so it never deletes the
temporaries of a run that is still writing.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(table: pa.Table, path: str | Path, **kwargs) -> Path:
    kwargs.setdefault("compression", "zstd")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def write_text_atomic(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


class DirectoryBusy(RuntimeError):
    """Another process is writing to this output folder."""


@contextlib.contextmanager
def exclusive_dir(directory: str | Path) -> Iterator[Path]:
    """Hold `directory` (created if missing) for one writer, then sweep the temporaries a killed
    run left in it. Two runs writing one folder would race on the same outputs (and each would
    take the other's temporaries for a dead run's), so the second fails at once, naming the
    folder. The lock is flock(2) on the folder itself: no lock file, released by the kernel when
    its holder exits, even on SIGKILL, so a killed run never leaves the folder locked.
    Nested folders of concurrent runs are not protected from each other (the sweep descends)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryBusy(f"{d}: another run is writing to this folder; wait for it to finish "
                                "or choose another output folder") from None
        remove_stale_temporaries(d)
        yield d
    finally:
        os.close(fd)  # releases the lock


def is_temporary(name: str) -> bool:
    """Ours (`.tmp-*`), and the hidden `.NAME.tmp` / `.NAME.tmp.EXT` / `.NAME.PID.tmp` that the
    fastText trainer and the model export stage their files under."""
    return name.startswith(TMP_PREFIX) or (name.startswith(".") and (name.endswith(".tmp") or ".tmp." in name))


def remove_stale_temporaries(directory: str | Path) -> int:
    """Delete temporaries a killed run left behind; returns how many. Call it only with the folder
    held (`exclusive_dir`): a live run's temporaries look the same."""
    n = 0
    d = Path(directory)
    if d.is_dir():
        for p in sorted((p for p in d.rglob(".*") if is_temporary(p.name)), reverse=True):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)  # a staged folder (e.g. a tokenizer being saved)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir(kind: str) -> Path:
    """A folder for what a run can rebuild but should not have to (derived artifacts keyed by their
    inputs' content): $REFINERY_CACHE/kind, default ~/.cache/llm-refinery/kind."""
    root = os.environ.get("REFINERY_CACHE") or Path.home() / ".cache" / "llm-refinery"
    return Path(root) / kind
