"""Data roots: where API-triggered runs may read and write.

A served deployment takes its paths from whoever can reach the API. `deployments/serve.py` sets
REFINERY_DATA_ROOTS (from `serve.data_roots`), and every flow checks its path parameters and the
path fields of its config against it before it touches anything. A path is allowed when it
resolves, symlinks and `..` included, to a root or below one. The bundled `sample/` and the bias
groups file are readable too, because the defaults use them. Without the variable, as on the
command line, paths are the user's own business and nothing is checked.

A folder inside a root may hold a symlink to a file outside it: `files_under` lists a folder's files
for the steps that read folders (extraction inputs, reference text, evaluation sets) and refuses the
run on such a file, before it is read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from core.config import PATH_FIELDS  # the config fields that name files a run reads

ENV = "REFINERY_DATA_ROOTS"
REPO = Path(__file__).resolve().parent.parent
ALSO_READABLE = (REPO / "sample", REPO / "tasks" / "bias_groups.yaml")


class PathNotAllowed(PermissionError):
    """A path outside the data roots of this server."""


def roots() -> list[Path]:
    return [Path(r).resolve() for r in os.environ.get(ENV, "").split(os.pathsep) if r]


def _inside(p: Path, allowed: list[Path]) -> bool:
    return any(p == r or r in p.parents for r in allowed)


def _check(name: str, value: str, allowed: list[Path]) -> None:
    shown = value if len(value) <= 200 else value[:200] + "..."
    try:
        p = Path(value).resolve()
    except (ValueError, OSError, RuntimeError) as e:   # a NUL byte, a symlink loop: nothing we could confine
        raise PathNotAllowed(f"{name}={shown!r} is not a usable path ({e}); served runs may only use "
                             f"paths under the data roots ({', '.join(map(str, roots()))}; serve.data_roots)") from None
    if not _inside(p, allowed):
        raise PathNotAllowed(f"{name}={shown!r} resolves to {str(p)[:300]}, outside the data roots of this server "
                             f"({', '.join(map(str, roots()))}; serve.data_roots)")


def _config_reads(node, prefix: str = "config") -> list[tuple[str, str]]:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in PATH_FIELDS and v:
                found += [(f"{prefix}.{k}", x) for x in (v if isinstance(v, list) else [v])]
            else:
                found += _config_reads(v, f"{prefix}.{k}")
    return found


def confine(writes: dict | None = None, reads: dict | None = None, config=None) -> None:
    """Raise PathNotAllowed unless every written path is under a data root and every read path is
    under a root or a bundled read-only location. A no-op when no roots are set."""
    allowed = roots()
    if not allowed:
        return
    readable = allowed + [p.resolve() for p in ALSO_READABLE]
    for name, value in (writes or {}).items():
        for v in (value if isinstance(value, list) else [value]):
            if v is not None:
                _check(name, str(v), allowed)
    for name, value in (reads or {}).items():
        for v in (value if isinstance(value, list) else [value]):
            if v is not None:
                _check(name, str(v), readable)
    if config is not None:
        for name, v in _config_reads(config.model_dump(mode="json")):
            _check(name, str(v), readable)


def files_under(folder: str | Path, keep: Callable[[Path], bool] = lambda f: True) -> list[Path]:
    """The files below `folder` (sorted; subfolders included, symlinked folders not entered) that pass
    `keep`. On a server, one that resolves outside the data roots and the bundled readable files
    raises PathNotAllowed naming it: a symlink must not carry a run's reads out of its roots."""
    folder = Path(folder)
    files = sorted(f for f in folder.rglob("*") if f.is_file() and keep(f))
    allowed = roots()
    if allowed:
        readable = allowed + [p.resolve() for p in ALSO_READABLE]
        for f in files:
            _check(f"a file in {folder}", str(f), readable)
    return files
