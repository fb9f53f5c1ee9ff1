"""The contract between the train flow and the trainer process (models/train.py), written and read here:
run.json (RunSpec: what a run is handed) and result.json (TrainResult: what it returns)."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.config import FinetuneConfig, TrainConfig


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: str                                   # a shard folder (absolute: the trainer runs elsewhere)
    out_dir: str                                    # the run folder
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    resume: bool = False                            # continue from OUT/checkpoints/last.ckpt
    fingerprint: str | None = None                  # the run's identity (flows.train.run_fingerprint)
    max_steps_hint: int | None = None               # the planner's step count, for the progress ETA
    progress_bar: bool = False                      # Lightning's own bar (the flow shows its own)

    def identity(self) -> str:
        """Canonical JSON of what a run's checkpoints depend on: everything but resume and fingerprint."""
        return json.dumps(self.model_dump(mode="json", exclude={"resume", "fingerprint"}), sort_keys=True)

    def write(self, path: str | Path) -> Path:
        from core.io import write_text_atomic

        return write_text_atomic(self.model_dump_json(indent=2), path)

    @classmethod
    def read(cls, path: str | Path) -> "RunSpec":
        return cls.model_validate_json(Path(path).read_text())


class FinetuneReport(BaseModel):
    model_config = ConfigDict(extra="allow")

    method: str
    trainable_params: int
    total_params: int
    trainable_fraction: float
    base: str | None = None
    base_sha256: str | None = None


class TrainResult(BaseModel):
    """result.json, written last by rank 0. Losses are means over `loss_mean_steps` steps; `val_*_start`
    is the step-0 validation (the base, or the untrained model). A fine-tune has `finetune` set, is named
    by its base (`model`), and has no preset or tokens per parameter (a pretraining budget)."""
    model_config = ConfigDict(extra="allow")   # a newer trainer's extra keys survive

    arch: str
    model: str
    preset: str | None = None
    model_type: str | None = None
    params: int
    trainable_params: int
    steps: int
    max_steps: int | None = None
    tokens_seen: int
    tokens_per_param: float | None = None
    first_loss: float | None = None
    final_loss: float | None = None
    loss_mean_steps: int | None = None
    val_loss_start: float | None = None
    val_ppl_start: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    wall_s: float
    precision: str
    devices: int
    nodes: int
    strategy: str
    skipped_batches: int = 0
    finetune: FinetuneReport | None = None
    checkpoint: str | None = None
    resumed: bool = False
    local_params_rank0: int | None = None
    export: str | None = None                      # the Hugging Face folder (hf/)
    export_paths: dict[str, str | None] | None = None   # a fine-tune's hf/, hf-adapter/, hf-base/
    outputs: list[str] = Field(default_factory=list)   # files the flow checks before trusting a cached run
    eval: dict | None = None                       # the eval stage's summary (flows/eval_stage.py)

    def write(self, out_dir: str | Path) -> Path:
        from core.io import write_text_atomic

        return write_text_atomic(self.model_dump_json(indent=2, exclude={"outputs", "eval"}),
                                 Path(out_dir) / "result.json")

    @classmethod
    def read(cls, out_dir: str | Path) -> "TrainResult":
        return cls.model_validate_json((Path(out_dir) / "result.json").read_text())

    def before_after(self) -> str:
        """One line: validation loss at step 0 (the base, or the untrained model) against the end."""
        a, b = self.val_loss_start, self.val_loss
        if a is None or b is None:
            return f"Validation loss {b if b is not None else '-'} (no step-0 validation)"
        who = f"the base ({self.model})" if self.finetune else "the untrained model"
        ppl = f"perplexity {self.val_ppl_start:,.2f} -> {self.val_ppl:,.2f}" if self.val_ppl_start and self.val_ppl else ""
        return f"Validation loss {a:.4f} for {who} -> {b:.4f} after {self.steps:,} steps ({100 * (b - a) / a:+.1f}%; {ppl})"
