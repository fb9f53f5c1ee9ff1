"""The funnel report: per-stage documents and tokens, merged from shard stats, and its plots."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

TOKEN_UNIT = "words: \\w+ matches, the n_words of extraction, used by every stage"


def merge_stats(parts: list[dict], stages: list[str]) -> list[dict]:
    """Sum per-shard stage stats into one row per stage, in pipeline order."""
    rows = []
    for stage in stages:
        row = {"stage": stage, "docs_in": 0, "docs_out": 0, "tokens_in": 0, "tokens_out": 0,
               "drops": {}, "dropped_tokens": {}}
        for p in parts:
            st = p["stats"].get(stage)
            if not st:
                continue
            for k in ("docs_in", "docs_out", "tokens_in", "tokens_out"):
                row[k] += st[k]
            for k in ("drops", "dropped_tokens"):
                for reason, v in st[k].items():
                    row[k][reason] = row[k].get(reason, 0) + v
        row["drops"] = dict(sorted(row["drops"].items(), key=lambda kv: -kv[1]))
        row["dropped_tokens"] = {k: row["dropped_tokens"][k] for k in row["drops"]}
        rows.append(row)
    return rows


def build_funnel(extract: dict | None, stage_rows: list[dict], extracted_docs: int, extracted_tokens: int,
                 threshold: dict) -> dict:
    kept = stage_rows[-1] if stage_rows else {"docs_out": 0, "tokens_out": 0}
    ratio = kept["tokens_out"] / extracted_tokens if extracted_tokens else 0.0
    target = threshold.get("target_keep_ratio")
    funnel = {
        "token_unit": TOKEN_UNIT,
        "extracted": {"docs": extracted_docs, "tokens": extracted_tokens},
        "stages": stage_rows,
        "kept": {"docs": kept["docs_out"], "tokens": kept["tokens_out"]},
        "kept_token_ratio": ratio,
        "target_keep_ratio": target,
        "quality_threshold": threshold,
    }
    if extract is not None:
        funnel["extract"] = {"pages": extract["pages"], "docs": extract["docs"],
                             "rejected_by_reason": extract["rejected_by_reason"]}
    if not threshold.get("reachable", True):
        funnel["warning"] = threshold["note"]
    return funnel


def funnel_table(funnel: dict) -> list[dict]:
    total = max(funnel["extracted"]["tokens"], 1)
    rows = []
    for r in funnel["stages"]:
        top = ", ".join(f"{k} {v}" for k, v in list(r["drops"].items())[:3])
        rows.append({"stage": r["stage"], "docs in": r["docs_in"], "docs out": r["docs_out"],
                     "tokens in": r["tokens_in"], "tokens out": r["tokens_out"],
                     "tokens kept of extracted": f"{r['tokens_out'] / total:.4f}", "top drops": top})
    return rows


def plot_funnel(funnel: dict, path: Path) -> None:
    stages = ["extracted"] + [r["stage"] for r in funnel["stages"]]
    tokens = [funnel["extracted"]["tokens"]] + [r["tokens_out"] for r in funnel["stages"]]
    docs = [funnel["extracted"]["docs"]] + [r["docs_out"] for r in funnel["stages"]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars = ax.bar(stages, [max(t, 1) for t in tokens], color="#4c72b0")
    ax.set_yscale("log")
    ax.set_ylabel("tokens (words) remaining, log scale")
    title = f"curation funnel: kept {funnel['kept_token_ratio']:.2%} of extracted tokens"
    if funnel.get("target_keep_ratio"):
        title += f" (target {funnel['target_keep_ratio']:.2%})"
    ax.set_title(title)
    for b, d, t in zip(bars, docs, tokens):
        ax.annotate(f"{d} docs\n{t} tok", (b.get_x() + b.get_width() / 2, max(t, 1)), ha="center",
                    va="bottom", fontsize=7)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(scored_paths: list[str], threshold: float, path: Path) -> None:
    """Histograms of quality scores (with the chosen threshold) and of toxicity."""
    cols = {"quality_score": [], "toxicity_score": []}
    for p in scored_paths:
        t = pq.read_table(p, columns=list(cols))
        for c in cols:
            cols[c].append(t[c].to_numpy(zero_copy_only=False))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (c, arrs) in zip(axes, cols.items()):
        v = np.concatenate(arrs) if arrs else np.zeros(0)
        ax.hist(v, bins=40, range=(0, 1), color="#55a868")
        ax.set_title(f"{c} ({len(v)} docs after toxicity)" if c == "quality_score" else f"{c} (kept by toxicity)")
        ax.set_xlabel("score")
        if c == "quality_score":
            ax.axvline(threshold, color="#c44e52", label=f"threshold {threshold:.3f}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
