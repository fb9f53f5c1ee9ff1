"""The data stages on Dask (runner.kind: dask) give the same outputs as the default thread runner.

extract -> curate -> shard on two real WARC shards, once with threads and once on a LocalCluster
of 2 worker processes, into two output folders, against a real Prefect API. Every output file
is compared: byte for byte, except the JSON reports, compared after dropping wall-clock timings
and the run's own folder name (they record absolute paths).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from prefect import flow

ROOT = Path(__file__).resolve().parent.parent
INPUTS = [str(ROOT / "sample" / "warc" / f"dolma-sample-000{i}.warc.gz") for i in (0, 1)]
# small and quick: a 2-shard corpus, a short reference, small fastText models, a small vocabulary
TREE = {"curate": {"quality": {"target_keep_ratio": 0.3, "bucket": 20000, "epoch": 5,
                               "reference": [str(ROOT / "sample/curation/reference/inaugural")]},
                   "toxicity": {"epoch": 3}},
        "shard": {"vocab_size": 512, "row_group_tokens": 2000}}


def _worker_info(dask_worker) -> dict:
    return {"pid": os.getpid(), "executed": dask_worker.state.executed_count}


@flow(name="data-stages")
def data_stages(inputs: list[str], out_dir: str, config) -> dict:
    """extract (inside curate) -> curate -> shard in one flow run, as `refinery run` chains them."""
    from prefect.context import FlowRunContext

    from flows.curate import run_curate
    from flows.shard import run_shard

    out = Path(out_dir)
    run_curate(inputs, str(out / "curate"), config)
    run_shard(str(out / "curate"), str(out / "shard"), config)
    runner = FlowRunContext.get().task_runner
    workers = None
    if config.runner.kind == "dask":  # what ran where, asked of the cluster before it closes
        workers = list(runner.client.run(_worker_info).values())
    return {"runner": type(runner).__name__, "flow_pid": os.getpid(), "workers": workers}


def _normalized_json(path: Path, run_dir: Path):
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not k.endswith("seconds")}  # wall-clock timings
        return [strip(v) for v in x] if isinstance(x, list) else x

    text = path.read_text().replace(str(run_dir.resolve()), "<RUN>").replace(str(run_dir), "<RUN>")
    return strip(json.loads(text))


def _digests(run_dir: Path) -> dict[str, str]:
    out = {}
    for p in sorted(x for x in run_dir.rglob("*") if x.is_file()):
        rel = p.relative_to(run_dir).as_posix()
        if p.suffix == ".json" and rel != "shard/tokenizer/tokenizer.json":
            data = json.dumps(_normalized_json(p, run_dir), sort_keys=True).encode()
        else:
            data = p.read_bytes()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def _run(cfg, out: Path):
    from flows.extract import with_concurrency
    from tests.test_flows import _task_runs

    f = with_concurrency(data_stages, cfg)
    t0 = time.monotonic()
    state = f(INPUTS, str(out), cfg, return_state=True)
    assert state.is_completed(), state
    runs = _task_runs(state.state_details.flow_run_id)
    return f.task_runner, state.result(), runs, time.monotonic() - t0


def _new_children(before: set[int]) -> list[psutil.Process]:
    """Processes started since `before` and still alive: cluster workers, their extraction pools.
    multiprocessing's resource tracker is one per process, reused, and ends with it: not a leak."""
    left = []
    for c in psutil.Process().children(recursive=True):
        try:
            if (c.pid not in before and c.status() != psutil.STATUS_ZOMBIE
                    and "multiprocessing.resource_tracker" not in " ".join(c.cmdline())):
                left.append(c)
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.fixture(scope="module")
def runs(prefect_api, tmp_path_factory):
    from core.config import RefineryConfig

    assert prefect_api  # the workers' tasks must report to this API, not start servers of their own
    base = tmp_path_factory.mktemp("dask")
    # tasks cache on content, not on the folder: both runs ask for a cold run (runner.refresh_cache), or
    # they would be served from each other's (or another test's) results
    cold = {"refresh_cache": True}
    threads = _run(RefineryConfig.model_validate(TREE | {"runner": cold}), base / "threads")
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    dask = _run(RefineryConfig.model_validate(TREE | {"runner": {"kind": "dask", "dask_workers": 2, **cold}}), base / "dask")
    deadline = time.monotonic() + 30
    while _new_children(before) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftover = [" ".join(p.cmdline())[:120] for p in _new_children(before)]
    return base, threads, dask, leftover


