"""The curate flow: extracted documents (or WARC files) to the kept corpus, with the funnel.

Three shard-parallel map phases around two corpus-wide reduces (see tasks/curate.py):
filter -> dedup reduce -> score -> threshold reduce -> select. Every map task is cached on
its inputs' content hashes, the curation config and the code, so a rerun finishes from
cache and a killed run resumes after its last finished shard.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from core.redact import install as install_redaction
from core import faults
from flows import progress
from flows.caching import input_fingerprint, map_shards, placed, shard_cache_key
from core.config import CurateConfig, RefineryConfig
from core.guard import confine
from flows.extract import run_extract
from core.retry import retry_options
from tasks import curate as steps
from tasks.extract import shard_inputs
from tasks.funnel import Funnel, build_funnel, funnel_table, merge_stats, model_warnings, plot_funnel, plot_scores
from core.io import atomic_path, exclusive_dir, file_sha256, write_text_atomic


def _combine(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


# ---- tasks: thin wrappers over tasks/curate.py ------------------------------------------------

@task(name="curate-filter", cache_key_fn=shard_cache_key, persist_result=True)
@placed
def filter_task(docs_path: str, input_sha256: str, out_dir: str, shard_name: str, config: CurateConfig) -> dict:
    faults.maybe_fail("curate-filter")
    return steps.filter_shard(docs_path, shard_name, Path(out_dir) / "work", config)


@task(name="dedup-reduce", cache_key_fn=shard_cache_key, persist_result=True)
@placed
def dedup_task(signature_files: list[str], input_sha256: str, out_dir: str, config: CurateConfig) -> dict:
    from tasks.dedup import find_duplicates
    from core.io import write_parquet_atomic

    work = Path(out_dir) / "work"
    drops = find_duplicates(signature_files, config.dedup, work / "dedup")
    path = write_parquet_atomic(drops, work / "dedup_drops.parquet")
    return {"path": str(path), "sha256": file_sha256(path), "dropped": drops.num_rows, "outputs": [str(path)]}


@task(name="train-quality", cache_key_fn=shard_cache_key, persist_result=True)
@placed
def train_quality_task(docs_paths: list[str], input_sha256: str, out_dir: str, config: CurateConfig) -> dict:
    from tasks.quality import load_reference, model_filename, train_quality

    q = config.quality
    positives = load_reference(q.reference, q.chunk_words)
    ids, crawl = sample_negatives(docs_paths, q.max_negatives) if q.negatives != "background" else ([], [])
    background = load_reference(q.background, q.chunk_words) if q.negatives != "crawl" else []
    path = Path(out_dir) / "models" / model_filename(q.method)
    metrics = train_quality(positives, crawl, q, path, background=background, crawl_ids=ids)
    training = {"positives": {"texts": len(positives), "words": _words(positives), "source": q.reference,
                              "unit": f"reference chunks of ~{q.chunk_words} words"},
                "negatives": {"texts": metrics["n_neg"], "words": _words(crawl) + _words(background), "source": q.negatives,
                              "crawl_docs": metrics["n_neg_crawl"], "background_texts": metrics["n_neg_background"],
                              "background": q.background if background else [],
                              "dropped_as_likely_positive": metrics["pu_dropped"]}}
    return {"path": str(path), "sha256": file_sha256(path), "outputs": [str(path), *metrics["fold_paths"]],
            "training": training, **metrics}


def _words(texts: list[str]) -> int:
    from core.text import count_words

    return sum(count_words(t) for t in texts)


@task(name="train-toxicity", cache_key_fn=shard_cache_key, persist_result=True)
@placed
def train_toxicity_task(data_path: str, input_sha256: str, out_dir: str, config: CurateConfig) -> dict:
    from tasks.toxicity import calibration_path, load_labeled, train_toxicity

    t = config.toxicity
    texts, labels = load_labeled(data_path, t.text_column, t.label_column, t.toxic_labels)
    path = Path(out_dir) / "models" / "toxicity.bin"
    # clean prose of many topics (toxicity.clean_data), never the quality reference: trained against a
    # legal reference, the model learnt "not legal = toxic" and removed a quarter of clean news pages
    metrics = train_toxicity(texts, labels, t, path, groups_file=config.bias.groups_file)
    training = {"labelled": {"texts": len(texts), "toxic": metrics["n_toxic"], "source": data_path},
                "clean": {"sentences": metrics["n_clean_sentences"], "source": t.clean_data,
                          "heldout_chunks": metrics["n_heldout_chunks"]},
                "identity_sentences": metrics["n_identity_sentences"]}
    return {"path": str(path), "sha256": file_sha256(path), "outputs": [str(path), str(calibration_path(path))],
            "training": training, **metrics}


@task(name="curate-score", cache_key_fn=shard_cache_key, persist_result=True)
@placed
def score_task(shard_name: str, input_sha256: str, out_dir: str, drops_path: str, quality_model: str,
               quality_folds: list[str], toxicity_model: str, config: CurateConfig) -> dict:
    return steps.score_shard(shard_name, Path(out_dir) / "work", drops_path, quality_model, toxicity_model, config,
                             quality_folds)


@task(name="curate-select", cache_key_fn=shard_cache_key, persist_result=True)
@placed
def select_task(shard_name: str, input_sha256: str, out_dir: str, threshold: float, config: CurateConfig) -> dict:
    return steps.select_shard(shard_name, Path(out_dir) / "work", Path(out_dir), threshold)


def copy_toxicity_model(src: str, models: Path) -> dict:
    """A user's toxicity model, with its calibration file when it has one (else the config's threshold)."""
    from tasks.toxicity import calibration_path

    dst = Path(shutil.copyfile(src, models / "toxicity.bin"))
    side = calibration_path(dst)
    if calibration_path(src).is_file():
        with atomic_path(side) as tmp:
            shutil.copyfile(calibration_path(src), tmp)
    else:
        side.unlink(missing_ok=True)
    return {"path": str(dst), "trained": False, "source": src}


def sample_negatives(docs_paths: list[str], n: int) -> tuple[list[str], list[str]]:
    """A deterministic sample of crawl documents, (ids, texts): the n with the smallest hash of their id."""
    keyed = []
    for p in docs_paths:
        ids = pq.read_table(p, columns=["id"])["id"].to_pylist()
        keyed += [(hashlib.sha256(i.encode()).hexdigest(), p, r) for r, i in enumerate(ids)]
    keyed.sort()
    chosen: dict[str, set[int]] = {}
    for _, p, r in keyed[:n]:
        chosen.setdefault(p, set()).add(r)
    ids, texts = [], []
    for p, rows in sorted(chosen.items()):
        t = pq.read_table(p, columns=["id", "text"])
        col, idc = t["text"].to_pylist(), t["id"].to_pylist()
        texts += [col[r] for r in sorted(rows)]
        ids += [idc[r] for r in sorted(rows)]
    return ids, texts


# ---- the flow -----------------------------------------------------------------------------------

def docs_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Split inputs into extracted-docs Parquet files and raw inputs that need extraction."""
    docs, raw = [], []
    for s in inputs:
        p = Path(s)
        if p.is_dir() and (p / "docs").is_dir() and list((p / "docs").glob("*.parquet")):
            docs += sorted((p / "docs").glob("*.parquet"))
        elif p.is_dir() and list(p.glob("*.parquet")):
            docs += sorted(p.glob("*.parquet"))
        elif p.suffix == ".parquet":
            docs.append(p)
        else:
            raw.append(s)
    return docs, raw


