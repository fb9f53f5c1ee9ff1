"""`serve.chain_train` end to end on a real `prefect server`: an API-triggered `shard` run completes, its
`refinery.shard.completed` event fires the `train` deployment's trigger, and the triggered run trains
on exactly those shards into SHARDS-train (its own module: with chaining on, every shard run of the
other serve tests would start a training run)."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from test_serve import TERMINAL, post, start_serve, start_server, stop, wait_for

ROOT = Path(__file__).resolve().parent.parent


def _texts() -> list[str]:
    """Real prose: the bundled reference paragraphs (WikiText-2 and Gutenberg), a few hundred of them."""
    raw = (ROOT / "sample" / "curation" / "reference" / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    paras = [p.strip() for p in raw.split("\n") if len(p.split()) > 40]
    return paras[:300]


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    data = tmp / "data"
    from smollm import write_docs

    write_docs(_texts(), data / "curated")
    logs = {n: open(tmp / f"{n}.log", "wb") for n in ("server", "serve")}
    procs = []
    try:
        api, env = start_server(tmp, logs["server"], procs)
        cfg = tmp / "refinery.yaml"
        cfg.write_text(json.dumps({
            "serve": {"crawl_cron": None, "data_roots": [str(data)], "chain_train": True, "limit": 2},
            "shard": {"vocab_size": 1024, "val_fraction": 0.1},
            "train": {"max_steps": 4, "seq_len": 64, "batch_size": 4, "val_every": 4, "val_batches": 2,
                      "checkpoint_every": 4, "accelerator": "cpu"},
            "eval": {"enabled": False}}))
        deps = start_serve(cfg, env, logs["serve"], procs)
        yield {"api": api, "deployments": deps, "data": data, "tmp": tmp, "procs": procs}
    finally:
        for p in reversed(procs):
            stop(p)
        for f in logs.values():
            f.close()


def _runs(api: str, deployment_id: str) -> list[dict]:
    r = post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}})
    return r.json() if r.status_code == 200 else []


def test_a_completed_shard_run_triggers_training_on_its_shards(chained):
    api, deps, data = chained["api"], chained["deployments"], chained["data"]
    shards = data / "shards"
    assert not _runs(api, deps["train"]["id"])                  # nothing trains before the event
    r = post(f"{api}/deployments/{deps['shard']['id']}/create_flow_run",
             json={"parameters": {"input_dir": str(data / "curated"), "out_dir": str(shards)}})
    assert r.status_code == 201, r.text[:1000]
    shard_run = r.json()["id"]

    def ended(run_id):
        def check():
            r = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10)
            return r.json()["state"] if r.status_code == 200 and r.json()["state"]["type"] in TERMINAL else None
        return check

    log = lambda: (chained["tmp"] / "serve.log").read_text()[-4000:]  # noqa: E731
    state = wait_for(ended(shard_run), 300, "the shard run", chained["procs"])
    assert state["type"] == "COMPLETED", (state, log())
    assert (shards / "manifest.json").is_file()

    # the event's trigger creates the train run; the serve process runs it to its end
    train_runs = wait_for(lambda: _runs(api, deps["train"]["id"]) or None, 120, "the triggered train run",
                          chained["procs"])
    assert len(train_runs) == 1
    run = train_runs[0]
    assert run["parameters"]["shards_dir"] == str(shards.resolve())
    assert run["parameters"]["out_dir"] == f"{shards.resolve()}-train"
    state = wait_for(ended(run["id"]), 600, "the triggered train run", chained["procs"])
    assert state["type"] == "COMPLETED", (state, log())
    result = json.loads(Path(f"{shards.resolve()}-train", "result.json").read_text())
    assert result["steps"] == 4 and Path(result["export"], "model.safetensors").is_file()
    # one event, one training run: nothing else was triggered meanwhile
    assert len(_runs(api, deps["train"]["id"])) == 1
