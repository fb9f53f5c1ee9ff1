"""The served deployments against a real `prefect server` on 127.0.0.1: the crawl deployment carries
its schedule, an API-triggered `data-to-model` run on the bundled sample completes with its outputs
and artifacts readable through the REST API, a wrong parameter is refused with 409 and no run, and a
burst of 50 API-triggered runs all end, within the serve process's run limit and the GPU slot."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 3           # serve.limit of the served process: flow runs it runs at once
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def post(url: str, **kw) -> httpx.Response:
    """POST as Prefect's own client does: a busy SQLite-backed server may answer 503 (or 429) for a
    moment; retry those with a backoff, return anything else."""
    for attempt in range(8):
        r = httpx.post(url, timeout=30, **kw)
        if r.status_code not in (429, 502, 503):
            return r
        time.sleep(1 + attempt)
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, procs=()):
    end = time.time() + timeout
    while time.time() < end:
        for p in procs:
            assert p.poll() is None, f"{what}: a process exited with {p.returncode}"
        try:
            v = check()
            if v:
                return v
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


# the deployments serve.py serves: prefect.yaml's list
DEPLOYMENTS = len(yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"])


def server_env(tmp: Path, api: str) -> dict:
    """The environment of a loopback `prefect server` and of the processes that talk to it."""
    return {**os.environ, "PREFECT_HOME": str(tmp / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT)}


def start_server(tmp: Path, log, procs: list) -> tuple[str, dict]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (appended to `procs`),
    healthy -> (api URL, its environment)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = server_env(tmp, api)
    procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True))
    wait_for(lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200, 180, "the Prefect server", procs)
    return api, env


def start_serve(config: Path, env: dict, log, procs: list) -> dict:
    """deployments/serve.py with `config` (appended to `procs`); waits until every deployment is served
    -> {name: deployment}."""
    procs.append(subprocess.Popen([sys.executable, str(ROOT / "deployments" / "serve.py"), "--config", str(config)],
                                  env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    api = env["PREFECT_API_URL"]

    def deployments():
        r = post(f"{api}/deployments/filter", json={}).json()
        return {d["name"]: d for d in r} if len(r) >= DEPLOYMENTS else None

    return wait_for(deployments, 240, "the served deployments", procs)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`prefect server start` on a free loopback port with its own PREFECT_HOME, then serve.py."""
    tmp = tmp_path_factory.mktemp("serve")
    logs = {n: open(tmp / f"{n}.log", "wb") for n in ("server", "serve")}
    procs = []
    try:
        api, env = start_server(tmp, logs["server"], procs)
        cfg = tmp / "refinery.yaml"
        cfg.write_text(json.dumps({"serve": {"crawl_cron": "15 4 * * *", "crawl_seeds": str(tmp / "seeds.txt"),
                                             "crawl_out": str(tmp / "crawl"), "data_roots": [str(tmp / "data")],
                                             "limit": LIMIT}}))
        deps = start_serve(cfg, env, logs["serve"], procs)
        yield {"api": api, "deployments": deps, "tmp": tmp, "procs": procs}
    finally:
        for p in reversed(procs):
            stop(p)
        for f in logs.values():
            f.close()


def test_every_deployment_is_served_and_crawl_is_scheduled(served):
    deps = served["deployments"]
    assert set(deps) >= {"crawl", "extract", "curate", "shard", "train", "finetune", "data-to-model"}
    assert all(d["enforce_parameter_schema"] for d in deps.values())
    crons = [s["schedule"].get("cron") for s in deps["crawl"]["schedules"]]
    assert crons == ["15 4 * * *"]
    assert deps["crawl"]["parameters"]["seeds_file"].endswith("seeds.txt")
    limits = post(f"{served['api']}/v2/concurrency_limits/filter", json={}).json()
    assert any(x["name"] == "refinery-gpu" and x["limit"] == 1 for x in limits)