def run_curate(inputs: list[str], out_dir: str, config: RefineryConfig) -> Funnel:
    with exclusive_dir(out_dir):   # one writer per folder; what a killed run left half-written is swept
        return _curate(inputs, Path(out_dir), config)


def _curate(inputs: list[str], out: Path, config: RefineryConfig) -> Funnel:
    log = get_run_logger()
    cfg, runner = config.curate, config.runner
    opts = retry_options(runner)
    eval_paths = [Path(e).expanduser() for e in cfg.decontaminate.paths]
    for e in eval_paths:   # fail fast, before extraction or any shard task
        if not e.exists():
            raise ValueError(f"curate.decontaminate.paths: {e}: no such file or folder (an evaluation set)")
    docs, raw = docs_inputs(inputs)
    extract = None
    if raw:
        shard_inputs(raw)  # fail fast on a missing path
        extract = run_extract(raw, str(out / "extract"), config)
        docs += sorted((out / "extract" / "docs").glob("*.parquet"))
    if not docs:
        raise ValueError("curate: no documents found in the inputs")
    shas = {p: file_sha256(p) for p in docs}
    names = {p: f"{p.stem}-{shas[p][:8]}" for p in docs}
    log.info("curate: %d shards", len(docs))

    # phase 1: filter (map) + dedup (reduce); the evaluation sets' content is part of its cache key
    eval_sha = _combine(*[input_fingerprint(e) for e in eval_paths]) if eval_paths else ""
    filtered = map_shards(filter_task, [(str(p), _combine(shas[p], eval_sha) if eval_sha else shas[p], str(out),
                                         names[p], cfg) for p in docs],
                          on_result=progress.phase("curate-filter-progress", "curate: filter + signatures"), **opts)
    sig_files = [str(out / "work" / "signatures" / f"{names[p]}.parquet") for p in docs]
    sig_sha = _combine(*[file_sha256(s) for s in sig_files])
    dedup = map_shards(dedup_task, [(sig_files, sig_sha, str(out), cfg)], **opts)[0]

    # the classifiers: the user's models, or trained here (cached)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    if cfg.quality.model_path:
        from tasks.quality import model_filename
        from tasks.select_io import method_of

        name = model_filename(method_of(cfg.quality.model_path))
        qmodel = {"path": str(shutil.copyfile(cfg.quality.model_path, models / name)), "trained": False,
                  "method": method_of(cfg.quality.model_path), "source": cfg.quality.model_path}
    else:
        bg = [input_fingerprint(b) for b in cfg.quality.background] if cfg.quality.negatives != "crawl" else []
        ref_sha = _combine(*[input_fingerprint(r) for r in cfg.quality.reference], *bg, *shas.values())
        qmodel = map_shards(train_quality_task, [([str(p) for p in docs], ref_sha, str(out), cfg)], **opts)[0]
    if cfg.toxicity.model_path:
        tmodel = copy_toxicity_model(cfg.toxicity.model_path, models)
    else:
        tox_sha = _combine(file_sha256(cfg.toxicity.training_data), file_sha256(cfg.bias.groups_file),
                           *[input_fingerprint(r) for r in cfg.toxicity.clean_data])
        tox_args = (cfg.toxicity.training_data, tox_sha, str(out), cfg)
        tmodel = map_shards(train_toxicity_task, [tox_args], **opts)[0]
    from tasks.toxicity import calibration_path

    side = calibration_path(tmodel["path"])
    folds = qmodel.get("fold_paths", [])
    model_sha = _combine(file_sha256(qmodel["path"]), *[file_sha256(f) for f in folds], file_sha256(tmodel["path"]),
                         file_sha256(side) if side.is_file() else "", dedup["sha256"])

    # phase 2: score (map) + threshold (reduce)
    scored = map_shards(score_task, [
        (names[p], _combine(file_sha256(out / "work" / "filtered" / f"{names[p]}.parquet"), model_sha), str(out),
         dedup["path"], qmodel["path"], folds, tmodel["path"], cfg) for p in docs],
        on_result=progress.phase("curate-score-progress", "curate: PII, toxicity, quality scores"), **opts)
    extracted_docs = sum(f["input_docs"] for f in filtered)
    extracted_tokens = sum(f["input_tokens"] for f in filtered)
    scored_paths = [str(out / "work" / "scored" / f"{names[p]}.parquet") for p in docs]
    threshold = steps.choose_threshold(scored_paths, extracted_tokens, cfg.quality.target_keep_ratio)

    # phase 3: select (map)
    selected = map_shards(select_task, [
        (names[p], _combine(file_sha256(sp), repr(threshold["threshold"])), str(out), threshold["threshold"], cfg)
        for p, sp in zip(docs, scored_paths)],
        on_result=progress.phase("curate-select-progress", "curate: select"), **opts)

    funnel = build_funnel(extract, merge_stats(filtered + scored + selected, steps.stages(cfg)),
                          extracted_docs, extracted_tokens, threshold)
    funnel.models = {"quality": qmodel, "toxicity": tmodel}
    funnel.warnings += model_warnings(funnel, cfg.quality.min_holdout_auc, cfg.toxicity.warn_removal)
    for w in funnel.warnings:
        log.warning("curate: %s", w)
    report(out, funnel, filtered, selected, scored_paths, cfg)
    return funnel


