"""`refinery run`: the end-to-end job on the bundled real sample.

Today it goes crawl -> extract -> curate -> shard; training joins when it lands.
The crawl half is a demo of the real crawler: the bundled pages are served from
sample/pages.warc.gz on 127.0.0.1 (so private hosts are allowed for this run only),
crawled politely into WARC, then extracted together with the bundled real WARCs.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.config import RefineryConfig
from flows.crawl import run_crawl
from flows.curate import run_curate
from flows.extract import run_extract
from flows.shard import run_shard
from tasks.serve_warc import serve_pages

SAMPLE = Path(__file__).resolve().parent.parent / "sample"


@flow(name="refinery-run", log_prints=True)
def run_flow(out_dir: str = "runs/sample", inputs: list[str] | None = None, crawl_demo: bool = True,
             config: RefineryConfig | None = None) -> dict:
    cfg = config or RefineryConfig()
    log = get_run_logger()
    out = Path(out_dir)
    inputs = list(inputs or [str(SAMPLE / "warc")])
    crawl = None
    if crawl_demo:
        # our own loopback server: private hosts allowed, and a short delay keeps the demo quick
        demo_crawl = cfg.crawl.model_copy(update={"allow_private_hosts": True,
                                                  "per_host_delay_s": min(cfg.crawl.per_host_delay_s, 0.2)})
        demo_cfg = cfg.model_copy(update={"crawl": demo_crawl})
        with serve_pages(str(SAMPLE / "pages.warc.gz")) as (base, urls):
            log.info("crawl demo: serving %d bundled pages at %s (loopback only)", len(urls), base)
            crawl = run_crawl(urls + [f"{base}/private/never-fetched.html"], str(out / "crawl"), demo_cfg)
        inputs.append(str(out / "crawl" / "warc"))
    extract = run_extract(inputs, str(out / "extract"), cfg)
    funnel = run_curate([str(out / "extract")], str(out / "curate"), cfg)
    manifest = run_shard(str(out / "curate"), str(out / "shard"), cfg)
    log.info("done: %d pages -> %d documents -> kept %d (%.2f%% of tokens) -> %d training tokens in %s",
             extract["pages"], extract["docs"], funnel["kept"]["docs"], 100 * funnel["kept_token_ratio"],
             manifest["splits"]["train"]["tokens"], out / "shard")
    return {"crawl": crawl, "extract": {k: v for k, v in extract.items() if k != "shards"},
            "curate": {k: funnel[k] for k in ("extracted", "kept", "kept_token_ratio", "target_keep_ratio")},
            "shard": {"vocab_size": manifest["tokenizer"]["vocab_size"],
                      **{s: {k: v[k] for k in ("docs", "tokens")} for s, v in manifest["splits"].items()}}}
