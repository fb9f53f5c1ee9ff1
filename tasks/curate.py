"""Curation over one shard of extracted documents, as plain functions.

The flow (flows/curate.py) runs them in three map phases around two global reduces:

    filter  (per shard)  the declared FILTER_STEPS: language ID -> Gopher repetition -> Gopher quality
                         -> C4 -> FineWeb [-> decontaminate], + dedup signatures   -> reduce: dedup clusters
    score   (per shard)  drop duplicates -> mask PII -> toxicity (model + word list) -> quality score
                                                                                 -> reduce: quality threshold
    select  (per shard)  keep quality_score >= threshold; write docs/ and rejected/

Every phase writes Parquet and a stats dict: per stage, documents and tokens in and out and drops
by reason, booked by `tasks.steps.Ledger`. Tokens are words (`\\w+`, `core.text.count_words`)
everywhere, the same count extraction reports as `n_words`.

Declared steps (FILTER_STEPS, run by `tasks.steps.run_steps`): every per-document filter, each a
function of a batch of documents and its config section. A new filter is one module with its
function and one line in FILTER_STEPS; stage names, the funnel's rows and which stages a run has
(`stages(cfg)`) all come from the list. Decontaminate runs, and has a funnel row, only when
`curate.decontaminate.paths` names evaluation sets.

The other stages are not filter steps, and book through the same Ledger:
- dedup: its decisions are a corpus-wide reduce over every shard's signatures (tasks/dedup.py),
  applied here as a drop list between phases; no function of one shard's documents can make them.
- pii: edits text and never drops; it runs on the documents dedup kept, in the score phase.
- toxicity: a classifier trained by the flow (a runtime input, not config) over the batch, whose
  score columns, and the quality scores computed over the same batch, are written for every document
  that reaches it; it also books a score histogram.
- quality: a corpus-wide threshold, chosen between phases from every shard's scores (`choose_threshold`).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.config import CurateConfig
from core.io import write_parquet_atomic
from core.text import count_words
from tasks import rules_c4, rules_fineweb, rules_gopher
from tasks.decontaminate import decontaminate_step
from tasks.langid import LANGID_COLUMNS, langid_step
from tasks.rules import RULES_SECTION
from tasks.steps import Ledger, Step, enabled_steps, per_document, run_steps

FILTER_STEPS = [   # the filter phase, in order (the rules in FineWeb's order)
    Step("langid", "curate.langid", langid_step, columns=LANGID_COLUMNS),
    Step("gopher_repetition", "curate.rules.gopher_repetition", per_document(rules_gopher.check_repetition)),
    Step("gopher_quality", "curate.rules.gopher_quality", per_document(rules_gopher.check_quality)),
    Step("c4", "curate.rules.c4", per_document(rules_c4.check, edits=True)),
    Step("fineweb", "curate.rules.fineweb", per_document(rules_fineweb.check)),
    Step("decontaminate", "curate.decontaminate", decontaminate_step, enabled=lambda c: bool(c.decontaminate.paths)),
]
SCORE_STAGES = ["dedup", "pii", "toxicity"]
SELECT_STAGES = ["quality"]
# derived: the rule families (tasks.rules.apply_rules runs them on one text), and every stage there is
RULE_STAGES = [s.name for s in FILTER_STEPS if (s.section or "").startswith(RULES_SECTION)]
STAGES = [s.name for s in FILTER_STEPS] + SCORE_STAGES + SELECT_STAGES   # stages(cfg): those a run has

HIST_BINS = 50  # toxicity share histogram over [0, 1], summed across shards for the funnel's plot


def filter_stages(cfg: CurateConfig, steps: list[Step] | None = None) -> list[str]:
    """The filter phase's stages for this config: decontaminate only when it has evaluation sets."""
    return [s.name for s in enabled_steps(FILTER_STEPS if steps is None else steps, cfg)]


def stages(cfg: CurateConfig, steps: list[Step] | None = None) -> list[str]:
    """The funnel's stages, in pipeline order, for this config."""
    return filter_stages(cfg, steps) + SCORE_STAGES + SELECT_STAGES


def _groups(texts: list[str], cfg: CurateConfig) -> list[list[str]]:
    from tasks.bias import mentions

    found = mentions(texts, cfg.bias.groups_file)
    return [[g for g, flags in found.items() if flags[i]] for i in range(len(texts))]


# ---- phase 1: filter ----------------------------------------------------------------------

