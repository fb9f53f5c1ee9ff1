"""Command-line progress bars for work that runs inside Prefect tasks.

Tasks run in threads of the CLI's own process, so the CLI installs a rich Progress
here and tasks report through `reporter(name)`; without a CLI it is a no-op.
"""
from __future__ import annotations

import sys
import threading
import time
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

    def update(done: int, total: int | None = None, description: str | None = None) -> None:
        prog.update(tid, completed=done, **({"total": total} if total is not None else {}),
                    **({"description": description} if description else {}))

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


def duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class TrainProgress:
    """A training run seen from outside the trainer, through the rows it appends to metrics.jsonl:
    step, smoothed loss, tokens/s and ETA. Shown as a rich bar under the CLI in a terminal, as a
    line on stderr (and in the run's log) every `every_s` seconds without one, and always as the
    description of a Prefect progress artifact, so the UI shows the same figures."""

    SMOOTH = 0.9          # exponential moving average of the loss, debiased (as TensorBoard's smoothing)

    def __init__(self, key: str, total: int | None, every_s: float = 30.0, log=None):
        from prefect.artifacts import create_progress_artifact

        self.total, self.every_s, self.log = total, every_s, log
        self.artifact = create_progress_artifact(0.0, key=key, description="train: starting")
        self.bar = reporter("train", total=total)
        self._ema, self._n, self._last_step, self._tps = 0.0, 0, -1, None
        self._first: tuple[float, int] | None = None      # (time, step) of the first step seen
        self._printed = time.monotonic()
        self.line = "train: starting"

    def rows(self, rows: list[dict]) -> None:
        """Feed the metrics rows not seen before (in order)."""
        for r in rows:
            if "loss" in r and r["step"] > self._last_step:
                self._n += 1
                self._ema = self.SMOOTH * self._ema + (1 - self.SMOOTH) * r["loss"]
                self._last_step = r["step"]
                self._tps = r.get("tokens_per_s")
                if self._first is None:
                    self._first = (time.monotonic(), r["step"])
        if self._n:
            self._show()

    def _show(self, final: bool = False) -> None:
        from prefect.artifacts import update_progress_artifact

        step, total = self._last_step, self.total or self._last_step
        loss = self._ema / (1 - self.SMOOTH ** self._n)
        eta = None
        if self._first and step > self._first[1] and not final:
            rate = (step - self._first[1]) / max(time.monotonic() - self._first[0], 1e-9)
            eta = (total - step) / rate
        parts = [f"step {step:,}/{total:,}", f"loss {loss:.4f}"]
        if self._tps:
            parts.append(f"{self._tps:,.0f} tok/s")
        parts.append("done" if final else f"ETA {duration(eta)}" if eta is not None else "ETA -")
        self.line = "train: " + " · ".join(parts)
        update_progress_artifact(self.artifact, 100.0 * min(step, total) / max(total, 1), description=self.line)
        if self.bar:
            self.bar(step, total, description=self.line)
        elif final or time.monotonic() - self._printed >= self.every_s:
            self._printed = time.monotonic()
            sys.stderr.write(self.line + "\n")
            sys.stderr.flush()
            if self.log is not None:
                self.log.info(self.line)

    def done(self, steps: int) -> None:
        self._last_step = steps
        if self._n:
            self._show(final=True)
