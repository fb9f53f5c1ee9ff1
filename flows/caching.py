"""Cache keys for shard tasks: (input content, stage config, code).

Prefect's default policy keys on the run id, so nothing survives a rerun. Ours keys on
what determines a shard's output: the input file's sha256, the stage config, the output
location, and a hash of the source of the packages that compute it. Change any of
them and the shard is recomputed; change none and a rerun finishes from cache.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from core.io import file_sha256

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
    """cache_key_fn for tasks whose parameters carry `input_sha256`, `config` and `out_dir`."""
    cfg = parameters.get("config")
    cfg_json = cfg.model_dump_json() if hasattr(cfg, "model_dump_json") else repr(cfg)
    parts = [context.task.name, parameters["input_sha256"], cfg_json,
             str(Path(parameters["out_dir"]).resolve()), parameters.get("shard_name", ""),
             code_version("core", "tasks", "flows")]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def content_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """cache_key_fn for tasks whose output does not depend on where it is written (the classifiers):
    (input content, config, code), not the output folder. A run into a new folder reuses the result
    of another folder's run and copies its files in (`adopt`)."""
    cfg = parameters.get("config")
    cfg_json = cfg.model_dump_json() if hasattr(cfg, "model_dump_json") else repr(cfg)
    parts = [context.task.name, parameters["input_sha256"], cfg_json, code_version("core", "tasks", "flows")]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def adopt(result: dict, folder: Path) -> dict:
    """A result whose files (`path`, `outputs`) lie in another run's folder, copied into `folder` (hard
    links where the filesystem allows, each placed atomically) and pointed at the copies."""
    import os
    import shutil

    from core.io import atomic_path

    old, folder = Path(result["path"]).parent, Path(folder)
    if old.resolve() == folder.resolve():
        return result
    for f in result.get("outputs", []):
        src = Path(f)
        with atomic_path(folder / src.relative_to(old)) as tmp:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)

    def move(v):
        if isinstance(v, str) and v.startswith(str(old) + os.sep):
            return str(folder / Path(v).relative_to(old))
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
    futures = [t.submit(*args) for args in arg_lists]
    results, cached = [], 0
    for args, fut in zip(arg_lists, futures):
        r = fut.result()
        if not outputs_present(r):
            r = t.with_options(refresh_cache=True)(*args)
        elif fut.state.name == "Cached":
            cached += 1
        results.append(r)
        if on_result:
            on_result(len(results), len(arg_lists))
        faults.maybe_kill(task.name)   # chaos drills: die with this shard done, the next ones not
    get_run_logger().info("%s: %d task runs, %d from cache, %d computed", task.name, len(arg_lists), cached,
                          len(arg_lists) - cached)
    return results
