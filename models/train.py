"""The training entry point: `python -m models.train --config run.json`.

It runs in its own process on purpose. Lightning's `ddp` re-executes the launching script once per
device, which would re-enter a Prefect flow, so the flow writes run.json and launches this module
(`torchrun ... -m models.train` for several devices or nodes, the same command under Slurm or a
Kubernetes job). It reports through files in the run folder, which the flow reads back:

    OUT/metrics.jsonl      one line per optimizer step (global mean loss, lr, tokens, tokens/s, MFU,
                           training seconds so far) and per validation (val loss, perplexity; the first
                           at step 0, before any update); appended, so a resume continues it
    OUT/checkpoints/       step=N.ckpt every `checkpoint_every` steps and last.ckpt (weights, optimizer,
                           scheduler, loop and data position): `resume` continues the same run exactly
    OUT/logs/metrics.csv   Lightning's CSV log; OUT/tb/ the TensorBoard log
    OUT/hf/                the Hugging Face export (model + tokenizer), when `export`
    OUT/result.json        written last by rank 0: the run summary
    OUT/error.json         written instead when the run fails: the error and whether a retry could heal it
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from core.config import FinetuneConfig, TrainConfig
from core.train_run import FinetuneReport, RunSpec, TrainResult
from models.architectures import OBJECTIVE, arch_of, build_model, make_config, n_params
from models.data import ShardDataModule
from models.module import LMModule
from core.io import write_text_atomic


class MetricsFile(Callback):
    """metrics.jsonl on rank 0: per optimizer step and per validation, flushed as it goes."""

    def __init__(self, path: Path):
        self.path = path
        self._losses: list[torch.Tensor] = []
        self._t0: float | None = None       # start of the current stretch of training (validation excluded)
        self._tokens0 = 0
        self._train_s = 0.0                 # training seconds before that stretch (earlier stretches, attempts)

    def _write(self, trainer, row: dict) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_start(self, trainer, module):
        self._last_step = trainer.global_step      # a resumed run starts at its checkpoint's step
        if trainer.is_global_zero and self.path.exists():
            # steps logged after the checkpoint by the run that died are redone: drop their rows
            rows = [r for r in self.path.read_text().splitlines() if json.loads(r)["step"] <= trainer.global_step]
            write_text_atomic("".join(r + "\n" for r in rows), self.path)
            done = [json.loads(r) for r in rows]
            self._train_s = max([r.get("elapsed_s", 0.0) for r in done if "loss" in r], default=0.0)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self._t0 is None:
            self._t0, self._tokens0 = time.perf_counter(), module.tokens_seen

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(loss.detach().float())
        if trainer.global_step == self._last_step or not self._losses:
            return                   # mid-accumulation: the optimizer has not stepped yet
        self._last_step = trainer.global_step
        mean = torch.stack(self._losses).mean()
        mean = trainer.strategy.reduce(mean, reduce_op="mean")   # the global loss, not rank 0's
        self._losses = []
        dt = time.perf_counter() - self._t0
        tps = (module.tokens_seen - self._tokens0) / dt if dt > 0 else 0.0
        row = {"step": trainer.global_step, "loss": round(float(mean), 6),
               "lr": trainer.optimizers[0].param_groups[0]["lr"], "tokens": module.tokens_seen,
               "tokens_per_s": round(tps, 1), "elapsed_s": round(self._train_s + dt, 3)}
        if module.peak_flops:
            row["mfu"] = round(tps * module.flops_per_token / (module.peak_flops * trainer.world_size), 4)
        self._write(trainer, row)

    def on_validation_end(self, trainer, module):
        val = trainer.callback_metrics.get("val/loss")
        if val is not None and not trainer.sanity_checking:
            self._write(trainer, {"step": trainer.global_step, "val_loss": round(float(val), 6),
                                  "val_ppl": round(math.exp(min(float(val), 30.0)), 4)})
        if self._t0 is not None:     # throughput and elapsed_s exclude validation
            self._train_s += time.perf_counter() - self._t0
        self._t0 = None


class KillAt(Callback):
    """Fault injection (tests, chaos drills): REFINERY_KILL_AT_STEP=N SIGKILLs rank 0 once N optimizer
    steps are done, before the next one starts, as a crash would (the others die with it).
    REFINERY_KILL_AT=train-step:N SIGKILLs the process that launched the trainer instead (a killed
    `refinery run` mid-training), which takes the trainer with it (core/faults.py)."""

    def __init__(self, step: int, parent: bool = False):
        self.step, self.parent = step, parent

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.is_global_zero:
            if self.parent:
                from core.faults import kill_parent_and_wait
                kill_parent_and_wait()
            else:
                os.kill(os.getpid(), signal.SIGKILL)


def plan_steps(cfg: TrainConfig, step: int, train_tokens: int, world: int) -> tuple[int, int]:
    """(optimizer steps, batches per epoch on one rank). The one place a run's length is derived,
    for the preflight planner and the trainer alike. `step` is the stream tokens one sequence
    consumes (seq_len; for span corruption the longer uncorrupted length): max_tokens wins, then
    max_steps, else one pass over the train tokens."""
    per_batch = cfg.batch_size * step * world
    per_step = per_batch * cfg.accumulate
    epoch = max(1, train_tokens // per_batch)
    if cfg.max_tokens:
        return max(1, cfg.max_tokens // per_step), epoch
    return cfg.max_steps or max(1, train_tokens // per_step), epoch


def stream_step(shards_dir: str, cfg: TrainConfig, objective: str) -> int:
    """Stream tokens per sequence, as the data module will cut them (no shard is read)."""
    if objective != "span":
        return cfg.seq_len
    return ShardDataModule(shards_dir, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                           objective=objective)._span_lengths()[0]


def strategy_for(cfg: TrainConfig):
    if cfg.strategy == "fsdp":
        # FSDP2 (fully_shard) through ModelParallelStrategy: runs on CPU (gloo) and GPU alike;
        # one consolidated checkpoint file so resume and export need no extra step
        from lightning.pytorch.strategies import ModelParallelStrategy
        return ModelParallelStrategy(data_parallel_size=cfg.devices * cfg.nodes, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    if cfg.strategy == "ddp" or cfg.devices * cfg.nodes > 1:
        from lightning.pytorch.strategies import DDPStrategy
        return DDPStrategy(find_unused_parameters=False)
    return "auto"


def detect_peak_flops(cfg: TrainConfig) -> float | None:
    if cfg.peak_flops:
        return cfg.peak_flops
    if not torch.cuda.is_available():
        return None
    try:
        from models.planner import peak_flops
        return peak_flops(cfg.gpu or torch.cuda.get_device_name(0), cfg.precision)
    except (ImportError, KeyError, ValueError):
        return None


def export_hf(module: LMModule, data_dir: Path, out: Path) -> Path:
    """OUT/hf: the model and the shards' tokenizer, so the Auto classes load both from one folder."""
    dest = out / "hf"
    tmp = out / ".hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model = module.model
    if hasattr(model, "merge_and_unload"):        # a LoRA model exports merged
        model = model.merge_and_unload()
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in (data_dir / "tokenizer").iterdir():
        shutil.copy2(f, tmp / f.name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def available_memory_gb(cfg: TrainConfig) -> tuple[str, float | None]:
    """(device name for the planner, GiB per device): the config's, else what this machine has."""
    on_gpu = cfg.accelerator == "gpu" or (cfg.accelerator == "auto" and torch.cuda.is_available())
    if on_gpu and torch.cuda.is_available():
        name = cfg.gpu or torch.cuda.get_device_name(0)
        return name, cfg.gpu_memory_gb or torch.cuda.get_device_properties(0).total_memory / 2**30
    if cfg.gpu_memory_gb:
        return cfg.gpu or "cpu", cfg.gpu_memory_gb
    avail = None
    try:  # CPU processes share the machine's RAM
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) / 2**20 / cfg.devices
    except OSError:
        pass
    return "cpu", avail


