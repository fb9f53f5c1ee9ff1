"""The funnel report: per-stage documents and tokens, merged from shard stats, and its plots."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

TOKEN_UNIT = "words: \\w+ matches, the n_words of extraction, used by every stage"


class Count(BaseModel):
    docs: int
    tokens: int


class StageRow(BaseModel):
    """One funnel row: what reached a stage and what left it, drops (and their words) by reason."""
    stage: str
    docs_in: int
    docs_out: int
    tokens_in: int
    tokens_out: int
    drops: dict[str, int]
    dropped_tokens: dict[str, int]
    histogram: list[int] | None = None     # a model stage's score histogram (toxicity share)


class Funnel(BaseModel):
    """funnel.json: the curation funnel, built by build_funnel and written by `dump`, the only places."""
    token_unit: str = TOKEN_UNIT
    extracted: Count
    stages: list[StageRow]
    kept: Count
    kept_token_ratio: float
    target_keep_ratio: float | None = None
    quality_threshold: dict
    extract: dict | None = None            # the extraction funnel, when curation started from WARCs
    warnings: list[str] = Field(default_factory=list)
    models: dict = Field(default_factory=dict)   # what the quality and toxicity models learnt from

    def stage(self, name: str) -> StageRow | None:
        return next((r for r in self.stages if r.stage == name), None)

    def as_dict(self) -> dict:
        """The JSON form: absent, not null, where a run has no extraction funnel or a row no histogram."""
        d = self.model_dump(mode="json")
        if d["extract"] is None:
            del d["extract"]
        for row in d["stages"]:
            if row["histogram"] is None:
                del row["histogram"]
        return d


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
            if "histogram" in st:   # a model stage's score histogram, summed bin by bin
                prev = row.get("histogram") or [0] * len(st["histogram"])
                row["histogram"] = [a + b for a, b in zip(prev, st["histogram"])]
        row["drops"] = dict(sorted(row["drops"].items(), key=lambda kv: -kv[1]))
        row["dropped_tokens"] = {k: row["dropped_tokens"][k] for k in row["drops"]}
        rows.append(row)
    return rows


def build_funnel(extract: dict | None, stage_rows: list[dict], extracted_docs: int, extracted_tokens: int,
                 threshold: dict) -> Funnel:
    kept = stage_rows[-1] if stage_rows else {"docs_out": 0, "tokens_out": 0}
    return Funnel(
        extracted=Count(docs=extracted_docs, tokens=extracted_tokens),
        stages=stage_rows,
        kept=Count(docs=kept["docs_out"], tokens=kept["tokens_out"]),
        kept_token_ratio=kept["tokens_out"] / extracted_tokens if extracted_tokens else 0.0,
        target_keep_ratio=threshold.get("target_keep_ratio"),
        quality_threshold=threshold,
        extract=None if extract is None else {"pages": extract["pages"], "docs": extract["docs"],
                                              "rejected_by_reason": extract["rejected_by_reason"]},
        warnings=[] if threshold.get("reachable", True) else [threshold["note"]])


def funnel_table(funnel: Funnel) -> list[dict]:
    total = max(funnel.extracted.tokens, 1)
    rows = []
    for r in funnel.stages:
        top = ", ".join(f"{k} {v}" for k, v in list(r.drops.items())[:3])
        rows.append({"stage": r.stage, "docs in": r.docs_in, "docs out": r.docs_out,
                     "tokens in": r.tokens_in, "tokens out": r.tokens_out,
                     "tokens kept of extracted": f"{r.tokens_out / total:.4f}", "top drops": top})
    return rows


def plot_funnel(funnel: Funnel, path: Path) -> None:
    stages = ["extracted"] + [r.stage for r in funnel.stages]
    tokens = [funnel.extracted.tokens] + [r.tokens_out for r in funnel.stages]
    docs = [funnel.extracted.docs] + [r.docs_out for r in funnel.stages]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bars = ax.bar(stages, [max(t, 1) for t in tokens], color="#4c72b0")
    ax.set_yscale("log")
    ax.set_ylabel("tokens (words) remaining, log scale")
    title = f"curation funnel: kept {funnel.kept_token_ratio:.2%} of extracted tokens"
    if funnel.target_keep_ratio:
        title += f" (target {funnel.target_keep_ratio:.2%})"
    ax.set_title(title)
    for b, d, t in zip(bars, docs, tokens):
        ax.annotate(f"{d} docs\n{t} tok", (b.get_x() + b.get_width() / 2, max(t, 1)), ha="center",
                    va="bottom", fontsize=7)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(scored_paths: list[str], threshold: float, path: Path, toxicity_hist: list[int] | None = None,
                toxicity_threshold: float | None = None, method: str = "") -> None:
    """One histogram per model stage, each with its threshold: the quality score of the documents that
    reached the quality stage, and the toxicity share of those that reached the toxicity stage."""
    parts = [pq.read_table(p, columns=["quality_score"])["quality_score"].to_numpy(zero_copy_only=False)
             for p in scored_paths]
    q = np.concatenate(parts) if parts else np.zeros(0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    lo, hi = (float(q.min()), float(q.max())) if len(q) else (0.0, 1.0)
    counts, _, _ = ax.hist(q, bins=50, range=(lo, hi if hi > lo else lo + 1), color="#55a868")
    ax.axvline(threshold, color="#c44e52", label=f"threshold {threshold:.4g}")
    kept = int((q >= threshold).sum())
    ax.set_title(f"quality score{f' ({method})' if method else ''}: {kept} of {len(q)} docs kept")
    ax.set_xlabel("score (higher: more like the reference)")
    _count_axis(ax, counts)
    ax.legend()
    ax = axes[1]
    if toxicity_hist:
        bins = len(toxicity_hist)
        ax.bar((np.arange(bins) + 0.5) / bins, toxicity_hist, width=1 / bins, color="#8172b2")
        _count_axis(ax, np.asarray(toxicity_hist))
        if toxicity_threshold is not None:
            ax.axvline(toxicity_threshold, color="#c44e52", label=f"drop above {toxicity_threshold:.2f}")
            ax.legend()
        ax.set_title(f"toxicity: share of words in toxic sentences ({sum(toxicity_hist)} docs)")
        ax.set_xlabel("share")
    else:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _count_axis(ax, counts) -> None:
    """Log counts only when a few bins dwarf the rest; small runs read better on a linear axis."""
    from matplotlib.ticker import ScalarFormatter

    if len(counts) and counts.max() > 100:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylabel("documents (log)")
    else:
        ax.set_ylabel("documents")


def model_warnings(funnel: Funnel, min_holdout_auc: float, max_toxicity_removal: float) -> list[str]:
    """What a user should look at before trusting a model stage."""
    out = []
    q = funnel.models.get("quality", {})
    auc = q.get("holdout_auc")
    if auc is not None and auc < min_holdout_auc:
        out.append(f"quality model ({q.get('method')}) separates its held-out reference chunks from held-out "
                   f"negatives at ROC-AUC {auc:.3f} < {min_holdout_auc}: too small or too crawl-like a reference, "
                   f"or negatives full of reference-like text (try negatives=crawl+background or pu_rounds=1)")
    t = funnel.models.get("toxicity", {})
    if (fpr := t.get("heldout_doc_fpr")) is not None and fpr > 0.02:
        out.append(f"toxicity model removes {fpr:.1%} of its held-out clean prose: the clean data may not "
                   f"cover your text's topics (curate.toxicity.clean_data)")
    tox = funnel.stage("toxicity")
    if tox and tox.docs_in:
        share = (tox.docs_in - tox.docs_out) / tox.docs_in
        if share > max_toxicity_removal:
            out.append(f"toxicity removed {share:.1%} of the documents that reached it (more than "
                       f"{max_toxicity_removal:.0%}): read rejected/ (stage toxicity) before trusting it")
    return out
