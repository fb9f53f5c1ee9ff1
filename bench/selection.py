"""Domain selection from a small reference: which method ranks a domain's documents on top of a crawl?

    .venv/bin/python bench/selection.py [--data ../shared/data] [--refs 10 30 100] [--seeds 2]
                                     [--methods tfidf fasttext ...] [--json bench/out/select.json]
                                     [--plot docs/bench-select.png]

For each domain of ../shared/data/domains (legal, medical, finance, science, general) and each R:
  reference  R documents of the domain (only documents outside the shipped background corpus);
  mix        other documents of that domain, 10% of the mix's words, and as the rest every held-out
             document of the other domains plus the English web pages (bench/corpus.py; web pages
             whose topic is the domain's own are left out, see WEB_TOPICS there). No reference
             document is ever in the mix.
Each method is trained through tasks.quality.train_quality exactly as `refinery curate` trains it
(reference cut into 200-word chunks as positives; the mix as the crawl; the shipped background; one
cross-fitting model per half of the crawl), then scores the mix as the pipeline does (tasks.quality.
score_crawl: each document by the model that did not train on it). Reported per domain, R and method, averaged over --seeds draws of reference and mix:
  auc        ROC-AUC of domain vs rest over the mix's documents;
  precision  share of the kept words that are the domain's, keeping the top-scored documents until
             half the domain's share of words is kept (the keep target a user would set);
  recall     share of the domain's words kept at that point;
  train s    the final fit (the held-out check, PU rounds and cross-fitting models come on top: "total s");
  ms/1k      scoring time per 1,000 mix documents, beside trafilatura's extraction time per 1,000 pages.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import DOMAINS, ROOT, check_data, default_data, domain_docs, web_pages  # noqa: E402

from core.config import QualityConfig  # noqa: E402
from tasks import fasttext_model as ft  # noqa: E402
from core.text import count_words  # noqa: E402
from tasks.quality import _chunks, load_reference, score_crawl, train_quality  # noqa: E402

SHARE = 0.10  # the domain's share of the mix's words
METHODS = {   # name -> QualityConfig fields
    "fasttext (crawl)": {"method": "fasttext"},          # the method before this bench
    "fasttext (background)": {"method": "fasttext", "negatives": "background"},
    "fasttext (crawl, PU x2)": {"method": "fasttext", "pu_rounds": 2},
    "dsir (crawl)": {"method": "dsir"},
    "moore-lewis (crawl)": {"method": "moore-lewis"},
    "embedding (crawl)": {"method": "embedding"},
    "tfidf (crawl+background)": {"method": "tfidf", "negatives": "crawl+background"},
    "tfidf (crawl, no cross-fitting)": {"method": "tfidf", "crossfit_folds": 1},
    "tfidf (crawl)": {"method": "tfidf"},                # the default
}


def make_mix(pools: dict[str, list[dict]], domain: str, r: int, seed: int):
    rng = np.random.default_rng(seed * 7919 + zlib.crc32(domain.encode()))
    own = [pools[domain][i] for i in rng.permutation(len(pools[domain]))]
    ref, rest = own[:r], own[r:]
    others = [d for k, docs in pools.items() if k != domain for d in docs if d["topic"] != domain]
    n_other = sum(d["n"] for d in others)
    need = SHARE / (1 - SHARE) * n_other
    mix_dom, words = [], 0
    for d in rest:
        if words >= need:
            break
        mix_dom.append(d)
        words += d["n"]
    if words < need:   # too few domain words left: fewer others instead, to keep the share
        others = [others[i] for i in rng.permutation(len(others))]
        keep, w = [], 0
        for d in others:
            if w >= words * (1 - SHARE) / SHARE:
                break
            keep.append(d)
            w += d["n"]
        others = keep
    mix = mix_dom + others
    y = np.r_[np.ones(len(mix_dom)), np.zeros(len(others))].astype(bool)
    return ref, mix, y


def at_keep(scores: np.ndarray, y: np.ndarray, n: np.ndarray) -> tuple[float, float]:
    """(precision, recall) in words, keeping top-scored documents up to half the domain's share."""
    order = np.argsort(-scores, kind="stable")
    target = 0.5 * (n * y).sum()
    k = int(np.searchsorted(np.cumsum(n[order]), target)) + 1
    kept = order[:k]
    return float((n[kept] * y[kept]).sum() / n[kept].sum()), float((n[kept] * y[kept]).sum() / (n * y).sum())


def run_one(method: str, fields: dict, ref: list[dict], mix: list[dict], y: np.ndarray, background: list[str],
            tmp: Path) -> dict:
    cfg = QualityConfig(**fields)
    positives = [c for d in ref for c in _chunks(d["text"], cfg.chunk_words)]
    texts = [d["text"] for d in mix]
    path = tmp / ("quality.bin" if cfg.method == "fasttext" else "quality.npz")
    t0 = time.perf_counter()
    ids = [d["id"] for d in mix]
    info = train_quality(positives, texts, cfg, path, background=background, crawl_ids=ids)
    total = time.perf_counter() - t0
    t1 = time.perf_counter()
    s = score_crawl(path, texts, ids, info["fold_paths"])   # as the pipeline scores its crawl
    score_s = time.perf_counter() - t1
    n = np.array([d["n"] for d in mix], dtype=np.float64)
    prec, rec = at_keep(s, y, n)
    return {"auc": ft.roc_auc(y, s), "precision": prec, "recall": rec,
            "train_s": info.get("fit_seconds", info.get("train_seconds")), "total_s": total,
            "score_ms_per_1k": 1e6 * score_s / len(texts), "holdout_auc": info.get("holdout_auc")}