def preflight(shards_dir: str, cfg: TrainConfig, ft: FinetuneConfig | None = None) -> dict:
    """The planner before any process starts: parameters, tokens, FLOPs, memory per device. A run
    that does not fit raises PlanError with the numbers (unless `skip_plan_check`)."""
    from models import planner
    from core.shard_format import load_manifest

    manifest = load_manifest(shards_dir)
    tok = manifest.tokenizer
    world = cfg.devices * cfg.nodes
    # fine-tuning: the base's architecture is unknown until it loads; its objective is causal or mlm
    objective = "causal" if ft is not None and ft.base else OBJECTIVE[cfg.arch]
    step = stream_step(shards_dir, cfg, objective)
    per_step = cfg.batch_size * step * world * cfg.accumulate
    steps, _ = plan_steps(cfg, step, manifest.split("train").tokens, world)
    if ft is not None and ft.base:
        from models import finetune

        # before any process starts: a base that is not there, or shards in another tokenizer's ids
        finetune.resolve_base(ft.base)
        finetune.check_shards_tokenizer(shards_dir, ft.base)
        return {"summary": f"fine-tuning {ft.base} with {ft.method}: {steps} steps of {per_step:,} tokens",
                "max_steps": steps}
    ids = tok.special_ids
    config = make_config(cfg.arch, cfg.preset, tok.vocab_size, cfg.seq_len,
                         {"eos": ids["eos"], "pad": ids.get("pad"), "mask": ids.get("mask")})
    gpu, mem = available_memory_gb(cfg)
    peak = cfg.peak_flops
    if peak is None and gpu != "cpu":
        try:
            peak = planner.peak_flops(gpu, cfg.precision)
        except ValueError:
            gpu = "cpu"       # an unlisted device: memory is still checked, time is not estimated
    p = planner.plan(params=planner.count_params(config), tokens=steps * per_step, gpu_memory_gb=mem,
                     gpus=cfg.devices, nodes=cfg.nodes, gpu=gpu, precision=cfg.precision,
                     strategy="fsdp" if cfg.strategy == "fsdp" else "ddp", seq_len=cfg.seq_len,
                     micro_batch=cfg.batch_size, activation_checkpointing=cfg.activation_checkpointing,
                     arch_dims=planner.arch_dims(config), peak=peak)
    if not cfg.skip_plan_check:
        planner.check(p)
    return {**p.to_dict(), "max_steps": steps}