def test_a_wrong_parameter_is_refused_and_creates_no_run(served):
    """Prefect 3.9's server answers a parameter that breaks the deployment's schema with 409 Conflict
    ("Validation failed for field ..."); FastAPI's 422 is for a body that is not a flow-run request."""
    api, dep = served["api"], served["deployments"]["data-to-model"]

    def runs() -> int:
        return len(post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [dep["id"]]}}}).json())

    before = runs()
    for bad in ({"crawl_demo": "sometimes"}, {"config": {"train": {"preset": "huge"}}},
                {"config": {"crawl": {"concurrency": -3}}}, {"no_such_parameter": 1}):
        r = post(f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": bad})
        assert r.status_code == 409 and "Validation failed" in r.text, (bad, r.status_code, r.text[:500])
    r = post(f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": "not an object"})
    assert r.status_code == 422, r.text[:500]
    assert runs() == before


@pytest.fixture(scope="module")
def sample_run(served):
    """An API-triggered `data-to-model` run on the bundled sample, run to its end: the test below checks
    it, and the burst reuses its curated documents and shards as the tiniest real inputs."""
    api, dep, tmp = served["api"], served["deployments"]["data-to-model"], served["tmp"]
    out = tmp / "data" / "run"
    r = post(f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": {"out_dir": str(out)}})
    assert r.status_code == 201, r.text[:1000]
    run_id = r.json()["id"]

    def finished():
        r = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10)
        if r.status_code != 200:
            return None                     # a busy server's 503: ask again
        state = r.json()["state"]
        return state if state["type"] in TERMINAL else None

    state = wait_for(finished, 900, "the data-to-model run", served["procs"])
    return {"out": out, "run_id": run_id, "state": state}


def test_api_triggered_data_to_model_completes_with_outputs_and_artifacts(served, sample_run):
    api, tmp = served["api"], served["tmp"]
    out, run_id, state = sample_run["out"], sample_run["run_id"], sample_run["state"]
    assert state["type"] == "COMPLETED", (state, (tmp / "serve.log").read_text()[-4000:])

    # the outputs, as the run left them
    assert (out / "curate" / "funnel.json").is_file() and (out / "shard" / "manifest.json").is_file()
    result = json.loads((out / "train" / "result.json").read_text())
    assert result["steps"] == 40 and Path(result["export"], "model.safetensors").is_file()

    # the story of the run, through the REST API: funnel, shards, tokenizer, training, progress
    arts = post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    keys = {a["key"] for a in arts if a["key"]}
    assert {"curation-funnel", "curation-summary", "extract-progress", "tokenizer-report", "train-loss", "train-summary", "train-progress"} <= keys, keys
    summary = next(a for a in arts if a["key"] == "train-summary")
    assert "val_ppl" in summary["data"]


def test_a_run_pointed_outside_the_data_roots_fails_before_writing(served):
    api, dep, tmp = served["api"], served["deployments"]["shard"], served["tmp"]
    escape = tmp / "data" / ".." / "escaped"
    r = post(f"{api}/deployments/{dep['id']}/create_flow_run",
             json={"parameters": {"input_dir": str(tmp / "data"), "out_dir": str(escape)}})
    assert r.status_code == 201, r.text[:500]
    run_id = r.json()["id"]

    def finished():
        r = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10)
        state = r.json()["state"] if r.status_code == 200 else None
        return state if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED") else None

    state = wait_for(finished, 300, "the refused run", served["procs"])
    assert state["type"] == "FAILED" and "outside the data roots" in state["message"], state
    assert not (tmp / "escaped").exists()


def cpu_s(pid: int, children: bool = False) -> float:
    """CPU seconds (user + system) of a process, or of its finished children (the serve process's flow
    runs), from /proc: what the burst costs, whatever else the machine is running."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    first = 13 if children else 11
    return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant (an end and a start at the same instant do not overlap)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def test_a_burst_of_50_api_triggered_runs_all_end_within_the_concurrency_limits(served, sample_run):
    """50 create_flow_run requests at once, across every deployment: cheap real work that completes
    (shard and extract on tiny inputs, two short training runs) and runs the data-roots guard refuses
    (FAILED, with the reason). Every run must reach a terminal state; the serve process never runs more
    than serve.limit at once (from the API's start and end times); the two training runs never hold
    the refinery-gpu slot together (their `train` task runs, which run inside it, never overlap)."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    api, deps, tmp = served["api"], served["deployments"], served["tmp"]
    assert sample_run["state"]["type"] == "COMPLETED", sample_run["state"]
    run = sample_run["out"]                             # its curated docs and shards: real and small
    data, outside = tmp / "data" / "burst", tmp / "outside"
    (data / "html").mkdir(parents=True)
    (data / "html" / "page.html").write_text("<html><body><article><p>" + "A short page about data. " * 40 +
                                             "</p></article></body></html>")
    tok = str(run / "shard" / "tokenizer" / "tokenizer.json")
    # no retries (a failure is final at once) and the sample's tokenizer instead of training one
    small = {"runner": {"task_retries": 0}, "shard": {"tokenizer_path": tok, "compare_tokenizer": tok}}
    train_cfg = {"runner": {"task_retries": 0}, "train": {
        "preset": "tiny", "max_steps": 2, "seq_len": 32, "batch_size": 2, "val_every": 1000, "val_batches": 1,
        "checkpoint_every": 1000, "warmup_steps": 0, "export": False}}

    plan = []       # (deployment, parameters, expected state type)
    plan += [("shard", {"input_dir": str(run / "curate"), "out_dir": str(data / f"shard-{i}"), "config": small},
              "COMPLETED") for i in range(2)]
    plan += [("extract", {"inputs": [str(data / "html")], "out_dir": str(data / f"extract-{i}"), "config": small},
              "COMPLETED") for i in range(1)]
    plan += [("train", {"shards_dir": str(run / "shard"), "out_dir": str(data / f"train-{i}"), "config": train_cfg},
              "COMPLETED") for i in range(2)]
    refused = [("shard", lambda i: {"input_dir": str(run / "curate"), "out_dir": str(outside / f"s{i}")}),
               ("extract", lambda i: {"inputs": ["/etc/hostname"], "out_dir": str(data / f"x{i}")}),
               ("curate", lambda i: {"inputs": [str(run / "extract")], "out_dir": f"{data}/../../c{i}"}),
               ("crawl", lambda i: {"seeds_file": "/etc/hostname", "out_dir": str(data / f"w{i}")}),
               ("train", lambda i: {"shards_dir": "/etc", "out_dir": str(data / f"t{i}")}),
               ("finetune", lambda i: {"base": "/etc/passwd", "shards_dir": str(run / "shard"),
                                       "out_dir": str(data / f"f{i}")}),
               ("data-to-model", lambda i: {"out_dir": str(outside / f"d{i}")})]
    for i in range(50 - len(plan)):
        name, params = refused[i % len(refused)]
        plan.append((name, params(i), "FAILED"))

    busy: list = []         # answers that made a create try again: 429/502/503, or a dropped connection
    lane = asyncio.Semaphore(2)
    batch = uuid.uuid4().hex

    async def create(client, i, name, params):
        """All 50 go out at once. Prefect's server on SQLite validates the parameter schema inside the
        create's transaction (about 0.2 CPU-s for our closed config schema), so concurrent creates collide
        and most of a burst gets 503 "database is locked". Those are retried through a lane of two, with
        jitter, which the server then takes one by one; the idempotency key makes a create whose answer
        was lost (a dropped connection) return the run it made instead of a second one."""
        for attempt in range(100):
            try:
                if attempt == 0:
                    return await client.create_flow_run_from_deployment(
                        deps[name]["id"], parameters=params, idempotency_key=f"burst-{batch}-{i}")
                async with lane:
                    return await client.create_flow_run_from_deployment(
                        deps[name]["id"], parameters=params, idempotency_key=f"burst-{batch}-{i}")
            except (PrefectHTTPStatusError, httpx.TransportError) as e:
                code = e.response.status_code if isinstance(e, PrefectHTTPStatusError) else type(e).__name__
                if code not in (429, 502, 503, "ReadError", "RemoteProtocolError", "ConnectError", "ReadTimeout"):
                    raise
                busy.append(code)
                await asyncio.sleep(random.uniform(0.2, 1.0))
        raise AssertionError(f"run {i} ({name}) was not accepted after 100 tries")

    async def burst():
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):      # every busy answer shows up here
            async with PrefectClient(api=api) as client:
                return await asyncio.gather(*[create(client, i, name, params)
                                              for i, (name, params, _) in enumerate(plan)])

    server, serve = (p.pid for p in served["procs"])
    cpu0 = (cpu_s(serve, children=True), cpu_s(server))
    t0 = time.time()
    runs = asyncio.run(burst())
    created_s = time.time() - t0
    ids = [r.id for r in runs]
    assert len(set(ids)) == 50
    train_ids = [r.id for r, (name, _, want) in zip(runs, plan) if name == "train" and want == "COMPLETED"]

    async def read_all():
        async with PrefectClient(api=api) as client:
            flow_runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            train_tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=train_ids)))
            return {r.id: r for r in flow_runs}, [t for t in train_tasks if t.name.startswith("train")]

    def all_done():
        try:
            got, tasks = asyncio.run(read_all())
        except httpx.HTTPError:
            return None                     # a busy server: ask again
        return (got, tasks) if len(got) == 50 and all(r.state.type.value in TERMINAL for r in got.values()) else None

    got, train_tasks = wait_for(all_done, 900, "the 50 burst runs to end", served["procs"])
    took = time.time() - t0

    states = {rid: got[rid].state for rid in ids}
    wrong = [(name, params, want, states[r.id].type.value, states[r.id].message)
             for r, (name, params, want) in zip(runs, plan) if states[r.id].type.value != want]
    assert not wrong, (wrong, (tmp / "serve.log").read_text()[-4000:])
    for r, (name, _, want) in zip(runs, plan):
        if want == "FAILED":
            assert "outside the data roots" in states[r.id].message, (name, states[r.id].message)
    assert not outside.exists() and not (tmp / "c0").exists()
    assert all((data / f"shard-{i}" / "manifest.json").is_file() for i in range(2))
    assert all((data / f"train-{i}" / "result.json").is_file() for i in range(2))

    peak = max_overlap([(got[rid].start_time.timestamp(), got[rid].end_time.timestamp()) for rid in ids])
    assert 1 <= peak <= LIMIT, peak
    gpu = [(t.start_time.timestamp(), t.end_time.timestamp()) for t in train_tasks]
    assert len(gpu) == 2 and max_overlap(gpu) == 1, gpu
    print(f"burst: 50 runs created in {created_s:.1f} s ({len(busy)} busy answers retried: "
          f"{sorted(set(map(str, busy)))}), all ended after {took:.0f} s; at most {peak} running at once "
          f"(limit {LIMIT}); training spans {[(round(a - t0), round(b - t0)) for a, b in sorted(gpu)]} s; "
          f"CPU: the runs {cpu_s(serve, children=True) - cpu0[0]:.0f} s, the server {cpu_s(server) - cpu0[1]:.0f} s")
