"""Fine-tuning a user can trust: the README's commands from another directory, shards in another
tokenizer's ids refused, no retries of what cannot heal, honest summaries, small LoRA checkpoints
that resume exactly, adapters that load with peft's Auto class. Real models (SmolLM2-135M from
GGUF, and a tiny model of our own), real subprocesses, a real Prefect API."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.smollm import ROOT, smollm2_gguf, tiny_shards, write_docs  # noqa: F401
from tests.test_finetune import wikitext_raw

REFINERY = str(Path(sys.executable).parent / "refinery")   # the console script a user runs
SMALL = ["--max-steps", "4", "--seq-len", "64", "--batch-size", "2", "--lora-r", "4",
         "--set", "train.val_batches=2", "--set", "train.progress_every_s=1", "--set", "eval.max_documents=4",
         "--set", "eval.context=128"]


def _env(api: str) -> dict:
    # one intra-op thread: the 2-core test box is shared (see tests/test_finetune.py one_thread)
    return {**os.environ, "PREFECT_API_URL": api, "OMP_NUM_THREADS": os.environ.get("REFINERY_TEST_THREADS", "1")}


def _run(args: list[str], cwd: Path, api: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([REFINERY, *args], cwd=cwd, env=_env(api), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def own_shards(prefect_api, tmp_path_factory) -> Path:
    """Shards in the project's own 2048-token BPE (not SmolLM2's)."""
    return tiny_shards(tmp_path_factory.mktemp("own"))


def test_readme_finetuning_runs_from_another_directory(prefect_api, smollm2_gguf, tmp_path):
    """The README's fine-tuning section as written, run from a fresh directory with relative paths:
    fetch the base, shard with its tokenizer, LoRA fine-tune. Then every promise about the outputs."""
    work = tmp_path / "project"
    (work / "smol" / "smollm2-135m").mkdir(parents=True)
    # what `refinery models fetch smollm2 --dest smol` leaves (copied from the test cache: no download)
    os.link(smollm2_gguf, work / "smol" / "smollm2-135m" / smollm2_gguf.name)
    write_docs(wikitext_raw(60_000), work / "data" / "curated", name="wiki")

    p = _run(["models", "fetch", "smollm2", "--dest", "smol"], work, prefect_api)
    assert p.returncode == 0, p.stderr
    gguf = os.path.relpath(p.stdout.strip(), work)
    assert gguf == f"smol/smollm2-135m/{smollm2_gguf.name}"
    p = _run(["shard", "data/curated", "--out", "data/shards-smol", "--tokenizer", gguf], work, prefect_api)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _run(["finetune", gguf, "--data", "data/shards-smol", "--out", "runs/smol", "--method", "lora", *SMALL],
             work, prefect_api)
    assert p.returncode == 0, p.stderr[-3000:]
    out = work / "runs" / "smol"

    # the base path reached the trainer (which runs in the project root) as an absolute path
    spec = json.loads((out / "run.json").read_text())
    assert spec["finetune"]["base"] == str(work / gguf)

    # progress without a terminal: a line with step, smoothed loss, tokens/s and ETA; no noise
    lines = [x for x in p.stderr.splitlines() if x.startswith("train: step")]
    assert lines and "tok/s" in lines[-1] and ("ETA" in lines[0] or "done" in lines[0]), p.stderr
    for noise in ("Concurrency limits", "de-quantizing", "Traceback", "anonymous usage", "Tip:"):
        assert noise not in p.stderr, noise

    # an honest summary: named by its base, before (step 0) against after, losses as means
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == smollm2_gguf.name and result["preset"] is None and result["tokens_per_param"] is None
    assert result["val_loss_start"] is not None and result["val_loss"] is not None
    assert result["loss_mean_steps"] == 1 and result["steps"] == 4
    assert f"Validation loss {result['val_loss_start']:.4f} for the base ({smollm2_gguf.name})" in p.stderr
    # SmolLM2's own tokenizer: the base starts at a sane loss (the mismatch gave 9.8)
    assert 1.5 < result["val_loss_start"] < 5.0, result

    # a LoRA checkpoint holds the adapters, their optimizer state and the data position, not the base
    ckpt = out / "checkpoints" / "last.ckpt"
    base_bytes = 4 * (result["params"] - result["trainable_params"])          # the fp32 base
    assert ckpt.stat().st_size < 0.05 * base_bytes, (ckpt.stat().st_size, base_bytes)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["state_dict"] and all(".lora_" in k for k in state["state_dict"])
    assert state["refinery"]["base"]["sha256"] == result["finetune"]["base_sha256"]

    # the adapter loads the usual way, on the dequantized base written beside it, and matches the merge
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((out / "hf-adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(out / "hf-base")
    adapted = AutoPeftModelForCausalLM.from_pretrained(str(out / "hf-adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(out / "hf-adapter"))
    ids = tok("The committee met on Tuesday and approved the budget.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=2e-3), (a - b).abs().max()


def test_shards_in_another_tokenizers_ids_are_refused(prefect_api, smollm2_gguf, own_shards, tmp_path):
    """The project's own BPE shards for SmolLM2 used to train at loss 9.8 without a word."""
    p = _run(["finetune", str(smollm2_gguf), "--data", str(own_shards), "--out", str(tmp_path / "run"),
              "--max-steps", "2"], tmp_path, prefect_api)
    assert p.returncode == 2, p.stderr[-2000:]
    manifest = json.loads((own_shards / "manifest.json").read_text())["tokenizer"]
    assert manifest["fingerprint"][:12] in p.stderr and manifest["name"] in p.stderr
    assert "49,152 ids" in p.stderr and f"--tokenizer {smollm2_gguf}" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()                      # refused before anything started

    # the served path (no CLI in front): the flow refuses before launching the trainer
    from core.config import RefineryConfig
    from flows.train import finetune_flow

    state = finetune_flow(str(smollm2_gguf), str(own_shards), str(tmp_path / "flow"), "lora",
                          RefineryConfig.model_validate({"train": {"max_steps": 2}}), return_state=True)
    assert state.is_failed() and "tokenized with" in state.message
    assert not (tmp_path / "flow" / "train.log").exists()