def run(spec: RunSpec | dict) -> TrainResult | None:
    spec = RunSpec.model_validate(spec)
    cfg = spec.train
    data_dir, out = Path(spec.data_dir), Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ft = spec.finetune
    model, ft_report, arch, base_identity = None, None, cfg.arch, None
    if ft.base:                          # fine-tuning: the base decides the architecture
        from models import finetune
        if cfg.strategy == "fsdp":
            raise ValueError("fine-tuning runs with ddp (or one device): LoRA and prompt tuning train ~1-2% of the "
                             "weights, the frozen base is replicated; set train.strategy=ddp")
        finetune.resolve_base(ft.base)   # a missing base fails here, before the shards are read
        model, base_tok = finetune.load_base(ft.base)
        # also here: the entry point may be launched without the flow
        finetune.check_shards_tokenizer(data_dir, ft.base, base_tok)
        arch = arch_of(model.config)
        base_identity = finetune.base_identity(ft.base)
    objective = OBJECTIVE[arch]
    dm = ShardDataModule(str(data_dir), seq_len=cfg.seq_len, batch_size=cfg.batch_size, objective=objective,
                         seed=cfg.seed, num_workers=cfg.num_workers)
    dm.setup()
    if model is None:
        special = {"eos": dm.eos_id, "pad": dm.pad_id, "mask": dm.mask_id}
        config = make_config(arch, cfg.preset, dm.vocab_size, cfg.seq_len, special)
        model = build_model(config)
    else:
        config = model.config
        if dm.vocab_size > config.vocab_size:
            raise ValueError(f"{data_dir}: the shards' tokenizer has {dm.vocab_size} ids, the base model "
                             f"{config.vocab_size}: shard with the base's tokenizer (refinery shard --tokenizer)")
        model, ft_report = finetune.apply_method(model, ft.method, lora_r=ft.lora_r, lora_alpha=ft.lora_alpha,
                                                 lora_dropout=ft.lora_dropout, lora_target=ft.lora_target,
                                                 prompt_tokens=ft.prompt_tokens,
                                                 prompt_init_text=ft.prompt_init_text, tokenizer=base_tok)
    world = cfg.devices * cfg.nodes
    if not ft.base:
        preflight(str(data_dir), cfg)       # also here: the entry point may be launched without the flow
    max_steps, epoch_batches = plan_steps(cfg, dm.step, dm.manifest.split("train").tokens, world)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, max_steps // 20)
    module = LMModule(model, objective, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                      warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=cfg.min_lr_ratio, seq_len=cfg.seq_len,
                      peak_flops=detect_peak_flops(cfg), activation_checkpointing=cfg.activation_checkpointing,
                      fsdp=cfg.strategy == "fsdp", nan_policy=cfg.nan_policy, compile=cfg.compile,
                      base_identity=base_identity)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    resume = spec.resume and last.exists()
    metrics_path = out / "metrics.jsonl"
    if not resume and metrics_path.exists():
        metrics_path.unlink()           # a fresh run starts a fresh log
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="step={step}", auto_insert_metric_name=False,
                                 every_n_train_steps=cfg.checkpoint_every, save_top_k=-1, save_last=True)
    trainer = L.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.nodes, strategy=strategy_for(cfg),
        precision=cfg.precision, max_steps=max_steps, accumulate_grad_batches=cfg.accumulate,
        gradient_clip_val=cfg.grad_clip or None,
        val_check_interval=min(cfg.val_every * cfg.accumulate, epoch_batches),
        check_val_every_n_epoch=None, limit_val_batches=cfg.val_batches, num_sanity_val_steps=0,
        logger=[CSVLogger(str(out), name="logs", version=""), TensorBoardLogger(str(out), name="tb", version="")],
        callbacks=[checkpoint, MetricsFile(metrics_path)] + kill_switch(), log_every_n_steps=cfg.log_every,
        use_distributed_sampler=False,      # the DataModule splits by rank itself (disjoint streams)
        enable_progress_bar=spec.progress_bar, enable_model_summary=False,
        default_root_dir=str(out))
    t0 = time.time()
    has_val = dm.manifest.split("val").tokens > 0
    if has_val and not resume:
        # step 0, before any update: the base (or the untrained model) on the same validation batches,
        # so the summary shows what training gained, not only where it ended
        trainer.validate(module, datamodule=dm, verbose=False)
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None)
    wall = time.time() - t0
    # validation once more at the end (every rank takes part) so the summary has the final perplexity
    val = (trainer.validate(module, datamodule=dm, verbose=False) or [{}])[0] if has_val else {}
    release_process_group()
    if not trainer.is_global_zero:
        return None
    result = TrainResult(**summarize(metrics_path, module, cfg, config, max_steps, wall, val), arch=arch,
                         checkpoint=str(last) if last.exists() else None, resumed=resume,
                         local_params_rank0=module.local_params)
    if ft_report:
        result.finetune = FinetuneReport(**{**ft_report, "base": ft.base, "base_sha256": base_identity["sha256"]})
        # a fine-tune is named by its base, and tokens per parameter is a pretraining budget (Chinchilla's
        # ~20), meaningless for adapting a model trained on trillions of tokens
        result.model, result.preset, result.tokens_per_param = Path(ft.base).name, None, None
    if cfg.export:
        if cfg.strategy == "fsdp":      # the sharded module cannot save_pretrained: rebuild from the full checkpoint
            module = LMModule(build_model(config), objective)
            module.load_state_dict(torch.load(last, map_location="cpu", weights_only=False)["state_dict"])
        if ft.base:
            from models import finetune
            paths = finetune.export_finetuned(module.model, ft.method, data_dir / "tokenizer", out / "hf")
            result.export, result.export_paths = paths["hf"], paths
        else:
            result.export = str(export_hf(module, data_dir, out))
    result.write(out)
    return result


