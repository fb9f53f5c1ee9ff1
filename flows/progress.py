"""Command-line progress bars for work that runs inside Prefect tasks.

Tasks run in threads of the CLI's own process, so the CLI installs a rich Progress
here and tasks report through `reporter(name)`; without a CLI it is a no-op.
"""
from __future__ import annotations

import threading
from typing import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_progress: Progress | None = None
_lock = threading.Lock()


def start() -> Progress:
    global _progress
    _progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    _progress.start()
    return _progress


def stop() -> None:
    global _progress
    if _progress is not None:
        _progress.stop()
        _progress = None


def reporter(name: str, total: int | None = None) -> Callable[..., None] | None:
    """A callback(done, total=None) that moves a bar named `name`; None when no CLI is attached."""
    if _progress is None:
        return None
    prog = _progress
    with _lock:
        tid = prog.add_task(name, total=total)

    def update(done: int, total: int | None = None) -> None:
        prog.update(tid, completed=done, **({"total": total} if total is not None else {}))

    return update


def phase(key: str, description: str) -> Callable[[int, int], None]:
    """An on_result(done, total) for map_shards: a Prefect progress artifact on the flow run
    (the UI) and, under the CLI, a rich bar (the terminal)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact = create_progress_artifact(0.0, key=key, description=description)
    bar = reporter(description)

    def update(done: int, total: int) -> None:
        update_progress_artifact(artifact, 100.0 * done / max(total, 1))
        if bar:
            bar(done, total)

    return update
