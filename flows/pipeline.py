"""`refinery run`: the end-to-end job on the bundled real sample.

crawl -> extract -> curate -> shard -> train (a tiny decoder, exported in Hugging Face format).
The crawl half is a demo of the real crawler: the bundled pages are served from
sample/pages.warc.gz on 127.0.0.1 (so private hosts are allowed for this run only),
crawled politely into WARC, then extracted together with the bundled real WARCs.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from core.redact import install as install_redaction
from core.config import RefineryConfig
from core.guard import confine
from flows.crawl import run_crawl
from flows.curate import run_curate
from flows.extract import run_extract
from flows.shard import run_shard
from flows.train import run_train
from tasks.serve_warc import serve_pages

SAMPLE = Path(__file__).resolve().parent.parent / "sample"


@flow(name="data-to-model", log_prints=True)
def data_to_model(out_dir: str = "runs/sample", inputs: list[str] | None = None, crawl_demo: bool = True,
             config: RefineryConfig | None = None) -> dict:
    install_redaction()    # a served run runs in a process of its own: scrub its logs from the start
    cfg = config or RefineryConfig()
    confine(writes={"out_dir": out_dir}, reads={"inputs": inputs}, config=cfg)
    log = get_run_logger()
    out = Path(out_dir)
    inputs_given = bool(inputs)
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
    train_cfg = cfg
    if not inputs_given and cfg.train.max_steps is None and cfg.train.max_tokens is None:
        # the bundled sample keeps a few thousand tokens: one pass would be 1-2 steps, too few to see
        # the loss fall, so the demo makes several passes (your own corpus trains as configured)
        train_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
            "max_steps": 40, "seq_len": min(cfg.train.seq_len, 128), "val_every": 20, "checkpoint_every": 20})})
    trained = run_train(str(out / "shard"), str(out / "train"), train_cfg)
    log.info("done: %d pages -> %d documents -> kept %d (%.2f%% of tokens) -> %d training tokens -> "
             "%s %s, val loss %s, exported to %s", extract["pages"], extract["docs"], funnel.kept.docs,
             100 * funnel.kept_token_ratio, manifest.split("train").tokens, trained.arch,
             trained.preset, trained.val_loss, trained.export)
    return {"crawl": crawl, "extract": {k: v for k, v in extract.items() if k != "shards"},
            "curate": funnel.model_dump(include={"extracted", "kept", "kept_token_ratio", "target_keep_ratio"}),
            "shard": {"vocab_size": manifest.tokenizer.vocab_size,
                      **{s: {"docs": v.docs, "tokens": v.tokens} for s, v in manifest.splits.items()}},
            "train": trained.model_dump(include={"arch", "preset", "params", "steps", "tokens_seen", "first_loss",
                                                 "final_loss", "val_loss_start", "val_loss", "val_ppl", "export"})}


run_flow = data_to_model  # `refinery run` is this flow