def release_process_group() -> None:
    """All ranks leave the process group together before rank 0 exports: a rank that exits while
    its gloo group is alive can abort in the group's destructor ("terminate called without an
    active exception", SIGABRT), failing a run whose training had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def kill_switch() -> list[Callback]:
    from core.faults import kill_points

    step = os.environ.get("REFINERY_KILL_AT_STEP")
    parent_step = kill_points().get("train-step")
    return ([KillAt(int(step))] if step else []) + ([KillAt(parent_step, parent=True)] if parent_step else [])


def summarize(metrics_path: Path, module: LMModule, cfg: TrainConfig, config, steps: int, wall: float,
              val: dict) -> dict:
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    train = [r for r in rows if "loss" in r]
    vals = [r for r in rows if "val_loss" in r]
    tps = [r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")]
    params = n_params(module.model)
    final_val = val.get("val/loss", vals[-1]["val_loss"] if vals else None)
    start = next((r["val_loss"] for r in vals if r["step"] == 0), None)
    # one batch's loss is noise: the first and last losses are means over k steps
    k = max(1, min(10, len(train) // 4))
    mean = lambda rs: round(sum(r["loss"] for r in rs) / len(rs), 6) if rs else None  # noqa: E731
    ppl = lambda v: None if v is None else round(math.exp(min(float(v), 30.0)), 4)  # noqa: E731
    return {"model": f"{cfg.arch} {cfg.preset}", "preset": cfg.preset, "params": params,
            "trainable_params": module.n_trainable,
            "steps": train[-1]["step"] if train else 0, "max_steps": steps, "tokens_seen": module.tokens_seen,
            "tokens_per_param": round(module.tokens_seen / params, 4),
            "first_loss": mean(train[:k]), "final_loss": mean(train[-k:]), "loss_mean_steps": k,
            "val_loss_start": start, "val_ppl_start": ppl(start),
            "val_loss": None if final_val is None else round(float(final_val), 6),
            "val_ppl": ppl(final_val),
            "tokens_per_s": round(sum(tps) / len(tps), 1) if tps else None,
            "mfu": train[-1].get("mfu") if train else None, "wall_s": round(wall, 2),
            "precision": cfg.precision, "devices": cfg.devices, "nodes": cfg.nodes, "strategy": cfg.strategy,
            "skipped_batches": module.skipped_batches, "model_type": config.model_type}


def _out_dir(spec_path: str) -> Path:
    """Where error.json goes: the spec's out_dir, even from a run.json that did not validate."""
    try:
        return Path(json.loads(Path(spec_path).read_text())["out_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return Path(spec_path).resolve().parent


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m models.train")
    ap.add_argument("--config", required=True, help="run.json written by the train flow")
    args = ap.parse_args(argv)
    from core import redact

    redact.install()        # this process logs too: the same scrubbing as the flows (explicit, not on import)
    quiet_libraries()
    try:
        run(RunSpec.read(args.config))
    except Exception as e:
        report_error(_out_dir(args.config), e)
        raise


def quiet_libraries() -> None:
    """train.log keeps what says something about this run: not Lightning's advertisement for its cloud
    logger, nor deprecation notices about library internals the run does not call."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "Tip:" not in r.getMessage())
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def report_error(out: Path, e: BaseException) -> None:
    """OUT/error.json: what failed and whether a retry could heal it (the flow decides on retries
    from it; the traceback stays in train.log)."""
    from core.retry import is_permanent

    if os.environ.get("RANK", "0") != "0":
        return
    try:
        write_text_atomic(json.dumps({"type": type(e).__name__, "message": str(e), "permanent": is_permanent(e)},
                                     indent=2), out / "error.json")
    except OSError:
        pass   # the traceback in train.log still says it


if __name__ == "__main__":
    main()