def extraction_ms_per_1k(data: Path) -> float:
    """trafilatura's time per page, as the pipeline runs it, over the shipped English test pages."""
    import csv

    from core.config import ExtractConfig
    from tasks.extract import extract_html

    e = ExtractConfig()
    opts = dict(include_comments=e.include_comments, include_tables=e.include_tables, favor=e.favor,
                deduplicate=e.deduplicate)
    rows = [r for r in csv.DictReader(open(data / "html_pages" / "manifest.csv")) if r["language"] == "en"]
    pages = [((data / "html_pages" / "pages" / r["file"]).read_bytes().decode("utf-8", "replace"), r["url"])
             for r in rows]
    t0 = time.perf_counter()
    for html, url in pages:
        extract_html(html, url, opts)
    return 1e6 * (time.perf_counter() - t0) / len(pages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--refs", type=int, nargs="+", default=[10, 30, 100])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--domains", nargs="+", default=DOMAINS, choices=DOMAINS, help="target domains")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="names from METHODS (quote them)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "select.json")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "bench-select.png"), help="PNG ('' for none)")
    args = ap.parse_args()
    data = check_data(args.data)
    methods = {m: METHODS[m] for m in args.methods}
    if "embedding (crawl)" in methods:
        try:
            import tasks.select_embed  # noqa: F401
        except ImportError as e:
            print(f"skipping the embedding method: {e}")
            methods.pop("embedding (crawl)")

    pools: dict[str, list[dict]] = {d: [] for d in DOMAINS}   # every domain in every mix, whichever are targets
    for d in domain_docs(data):
        pools[d["source"]].append(d)
    pools["web"] = web_pages(data)
    for docs in pools.values():
        for d in docs:
            d["n"] = count_words(d["text"])
    background = load_reference(QualityConfig().background, QualityConfig().chunk_words)
    web_topics = {t: sum(d["topic"] == t for d in pools["web"]) for t in ("web", *DOMAINS)}
    print(f"pools: {', '.join(f'{k} {len(v)} docs' for k, v in pools.items())}; web page topics {web_topics}; "
          f"background {len(background)} chunks")
    extract_ms = extraction_ms_per_1k(data)
    print(f"extraction (trafilatura, as the pipeline runs it): {extract_ms:.0f} ms per 1,000 pages")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-select-") as tmp:
        for domain in args.domains:
            for r in args.refs:
                runs: dict[str, list[dict]] = {m: [] for m in methods}
                for seed in range(args.seeds):
                    ref, mix, y = make_mix(pools, domain, r, seed)
                    for m, fields in methods.items():
                        runs[m].append(run_one(m, fields, ref, mix, y, background, Path(tmp)))
                share = float(sum(d["n"] for d, yy in zip(mix, y) if yy) / sum(d["n"] for d in mix))
                for m, rs in runs.items():
                    row = {"domain": domain, "R": r, "method": m, "mix_docs": len(mix), "domain_docs": int(y.sum()),
                           "domain_share": round(share, 4), "seeds": args.seeds}
                    for k in ("auc", "precision", "recall", "train_s", "total_s", "score_ms_per_1k"):
                        vals = [x[k] for x in rs if x[k] is not None]
                        row[k] = float(np.mean(vals)) if vals else None
                        if k in ("auc", "precision"):
                            row[k + "_min"] = float(np.min(vals))
                    rows.append(row)
                    print(f"{domain:8s} R={r:<3d} {m:26s} auc {row['auc']:.4f} (min {row['auc_min']:.4f})  "
                          f"precision {row['precision']:.3f} (min {row['precision_min']:.3f})  "
                          f"recall {row['recall']:.3f}  train {row['train_s']:.2f}s (total {row['total_s']:.1f}s)  "
                          f"score {row['score_ms_per_1k']:.0f} ms/1k", flush=True)
    result = {"share": SHARE, "seeds": args.seeds, "extraction_ms_per_1k": extract_ms, "rows": rows,
              "pools": {k: len(v) for k, v in pools.items()}, "web_topics": web_topics}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print_markdown(rows, extract_ms)
    if args.plot:
        plot(rows, Path(args.plot))
    print(f"\nwrote {args.json}" + (f" and {args.plot}" if args.plot else ""))


def print_markdown(rows: list[dict], extract_ms: float) -> None:
    print("\n| domain | R | method | ROC-AUC | precision | recall | train s | score ms/1k docs |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['domain']} | {r['R']} | {r['method']} | {r['auc']:.3f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {r['train_s']:.2f} | {r['score_ms_per_1k']:.0f} |")
    print(f"\nextraction: {extract_ms:.0f} ms per 1,000 pages")


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    refs = sorted({r["R"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    fig = Figure(figsize=(4.2 * len(refs), 4.6), layout="constrained")
    axes = fig.subplots(1, len(refs), squeeze=False)[0]
    width = 0.8 / len(methods)
    for ax, r in zip(axes, refs):
        for i, m in enumerate(methods):
            vals = [next((x["precision"] for x in rows if x["R"] == r and x["method"] == m and x["domain"] == d), 0)
                    for d in domains]
            ax.bar(np.arange(len(domains)) + i * width, vals, width, label=m)
        ax.axhline(0.95, color="black", ls="--", lw=0.8)
        ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"R = {r} reference documents")
        ax.set_ylabel("precision at half the domain's share")
    axes[-1].legend(fontsize="x-small", loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
