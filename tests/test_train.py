"""Training on real shards: each architecture learns, DDP (torchrun, 2 CPU processes, gloo) matches one
process on the same double batch, FSDP2 shards the weights and trains, a killed run resumes with
the same losses, exports reload with the same logits, and the Prefect flow reports its artifacts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_shard import write_curated

ROOT = Path(__file__).resolve().parent.parent
BASE = {"preset": "tiny", "seq_len": 64, "batch_size": 4, "val_every": 1000, "val_batches": 4,
        "checkpoint_every": 1000, "lr": 3e-3, "warmup_steps": 2}


@pytest.fixture(scope="module")
def shards(prefect_api, tmp_path_factory) -> Path:
    """Real text (WikiText articles, inaugural addresses, real pages) tokenized by `refinery shard`."""
    from core.config import RefineryConfig
    from flows.shard import shard_flow

    base = tmp_path_factory.mktemp("train-data")
    write_curated(base / "curated")
    cfg = RefineryConfig.model_validate({"shard": {"vocab_size": 2048, "val_fraction": 0.05,
                                                   "row_group_tokens": 8192}})
    state = shard_flow(str(base / "curated"), str(base / "shards"), cfg, return_state=True)
    assert state.is_completed(), state
    return base / "shards"


def spec(shards: Path, out: Path, **train) -> dict:
    return {"data_dir": str(shards), "out_dir": str(out), "train": {**BASE, **train}}


def launch(spec_: dict, devices: int = 1, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """The entry point as the flow launches it: its own process, torchrun for several devices."""
    path = Path(spec_["out_dir"]) / "run-spec.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec_))
    entry = ["-m", "models.train", "--config", str(path)]
    cmd = [sys.executable, *entry] if devices == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}", *entry]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step is logged twice"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def reload_and_compare(out: Path, batch: dict) -> None:
    """The hf/ export loads with the Auto class of its family (and the tokenizer) and gives the same
    logits as the weights of the last checkpoint."""
    from transformers import AutoConfig, AutoTokenizer

    from models.architectures import auto_class, build_model

    config = AutoConfig.from_pretrained(out / "hf")
    exported = auto_class(config).from_pretrained(out / "hf").eval()
    assert AutoTokenizer.from_pretrained(out / "hf").decode([5, 6, 7]) is not None
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    fresh = build_model(config)
    fresh.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
    fresh.eval()
    with torch.no_grad():
        a, b = exported(**batch).logits, fresh(**batch).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_each_architecture_learns_and_exports(shards, tmp_path, arch):
    from models.train import run

    out = tmp_path / arch
    result = run(spec(shards, out, arch=arch, max_steps=30, checkpoint_every=30))
    curve = losses(out)
    first, last5 = curve[1], sum(curve[s] for s in range(26, 31)) / 5
    print(arch, result.params, "loss", first, "->", last5, "val", result.val_loss)
    assert last5 < first - 0.5, curve
    assert result.val_loss is not None and result.val_loss < first
    assert result.steps == 30 and result.tokens_seen == 30 * 4 * 64
    ids = torch.randint(5, 2000, (2, 16))
    batch = {"input_ids": ids}
    if arch == "encoder-decoder":
        batch["decoder_input_ids"] = ids[:, :8]
    reload_and_compare(out, batch)


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
@pytest.mark.parametrize("limit", [{}, {"max_tokens": 5000}])
def test_planner_and_trainer_derive_the_same_run_length(shards, arch, limit):
    """The preflight planner reads only the manifest, the trainer the data module: both must count
    the same steps (span corruption consumes more stream tokens per sequence than seq_len)."""
    from core.config import TrainConfig
    from models.architectures import OBJECTIVE
    from models.data import ShardDataModule
    from models.train import plan_steps, preflight

    cfg = TrainConfig(**{**BASE, "arch": arch, **limit})
    dm = ShardDataModule(str(shards), seq_len=cfg.seq_len, batch_size=cfg.batch_size, objective=OBJECTIVE[arch])
    dm.setup()
    trainer_steps, _ = plan_steps(cfg, dm.step, dm.manifest.split("train").tokens, 1)
    assert preflight(str(shards), cfg)["max_steps"] == trainer_steps
    if arch == "encoder-decoder":
        assert dm.step > cfg.seq_len


def reference_losses(shards: Path, steps: int, per_rank: dict) -> list[float]:
    """One process, plain loop, the same model init and the two ranks' batches concatenated:
    what DDP must reproduce (gradients averaged over ranks = gradient of the double batch)."""
    import lightning as L

    from models.architectures import build_model, make_config
    from models.data import ShardDataModule
    from models.module import LMModule

    t = {**BASE, **per_rank}
    L.seed_everything(0, workers=True, verbose=False)
    dms = [ShardDataModule(str(shards), seq_len=t["seq_len"], batch_size=t["batch_size"], objective="causal",
                           seed=0, rank=r, world_size=2) for r in (0, 1)]
    for dm in dms:
        dm.setup()
    dm = dms[0]
    model = build_model(make_config("decoder", "tiny", dm.vocab_size, t["seq_len"],
                                    {"eos": dm.eos_id, "pad": dm.pad_id, "mask": dm.mask_id}))
    module = LMModule(model, "causal", lr=t["lr"], warmup_steps=t["warmup_steps"], max_steps=steps)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    its = [iter(d.train_dataloader()) for d in dms]
    out = []
    for _ in range(steps):
        b0, b1 = next(its[0]), next(its[1])
        batch = {k: torch.cat([b0[k], b1[k]]) for k in b0}
        loss = module.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_ddp_two_processes_match_one_process_double_batch_and_fsdp2_shards(shards, tmp_path):
    steps = 8
    launch(spec(shards, tmp_path / "ddp", max_steps=steps, devices=2, strategy="ddp", accelerator="cpu"), devices=2)
    ddp = losses(tmp_path / "ddp")
    ref = reference_losses(shards, steps, {})
    print("ddp", [ddp[s] for s in sorted(ddp)], "\nref", ref)
    assert sorted(ddp) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert ddp[s] == pytest.approx(ref[s - 1], rel=2e-4), (s, ddp[s], ref[s - 1])
    assert ddp[steps] < ddp[1]

    launch(spec(shards, tmp_path / "fsdp", max_steps=steps, devices=2, strategy="fsdp", accelerator="cpu"), devices=2)
    fsdp = losses(tmp_path / "fsdp")
    result = json.loads((tmp_path / "fsdp" / "result.json").read_text())
    print("fsdp", [fsdp[s] for s in sorted(fsdp)], "rank 0 holds", result["local_params_rank0"], "of", result["params"])
    # each rank holds about half of the weights, and the run trains like DDP does
    assert result["local_params_rank0"] <= 0.55 * result["params"]
    for s in range(1, steps + 1):
        assert fsdp[s] == pytest.approx(ddp[s], rel=2e-4)
    reload_and_compare(tmp_path / "fsdp", {"input_ids": torch.randint(5, 2000, (2, 16))})


def test_killed_run_resumes_with_the_same_losses(shards, tmp_path):
    common = {"max_steps": 10, "checkpoint_every": 4, "export": False}
    launch(spec(shards, tmp_path / "straight", **common))
    straight = losses(tmp_path / "straight")

    s = {**spec(shards, tmp_path / "killed", **common), "resume": True}
    p = launch(s, env={"REFINERY_KILL_AT_STEP": "6"}, check=False)
    assert p.returncode == -9, p.stderr[-2000:]                    # SIGKILL after step 6; checkpoint at 4
    assert not (tmp_path / "killed" / "result.json").exists()
    assert (tmp_path / "killed" / "checkpoints" / "step=4.ckpt").exists()
    launch(s)
    resumed = losses(tmp_path / "killed")
    result = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert result["resumed"] and result["tokens_seen"] == 10 * 4 * 64
    assert resumed == straight                                   # steps 5..10 replayed exactly


def test_train_flow_reports_artifacts_and_is_cached(shards, tmp_path, prefect_api):
    from prefect.client.orchestration import get_client

    from core.config import RefineryConfig
    from flows.train import train_flow

    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": "The committee met on Tuesday and approved the budget for the new year."}) + "\n")
    cfg = RefineryConfig.model_validate({"train": {**BASE, "max_steps": 12, "val_every": 6},
                                         "eval": {"data": [str(held)], "context": 64}})
    state = train_flow(str(shards), str(tmp_path / "run"), cfg, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result.steps == 12 and (tmp_path / "run" / "loss.png").stat().st_size > 5000
    assert [r for r in losses(tmp_path / "run")] == list(range(1, 13))
    assert Path(result.export, "model.safetensors").exists()

    async def artifacts():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["train-loss", "train-summary", "eval", "train-progress"])))
            return {a.key: a for a in arts if a.flow_run_id == state.state_details.flow_run_id}

    import asyncio
    arts = asyncio.run(artifacts())
    assert set(arts) == {"train-loss", "train-summary", "eval", "train-progress"}
    assert "val_ppl" in arts["train-summary"].data and "tokens_per_param" in arts["train-summary"].data
    # before and after: a validation pass at step 0 (the untrained model) and at the end
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val_loss" in r]
    assert vals[0]["step"] == 0 and result.val_loss_start == vals[0]["val_loss"] > result.val_loss
    assert "Validation loss" in arts["train-summary"].data and "untrained model" in arts["train-summary"].data
    # the progress artifact carries the same figures as the terminal: step, smoothed loss, tokens/s
    desc = arts["train-progress"].description
    assert "step 12/12" in desc and "loss" in desc and "tok/s" in desc, desc
    # training seconds accumulate across validations (they restarted at each before)
    elapsed = [r["elapsed_s"] for r in rows if "loss" in r]
    assert elapsed == sorted(elapsed) and elapsed[-1] > elapsed[5]
    # the eval stage: bits per byte on the val shard and the extra set, as an artifact and eval.json
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(evaluation["datasets"]) == {"shards-val", "held"}
    assert all(0.5 < d["bits_per_byte"] < 10 for d in evaluation["datasets"].values())
    rows = json.loads(arts["eval"].data)
    assert {r["dataset"] for r in rows} == {"shards-val", "held"} and result.eval["rows"] == rows

    # unchanged shards, config and code: the second run is served from cache, no new training
    mtime = (tmp_path / "run" / "result.json").stat().st_mtime
    again = train_flow(str(shards), str(tmp_path / "run"), cfg)
    assert again.steps == 12 and (tmp_path / "run" / "result.json").stat().st_mtime == mtime


def test_planner_refuses_a_run_that_cannot_fit_before_launching(shards, tmp_path, prefect_api):
    from core.config import RefineryConfig
    from flows.train import train_flow
    from models.planner import PlanError

    cfg = RefineryConfig.model_validate({"train": {"preset": "1b", "seq_len": 2048, "batch_size": 8,
                                                   "max_steps": 10, "gpu_memory_gb": 16}})
    with pytest.raises(PlanError, match=r"needs [\d.]+ GiB per device, has 16.0 GiB: weights"):
        train_flow(str(shards), str(tmp_path / "big"), cfg)
    assert not (tmp_path / "big" / "run.json").exists()           # refused before any process started


@pytest.mark.parametrize("extra", [{"precision": "bf16-mixed"}, {"precision": "bf16-true"},
                                   {"activation_checkpointing": True, "accumulate": 2, "peak_flops": 1e11}])
def test_precisions_checkpointing_accumulation_and_mfu(shards, tmp_path, extra):
    from models.train import run

    out = tmp_path / "run"
    result = run(spec(shards, out, max_steps=12, export=False, **extra))
    curve = losses(out)
    assert sorted(curve) == list(range(1, 13)) and curve[12] < curve[1] - 0.2, curve
    acc = extra.get("accumulate", 1)
    assert result.tokens_seen == 12 * acc * 4 * 64
    if "peak_flops" in extra:        # MFU = tokens/s * FLOPs per token / peak, logged per step
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        assert all(0 < r["mfu"] < 1 for r in rows) and result.mfu > 0


def test_nan_loss_stops_naming_the_step_or_is_skipped(shards, tmp_path):
    import lightning as L

    from models.architectures import build_model, make_config
    from models.data import ShardDataModule
    from models.module import LMModule

    class PoisonedAt(LMModule):  # the real training_step sees a NaN loss on the third batch
        def loss(self, batch):
            loss = super().loss(batch)
            return loss * float("nan") if self.trainer.fit_loop.total_batch_idx == 2 else loss

    def fit(policy: str) -> PoisonedAt:
        dm = ShardDataModule(str(shards), seq_len=64, batch_size=4)
        dm.setup()
        model = build_model(make_config("decoder", "tiny", dm.vocab_size, 64, {"eos": dm.eos_id, "pad": dm.pad_id}))
        module = PoisonedAt(model, "causal", max_steps=5, nan_policy=policy)
        L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, limit_val_batches=0, default_root_dir=str(tmp_path)).fit(module, dm)
        return module

    with pytest.raises(FloatingPointError, match="loss is nan at step 2"):
        fit("stop")
    module = fit("skip")
    assert module.skipped_batches == 1 and module.global_step == 5
    assert all(torch.isfinite(p).all() for p in module.model.parameters())   # nothing trained through the NaN


def test_a_corrupt_or_missing_shard_fails_the_run_fast_naming_the_file(shards, tmp_path, prefect_api):
    """Through the train flow, as a user meets it: the trainer process stops before step 1 and the
    flow's error carries the shard's path."""
    import shutil

    from core.config import RefineryConfig
    from flows.train import train_flow

    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    victim = sorted((bad / "train").glob("*.parquet"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF                                  # one flipped byte: same size, other sha256
    victim.write_bytes(bytes(data))
    cfg = RefineryConfig.model_validate({"runner": {"task_retries": 0}, "train": {**BASE, "max_steps": 5}})
    t0 = time.time()
    with pytest.raises(RuntimeError, match=f"{victim}: sha256 does not match the manifest"):
        train_flow(str(bad), str(tmp_path / "run-corrupt"), cfg)
    assert not (tmp_path / "run-corrupt" / "metrics.jsonl").exists()   # no step was trained
    victim.unlink()
    with pytest.raises(RuntimeError, match=f"{victim}: shard missing"):
        train_flow(str(bad), str(tmp_path / "run-missing"), cfg)
    print(f"both refused in {time.time() - t0:.1f} s")
