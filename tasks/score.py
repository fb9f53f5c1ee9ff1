"""`refinery score`: a quality or toxicity model over the user's own texts, for evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from core.io import write_parquet_atomic


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{n}: expected an object with a string 'text' field")
            rows.append(obj)
    return rows


def score_file(kind: str, model: str, input_path: str, out_path: str) -> dict:
    if not Path(model).is_file():
        raise FileNotFoundError(f"model not found: {model}")
    rows = read_jsonl(input_path)
    texts = [r["text"] for r in rows]
    if kind == "quality":
        from tasks.quality import score_quality

        scores = {"quality_score": score_quality(model, texts)}
    else:
        from tasks.toxicity import score_toxicity

        mx, mean = score_toxicity(model, texts)
        scores = {"toxicity_score": mx, "toxicity_mean": mean}
    table = pa.Table.from_pylist(rows)
    for name, v in scores.items():
        table = table.append_column(name, pa.array([float(x) for x in v], pa.float64()))
    write_parquet_atomic(table, out_path)
    return {"texts": len(rows), "out": str(out_path),
            **{f"mean {k}": float(sum(v) / len(v)) if len(v) else None for k, v in scores.items()}}
