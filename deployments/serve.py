"""Serve every deployment from one process, no work pool or worker needed:

    python deployments/serve.py [--config refinery.yaml]        (or: refinery serve [--config ...])

    crawl          on the cron schedule of `serve.crawl_cron` (UTC), seeds and output from the config
    extract, curate, shard, train, finetune, data-to-model     triggered from the UI, the CLI or the REST API

Parameters are typed (pydantic), and every deployment enforces its parameter schema: the server
answers 422 to a run with a wrong parameter, so no run is created that would crash on it.
`train` and `finetune` take the `refinery-gpu` global concurrency limit (1 slot, created here): two
training runs never share a device. With `serve.chain_train`, a completed `shard` run (its
`refinery.shard.completed` event) starts `train` on that run's output. Served runs may only read and
write under `serve.data_roots` (flows/guard.py): a path parameter pointing elsewhere fails the run
before it touches anything.
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

GPU_LIMIT = "refinery-gpu"
ENV = "REFINERY_DATA_ROOTS"     # flows.guard.ENV, without importing flows before the path is set


def closed(deployment):
    """Prefect's parameter schema lists the flow's parameters but leaves unknown ones allowed: such a run
    would be created and then crash calling the flow. A closed schema makes the server refuse it."""
    from prefect.utilities.callables import ParameterSchema

    class ClosedParameterSchema(ParameterSchema):
        additionalProperties: bool = False

    schema = deployment._parameter_openapi_schema.model_dump(exclude_unset=True)
    deployment._parameter_openapi_schema = ClosedParameterSchema(**schema, additionalProperties=False)
    return deployment


def build_deployments(cfg) -> list:
    from prefect.events import DeploymentEventTrigger

    from flows.crawl import crawl_flow
    from flows.curate import curate_flow
    from flows.extract import extract_flow, with_concurrency
    from flows.pipeline import data_to_model
    from flows.shard import shard_flow
    from flows.train import finetune_flow, train_flow

    config = cfg.model_dump(mode="json")       # the served config is every deployment's default
    data = ["data"]
    s = cfg.serve
    chain = [DeploymentEventTrigger(
        name="train on new shards", expect={"refinery.shard.completed"},
        parameters={"shards_dir": "{{ event.payload.out_dir }}", "out_dir": "{{ event.payload.out_dir }}-train"},
    )] if s.chain_train else None
    return [closed(d) for d in [
        with_concurrency(crawl_flow, cfg).to_deployment(
            "crawl", cron=s.crawl_cron, tags=data, description="Polite crawl of the seed list into WARC",
            parameters={"seeds_file": s.crawl_seeds, "out_dir": s.crawl_out, "config": config}),
        with_concurrency(extract_flow, cfg).to_deployment("extract", tags=data, parameters={"config": config}),
        with_concurrency(curate_flow, cfg).to_deployment("curate", tags=data, parameters={"config": config}),
        with_concurrency(shard_flow, cfg).to_deployment("shard", tags=data, parameters={"config": config}),
        train_flow.to_deployment("train", tags=["train"], parameters={"config": config}, triggers=chain),
        finetune_flow.to_deployment("finetune", tags=["train"], parameters={"config": config}),
        with_concurrency(data_to_model, cfg).to_deployment(
            "data-to-model", tags=data + ["train"], parameters={"config": config},
            description="crawl demo -> extract -> curate -> shard -> train, on the bundled sample by default"),
    ]]


def ensure_gpu_limit(slots: int = 1) -> None:
    """One global concurrency slot per device for training; kept if an operator changed it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))
        except ObjectAlreadyExists:
            pass


def main(argv: list[str] | None = None) -> None:
    from prefect import serve

    from core.config import load_config

    ap = argparse.ArgumentParser(prog="deployments/serve.py")
    ap.add_argument("--config", help="YAML configuration (the served defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    # served runs inherit this: every flow refuses paths outside these roots (flows/guard.py)
    os.environ[ENV] = os.pathsep.join(str(Path(r).resolve()) for r in cfg.serve.data_roots)
    ensure_gpu_limit()
    serve(*build_deployments(cfg), limit=cfg.serve.limit, print_starting_message=True)


if __name__ == "__main__":
    main()