def filter_shard(docs_path: str, shard: str, work: Path, cfg: CurateConfig, steps: list[Step] | None = None) -> dict:
    """The filter steps (FILTER_STEPS, or `steps`) over one shard; survivors get dedup signatures."""
    from tasks.dedup import signatures

    steps = FILTER_STEPS if steps is None else steps
    docs = pq.read_table(docs_path).to_pylist()
    before = {"docs": len(docs), "tokens": 0, "groups": Counter()}
    for d, g in zip(docs, _groups([d["text"] for d in docs], cfg)):   # the bias audit's "before"
        d["groups"] = g
        before["tokens"] += d["n_words"]
        before["groups"].update(g)
    ledger = Ledger(filter_stages(cfg, steps))
    kept = run_steps(docs, steps, cfg, ledger)
    table = pa.Table.from_pylist(kept) if kept else _kept_schema(docs_path, enabled_steps(steps, cfg)).empty_table()
    write_parquet_atomic(table, work / "filtered" / f"{shard}.parquet")
    write_parquet_atomic(ledger.table(), work / "rejected" / f"{shard}-filter.parquet")
    sig = signatures(table.select(["id", "url", "text", "n_words"]), shard, cfg.dedup)
    write_parquet_atomic(sig, work / "signatures" / f"{shard}.parquet")
    return {"shard": shard, "stats": ledger.stats, "input_docs": before["docs"], "input_tokens": before["tokens"],
            "input_groups": dict(before["groups"]),
            "outputs": [str(work / d / f"{shard}{x}.parquet") for d, x in
                        (("filtered", ""), ("rejected", "-filter"), ("signatures", ""))]}


def _kept_schema(docs_path: str, steps: list[Step]) -> pa.Schema:
    """The filtered shard's schema when no document is left: the input's, the groups and the steps' columns."""
    s = pq.read_schema(docs_path).append(pa.field("groups", pa.list_(pa.string())))
    for step in steps:
        for name, typ in step.columns.items():
            s = s.append(pa.field(name, pa.type_for_alias(typ)))
    return s


# ---- phase 2: score -----------------------------------------------------------------------

def score_shard(shard: str, work: Path, drops_path: str, quality_model: str, toxicity_model: str,
                cfg: CurateConfig, quality_folds: list[str] | None = None) -> dict:
    """Drop duplicates, mask PII, drop toxic documents, attach quality scores (each document by the
    cross-fitting fold model that did not train on it, when there are fold models)."""
    from tasks.pii import mask_pii
    from tasks.quality import score_crawl
    from tasks.toxicity import judge

    table = pq.read_table(work / "filtered" / f"{shard}.parquet")
    drops = pq.read_table(drops_path)
    drops = drops.filter(pc.equal(drops["shard"], shard))
    dup = {r["row"]: r for r in drops.to_pylist()}
    ledger = Ledger(SCORE_STAGES)
    docs = []
    for i, d in enumerate(table.to_pylist()):
        w = d["n_words"]
        if i in dup:
            r = dup[i]
            ledger.drop("dedup", d, w, r["reason"], f"duplicate of {r['survivor_id']}")
            continue
        ledger.keep("dedup", w, w)
        masked, counts = mask_pii(d["text"], cfg.pii)
        new_w = count_words(masked)
        ledger.keep("pii", w, new_w)
        d.update(text=masked, n_words=new_w, n_chars=len(masked), pii_email=counts.get("email", 0),
                 pii_phone=counts.get("phone", 0), pii_ip=counts.get("ip", 0))
        docs.append(d)
    texts = [d["text"] for d in docs]
    if cfg.toxicity.enabled:
        tox_cols, reasons, details = judge(toxicity_model, texts, cfg.toxicity, cfg.bias.groups_file)
    else:
        from tasks.toxicity import COLUMNS

        tox_cols = {c: np.zeros(len(texts)) for c in COLUMNS}
        reasons, details = [None] * len(texts), [""] * len(texts)
    qual = score_crawl(quality_model, texts, [d["id"] for d in docs], quality_folds or []) if docs else np.zeros(0)
    hist = np.histogram(tox_cols["toxicity_share"], bins=HIST_BINS, range=(0, 1))[0]
    ledger.stats["toxicity"]["histogram"] = hist.tolist()
    scored = []
    for i, (d, reason, q) in enumerate(zip(docs, reasons, qual)):
        d.update({k: float(v[i]) for k, v in tox_cols.items()}, quality_score=float(q))
        if reason:
            ledger.drop("toxicity", d, d["n_words"], reason, details[i])
        else:
            ledger.keep("toxicity", d["n_words"], d["n_words"])
            scored.append(d)
    write_parquet_atomic(pa.Table.from_pylist(scored) if scored else _empty_scored(table.schema),
                         work / "scored" / f"{shard}.parquet")
    write_parquet_atomic(ledger.table(), work / "rejected" / f"{shard}-score.parquet")
    return {"shard": shard, "stats": ledger.stats, "outputs": [str(work / "scored" / f"{shard}.parquet"),
                                                         str(work / "rejected" / f"{shard}-score.parquet")]}


