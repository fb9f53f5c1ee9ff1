"""bench/e2e.py's child processes, one per measured run: ours (the real flow bodies in one Prefect
flow, map phases timed) and DataTrove (five LocalPipelineExecutors, the steps of bench/curate.py).
Each prints one JSON line (marks, phases, counts) that the parent reads."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from datatrove_settings import minhash_config, rule_filters, trafilatura_step


# ---- ours (child process) -------------------------------------------------------------------

def child_ours(args) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    t_import = time.time()
    from prefect import flow

    import flows.curate
    import flows.extract
    import flows.shard
    from core.config import load_config
    from flows.runners import with_concurrency

    out = Path(args.out)
    if args.variant == "warmup":  # migrates PREFECT_HOME's database, before anything is timed
        with_concurrency(flow(name="bench-e2e-warmup")(lambda: 1), load_config())()
        print(json.dumps({"warmup": True}))
        return
    # cold runs: every task computes (runner.refresh_cache), as a first run on new data does; the second
    # run ("warm") goes into a new folder on the same corpus and takes what it can from cache
    sets = [f"extract.workers={args.workers}"] + (["runner.refresh_cache=true"] if args.variant != "warm" else [])
    if args.variant == "dask":
        sets = ["extract.workers=1", "runner.kind=dask", f"runner.dask_workers={args.workers}", "runner.refresh_cache=true"]
    if args.variant == "nometa":
        sets.append("extract.metadata=none")
    if args.train_steps:
        sets += [f"train.max_steps={args.train_steps}", "train.seq_len=128", "train.val_every=1000",
                 f"train.checkpoint_every={args.train_steps}", "train.export=false"]
    cfg = load_config(None, sets)

    phases: list[dict] = []  # every map_shards call: task name, start, end, tasks

    def timed(orig):
        def wrapper(task, arg_lists, *a, **kw):
            t0 = time.time()
            try:
                return orig(task, arg_lists, *a, **kw)
            finally:
                phases.append({"name": task.name, "start": t0, "end": time.time(), "tasks": len(arg_lists)})
        return wrapper

    for mod in (flows.extract, flows.curate, flows.shard):
        mod.map_shards = timed(mod.map_shards)

    marks: dict[str, list[float]] = {}
    counts: dict = {}

    @flow(name="bench-e2e")
    def e2e() -> str:
        from prefect.runtime import flow_run

        marks["flow body"] = [time.time()]
        t = time.time()
        ex = flows.extract.run_extract([args.corpus], str(out / "extract"), cfg)
        marks["extract"] = [t, time.time()]
        counts.update(pages=ex["pages"], docs=ex["docs"], rejected=ex["rejected"])
        t = time.time()
        funnel = flows.curate.run_curate([str(out / "extract")], str(out / "curate"), cfg)
        marks["curate"] = [t, time.time()]
        counts.update(after_rules=funnel.stage("fineweb").docs_out, dedup_dropped=sum(funnel.stage("dedup").drops.values()),
                      dedup_by_reason=funnel.stage("dedup").drops, kept=funnel.kept.docs)
        t = time.time()
        manifest = flows.shard.run_shard(str(out / "curate"), str(out / "shard"), cfg)
        marks["shard"] = [t, time.time()]
        counts.update(train_tokens=manifest.split("train").tokens)
        if args.train_steps:
            from flows.train import run_train

            t = time.time()
            tr = run_train(str(out / "shard"), str(out / "train"), cfg)
            marks["train"] = [t, time.time()]
            counts.update(train_steps=tr.steps, train_tokens_seen=tr.tokens_seen)
        return str(flow_run.id)

    if cfg.runner.kind == "threads":   # as `refinery run` does (flows/cli.py), before the API starts
        from tasks.extract import prestart_workers

        prestart_workers(cfg.extract)
    run_id = with_concurrency(e2e, cfg)()
    t_end = time.time()
    cached = count_cached(run_id)
    if cached and args.variant != "warm":
        sys.exit(f"{cached} task runs were served from cache: the measurement would not compute")
    print(json.dumps({"import_start": t_import, "end": t_end, "marks": marks, "phases": phases, "counts": counts,
                      "cached": cached}))


def count_cached(run_id: str) -> int:
    """Task runs of this flow run that ended Cached (expected 0: every output folder is new)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    cached, offset = 0, 0
    with get_client(sync_client=True) as c:
        while True:
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])), limit=200,
                                    offset=offset)
            cached += sum(1 for r in runs if r.state is not None and r.state.name == "Cached")
            if len(runs) < 200:
                return cached
            offset += 200


