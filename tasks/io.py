"""Atomic file writes and content hashes: the two things every stage relies on.

A killed run must never leave a half-written file under its final name, so every
writer goes through `atomic_path`: write to a hidden temporary beside the target,
fsync, then rename (atomic on POSIX within one filesystem).
"""
from __future__ import annotations

import contextlib
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


def remove_stale_temporaries(directory: str | Path) -> int:
    """Delete temporaries a killed run left behind; returns how many."""
    n = 0
    d = Path(directory)
    if d.is_dir():
        for p in sorted(d.rglob(f"{TMP_PREFIX}*"), reverse=True):
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