def test_a_missing_base_fails_on_the_first_attempt(prefect_api, own_shards, tmp_path):
    """A missing file cannot appear on a retry: one attempt, one message (it used to be tried 3 times)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from core.config import RefineryConfig
    from core.retry import retry_options
    from flows.train import shards_fingerprint, train_task

    cfg = RefineryConfig.model_validate({"runner": {"task_retries": 2, "retry_delay_s": 0}})
    spec = {"data_dir": str(own_shards), "out_dir": str(tmp_path / "run"),
            "train": {"max_steps": 2, "seq_len": 32, "batch_size": 2, "accelerator": "cpu"},
            "finetune": {"base": str(tmp_path / "nowhere" / "base.gguf"), "method": "lora"}}

    @flow
    def attempt():
        return train_task.with_options(**retry_options(cfg.runner))(spec, shards_fingerprint(str(own_shards)))

    state = attempt(return_state=True)
    assert state.is_failed() and "no such file or folder" in state.message
    error = json.loads((tmp_path / "run" / "error.json").read_text())
    assert error["type"] == "FileNotFoundError" and error["permanent"] is True

    async def task_runs():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))

    import asyncio
    runs = asyncio.run(task_runs())
    assert len(runs) == 1 and runs[0].run_count == 1 and runs[0].state.is_failed()

    # the CLI checks before Prefect starts: one line, exit 2
    p = _run(["finetune", "nowhere/base.gguf", "--data", str(own_shards), "--out", "run"], tmp_path, prefect_api)
    assert p.returncode == 2 and p.stderr.count("no such file or folder") == 1 and "Traceback" not in p.stderr


def test_retry_condition_retries_only_what_can_heal():
    from prefect.states import Failed

    from core.faults import InjectedFault
    from core.retry import PermanentError, transient
    from models.finetune import NeedsCUDA, TokenizerMismatch
    from models.planner import PlanError
    from core.shard_format import ShardError

    for exc in (FileNotFoundError("x"), TokenizerMismatch("x"), PlanError("x"), ShardError("x"), NeedsCUDA("x"),
                PermanentError("x"), ValueError("x")):
        assert not transient(None, None, Failed(data=exc)), exc
    for exc in (InjectedFault("x"), RuntimeError("training exited with -9"), ConnectionError("x"), TimeoutError()):
        assert transient(None, None, Failed(data=exc)), exc


def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(own_shards, tmp_path):
    """SIGKILL mid-run, resume from the small checkpoint: the losses after it equal an uninterrupted run's."""
    from tests.test_finetune import datamodule, tiny_decoder
    from tests.test_train import launch, losses

    base = tiny_decoder(datamodule(own_shards))
    base.save_pretrained(str(tmp_path / "base"))

    def spec(out: str) -> dict:
        return {"data_dir": str(own_shards), "out_dir": str(tmp_path / out), "resume": True,
                "train": {"seq_len": 64, "batch_size": 4, "max_steps": 10, "lr": 1e-2, "warmup_steps": 2,
                          "val_every": 1000, "val_batches": 2, "checkpoint_every": 4, "accelerator": "cpu",
                          "export": False},
                "finetune": {"base": str(tmp_path / "base"), "method": "lora", "lora_r": 2}}

    launch(spec("straight"))
    p = launch(spec("killed"), env={"REFINERY_KILL_AT_STEP": "6"}, check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    ckpt = torch.load(tmp_path / "killed" / "checkpoints" / "step=4.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])
    base_bytes = sum(p.numel() * 4 for p in base.parameters())
    assert (tmp_path / "killed" / "checkpoints" / "step=4.ckpt").stat().st_size < base_bytes
    launch(spec("killed"))
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    result = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert result["resumed"]

    # the same checkpoint on another base is refused, naming both
    shutil.copytree(tmp_path / "killed", tmp_path / "other")
    other = tiny_decoder(datamodule(own_shards))
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save_pretrained(str(tmp_path / "base2"))
    s = {**spec("other"), "finetune": {**spec("other")["finetune"], "base": str(tmp_path / "base2")}}
    p = launch(s, check=False)
    assert p.returncode != 0 and "resume with that base" in p.stderr


def test_finetune_help_names_every_lora_and_prompt_setting():
    from flows.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["finetune"]
    text = sub.format_help()
    readme = (ROOT / "README.md").read_text()
    for flag in ("--lora-r", "--lora-alpha", "--lora-dropout", "--lora-target", "--prompt-tokens",
                 "--prompt-init-text", "--method"):
        assert flag in text and flag in readme, flag
    assert "refinery models fetch smollm2" in readme


def test_absolute_paths_anchor_every_path_field(tmp_path):
    from core.config import absolute_paths, load_config

    cfg = load_config(None, ["finetune.base=smol/m.gguf", "eval.data=[a.jsonl, /abs/b.txt]",
                             "shard.tokenizer_path=tok"])
    fixed = absolute_paths(cfg, tmp_path)
    assert fixed.finetune.base == str(tmp_path / "smol" / "m.gguf")
    assert fixed.eval.data == [str(tmp_path / "a.jsonl"), "/abs/b.txt"]
    assert fixed.shard.tokenizer_path == str(tmp_path / "tok")
    assert fixed.curate.quality.reference == cfg.curate.quality.reference      # already absolute


def test_no_telemetry_banner_in_a_terminal(tmp_path):
    """Prefect prints a first-run telemetry notice on a TTY unless DO_NOT_TRACK is set: the CLI sets it."""
    import pty
    import select

    def in_pty(code: str, env: dict) -> str:
        master, slave = pty.openpty()
        p = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                             env=env, close_fds=True)
        os.close(slave)
        out = b""
        while True:
            r, _, _ = select.select([master], [], [], 60)
            if not r:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        p.wait(timeout=60)
        os.close(master)
        return out.decode(errors="replace")

    env = {k: v for k, v in os.environ.items() if k != "DO_NOT_TRACK"}
    plain = in_pty("import prefect", {**env, "PREFECT_HOME": str(tmp_path / "a")})
    ours = in_pty("import flows.cli, prefect", {**env, "PREFECT_HOME": str(tmp_path / "b")})
    if "anonymous usage" not in plain:
        pytest.skip("Prefect shows no telemetry notice here (a CI environment variable is set)")
    assert "anonymous usage" not in ours, ours
