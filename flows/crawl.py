"""The crawl flow: seed URLs to WARC files and a crawl log, politely."""
from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import progress
from core.redact import install as install_redaction
from core.config import CrawlConfig, RefineryConfig
from core.guard import confine
from core.retry import retry_options
from tasks.fetch import crawl


def read_seeds(path: str | Path) -> list[str]:
    """One URL per line; blank lines and #-comments ignored."""
    lines = Path(path).read_text().splitlines()
    return [s for s in (ln.split("#", 1)[0].strip() for ln in lines) if s]


# The web changes, so a crawl is never served from cache; a retried or rerun crawl
# resumes from its own journal instead (tasks/fetch.py) and refetches nothing finished.
@task(name="crawl-seeds", cache_policy=NO_CACHE)
def crawl_task(seeds: list[str], out_dir: str, config: CrawlConfig) -> dict:
    summary = asyncio.run(crawl(seeds, Path(out_dir), config, on_progress=progress.reporter("crawl")))
    get_run_logger().info("crawl: %s", summary)
    return summary


def run_crawl(seeds: list[str], out_dir: str, config: RefineryConfig) -> dict:
    t = crawl_task.with_options(**retry_options(config.runner))
    summary = t(seeds, out_dir, config.crawl)
    log = Path(out_dir) / "crawl_log.parquet"
    if log.is_file():
        outcomes = Counter(pq.read_table(log, columns=["outcome"]).column("outcome").to_pylist())
        create_table_artifact(key="crawl-outcomes", description="Crawl: URLs by outcome",
                              table=[{"outcome": k, "urls": v} for k, v in sorted(outcomes.items())])
    return summary


@flow(name="crawl", log_prints=True)
def crawl_flow(seeds_file: str, out_dir: str, config: RefineryConfig | None = None) -> dict:
    install_redaction()    # a served run runs in a process of its own: scrub its logs from the start
    cfg = config or RefineryConfig()
    confine(writes={"out_dir": out_dir}, reads={"seeds_file": seeds_file}, config=cfg)
    return run_crawl(read_seeds(seeds_file), out_dir, cfg)
