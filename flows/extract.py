"""The extract flow: every input shard (WARC/WET file, or a folder of HTML) to
docs/ and rejected/ Parquet, one cached Prefect task per shard."""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from core.redact import install as install_redaction
from core import faults
from flows import progress
from flows.caching import input_fingerprint, map_shards, placed, shard_cache_key
from core.config import ExtractConfig, RefineryConfig
from core.guard import confine
from flows.runners import task_runner_for, with_concurrency  # noqa: F401 - the CLI's and serve's import
from core.retry import retry_options
from tasks.extract import extract_shard, shard_inputs
from tasks.workers import close_all as close_idle_pools
from core.io import exclusive_dir, write_text_atomic


def shard_name(path: Path, sha: str) -> str:
    """Readable and collision-free: the file's stem plus the start of its content hash."""
    stem = re.sub(r"\.(warc|wet|arc)?(\.gz)?$|\.(txt|html?)$", "", path.name, flags=re.I)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "shard"
    return f"{stem[:60]}-{sha[:10]}"


@task(name="extract-shard", cache_key_fn=shard_cache_key, persist_result=True)
@placed
def extract_shard_task(input_path: str, input_sha256: str, out_dir: str, shard_name: str,
                       config: ExtractConfig) -> dict:
    log = get_run_logger()
    faults.maybe_fail("extract-shard")
    result = asdict(extract_shard(input_path, out_dir, shard_name, config,
                                  on_progress=progress.reporter(Path(input_path).name)))
    result["outputs"] = [result["docs_path"], result["rejected_path"]]
    log.info("%s: %d pages -> %d docs, %d rejected %s in %.1fs", Path(input_path).name, result["pages"],
             result["docs"], result["rejected"], result["rejected_by_reason"], result["seconds"])
    return result


def run_extract(inputs: list[str], out_dir: str, config: RefineryConfig) -> dict:
    """Body of the flow, callable from other flows."""
    # one writer per folder; a killed run's half-written files are swept, never counted as output
    with exclusive_dir(out_dir):
        return _extract(inputs, Path(out_dir), config)


def _extract(inputs: list[str], out: Path, config: RefineryConfig) -> dict:
    log = get_run_logger()
    shards = shard_inputs(inputs)
    log.info("extract: %d shards from %d inputs", len(shards), len(inputs))
    runner = config.runner
    progress = create_progress_artifact(0.0, key="extract-progress", description="shards extracted (%)")
    args = []
    for p in shards:
        sha = input_fingerprint(p)
        args.append((str(p), sha, str(out), shard_name(p, sha), config.extract))
    results = map_shards(extract_shard_task, args, **retry_options(runner),
                         on_result=lambda i, n: update_progress_artifact(progress, 100.0 * i / n))
    # the stage is over: its idle parser processes (~120 MiB each) would otherwise sit beside
    # curation and tokenizer training, the run's memory peak
    close_idle_pools()
    summary = summarize(results)
    write_text_atomic(json.dumps(summary, indent=2), out / "extract_summary.json")
    create_table_artifact(key="extract-counts", table=count_table(results, summary),
                          description="Extraction: pages in, documents out, rejections by reason, per shard")
    return summary


def count_table(results: list[dict], summary: dict) -> list[dict]:
    reasons = list(summary["rejected_by_reason"])
    rows = [(Path(r["input"]).name, r) for r in results] + [("TOTAL", summary)]
    return [{"shard": name, "pages": r["pages"], "docs": r["docs"], "rejected": r["rejected"],
             **{f"rejected: {k}": r["rejected_by_reason"].get(k, 0) for k in reasons}} for name, r in rows]


def summarize(results: list[dict]) -> dict:
    def total(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in results:
            for k, v in (r.get(key) or {}).items():
                out[k] = out.get(k, 0) + v
        return dict(sorted(out.items()))

    # repaired pages were kept (bad bytes replaced, a wrong charset label overridden): counted, not lost
    return {"shards": results, "pages": sum(r["pages"] for r in results), "docs": sum(r["docs"] for r in results),
            "rejected": sum(r["rejected"] for r in results), "rejected_by_reason": total("rejected_by_reason"),
            "repaired_by_reason": total("repaired_by_reason")}


@flow(name="extract", log_prints=True)
def extract_flow(inputs: list[str], out_dir: str, config: RefineryConfig | None = None) -> dict:
    install_redaction()    # a served run runs in a process of its own: scrub its logs from the start
    cfg = config or RefineryConfig()
    confine(writes={"out_dir": out_dir}, reads={"inputs": inputs}, config=cfg)
    return run_extract(inputs, out_dir, cfg)