def report(out: Path, funnel: Funnel, filtered: list[dict], selected: list[dict], scored_paths: list[str],
           cfg: CurateConfig) -> None:
    from tasks.bias import audit, plot_audit

    # a rerun served from cache has the same funnel: its plots are already there (plots first, the JSON
    # last, so a JSON that matches means its plots were finished); each plot is written atomically
    funnel_json = steps.dump(funnel.as_dict())
    if not _report_current(out / "funnel.json", funnel_json, out / "funnel.png", out / "scores.png"):
        (out / "funnel.json").unlink(missing_ok=True)    # no JSON vouches for plots half redone
        with atomic_path(out / "funnel.png") as tmp:
            plot_funnel(funnel, tmp)
        tox = funnel.stage("toxicity")
        with atomic_path(out / "scores.png") as tmp:
            plot_scores(scored_paths, funnel.quality_threshold["threshold"], tmp, tox.histogram,
                        cfg.toxicity.max_share, funnel.models["quality"].get("method", ""))
        write_text_atomic(funnel_json, out / "funnel.json")
    before, after = {}, {}
    for f in filtered:
        for g, n in f["input_groups"].items():
            before[g] = before.get(g, 0) + n
    for s in selected:
        for g, n in s["kept_groups"].items():
            after[g] = after.get(g, 0) + n
    by_stage: dict[str, dict[str, int]] = {}
    for s in selected:
        for stage, c in s.get("removed_groups", {}).items():
            for g, n in c.items():
                by_stage.setdefault(stage, {})[g] = by_stage.setdefault(stage, {}).get(g, 0) + n
    bias = audit(before, after, funnel.extracted.docs, funnel.kept.docs, cfg.bias, stages=by_stage)
    bias_json = steps.dump(bias)
    if not _report_current(out / "bias.json", bias_json, out / "bias.png"):
        (out / "bias.json").unlink(missing_ok=True)
        with atomic_path(out / "bias.png") as tmp:
            plot_audit(bias, tmp)
        write_text_atomic(bias_json, out / "bias.json")

    create_table_artifact(key="curation-funnel", table=funnel_table(funnel),
                          description="Curation funnel: documents and tokens (words) per stage")
    create_markdown_artifact(key="curation-summary", markdown=summary_markdown(out, funnel, bias),
                             description="Curation summary, bias audit and sample documents")


