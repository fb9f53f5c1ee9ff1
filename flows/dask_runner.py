"""prefect-dask's DaskTaskRunner, with the workers' tasks pointed at the flow's own Prefect API.

Every task Prefect ships to a Dask worker carries the flow process's Prefect settings. With no
PREFECT_API_URL (the CLI's default) those say "no API", because the flow talks to a temporary
server it started itself: each worker process then started a temporary server of its own on
the same SQLite database (about 20 s per worker on 2 cores, and three servers writing one
file). Submitting under the URL of the flow's server sends the workers' task runs, logs and
artifacts to it. With PREFECT_API_URL set nothing changes.

Imported only when `runner.kind` is dask (prefect_dask imports distributed: about a second).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from prefect.settings import PREFECT_API_URL, temporary_settings
from distributed.diagnostics.plugin import WorkerPlugin
from prefect_dask import DaskTaskRunner


def flow_api_url() -> str | None:
    """The flow process's temporary API server URL, or None when an API URL is configured."""
    if PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the flow's client already started this one (a singleton)
    server.start()                   # a no-op when running
    return server.api_url


def close_worker_pools() -> None:
    """Run on each worker of a LocalCluster before it closes: stop the extraction processes
    (tasks/workers.py) now, not in the worker's exit, which the nanny kills after 4 s."""
    from tasks.workers import close_all

    close_all()


class _ScrubLogs(WorkerPlugin):
    """A Dask worker plugin: every worker, present or started later, installs log redaction, since
    the tasks it runs log to the flow's API (core/redact.py)."""
    name = "refinery-redact"

    def setup(self, worker) -> None:
        from core.redact import install

        install()


class RefineryDaskTaskRunner(DaskTaskRunner):
    """A DaskTaskRunner whose tasks report to the flow's Prefect API (see the module docstring).
    Workers must also share the filesystem: output folders and PREFECT_HOME's result storage."""

    def submit(self, task, parameters: dict[str, Any], wait_for=None, dependencies=None):
        if not getattr(self, "_scrubbing", False):      # the client (and cluster) start on first use
            self.client.register_plugin(_ScrubLogs())
            self._scrubbing = True
        url = flow_api_url()
        with temporary_settings(updates={PREFECT_API_URL: url}) if url else nullcontext():
            return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)

    def __exit__(self, *args: Any) -> None:
        # a cluster started for this run closes with it; the workers of a long-lived cluster
        # (an address) keep their warm pools for the next run
        if self._client is not None and self._cluster is not None and not self.address:
            try:
                self._client.run(close_worker_pools)
            except Exception:  # noqa: BLE001 - the workers' own exit closes the pools anyway
                pass
        super().__exit__(*args)