def test_runner_kinds_are_configured(runs):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    _, threads, dask, _ = runs
    assert isinstance(threads[0], ThreadPoolTaskRunner)
    assert isinstance(dask[0], DaskTaskRunner)
    assert dask[0].cluster_class == "distributed.LocalCluster" and dask[0].cluster_kwargs["n_workers"] == 2
    assert threads[1]["runner"] == "ThreadPoolTaskRunner" and dask[1]["runner"] == "RefineryDaskTaskRunner"


def test_dask_tasks_ran_on_two_worker_processes(runs):
    _, _, (_, result, task_runs, seconds), _ = runs
    workers = result["workers"]
    assert len(workers) == 2
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and result["flow_pid"] not in pids and os.getpid() not in pids
    # every task run of the flow run executed on a worker, and both workers took some
    assert sum(w["executed"] for w in workers) == len(task_runs), (workers, len(task_runs))
    assert all(w["executed"] > 0 for w in workers), workers
    print(f"dask run: {seconds:.1f}s, {len(task_runs)} task runs, workers {workers}")


def test_both_runs_computed_and_reported_to_the_same_api(runs):
    _, threads, dask, _ = runs
    names = sorted(r.name.rsplit("-", 1)[0] for r in threads[2])
    assert names and names == sorted(r.name.rsplit("-", 1)[0] for r in dask[2])
    # both runs are cold (runner.refresh_cache): every task computed
    for _, _, task_runs, _ in (threads, dask):
        assert {r.state.name for r in task_runs} == {"Completed"}, [(r.name, r.state.name) for r in task_runs]
    assert {"extract-shard", "curate-filter", "dedup-reduce", "train-quality", "train-toxicity", "curate-score",
            "curate-select", "shard-tokenizer", "shard-tokenize"} <= set(names)


def test_outputs_are_identical(runs):
    base = runs[0]
    a, b = _digests(base / "threads"), _digests(base / "dask")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    # the comparison covered every stage's real outputs
    for rel in ("curate/extract/extract_summary.json", "curate/funnel.json", "curate/bias.json",
                "curate/models/quality.npz", "curate/models/toxicity.bin", "shard/manifest.json",
                "shard/tokenizer/tokenizer.json"):
        assert rel in a, rel
    for d in ("curate/extract/docs", "curate/docs", "curate/rejected", "shard/train", "shard/val"):
        assert any(k.startswith(d + "/") and k.endswith(".parquet") for k in a), d
    manifest = json.loads((base / "dask" / "shard" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] > 0


def test_cluster_shut_down_without_leftover_processes(runs):
    assert runs[3] == []


def test_cli_without_an_api_url_runs_one_prefect_server(tmp_path):
    """`refinery ... --set runner.kind=dask` with no PREFECT_API_URL: the CLI starts a temporary
    Prefect server, and the workers' tasks must use it, not each start a server of their own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), REFINERY_DASK_ADDRESS="")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "extract", str(ROOT / "sample" / "warc" / "warcio-example-trunc.warc"),
         "--out", str(tmp_path / "x"), "--set", "runner.kind=dask", "--set", "runner.dask_workers=1",
         "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    servers: set[tuple[int, int]] = set()
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for c in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "prefect.server.api.server" in " ".join(c.cmdline()):
                        servers.add((c.pid, c.ppid()))
                except psutil.Error:
                    pass
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert proc.returncode == 0, out[-3000:]
    assert json.loads(out[out.index("{"):])["pages"] > 0
    assert [ppid for _, ppid in servers] == [proc.pid], (servers, proc.pid)
