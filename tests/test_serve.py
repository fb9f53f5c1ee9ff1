"""The served deployments against a real `prefect server` on 127.0.0.1: the crawl deployment carries
its schedule, an API-triggered `data-to-model` run on the bundled sample completes with its outputs
and artifacts readable through the REST API, and a wrong parameter is refused with 422 and no run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`prefect server start` on a free loopback port with its own PREFECT_HOME, then serve.py."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
           "PYTHONPATH": str(ROOT)}
    logs = {n: open(tmp / f"{n}.log", "wb") for n in ("server", "serve")}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)],
                              env=env, stdout=logs["server"], stderr=subprocess.STDOUT, start_new_session=True)
    procs = [server]
    try:
        wait_for(lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200, 180, "the Prefect server", procs)
        cfg = tmp / "refinery.yaml"
        cfg.write_text(json.dumps({"serve": {"crawl_cron": "15 4 * * *", "crawl_seeds": str(tmp / "seeds.txt"),
                                             "crawl_out": str(tmp / "crawl"), "data_roots": [str(tmp / "data")]}}))
        serve = subprocess.Popen([sys.executable, str(ROOT / "deployments" / "serve.py"), "--config", str(cfg)],
                                 env=env, cwd=ROOT, stdout=logs["serve"], stderr=subprocess.STDOUT,
                                 start_new_session=True)
        procs.append(serve)

        def deployments():
            r = post(f"{api}/deployments/filter", json={}).json()
            return {d["name"]: d for d in r} if len(r) >= 7 else None

        deps = wait_for(deployments, 240, "the served deployments", procs)
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


def test_api_triggered_data_to_model_completes_with_outputs_and_artifacts(served):
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
        return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    state = wait_for(finished, 900, "the data-to-model run", served["procs"])
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
