"""The train flow: plan -> launch the trainer as a subprocess -> read back -> artifacts.

    plan      the Chinchilla and memory planner; a run that cannot fit is refused with the numbers
    launch    `python -m models.train --config OUT/run.json`, or torchrun for several devices: Lightning's
              ddp re-executes its launching script per device, which must not be this flow
    watch     OUT/metrics.jsonl while it runs -> a Prefect progress artifact and a rich bar
    report    OUT/result.json -> loss curves (PNG + table artifact) and a run summary (markdown)

A failed attempt is retried by Prefect and resumes from the last checkpoint (same data position,
same subsequent losses); so does a rerun after the whole process was killed, when the run folder's
run.json shows the same shards, config and code. A finished run with unchanged shards, config and
code is served from cache. The trainer is tied to the process that launched it: killing `refinery`
kills its trainer too, so no orphan keeps writing checkpoints the rerun resumes from.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.concurrency.sync import concurrency
from prefect.context import get_run_context

from core.redact import install as install_redaction, redact
from core import faults
from flows import progress
from flows.caching import code_version
from core.config import RefineryConfig, absolute_paths
from core.guard import confine
from core.retry import PermanentError, retry_options
from core.io import atomic_path, exclusive_dir
from core.train_run import RunSpec, TrainResult

ROOT = Path(__file__).resolve().parent.parent
_PREFECT_SECRETS = {"PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING"}
GPU_LIMIT = "refinery-gpu"


def launch_command(spec_path: Path, devices: int, nodes: int) -> list[str]:
    """One device: the entry point itself. Several: torchrun on this node (gloo on CPU, NCCL on GPU).
    Multi-node runs start the same `-m models.train --config` under Slurm/Kubernetes (see README)."""
    entry = ["-m", "models.train", "--config", str(spec_path)]
    if devices * nodes == 1:
        return [sys.executable, *entry]
    if nodes > 1:
        raise ValueError("nodes > 1: launch `torchrun --nnodes N --nproc-per-node K --rdzv-endpoint HOST:PORT "
                         "-m models.train --config run.json` on every node (Slurm srun / a Kubernetes job); "
                         "the flow starts single-node runs only")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}", *entry]


class MetricsTail:
    """The rows appended to metrics.jsonl since the last call (complete lines only)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def __call__(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1          # a line being written right now waits for the next call
        self.offset += end
        rows = []
        for line in data[:end].splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return rows


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return rows


def run_fingerprint(spec: RunSpec | dict, shards_sha256: str) -> str:
    """What a training run's checkpoints depend on: the shards, the spec (but `resume`) and the code."""
    parts = [shards_sha256, RunSpec.model_validate(spec).identity(), code_version("core", "models", "flows", "tasks")]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def train_cache_key(context, parameters: dict) -> str:
    return hashlib.sha256(f"{context.task.name}\x1f{run_fingerprint(parameters['spec'], parameters['shards_sha256'])}"
                          .encode()).hexdigest()


def checkpoint_intact(path: Path) -> bool:
    """A torch checkpoint is a zip whose directory is written last: a file cut short by a kill has none."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def restore_last_checkpoint(out: Path) -> bool:
    """Is there a complete checkpoints/last.ckpt to resume from? Lightning stages a checkpoint in
    $TMPDIR and moves it into place, a copy when that is another filesystem, so a kill can cut
    last.ckpt short; the newest complete step=N.ckpt (saved just before it) then takes its place,
    and without one the run starts over."""
    ckpts = out / "checkpoints"
    last = ckpts / "last.ckpt"
    if not last.exists() or checkpoint_intact(last):
        return last.exists()
    steps = [(int(m[1]), p) for p in ckpts.glob("step=*.ckpt") if (m := re.match(r"step=(\d+)", p.name))]
    for _, p in sorted(steps, reverse=True):
        if checkpoint_intact(p):
            with atomic_path(last) as tmp:
                shutil.copyfile(p, tmp)
            return True
    last.unlink()
    return False


def same_run(out: Path, fingerprint: str) -> bool:
    """Was the run folder's last attempt this very run (same shards, spec and code)?"""
    try:
        return json.loads((out / "run.json").read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


@task(name="train", cache_key_fn=train_cache_key, persist_result=True)
def train_task(spec: RunSpec | dict, shards_sha256: str) -> TrainResult:
    log = get_run_logger()
    spec = RunSpec.model_validate(spec)      # run.json's schema, whoever calls (a served run passes JSON)
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = get_run_context()
    fingerprint = run_fingerprint(spec, shards_sha256)
    # a retry resumes; so does the first attempt of a rerun, if a killed run left this run's checkpoint
    resume = restore_last_checkpoint(out) and (spec.resume or ctx.task_run.run_count > 1
                                               or same_run(out, fingerprint))
    if resume:
        log.info("resuming from %s", out / "checkpoints" / "last.ckpt")
    spec = spec.model_copy(update={"resume": resume, "fingerprint": fingerprint})
    spec_path = spec.write(out / "run.json")
    (out / "result.json").unlink(missing_ok=True)
    (out / "error.json").unlink(missing_ok=True)
    t = spec.train
    cmd = launch_command(spec_path, t.devices, t.nodes)
    log.info("launching: %s", " ".join(cmd))
    # the trainer never talks to Prefect: its credentials and database URL stay out of its environment
    env = {k: v for k, v in os.environ.items()
           if not (k in _PREFECT_SECRETS or (k.startswith("PREFECT_") and "DATABASE" in k))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env.setdefault("TQDM_DISABLE", "1")     # train.log holds the trainer's messages, not progress bars
    shown = progress.TrainProgress("train-progress", spec.max_steps_hint, t.progress_every_s, log)
    tail = MetricsTail(out / "metrics.jsonl")
    with open(out / "train.log", "ab") as logf:
        # this thread waits for the trainer, so tying the trainer to it ties it to the process
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                preexec_fn=faults.die_with_parent())
        while proc.poll() is None:
            time.sleep(1)
            shown.rows(tail())
    shown.rows(tail())
    if proc.returncode != 0 or not (out / "result.json").exists():
        raise training_error(out, proc.returncode)
    result = TrainResult.read(out)
    shown.done(result.steps)
    result.outputs = [str(out / "result.json")] + ([str(Path(result.export) / "config.json")] if result.export else [])
    return result


def training_error(out: Path, returncode: int) -> Exception:
    """The trainer's failure as an exception: PermanentError (no retry: a missing file, a bad config,
    mismatched tokenizers, no CUDA) when its error.json says so, else RuntimeError (retried)."""
    try:
        err = json.loads((out / "error.json").read_text())
    except (OSError, ValueError):
        err = None
    if err and err.get("permanent"):
        # one clear message; the traceback is in train.log (a failed state's message is stored as written:
        # log records are scrubbed, messages are not)
        return PermanentError(redact(f"{err['type']}: {err['message']} (details: {out / 'train.log'})"))
    tail = (out / "train.log").read_text(errors="replace")[-3000:]
    return RuntimeError(redact(f"training exited with {returncode}; last lines of {out / 'train.log'}:\n{tail}"))


def loss_plot(out: Path, rows: list[dict]) -> Path | None:
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "loss.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def report(out: Path, result: TrainResult, plan: dict | None) -> None:
    rows = read_metrics(out / "metrics.jsonl")
    png = loss_plot(out, rows)
    curve = [r for r in rows if "loss" in r]
    stride = max(1, len(curve) // 200)        # the table artifact stays readable on long runs
    create_table_artifact(key="train-loss", table=curve[::stride] + ([curve[-1]] if curve[-1::stride] != curve[-1:] else []),
                          description="Training loss per optimizer step")
    fmt = lambda v: "-" if v is None else (f"{v:,.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))  # noqa: E731
    keys = ["model", "arch", "params", "trainable_params", "steps", "tokens_seen", "tokens_per_param", "first_loss",
            "final_loss", "val_loss_start", "val_loss", "val_ppl_start", "val_ppl", "tokens_per_s", "mfu", "precision",
            "devices", "strategy", "wall_s"]
    k = result.loss_mean_steps
    md = [f"# Training run `{out}`", "", result.before_after(), "", "| | |", "|---|---|"] + [
        f"| {key}{f' (mean of {k} steps)' if k and key in ('first_loss', 'final_loss') else ''} | {fmt(getattr(result, key))} |"
        for key in keys if key != "tokens_per_param" or result.tokens_per_param is not None]
    if ft := result.finetune:
        md += ["", f"Fine-tuned `{ft.base}` with **{ft.method}**: {ft.trainable_params:,} of "
                   f"{ft.total_params:,} parameters trainable ({100 * ft.trainable_fraction:.3f}%)."]
    if plan:
        md += ["", "Planner: " + plan.get("summary", "")]
    md += ["", f"Loss curve: `{png}`" if png else "", f"Export: `{result.export}`",
           f"Checkpoint: `{result.checkpoint}`"]
    create_markdown_artifact(key="train-summary", markdown="\n".join(md), description="Training run summary")




def gpu_slot():
    """One training run per device where a served setup created the global `refinery-gpu` limit;
    elsewhere (e.g. `refinery run`) nothing, without Prefect's "limit does not exist" warning."""
    from contextlib import nullcontext

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
    except ObjectNotFound:
        return nullcontext()
    return concurrency(GPU_LIMIT, occupy=1, strict=False)


def shards_fingerprint(shards_dir: str) -> str:
    """The manifest lists every shard's sha256 and the tokenizer's: its hash identifies the data."""
    return hashlib.sha256(Path(shards_dir, "manifest.json").read_bytes()).hexdigest()


def run_train(shards_dir: str, out_dir: str, config: RefineryConfig, resume: bool = False) -> TrainResult:
    with exclusive_dir(out_dir):   # one trainer per run folder; a killed run's temporaries are swept
        return _train(shards_dir, Path(out_dir), config, resume)


def _train(shards_dir: str, out: Path, config: RefineryConfig, resume: bool) -> TrainResult:
    log = get_run_logger()
    from models.train import preflight
    plan = preflight(shards_dir, config.train, config.finetune)      # raises PlanError with the numbers
    log.info("plan: %s", plan.get("summary", ""))
    spec = RunSpec(data_dir=str(Path(shards_dir).resolve()), out_dir=str(out.resolve()), train=config.train,
                   finetune=config.finetune, resume=resume, max_steps_hint=plan.get("max_steps"))
    opts = retry_options(config.runner)
    # one training run per device: served deployments create this global limit with one slot
    with gpu_slot():
        state = train_task.with_options(**opts)(spec, shards_fingerprint(shards_dir), return_state=True)
        result = state.result()
        if not all(Path(p).exists() for p in result.outputs):
            result = train_task.with_options(refresh_cache=True, **opts)(spec, shards_fingerprint(shards_dir))
        elif state.name == "Cached":
            log.info("train: served from cache")
    report(out, result, plan)
    from flows.eval_stage import eval_stage
    if (evaluation := eval_stage(out, result, shards_dir, config)) is not None:
        result.eval = evaluation
    log.info("trained %s: %s; export %s", result.model, result.before_after(), result.export)
    return result


@flow(name="train", log_prints=True)
def train_flow(shards_dir: str, out_dir: str, config: RefineryConfig | None = None, resume: bool = False) -> TrainResult:
    install_redaction()    # a served run runs in a process of its own: scrub its logs from the start
    cfg = absolute_paths(config or RefineryConfig())   # the trainer runs in another working directory
    confine(writes={"out_dir": out_dir}, reads={"shards_dir": shards_dir}, config=cfg)
    return run_train(shards_dir, out_dir, cfg, resume)


@flow(name="finetune", log_prints=True)
def finetune_flow(base: str, shards_dir: str, out_dir: str, method: Literal["full", "lora", "prompt", "qlora"] = "lora",
                  config: RefineryConfig | None = None, resume: bool = False) -> TrainResult:
    """Fine-tune `base` (our export, a Hugging Face folder or a GGUF file) on shards made with its tokenizer."""
    install_redaction()    # a served run runs in a process of its own: scrub its logs from the start
    cfg = config or RefineryConfig()
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"base": base, "method": method})})
    cfg = absolute_paths(cfg)   # the trainer runs in another working directory
    confine(writes={"out_dir": out_dir}, reads={"shards_dir": shards_dir}, config=cfg)   # the config holds base
    return run_train(shards_dir, out_dir, cfg, resume)
