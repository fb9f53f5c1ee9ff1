"""The eval stage that ends every training run: bits per byte of the trained model (and, when
fine-tuning, of its base beside it) on the val shard and on every `eval.data` set.

    OUT/eval.json        the trained model, in `refinery eval`'s format
    OUT/eval-base.json   the base model (fine-tuning only)
    artifact `eval`      one row per data set: base and trained bits per byte and the change

Bits per byte rather than the trainer's loss: the loss depends on the tokenizer, so a base and a
model trained with another vocabulary, or two curation variants, compare only in bits per byte.
Each evaluation is a cached task: its key is the model's files, the data's content, the eval
settings and the code, so an unchanged base is scored once across runs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.caching import code_version, input_fingerprint
from core.config import EvalConfig, RefineryConfig
from core.io import write_text_atomic
from core.train_run import TrainResult


def eval_cache_key(context, parameters: dict) -> str:
    model = Path(parameters["model"])
    parts = [input_fingerprint(model) if model.exists() else str(model)]
    parts += [input_fingerprint(d) for d in parameters["data"]]
    parts += [json.dumps(parameters["cfg"].model_dump(mode="json"), sort_keys=True), code_version("core", "models", "tasks")]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


@task(name="evaluate", cache_key_fn=eval_cache_key, persist_result=True)
def eval_task(model: str, data: list[str], cfg: EvalConfig, out_json: str) -> dict:
    """Bits per byte of one model on each data set, written to out_json."""
    from models.evaluate import evaluate

    result = evaluate(model, data, context=cfg.context, batch_size=cfg.batch_size, device=cfg.device,
                      show_progress=False, max_documents=cfg.max_documents)
    write_text_atomic(json.dumps(result, indent=2), Path(out_json))
    return result


def eval_stage(out: Path, result: TrainResult, shards_dir: str, config: RefineryConfig) -> dict | None:
    """Evaluate the run's export (and a fine-tune's base); None when there is nothing to evaluate."""
    log = get_run_logger()
    cfg = config.eval
    export = result.export
    if not cfg.enabled or not export:
        return None
    if result.arch != "decoder":
        log.info("eval: skipped: bits per byte needs a causal LM, this run trained a %s", result.arch)
        return {"skipped": f"bits per byte needs a causal LM; this run trained a {result.arch}"}
    data = [str(Path(shards_dir) / "val")] if _has_val(shards_dir) else []
    data += [str(Path(d).expanduser().resolve()) for d in cfg.data]
    if not data:
        log.info("eval: skipped: no val split and no eval.data")
        return None
    opts = {"retries": 0}        # a model that fails to load fails again: no blind retries
    tuned = eval_task.with_options(**opts)(export, data, cfg, str(out / "eval.json"))
    base = None
    if config.finetune.base:
        base = eval_task.with_options(**opts)(str(Path(config.finetune.base).expanduser().resolve()), data, cfg,
                                              str(out / "eval-base.json"))
    # a cached result was written into another run's folder: this run's folder gets its own copy
    write_text_atomic(json.dumps(tuned, indent=2), out / "eval.json")
    if base:
        write_text_atomic(json.dumps(base, indent=2), out / "eval-base.json")
    rows = []
    for name, s in tuned["datasets"].items():
        b = base["datasets"][name] if base else None
        rows.append({"dataset": name, "documents": s["documents"], "bytes": s["bytes"],
                     "base_bits_per_byte": round(b["bits_per_byte"], 4) if b else None,
                     "bits_per_byte": round(s["bits_per_byte"], 4),
                     "change_pct": round(100 * (s["bits_per_byte"] / b["bits_per_byte"] - 1), 2) if b else None,
                     "perplexity": round(s["perplexity"], 3)})
        log.info("eval %s: %.4f bits/byte%s", name, s["bits_per_byte"],
                 f" (base {b['bits_per_byte']:.4f}, {rows[-1]['change_pct']:+.2f}%)" if b else "")
    create_table_artifact(key="eval", table=rows,
                          description="Bits per byte after training" + (" (base model beside it)" if base else ""))
    return {"rows": rows, "eval_json": str(out / "eval.json"),
            "base_eval_json": str(out / "eval-base.json") if base else None}


def _has_val(shards_dir: str) -> bool:
    from core.shard_format import ShardError, load_manifest

    try:
        return load_manifest(shards_dir).split("val").docs > 0
    except ShardError:
        return False
