"""Task runners for the data stages, chosen by `runner.kind`.

threads: shard tasks run in a thread pool of the flow's own process (the default).
dask:    shard tasks run on a Dask cluster through prefect-dask: the scheduler at
         `runner.dask_address` (or $REFINERY_DASK_ADDRESS), else a LocalCluster of
         `runner.dask_workers` processes started for the flow run and closed after it.

Either way the flow itself, its reduces and its reports run in the flow's process; only
the `map_shards` tasks move. Workers reach the flow's Prefect API (flows/dask_runner.py) and
write the same files to the same paths, so outputs and caching are the same as with threads.
A remote cluster (an address) needs workers that share the filesystem (output folders, and
PREFECT_HOME's result storage) and a Prefect server both sides reach (PREFECT_API_URL).
"""
from __future__ import annotations

import logging
import os

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from core.config import RefineryConfig, RunnerConfig

DASK_ADDRESS_ENV = "REFINERY_DASK_ADDRESS"


def dask_address(runner: RunnerConfig) -> str | None:
    """The scheduler to connect to: the config's, else the environment's; None: start a LocalCluster."""
    return runner.dask_address or os.environ.get(DASK_ADDRESS_ENV) or None


def task_runner_for(config: RefineryConfig | RunnerConfig) -> TaskRunner:
    """A fresh task runner for the configured kind (Prefect duplicates it per flow run)."""
    runner = config.runner if isinstance(config, RefineryConfig) else config
    if runner.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=runner.shard_concurrency)
    from flows.dask_runner import RefineryDaskTaskRunner  # imports distributed: only paid when asked for

    address = dask_address(runner)
    if address:
        return RefineryDaskTaskRunner(address=address)
    # the LocalCluster's scheduler and nannies log each start and stop at INFO into this process's
    # console (Prefect's root handler); its own silence_logs setting misses that handler
    quiet = logging.getLogger("distributed")
    if quiet.getEffectiveLevel() < logging.WARNING:
        quiet.setLevel(logging.WARNING)
    return RefineryDaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": runner.dask_workers, "threads_per_worker": runner.dask_threads_per_worker,
        "processes": True, "dashboard_address": None})


def with_concurrency(f, config: RefineryConfig):
    """`f` with the configured task runner (the CLI's extract, curate, shard and run)."""
    return f.with_options(task_runner=task_runner_for(config))
