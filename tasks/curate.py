"""Curation steps over one shard of extracted documents, as plain functions.

The flow (flows/curate.py) runs them in three map phases around two global reduces:

    filter  (per shard)  language ID -> Gopher repetition -> Gopher quality -> C4 -> FineWeb
                         [-> decontaminate], + dedup signatures                  -> reduce: dedup clusters
    score   (per shard)  drop duplicates -> mask PII -> toxicity (model + word list) -> quality score
                                                                                 -> reduce: quality threshold
    select  (per shard)  keep quality_score >= threshold; write docs/ and rejected/

Every phase writes Parquet and a stats dict: per stage, documents and tokens in and out
and drops by reason. Tokens are words (`\\w+`, `tasks.extract.count_words`) everywhere,
the same count extraction reports as `n_words`. The decontaminate stage (evaluation-set n-grams,
tasks/decontaminate.py) is in the funnel only when `curate.decontaminate.paths` names sets.
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
from tasks.extract import count_words
from core.io import write_parquet_atomic

RULE_STAGES = ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
FILTER_STAGES = ["langid", *RULE_STAGES, "decontaminate"]
SCORE_STAGES = ["dedup", "pii", "toxicity"]
STAGES = FILTER_STAGES + SCORE_STAGES + ["quality"]   # every stage there is; stages(cfg): those a run has

HIST_BINS = 50  # toxicity share histogram over [0, 1], summed across shards for the funnel's plot
REJECT_COLUMNS = ["id", "url", "domain", "source", "stage", "reason", "detail", "n_words", "groups", "text"]


def new_stats(stages: list[str]) -> dict:
    return {s: {"docs_in": 0, "docs_out": 0, "tokens_in": 0, "tokens_out": 0, "drops": {}, "dropped_tokens": {}}
            for s in stages}


def _drop(stats: dict, stage: str, reason: str, words: int) -> None:
    st = stats[stage]
    st["drops"][reason] = st["drops"].get(reason, 0) + 1
    st["dropped_tokens"][reason] = st["dropped_tokens"].get(reason, 0) + words


def _pass(stats: dict, stage: str, words_in: int, words_out: int, kept: bool) -> None:
    st = stats[stage]
    st["docs_in"] += 1
    st["tokens_in"] += words_in
    if kept:
        st["docs_out"] += 1
        st["tokens_out"] += words_out


def _reject_row(doc: dict, stage: str, reason: str, detail: str, words: int) -> dict:
    return {"id": doc["id"], "url": doc["url"], "domain": doc["domain"], "source": doc["source"], "stage": stage,
            "reason": reason, "detail": detail[:300], "n_words": words, "groups": doc.get("groups", []),
            "text": doc["text"]}


def reject_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema([("id", pa.string()), ("url", pa.string()), ("domain", pa.string()), ("source", pa.string()),
                        ("stage", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                        ("n_words", pa.int64()), ("groups", pa.list_(pa.string())), ("text", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def filter_stages(cfg: CurateConfig) -> list[str]:
    """The filter phase's stages for this config: decontaminate only when it has evaluation sets."""
    return [s for s in FILTER_STAGES if s != "decontaminate" or cfg.decontaminate.paths]


def stages(cfg: CurateConfig) -> list[str]:
    """The funnel's stages, in pipeline order, for this config."""
    return filter_stages(cfg) + SCORE_STAGES + ["quality"]


def _groups(texts: list[str], cfg: CurateConfig) -> list[list[str]]:
    from tasks.bias import mentions

    found = mentions(texts, cfg.bias.groups_file)
    return [[g for g, flags in found.items() if flags[i]] for i in range(len(texts))]


# ---- phase 1: filter ----------------------------------------------------------------------

def filter_shard(docs_path: str, shard: str, work: Path, cfg: CurateConfig) -> dict:
    """Language ID, heuristic rules and (when configured) evaluation-set decontamination; survivors
    get dedup signatures."""
    from tasks.dedup import signatures
    from tasks.langid import identify, keep_language
    from tasks.rules import apply_rules

    docs = pq.read_table(docs_path).to_pylist()
    stats = new_stats(filter_stages(cfg))
    decon = None
    if cfg.decontaminate.paths:
        from tasks.decontaminate import load_index

        decon = load_index(cfg.decontaminate.paths, cfg.decontaminate.ngram)   # once per process
        eval_reason = f"eval {cfg.decontaminate.ngram}-gram"
    texts = [d["text"] for d in docs]
    groups = _groups(texts, cfg)
    langs = identify(texts, cfg.langid)
    kept, rejected = [], []
    before = {"docs": len(docs), "tokens": 0, "groups": Counter()}
    for d, g, (lang, score) in zip(docs, groups, langs):
        d["groups"], d["lang"], d["lang_score"] = g, lang, float(score)
        words = d["n_words"]
        before["tokens"] += words
        before["groups"].update(g)
        ok = keep_language(lang, score, cfg.langid)
        _pass(stats, "langid", words, words, ok)
        if not ok:
            _drop(stats, "langid", f"lang:{lang}" if lang in cfg.langid.languages else "other language", words)
            rejected.append(_reject_row(d, "langid", "language", f"{lang} {score:.2f}", words))
            continue
        text, reason, detail = apply_rules(d["text"], cfg.rules)
        family = reason.split(":", 1)[0] if reason else None
        edited = count_words(text)
        # one pass of the rules, booked stage by stage so each family's funnel row is exact:
        # C4 edits lines, so its output and FineWeb's input are the edited text's words
        for stage in RULE_STAGES:
            w_in = edited if stage == "fineweb" else words
            if family == stage:
                _pass(stats, stage, w_in, 0, False)
                _drop(stats, stage, reason, w_in)
                rejected.append(_reject_row(d, stage, reason, detail, w_in))
                break
            _pass(stats, stage, w_in, edited if stage in ("c4", "fineweb") else words, True)
        else:
            if decon is not None:   # the text as kept (C4-edited) against the evaluation sets
                hit, eval_detail = decon.contaminated(text)
                _pass(stats, "decontaminate", edited, edited, not hit)
                if hit:
                    _drop(stats, "decontaminate", eval_reason, edited)
                    rejected.append(_reject_row(d, "decontaminate", eval_reason, eval_detail, edited))
                    continue
            d["text"], d["n_words"], d["n_chars"] = text, edited, len(text)
            kept.append(d)
    table = pa.Table.from_pylist(kept) if kept else pa.Table.from_pylist([], schema=_kept_schema(docs_path))
    write_parquet_atomic(table, work / "filtered" / f"{shard}.parquet")
    write_parquet_atomic(reject_table(rejected), work / "rejected" / f"{shard}-filter.parquet")
    sig = signatures(table.select(["id", "url", "text", "n_words"]), shard, cfg.dedup)
    write_parquet_atomic(sig, work / "signatures" / f"{shard}.parquet")
    return {"shard": shard, "stats": stats, "input_docs": before["docs"], "input_tokens": before["tokens"],
            "input_groups": dict(before["groups"]),
            "outputs": [str(work / d / f"{shard}{x}.parquet") for d, x in
                        (("filtered", ""), ("rejected", "-filter"), ("signatures", ""))]}


