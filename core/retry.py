"""Which failures a task retries: transient ones only.

A retry helps where the next attempt can go differently: a worker killed by the OOM killer, a
network blip, a full disk being cleaned, an injected fault. It cannot help a missing file, an
invalid config, shards made with another tokenizer, or a feature that needs a CUDA GPU on a
machine without one: those fail on the first attempt with their message, instead of the same
traceback three times and a wait between each.
"""
from __future__ import annotations

import pydantic


class PermanentError(RuntimeError):
    """An error that no retry can heal (raised where the cause was classified in another process:
    the trainer reports its own through OUT/error.json)."""


PERMANENT: tuple[type[BaseException], ...] = (
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,   # the path is what it is
    ValueError, TypeError, pydantic.ValidationError,     # bad config or input (ValueError covers PlanError,
                                                         # ConfigError, TokenizerMismatch)
    ImportError, NotImplementedError, PermanentError,
)


def is_permanent(exc: BaseException | None) -> bool:
    from core.shard_format import ShardError          # corrupt or missing shards stay corrupt

    permanent = PERMANENT + (ShardError,)
    if type(exc).__name__ == "NeedsCUDA":               # models.finetune's: no GPU appears on a retry
        return True
    return isinstance(exc, permanent)


def transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry unless the failure is one no attempt can heal."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - an unreadable result: treat it as transient, as before
            return True
    return not (isinstance(exc, BaseException) and is_permanent(exc))


def retry_options(runner) -> dict:
    """Task options from the runner config: its retries, its delay, transient failures only; and
    `refresh_cache` where the config asks for a cold run."""
    opts = {"retries": runner.task_retries, "retry_delay_seconds": runner.retry_delay_s,
            "retry_condition_fn": transient}
    if runner.refresh_cache:
        opts["refresh_cache"] = True
    return opts
