"""Serve every deployment from one process, no work pool or worker needed:

    python deployments/serve.py [--config refinery.yaml]        (or: refinery serve [--config ...])

    crawl          on the cron schedule of `serve.crawl_cron` (UTC), seeds and output from the config
    extract, curate, shard, train, finetune, data-to-model     triggered from the UI, the CLI or the REST API

The list itself (names, entrypoints, descriptions, tags) is prefect.yaml's `deployments:`, read here, so
`prefect deploy` and `refinery serve` offer the same deployments.

Parameters are typed (pydantic), and every deployment enforces its parameter schema: the server
answers 422 to a run with a wrong parameter, so no run is created that would crash on it.
`train` and `finetune` take the `refinery-gpu` global concurrency limit (1 slot, created here): two
training runs never share a device. With `serve.chain_train`, a completed `shard` run (its
`refinery.shard.completed` event) starts `train` on that run's output. Served runs may only read and
write under `serve.data_roots` (core/guard.py): a path parameter pointing elsewhere fails the run
before it touches anything. A served run whose process dies (SIGKILL, OOM) is marked Crashed once its
heartbeats stop for `serve.crash_after_s` (flows/crash.py: the deployments carry its tag, the runs
heartbeat every `serve.heartbeat_s`, and the automation that crashes silent runs is installed here).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")      # the client's telemetry and its first-run banner

PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
ENV = "REFINERY_DATA_ROOTS"     # core.guard.ENV, without importing the project before the path is set


def closed(deployment):
    """Prefect's parameter schema lists the flow's parameters but leaves unknown ones allowed: such a run
    would be created and then crash calling the flow. A closed schema makes the server refuse it."""
    from prefect.utilities.callables import ParameterSchema

    class ClosedParameterSchema(ParameterSchema):
        additionalProperties: bool = False

    schema = deployment._parameter_openapi_schema.model_dump(exclude_unset=True)
    deployment._parameter_openapi_schema = ClosedParameterSchema(**schema, additionalProperties=False)
    return deployment


def catalog() -> list[dict]:
    """The deployments, defined once in prefect.yaml (name, entrypoint, description, tags): serving them
    from this process changes where they run and their defaults, not what they are."""
    import yaml

    return yaml.safe_load(PREFECT_FILE.read_text())["deployments"]


def load_flow(entrypoint: str):
    """'flows/crawl.py:crawl_flow' -> the flow object (imported as a module of this package)."""
    import importlib

    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def build_deployments(cfg) -> list:
    from prefect.events import DeploymentEventTrigger

    from flows.crash import WATCH_TAG
    from flows.extract import with_concurrency

    config = cfg.model_dump(mode="json")       # the served config is every deployment's default
    s = cfg.serve
    own = {    # what serving adds to prefect.yaml's entries: the config's schedule, seeds and chaining
        "crawl": dict(cron=s.crawl_cron, parameters={"seeds_file": s.crawl_seeds, "out_dir": s.crawl_out}),
        "train": dict(triggers=[DeploymentEventTrigger(
            name="train on new shards", expect={"refinery.shard.completed"},
            parameters={"shards_dir": "{{ event.payload.out_dir }}",
                        "out_dir": "{{ event.payload.out_dir }}-train"})] if s.chain_train else None),
    }
    out = []
    for d in catalog():
        flow = load_flow(d["entrypoint"])
        if "gpu" not in d["tags"]:             # data stages: their shard tasks' runner and concurrency
            flow = with_concurrency(flow, cfg)
        extra = dict(own.get(d["name"], {}))
        params = {**extra.pop("parameters", {}), "config": config}
        tags = [*d["tags"], WATCH_TAG]      # the crash automation judges only runs that carry it
        out.append(closed(flow.to_deployment(d["name"], tags=tags, description=d["description"],
                                             parameters=params, **extra)))
    return out


def ensure_gpu_limit(slots: int = 1) -> None:
    """One global concurrency slot per device for training; kept if an operator changed it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    from flows.train import GPU_LIMIT

    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))
        except ObjectAlreadyExists:
            pass


def main(argv: list[str] | None = None) -> None:
    from prefect import serve

    from core import redact
    from core.config import load_config

    redact.install()        # the serve process logs too (each served run installs it in its own process)

    ap = argparse.ArgumentParser(prog="deployments/serve.py")
    ap.add_argument("--config", help="YAML configuration (the served defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    # served runs inherit this: every flow refuses paths outside these roots (core/guard.py)
    os.environ[ENV] = os.pathsep.join(str(Path(r).resolve()) for r in cfg.serve.data_roots)
    from flows.crash import crash_settings, ensure_crash_automation

    heartbeat_s, window_s = crash_settings(cfg.serve)
    ensure_gpu_limit()
    ensure_crash_automation(window_s)
    # the runner gives each run's process PREFECT_FLOWS_HEARTBEAT_FREQUENCY=heartbeat_s
    serve(*build_deployments(cfg), limit=cfg.serve.limit, print_starting_message=True,
          heartbeat_seconds=heartbeat_s)


if __name__ == "__main__":
    main()