def _empty_scored(schema: pa.Schema) -> pa.Table:
    from tasks.toxicity import COLUMNS

    for name, typ in [("pii_email", pa.int64()), ("pii_phone", pa.int64()), ("pii_ip", pa.int64()),
                      *[(c, pa.float64()) for c in COLUMNS], ("quality_score", pa.float64())]:
        schema = schema.append(pa.field(name, typ))
    return schema.empty_table()


# ---- reduce: the quality threshold --------------------------------------------------------

def choose_threshold(scored_paths: list[str], extracted_tokens: int, target_ratio: float) -> dict:
    """The token-weighted score quantile that keeps `target_ratio` of the extracted tokens.

    Documents are ranked by quality score; the threshold is the score of the document at
    which the running sum of words comes nearest the target (on a small corpus one document
    can be a sizeable share of it). Ties at the threshold are kept whole.
    """
    scores, words = [], []
    for p in scored_paths:
        t = pq.read_table(p, columns=["quality_score", "n_words"])
        scores.append(t["quality_score"].to_numpy(zero_copy_only=False))
        words.append(t["n_words"].to_numpy(zero_copy_only=False))
    s = np.concatenate(scores) if scores else np.zeros(0)
    w = np.concatenate(words) if words else np.zeros(0, dtype=np.int64)
    target = target_ratio * extracted_tokens
    available = int(w.sum())
    out = {"target_keep_ratio": target_ratio, "target_tokens": int(round(target)),
           "candidate_docs": int(len(s)), "candidate_tokens": available}
    if len(s) == 0:
        return out | {"threshold": 1.0, "reachable": False,
                      "note": "no documents survived the earlier stages"}
    if available <= target:
        return out | {"threshold": float(s.min()), "reachable": False,
                      "note": (f"target not reachable: earlier stages left {available} tokens "
                               f"({available / max(extracted_tokens, 1):.4f} of extracted), below the target "
                               f"{target_ratio}; every remaining document is kept")}
    order = np.argsort(-s, kind="stable")
    cum = np.cumsum(w[order])
    k = int(np.searchsorted(cum, target, side="left"))
    if k > 0 and (k >= len(cum) or target - cum[k - 1] < cum[k] - target):
        k -= 1  # stopping one document short lands nearer the target than taking it
    return out | {"threshold": float(s[order][min(k, len(s) - 1)]), "reachable": True, "note": ""}


# ---- phase 3: select ------------------------------------------------------------------------

def select_shard(shard: str, work: Path, out: Path, threshold: float) -> dict:
    table = pq.read_table(work / "scored" / f"{shard}.parquet")
    ledger = Ledger(SELECT_STAGES)
    keep_mask = pc.greater_equal(table["quality_score"], threshold) if table.num_rows else None
    for d, keep in zip(table.to_pylist(), keep_mask.to_pylist() if keep_mask is not None else []):
        if keep:
            ledger.keep("quality", d["n_words"], d["n_words"])
        else:
            ledger.drop("quality", d, d["n_words"], "below threshold",
                        f"score {d['quality_score']:.4f} < {threshold:.4f}")
    kept = table.filter(keep_mask) if keep_mask is not None else table
    write_parquet_atomic(kept, out / "docs" / f"{shard}.parquet")
    parts = [pq.read_table(work / "rejected" / f"{shard}-{phase}.parquet") for phase in ("filter", "score")]
    all_rejected = pa.concat_tables(parts + [ledger.table()])
    write_parquet_atomic(all_rejected, out / "rejected" / f"{shard}.parquet")
    kept_groups = Counter(g for gs in kept["groups"].to_pylist() for g in gs) if kept.num_rows else Counter()
    # which stage removed documents about which group: the bias audit's per-stage attribution
    removed_groups: dict[str, Counter] = {}
    for stage, gs in zip(all_rejected["stage"].to_pylist(), all_rejected["groups"].to_pylist()):
        c = removed_groups.setdefault(stage, Counter())
        c["*"] += 1
        c.update(gs)
    return {"shard": shard, "stats": ledger.stats, "kept_docs": kept.num_rows,
            "kept_tokens": int(pc.sum(kept["n_words"]).as_py() or 0) if kept.num_rows else 0,
            "kept_groups": dict(kept_groups), "removed_groups": {s: dict(c) for s, c in removed_groups.items()},
            "outputs": [str(out / "docs" / f"{shard}.parquet"), str(out / "rejected" / f"{shard}.parquet")]}


def dump(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=float)