# ---- DataTrove (child process) --------------------------------------------------------------

def _dt_langid(doc) -> bool:
    from core.config import CurateConfig
    from tasks.langid import identify, keep_language

    cfg = CurateConfig().langid
    lang, score = identify([doc.text], cfg)[0]
    return keep_language(lang, score, cfg)


def child_datatrove(args) -> None:
    t_import = time.time()
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                                  MinhashDedupSignature)
    from datatrove.pipeline.filters import LambdaFilter
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    mh = minhash_config()
    out, w = Path(args.out), args.workers
    n_files = len(list(Path(args.corpus).glob("*.warc.gz")))
    rules = [
        LambdaFilter(_dt_langid),  # stands in for LanguageFilter (its fastText model is a run-time download)
        *rule_filters(),  # bench/datatrove_settings.py: the same steps and thresholds as bench/curate.py
    ]
    logs = out / "logs"
    executors = {
        "extract": LocalPipelineExecutor(
            [WarcReader(args.corpus, glob_pattern="*.warc.gz"), trafilatura_step(),
             JsonlWriter(str(out / "extracted"))],
            tasks=n_files, workers=w, logging_dir=str(logs / "extract")),
        "filter": LocalPipelineExecutor(
            [JsonlReader(str(out / "extracted")), *rules, JsonlWriter(str(out / "filtered")),
             MinhashDedupSignature(str(out / "signatures"), config=mh)],
            tasks=n_files, workers=w, logging_dir=str(logs / "filter")),
        "buckets": LocalPipelineExecutor([MinhashDedupBuckets(str(out / "signatures"), str(out / "buckets"), config=mh)],
                                         tasks=mh.num_buckets, workers=w, logging_dir=str(logs / "buckets")),
        "cluster": LocalPipelineExecutor([MinhashDedupCluster(str(out / "buckets"), str(out / "remove_ids"), config=mh)],
                                         tasks=1, workers=1, logging_dir=str(logs / "cluster")),
        "dedup_filter": LocalPipelineExecutor(
            [JsonlReader(str(out / "filtered")), MinhashDedupFilter(str(out / "remove_ids")),
             JsonlWriter(str(out / "deduped"))],
            tasks=n_files, workers=w, logging_dir=str(logs / "dedup_filter")),
    }
    marks = {"flow body": [time.time()]}
    for name, ex in executors.items():
        t = time.time()
        ex.run()
        marks[name] = [t, time.time()]
    t_end = time.time()

    def stats(name):
        return json.loads((logs / name / "stats.json").read_text())

    fwd = lambda step: step["stats"].get("forwarded", 0)  # noqa: E731
    s_ex, s_fi, s_dd = stats("extract"), stats("filter"), stats("dedup_filter")
    # stats.json lists the steps in order: [reader, *rules, writer, signature] for the filter executor
    counts = {"docs": fwd(s_ex[1]), "after_rules": fwd(s_fi[len(rules)]), "kept": fwd(s_dd[1]),
              "dedup_dropped": fwd(s_fi[len(rules)]) - fwd(s_dd[1])}
    print(json.dumps({"import_start": t_import, "end": t_end, "marks": marks, "phases": [], "counts": counts}))