def _report_current(json_path: Path, text: str, *plots: Path) -> bool:
    try:
        return json_path.read_text() == text and all(p.is_file() for p in plots)
    except OSError:
        return False


def summary_markdown(out: Path, funnel: Funnel, bias: dict) -> str:
    lines = [f"# Curation of {funnel.extracted.docs} documents",
             f"Kept **{funnel.kept.docs} documents, {funnel.kept.tokens} tokens** "
             f"= **{funnel.kept_token_ratio:.2%}** of extracted tokens "
             f"(target {funnel.target_keep_ratio:.2%}; tokens are words).", ""]
    for w in funnel.warnings:
        lines += [f"> **Warning:** {w}", ""]
    lines += ["| stage | docs in | docs out | tokens out | top drops |", "|---|---:|---:|---:|---|"]
    for r in funnel_table(funnel):
        lines.append(f"| {r['stage']} | {r['docs in']} | {r['docs out']} | {r['tokens out']} | {r['top drops']} |")
    lines += ["", *models_markdown(funnel.models)]
    flagged = [g for g, r in bias.get("groups", {}).items() if r.get("flagged")]
    lines += ["", f"## Bias audit: {'flagged ' + ', '.join(flagged) if flagged else 'no group flagged'}",
              f"Overall removal rate {bias['overall']['removal_rate'] or 0:.1%}; a group is flagged when its "
              f"documents are removed >= {bias['disparity_ratio']}x as often.", "",
              "| group | docs before | docs after | removal rate | ratio | most disparate stage |",
              "|---|---:|---:|---:|---:|---|"]
    for g, r in bias.get("groups", {}).items():
        ratios = {s: v for s, v in (r.get("stage_ratio") or {}).items() if v is not None}
        worst = max(ratios, key=ratios.get) if ratios else None
        rate = "-" if r["removal_rate"] is None else f"{r['removal_rate']:.1%}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {g}{' ⚠' if r['flagged'] else ''} | {r['mentions_before']} | {r['mentions_after']} | "
                     f"{rate} | {ratio} | {f'{worst} ({ratios[worst]:.2f}x)' if worst else '-'} |")
    lines += ["", f"Outputs: `{out}/docs`, `{out}/rejected`, `{out}/funnel.json`, `{out}/bias.json`"]
    return "\n".join(lines)


