"""Model files of the NumPy selection methods: one .npz each, tagged with its method, written
atomically (a killed run leaves no half model) and loaded once per (path, mtime, size)."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np


def save_model(path, method: str, **arrays) -> int:
    """Write arrays + the method tag to `path` (temporary file, then rename); return its size."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:   # a file object: np.savez would append .npz to a bare name
            np.savez_compressed(f, method=np.array(method), **arrays)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out.stat().st_size


def method_of(path) -> str:
    """'fasttext' for a fastText .bin, else the tag inside the .npz."""
    p = Path(path)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":   # not a zip: a fastText binary
        return "fasttext"
    return str(_load(str(p.resolve()), *_stamp(p))["method"])


def load_model(path, method: str) -> dict:
    p = Path(path)
    m = _load(str(p.resolve()), *_stamp(p))
    if str(m["method"]) != method:
        raise ValueError(f"{p}: a {m['method']} model, not {method}")
    return m


def _stamp(p: Path) -> tuple[int, int]:
    st = os.stat(p)
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=8)
def _load(path: str, _mtime_ns: int, _size: int) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
