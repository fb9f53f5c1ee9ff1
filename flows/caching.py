"""Cache keys for shard tasks: (input content, stage config, code), never the output folder.

Prefect's default policy keys on the run id, so nothing survives a rerun. Ours keys on
what determines a shard's output: the input's sha256, the stage config, the shard name and
a hash of the source of the packages that compute it. Change any of them and the shard is
recomputed; change none and a rerun finishes from cache, also a run into a new folder:
`map_shards` links the cached result's files from the folder they were written to
(`relocate`), so every run folder stays complete and self-contained.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
from functools import lru_cache
from pathlib import Path
from typing import Any

from core.io import file_sha256
from core.memory import release as release_memory

ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=None)
def code_version(*packages: str) -> str:
    h = hashlib.sha256()
    for pkg in packages:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            h.update(p.relative_to(ROOT).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def input_fingerprint(path: str | Path) -> str:
    """sha256 of a file, or of a directory's (relative name, sha256) list."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def shard_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """cache_key_fn for tasks whose parameters carry `input_sha256` and `config` (and an `out_dir`, which
    is left out: where a result is written does not change it)."""
    cfg = parameters.get("config")
    cfg_json = cfg.model_dump_json() if hasattr(cfg, "model_dump_json") else repr(cfg)
    parts = [context.task.name, parameters["input_sha256"], cfg_json, parameters.get("shard_name", ""),
             code_version("core", "tasks", "flows")]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def placed(fn):
    """Task results record the folder they were written to (`out_dir`), so that a run into another
    folder can take them from cache and link their files over (`relocate`)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        result["out_dir"] = str(Path(sig.bind(*args, **kwargs).arguments["out_dir"]).resolve())
        return result
    return wrapper


def relocate(result: dict, out_dir: str | Path) -> dict:
    """A result whose files (`outputs`) lie in another run's folder, linked into `out_dir` (hard links
    where the filesystem allows, else copies; each placed atomically) and every path in it pointed at
    the links. Later writes replace files by rename, so a link never lets one run change another's."""
    import os
    import shutil

    from core.io import atomic_path

    new = Path(out_dir).resolve()
    if "out_dir" not in result or Path(result["out_dir"]) == new:
        return result
    old = Path(result["out_dir"])
    for f in result.get("outputs", []):
        src = Path(f)
        dst = new / src.relative_to(old)
        if dst.is_file() and os.path.samefile(src, dst):
            continue
        with atomic_path(dst) as tmp:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)

    def move(v):
        if isinstance(v, str) and (v == str(old) or v.startswith(str(old) + os.sep)):
            return str(new / Path(v).relative_to(old))
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        return v

    return move(result)


def outputs_present(result: dict) -> bool:
    """A cached result is only as good as its files: all of `result['outputs']` must exist."""
    return all(Path(p).is_file() for p in result.get("outputs", []))


def map_shards(task, arg_lists: list[tuple], on_result=None, **options) -> list[dict]:
    """Submit one task run per argument tuple and gather results in order. A result served
    from cache whose output files are gone (a deleted output folder) is recomputed. Logs how
    many runs came from cache: after a killed run, the rerun's log shows what it did not redo."""
    from prefect import get_run_logger

    from core import faults

    t = task.with_options(**options)
    sig = inspect.signature(task.fn)
    futures = [t.submit(*args) for args in arg_lists]
    results, cached = [], 0
    for args, fut in zip(arg_lists, futures):
        r = fut.result()
        if not outputs_present(r):
            r = t.with_options(refresh_cache=True)(*args)
        elif fut.state.name == "Cached":
            cached += 1
        out_dir = sig.bind(*args).arguments.get("out_dir")
        results.append(relocate(r, out_dir) if out_dir else r)
        if on_result:
            on_result(len(results), len(arg_lists))
        faults.maybe_kill(task.name)   # chaos drills: die with this shard done, the next ones not
    get_run_logger().info("%s: %d task runs, %d from cache, %d computed", task.name, len(arg_lists), cached,
                          len(arg_lists) - cached)
    release_memory()   # a phase is over: its freed heap would otherwise add to the next phase's peak
    return results