def models_markdown(models: dict) -> list[str]:
    """What each model stage learnt from: the size and source of every training set, and how well it
    separates held-out data. Score histograms with their thresholds: scores.png."""
    lines = ["## Models (score histograms and thresholds: scores.png)"]
    q, t = models.get("quality", {}), models.get("toxicity", {})
    if not q.get("training"):
        lines.append(f"- quality: given model `{q.get('source', q.get('path'))}` ({q.get('method', '?')})")
    else:
        pos, neg = q["training"]["positives"], q["training"]["negatives"]
        auc = q.get("holdout_auc")
        lines.append(f"- quality ({q['method']}): {pos['texts']} positives ({pos['unit']}, {pos['words']} words) "
                     f"from {', '.join(f'`{x}`' for x in pos['source'])}; {neg['texts']} negatives "
                     f"({neg['crawl_docs']} crawl documents, {neg['background_texts']} background chunks"
                     f"{', ' + str(neg['dropped_as_likely_positive']) + ' crawl documents dropped as likely positives' if neg['dropped_as_likely_positive'] else ''}); "
                     f"held-out ROC-AUC {'-' if auc is None else f'{auc:.3f}'} "
                     f"({q.get('holdout_pos')} vs {q.get('holdout_neg')} texts)")
    if not t.get("training"):
        lines.append(f"- toxicity: given model `{t.get('source', t.get('path'))}`")
    else:
        lab, clean = t["training"]["labelled"], t["training"]["clean"]
        lines.append(f"- toxicity (fasttext): {lab['texts']} labelled texts ({lab['toxic']} toxic) from "
                     f"`{lab['source']}`; {clean['sentences']} clean sentences from "
                     f"{', '.join(f'`{x}`' for x in clean['source'])}; {t['training']['identity_sentences']} "
                     f"neutral identity sentences; sentence threshold {t.get('sentence_threshold', 0):.3f}, "
                     f"calibrated on {clean['heldout_chunks']} held-out clean chunks (documents removed there: "
                     f"{t.get('heldout_doc_fpr', 0):.2%})")
    return lines


@flow(name="curate", log_prints=True)
def curate_flow(inputs: list[str], out_dir: str, config: RefineryConfig | None = None) -> Funnel:
    install_redaction()    # a served run runs in a process of its own: scrub its logs from the start
    cfg = config or RefineryConfig()
    confine(writes={"out_dir": out_dir}, reads={"inputs": inputs}, config=cfg)
    return run_curate(inputs, out_dir, cfg)