def _kept_schema(docs_path: str) -> pa.Schema:
    s = pq.read_schema(docs_path)
    return s.append(pa.field("groups", pa.list_(pa.string()))).append(pa.field("lang", pa.string())) \
        .append(pa.field("lang_score", pa.float64()))


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
    stats = new_stats(SCORE_STAGES)
    docs, rejected = [], []
    for i, d in enumerate(table.to_pylist()):
        w = d["n_words"]
        _pass(stats, "dedup", w, w, i not in dup)
        if i in dup:
            r = dup[i]
            _drop(stats, "dedup", r["reason"], w)
            rejected.append(_reject_row(d, "dedup", r["reason"], f"duplicate of {r['survivor_id']}", w))
            continue
        masked, counts = mask_pii(d["text"], cfg.pii)
        new_w = count_words(masked)
        _pass(stats, "pii", w, new_w, True)
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
    stats["toxicity"]["histogram"] = np.histogram(tox_cols["toxicity_share"], bins=HIST_BINS, range=(0, 1))[0].tolist()
    scored = []
    for i, (d, reason, q) in enumerate(zip(docs, reasons, qual)):
        d.update({k: float(v[i]) for k, v in tox_cols.items()}, quality_score=float(q))
        w = d["n_words"]
        _pass(stats, "toxicity", w, w, reason is None)
        if reason:
            _drop(stats, "toxicity", reason, w)
            rejected.append(_reject_row(d, "toxicity", reason, details[i], w))
        else:
            scored.append(d)
    write_parquet_atomic(pa.Table.from_pylist(scored) if scored else _empty_scored(table.schema),
                         work / "scored" / f"{shard}.parquet")
    write_parquet_atomic(reject_table(rejected), work / "rejected" / f"{shard}-score.parquet")
    return {"shard": shard, "stats": stats, "outputs": [str(work / "scored" / f"{shard}.parquet"),
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
    stats = new_stats(["quality"])
    keep_mask = pc.greater_equal(table["quality_score"], threshold) if table.num_rows else None
    rejected = []
    for d, keep in zip(table.to_pylist(), keep_mask.to_pylist() if keep_mask is not None else []):
        _pass(stats, "quality", d["n_words"], d["n_words"], keep)
        if not keep:
            _drop(stats, "quality", "below threshold", d["n_words"])
            rejected.append(_reject_row(d, "quality", "below threshold",
                                        f"score {d['quality_score']:.4f} < {threshold:.4f}", d["n_words"]))
    kept = table.filter(keep_mask) if keep_mask is not None else table
    write_parquet_atomic(kept, out / "docs" / f"{shard}.parquet")
    parts = [pq.read_table(work / "rejected" / f"{shard}-{phase}.parquet") for phase in ("filter", "score")]
    all_rejected = pa.concat_tables(parts + [reject_table(rejected)])
    write_parquet_atomic(all_rejected, out / "rejected" / f"{shard}.parquet")
    kept_groups = Counter(g for gs in kept["groups"].to_pylist() for g in gs) if kept.num_rows else Counter()
    # which stage removed documents about which group: the bias audit's per-stage attribution
    removed_groups: dict[str, Counter] = {}
    for stage, gs in zip(all_rejected["stage"].to_pylist(), all_rejected["groups"].to_pylist()):
        c = removed_groups.setdefault(stage, Counter())
        c["*"] += 1
        c.update(gs)
    return {"shard": shard, "stats": stats, "kept_docs": kept.num_rows,
            "kept_tokens": int(pc.sum(kept["n_words"]).as_py() or 0) if kept.num_rows else 0,
            "kept_groups": dict(kept_groups), "removed_groups": {s: dict(c) for s, c in removed_groups.items()},
            "outputs": [str(out / "docs" / f"{shard}.parquet"), str(out / "rejected" / f"{shard}.parquet")]}


def dump(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=float)
