"""run.json: what the train flow hands the trainer process (models/train.py), written and read here."""
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
