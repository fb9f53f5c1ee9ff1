"""Crashed runs (flows/crash.py) against a real `prefect server` on 127.0.0.1 and the real serve process:
an API-triggered `extract` run on the bundled sample is SIGKILLed mid-extraction together with the serve
process that runs it (its whole process group: nothing is left to report the death), and the server's
zombie automation marks it Crashed within the window; a rerun through a new serve process completes,
with the shards finished before the kill taken from the cache.

Heartbeats every 30 s (Prefect's minimum) and a 60 s window keep it to about three minutes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_serve import post, start_serve as serve_on, start_server, stop, wait_for

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample"
HEARTBEAT_S, WINDOW_S = 30, 60
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def test_crash_settings_are_checked():
    from core.config import ConfigError, load_config
    from flows.crash import crash_settings

    def settings(**serve):
        return crash_settings(load_config(None, {f"serve.{k}": v for k, v in serve.items()}).serve)

    assert settings() == (30, 90)
    assert settings(heartbeat_s=40) == (40, 120)
    assert settings(heartbeat_s=30, crash_after_s=60) == (30, 60)
    for bad in ({"heartbeat_s": 10}, {"crash_after_s": 45}, {"heartbeat_s": 40, "crash_after_s": 70},
                {"heartbeat_s": "x"}):
        with pytest.raises(ConfigError, match="serve"):
            settings(**bad)


def descendants(pid: int) -> list[int]:
    """Every live process under `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    log = open(tmp / "server.log", "wb")
    procs = []
    try:
        api, env = start_server(tmp, log, procs)
        proc = procs[0]
        cfg = tmp / "refinery.yaml"
        cfg.write_text(json.dumps({"serve": {"crawl_seeds": str(tmp / "seeds.txt"), "crawl_out": str(tmp / "data" / "crawl"),
                                             "data_roots": [str(tmp / "data")], "limit": 1,
                                             "heartbeat_s": HEARTBEAT_S, "crash_after_s": WINDOW_S}}))
        yield {"api": api, "env": env, "tmp": tmp, "cfg": cfg, "proc": proc}
    finally:
        for p in procs:
            stop(p)
        log.close()


def start_serve(server: dict, n: int) -> tuple[subprocess.Popen, dict]:
    """Serve process number n on the module's server -> (its process, the served deployments)."""
    procs = [server["proc"]]
    try:
        with open(server["tmp"] / f"serve-{n}.log", "wb") as log:
            deps = serve_on(server["cfg"], server["env"], log, procs)
    except BaseException:
        if len(procs) > 1:
            stop(procs[-1])
        raise
    return procs[-1], deps


def flow_run(api: str, run_id: str) -> dict | None:
    r = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10)
    return r.json() if r.status_code == 200 else None


def shard_tasks(api: str, run_id: str) -> list[dict]:
    r = post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}})
    return [t for t in r.json() if t["name"].startswith("extract-shard")]


def test_a_served_run_killed_with_its_serve_process_is_crashed_and_a_rerun_completes(server):
    from flows.crash import AUTOMATION, WATCH_TAG, ensure_crash_automation
    from prefect.settings import PREFECT_API_URL, temporary_settings

    t_start = time.time()
    api, tmp = server["api"], server["tmp"]
    serve, deps = start_serve(server, 1)
    try:
        dep = deps["extract"]
        assert WATCH_TAG in dep["tags"]
        autos = post(f"{api}/automations/filter", json={}).json()
        assert [a["name"] for a in autos].count(AUTOMATION) == 1
        auto = next(a for a in autos if a["name"] == AUTOMATION)
        assert auto["enabled"] and auto["trigger"]["posture"] == "Proactive"
        assert auto["trigger"]["within"] == WINDOW_S
        with temporary_settings({PREFECT_API_URL: api}):       # what serve did at its start: nothing to change
            assert ensure_crash_automation(WINDOW_S)[1] == "unchanged"

        inputs = [str(p) for p in sorted((SAMPLE / "warc").glob("*.warc*"))] + [str(SAMPLE / "pages.warc.gz")]
        params = {"inputs": inputs, "out_dir": str(tmp / "data" / "extract"),
                  "config": {"runner": {"task_retries": 0}, "extract": {"timeout_s": 600}}}

        # the run's process alone killed (the OOM killer's usual pick): serve, alive, reports it at once
        r = post(f"{api}/deployments/{dep['id']}/create_flow_run",
                 json={"parameters": {**params, "out_dir": str(tmp / "data" / "alone")}})
        assert r.status_code == 201, r.text[:1000]
        alone = r.json()["id"]

        def run_process():
            if (flow_run(api, alone) or {}).get("state_type") != "RUNNING":
                return None
            return [p for p in descendants(serve.pid) if parent(p) == serve.pid and b"prefect.engine" in cmdline(p)]

        os.kill(wait_for(run_process, 120, "the first run's process", [serve, server["proc"]])[0], signal.SIGKILL)
        t0 = time.time()
        state = wait_for(lambda: (flow_run(api, alone) or {}).get("state_type") in TERMINAL and flow_run(api, alone)["state"],
                         60, "the run whose process was killed to end", [serve, server["proc"]])
        assert state["type"] == "CRASHED" and "SIGKILL" in state["message"], state
        print(f"crash: the run's process alone SIGKILLed: Crashed by serve {time.time() - t0:.1f} s later")

        r = post(f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": params})
        assert r.status_code == 201, r.text[:1000]
        run_id = r.json()["id"]

        # mid-extraction: the run is Running and some, not all, of its shards are done
        def mid_extraction():
            run = flow_run(api, run_id)
            assert run is None or run["state_type"] not in TERMINAL, run and run["state"]
            done = [t for t in shard_tasks(api, run_id) if t["state_type"] == "COMPLETED"]
            return done if run and run["state_type"] == "RUNNING" and done else None

        wait_for(mid_extraction, 300, "the run to be mid-extraction", [serve, server["proc"]])
        procs = descendants(serve.pid)
        assert procs, "the run's process is a child of the serve process"
        os.killpg(serve.pid, signal.SIGKILL)            # the serve process, the run's process, its workers
        for pid in procs:
            try:
                os.kill(pid, signal.SIGKILL)            # in case one left the process group
            except ProcessLookupError:
                pass
        killed_at = time.time()
        serve.wait(10)
        wait_for(lambda: not any(alive(p) for p in procs), 10, "the killed processes to be gone")
    finally:
        stop(serve)

    done_before = [t["name"] for t in shard_tasks(api, run_id) if t["state_type"] == "COMPLETED"]
    assert 1 <= len(done_before) < len(inputs), done_before
    assert flow_run(api, run_id)["state_type"] == "RUNNING"       # nobody is left to say otherwise

    def crashed():
        run = flow_run(api, run_id)
        return run["state"] if run and run["state_type"] in TERMINAL else None

    state = wait_for(crashed, WINDOW_S + HEARTBEAT_S + 30, "the killed run to be Crashed", [server["proc"]])
    took = time.time() - killed_at
    assert state["type"] == "CRASHED", state
    assert f"No heartbeat for {WINDOW_S} s" in state["message"], state["message"]
    assert took <= WINDOW_S + 20, took       # the last heartbeat was before the kill: at most window + 5 s

    beats = post(f"{api}/events/filter", json={"filter": {
        "event": {"name": ["prefect.flow-run.heartbeat"]},
        "resource": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 50}).json()["events"]
    assert beats, "the run sent heartbeats"
    print(f"crash: killed {len(procs)} processes with {len(done_before)}/{len(inputs)} shards done; Crashed "
          f"{took:.0f} s after the kill (heartbeat {HEARTBEAT_S} s, window {WINDOW_S} s, {len(beats)} heartbeats "
          f"seen)")

    # the rerun, through a new serve process, resumes: the shards done before the kill come from the cache
    serve, deps = start_serve(server, 2)
    try:
        r = post(f"{api}/deployments/{deps['extract']['id']}/create_flow_run", json={"parameters": params})
        assert r.status_code == 201, r.text[:1000]
        rerun = r.json()["id"]

        def ended():
            run = flow_run(api, rerun)
            return run["state"] if run and run["state_type"] in TERMINAL else None

        state = wait_for(ended, 300, "the rerun", [serve, server["proc"]])
        assert state["type"] == "COMPLETED", (state, (tmp / "serve-2.log").read_text()[-4000:])
    finally:
        stop(serve)
    tasks = shard_tasks(api, rerun)
    cached = [t for t in tasks if t["state_name"] == "Cached"]
    assert len(tasks) == len(inputs) and len(cached) >= len(done_before), [(t["name"], t["state_name"]) for t in tasks]
    assert (tmp / "data" / "extract" / "docs").is_dir()
    assert flow_run(api, run_id)["state_type"] == "CRASHED"
    print(f"crash: rerun completed, {len(cached)} shards from cache; test {time.time() - t_start:.0f} s")

    # idempotent: a new window updates the one automation in place; a copy (two serves at once) is removed
    from prefect.client.orchestration import get_client
    from flows.crash import crash_automation

    with temporary_settings({PREFECT_API_URL: api}):
        first = ensure_crash_automation(WINDOW_S)[0]
        assert ensure_crash_automation(WINDOW_S + 30) == (first, "updated")
        with get_client(sync_client=True) as client:
            client.create_automation(crash_automation(WINDOW_S + 30))
        kept, what = ensure_crash_automation(WINDOW_S + 30)
        assert what == "unchanged"
    autos = [a for a in post(f"{api}/automations/filter", json={}).json() if a["name"] == AUTOMATION]
    assert [(a["id"], a["trigger"]["within"]) for a in autos] == [(str(kept), WINDOW_S + 30)]


def test_a_foreground_cli_run_against_a_server_killed_is_crashed_too(server):
    """`refinery extract` in a terminal with PREFECT_API_URL set: the CLI tags its runs for the same
    automation and heartbeats at serve.heartbeat_s, so a SIGKILL leaves no Running run behind either."""
    from flows.crash import WATCH_TAG, ensure_crash_automation
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, tmp = server["api"], server["tmp"]
    with temporary_settings({PREFECT_API_URL: api}):
        ensure_crash_automation(WINDOW_S)               # as a serve process on this server would
    inputs = [str(p) for p in sorted((SAMPLE / "warc").glob("*.warc*"))] + [str(SAMPLE / "pages.warc.gz")]
    log = open(tmp / "cli.log", "wb")
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "extract", *inputs, "--out", str(tmp / "cli"),
                            "--no-progress", "--set", "runner.task_retries=0", "--timeout", "600",
                            "--runner-refresh-cache"],   # cold: the served test above extracted these files
                           env=server["env"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        def mid_extraction():
            runs = post(f"{api}/flow_runs/filter", json={"flow_runs": {
                "tags": {"all_": [WATCH_TAG]}, "deployment_id": {"is_null_": True}}}).json()
            run = next((r for r in runs if r["state_type"] == "RUNNING"), None)
            if run is None or not [t for t in shard_tasks(api, run["id"]) if t["state_type"] == "COMPLETED"]:
                return None
            beats = post(f"{api}/events/filter", json={"filter": {
                "event": {"name": ["prefect.flow-run.heartbeat"]},
                "resource": {"id": [f"prefect.flow-run.{run['id']}"]}}, "limit": 5}).json()["events"]
            return run if beats else None           # the window counts from a heartbeat

        run = wait_for(mid_extraction, 300, "the CLI run to be mid-extraction with a heartbeat", [cli, server["proc"]])
        os.killpg(cli.pid, signal.SIGKILL)
        killed_at = time.time()
        cli.wait(10)
    finally:
        stop(cli)

    def crashed():
        r = flow_run(api, run["id"])
        return r["state"] if r and r["state_type"] in TERMINAL else None

    state = wait_for(crashed, WINDOW_S + HEARTBEAT_S + 30, "the killed CLI run to be Crashed", [server["proc"]])
    took = time.time() - killed_at
    assert state["type"] == "CRASHED" and f"No heartbeat for {WINDOW_S} s" in state["message"], state
    assert took <= WINDOW_S + 20, took       # the last heartbeat was before the kill
    print(f"crash: a foreground CLI run SIGKILLed: Crashed {took:.0f} s after the kill")
