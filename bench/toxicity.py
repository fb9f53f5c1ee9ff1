"""Toxicity removal on real held-out text: does it spare clean prose and identity mentions, and does it
still remove pages of hateful or offensive posts? Old rule and models side by side with the new ones.

    .venv/bin/python bench/toxicity.py [--data ../shared/data] [--json bench/out/toxicity.json]
                                       [--plot bench/out/toxicity.png] [--seed 0] [--sweep]

About 80 s on 2 cores (--sweep: the new rule's thresholds over a grid, about 90 s more). Prints one table,
configurations side by side; writes every figure to --json and a PNG (k toxic posts of 12 -> removal; clean
removal by source; identity flips by group).

Everything is rebuilt from the shared data folder (`--data`, default ../shared/data from the repo root;
the script fails at once without it):
  clean      English web pages (html_pages/pages, html_pages/dclm_quality_pairs, the dolma WARCs and the
             Common Crawl WARC slice, extracted with tasks.extract.extract_html, English by py3langid,
             >= 500 chars, exact duplicates once); pages of the categories spam_scam, default_server_page,
             low_quality, the DCLM negatives and the Common Crawl slice are reported as "other", not clean;
             plus every domains/*/docs.jsonl document NOT in the shipped background corpus
             (sample/build_background.py: in_background) -- law, medicine, finance, science, general.
  toxic      a stratified 20% split of Davidson et al. (seeded, per class) that no model trains on; pages of
             12 held-out posts, one per line: hate or offensive posts ("toxic"), hate only ("hate"),
             "neither" posts ("neutral", forum-like ordinary posts); and pages of 12 posts with k toxic
             ones, k = 0..12 (the plot).
  identity   every clean page a configuration keeps gets, in turn, 3 neutral sentences naming an identity
             group (EVAL_TEMPLATES x EVAL_TERMS below, none of them a training template), each inserted
             after a random line: a flip is such a page then removed.
Models: "old" = the previous trainer (tweets + the quality reference's sentences as clean), with the
default reference and with a legal-only reference (background legal documents: the user's report);
"new" = tasks.toxicity.train_toxicity with the default ToxicityConfig (tweets + clean_data + identity
templates, calibrated), and the same without identity templates. Rules: "old" = any sentence > 0.9, or
mean > 0.5, or word-list ratio > 0.01; "new" = tasks.toxicity.judge.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import DOMAINS, ROOT, domain_docs, web_pages  # noqa: E402

from core.config import BiasConfig, QualityConfig, ToxicityConfig  # noqa: E402
from tasks import fasttext_model as ft  # noqa: E402
from tasks import toxicity as tox  # noqa: E402
from tasks.quality import load_reference  # noqa: E402

POSTS_PER_PAGE = 12
OLD_RULE = {"max_score": 0.9, "max_mean_score": 0.5, "max_wordlist_ratio": 0.01}
# Held-out identity sentences: templates and words chosen here, disjoint from tox.IDENTITY_TEMPLATES.
EVAL_TEMPLATES = ("My neighbour is {a}.", "He is a {a} man.", "She is a {a} woman.", "{A} families live here.",
                  "The two {a} women run a bakery.", "Our new teacher is {a}.",
                  "A {a} couple moved in next door.", "The {a} students organised a book fair.")
EVAL_TERMS = {
    "religion": ["Muslim", "Jewish", "Christian", "Hindu", "Buddhist", "Sikh", "atheist", "Catholic"],
    "ethnicity": ["Black", "white", "Asian", "African", "Hispanic", "Latino", "Arab", "Indigenous",
                  "Native American"],
    "sexual_orientation": ["gay", "lesbian", "bisexual", "homosexual", "heterosexual", "queer"],
    "disability": ["disabled", "blind", "deaf", "autistic", "mentally ill"],
    "gender": ["transgender", "trans", "nonbinary", "female", "male"],
}
EVAL_GENDER_NOUNS = ["The two women run a bakery.", "The two men run a bakery.", "My neighbour is a woman.",
                     "The girls walked to school together.", "The boys walked to school together.",
                     "Our new teacher is a man.", "A young woman opened the shop.", "Two men fixed the roof."]


# ---- data -------------------------------------------------------------------------------------

def identity_eval() -> list[tuple[str, str]]:
    """(group, sentence) held-out identity sentences."""
    out = [(g, t.format(a=w, A=w[:1].upper() + w[1:])) for g, words in EVAL_TERMS.items()
           for w in words for t in EVAL_TEMPLATES]
    out += [("gender", s) for s in EVAL_GENDER_NOUNS]
    skeleton = lambda t: t.replace("{W}", "{w}").replace("{A}", "{w}").replace("{a}", "{w}")  # noqa: E731
    assert not {skeleton(t) for t in EVAL_TEMPLATES} & {skeleton(t) for t in tox.IDENTITY_TEMPLATES}
    return out


def davidson_split(data: Path, seed: int):
    cfg = ToxicityConfig()
    path = data / "toxicity_davidson" / "labeled_data.csv"
    texts, y = tox.load_labeled(path, cfg.text_column, cfg.label_column, cfg.toxic_labels)
    cls = np.array([int(r[cfg.label_column]) for r in csv.DictReader(open(path, encoding="utf-8"))])
    rng = np.random.default_rng(seed)
    held = np.zeros(len(y), dtype=bool)
    for c in np.unique(cls):  # stratified 20% of every class
        idx = np.flatnonzero(cls == c)
        held[rng.choice(idx, len(idx) // 5, replace=False)] = True
    return texts, y, cls, held


def post_pages(texts, idx, seed: int, groupings: int = 1) -> list[str]:
    """Pages of POSTS_PER_PAGE posts, one per line: `groupings` seeded partitions of the posts idx."""
    rng, n, out = np.random.default_rng(seed), POSTS_PER_PAGE, []
    for _ in range(groupings):
        perm = rng.permutation(idx)
        out += ["\n".join(texts[i] for i in perm[k:k + n]) for k in range(0, len(perm) - n + 1, n)]
    return out


def mixed_pages(texts, toxic_idx, neutral_idx, per_k: int, seed: int) -> dict[int, list[str]]:
    rng = np.random.default_rng(seed)
    out = {}
    for k in range(POSTS_PER_PAGE + 1):
        pages = []
        for _ in range(per_k):
            posts = [texts[i] for i in rng.choice(toxic_idx, k, replace=False)]
            posts += [texts[i] for i in rng.choice(neutral_idx, POSTS_PER_PAGE - k, replace=False)]
            rng.shuffle(posts)
            pages.append("\n".join(posts))
        out[k] = pages
    return out


def with_sentence(text: str, sentence: str, rng) -> str:
    lines = text.split("\n")
    at = int(rng.integers(0, len(lines) + 1))
    return "\n".join(lines[:at] + [sentence] + lines[at:])


# ---- models and rules -------------------------------------------------------------------------

def train_old(texts, y, cfg: ToxicityConfig, out: Path, clean_texts: list[str]) -> dict:
    """The previous trainer: the tweets plus every sentence of clean_texts as clean, no hold-out."""
    pairs = [(tox.TOXIC if v else tox.CLEAN, t) for t, v in zip(texts, y)]
    pairs += [(tox.CLEAN, s) for t in clean_texts for s in tox.split_sentences(t)]
    return ft.train_supervised(pairs, out, epoch=cfg.epoch, seed=cfg.seed, **tox._MODEL_PARAMS)


def old_rule(model, texts, cfg: ToxicityConfig, groups: str) -> list[str | None]:
    """The previous score_shard rule, with its reasons."""
    mx, mean = tox.score_toxicity(model, texts)
    wl = tox.wordlist_ratio(texts, cfg.wordlist, groups)
    return ["toxic sentence" if a > OLD_RULE["max_score"] else "toxic document" if b > OLD_RULE["max_mean_score"]
            else "word list" if c > OLD_RULE["max_wordlist_ratio"] else None for a, b, c in zip(mx, mean, wl)]


def new_rule(model, texts, cfg: ToxicityConfig, groups: str) -> list[str | None]:
    return tox.judge(model, texts, cfg, groups)[1]


# ---- evaluation -------------------------------------------------------------------------------

def evaluate(name: str, model: Path, rule, cfg, groups, ev: dict, seed: int) -> dict:
    reasons: dict[str, Counter] = {}

    def decide(texts: list[str], key: str | None = None) -> np.ndarray:
        why = rule(model, texts, cfg, groups)
        if key:
            reasons[key] = Counter(r for r in why if r)
        return np.array([r is not None for r in why], dtype=bool)

    clean = ev["clean"]
    removed = decide([d["text"] for d in clean], "clean")
    by_source = {}
    for s in sorted({d["source"] for d in clean}):
        m = np.array([d["source"] == s for d in clean])
        by_source[s] = [int(removed[m].sum()), int(m.sum())]
    web = np.array([d["source"].startswith("web:") for d in clean])
    other = decide([d["text"] for d in ev["other"]], "other") if ev["other"] else np.zeros(0, bool)
    res = {"name": name, "clean_removed": float(removed.mean()), "clean_n": len(clean),
           "clean_removed_n": int(removed.sum()),
           "web_removed": [int(removed[web].sum()), int(web.sum())],
           "domain_removed": [int(removed[~web].sum()), int((~web).sum())],
           "by_source": by_source,
           "removed_ids": [d["id"] for d, r in zip(clean, removed) if r],
           "other_removed": [int(other.sum()), len(other)]}
    for key in ("toxic", "hate", "offensive", "neutral"):
        r = decide(ev[key], key)
        res[f"{key}_pages_removed"] = float(r.mean())
        res[f"{key}_pages_n"] = len(r)
    res["mixed_removed"] = {k: float(decide(p).mean()) for k, p in ev["mixed"].items()}
    # identity flips: kept clean pages x 3 held-out identity sentences each
    rng = np.random.default_rng(seed)
    kept = [d["text"] for d, r in zip(clean, removed) if not r]
    ids = ev["identity"]
    trials, groups_of = [], []
    for text in kept:
        for j in rng.choice(len(ids), 3, replace=False):
            trials.append(with_sentence(text, ids[j][1], rng))
            groups_of.append(ids[j][0])
    flips = decide(trials)
    g = np.array(groups_of)
    res["identity_flips"] = [int(flips.sum()), len(flips)]
    res["identity_flips_by_group"] = {k: [int(flips[g == k].sum()), int((g == k).sum())] for k in EVAL_TERMS}
    # sentence level: the identity sentences alone, scored against this rule's sentence threshold
    threshold = tox.sentence_threshold(model, cfg)[0] if rule is new_rule else OLD_RULE["max_score"]
    p = ft.prob_of(ft.load(model), [s for _, s in ids], tox.TOXIC)
    gs = np.array([k for k, _ in ids])
    res["sentence_threshold"] = threshold
    res["identity_sentences_over_threshold"] = {k: [int((p[gs == k] > threshold).sum()), int((gs == k).sum())]
                                                for k in EVAL_TERMS}
    res["identity_sentence_mean_p"] = {k: float(p[gs == k].mean()) for k in EVAL_TERMS}
    top, _ = tox.score_toxicity(model, ev["heldout_posts"])
    res["heldout_post_auc"] = ft.roc_auc(ev["heldout_labels"], top)
    res["reasons"] = {k: dict(v) for k, v in reasons.items()}
    return res


def fmt_frac(a: int, b: int) -> str:
    return f"{a}/{b} ({a / b:.1%})" if b else "-"


def print_table(results: list[dict], timings: dict) -> None:
    names = [r["name"] for r in results]
    width = max(16, *(len(n) for n in names))
    rows: list[tuple[str, list[str]]] = [
        ("clean docs removed", [fmt_frac(r["clean_removed_n"], r["clean_n"]) for r in results]),
        ("  web pages", [fmt_frac(*r["web_removed"]) for r in results]),
        ("  domain docs", [fmt_frac(*r["domain_removed"]) for r in results]),
    ]
    for s in results[0]["by_source"]:
        rows.append((f"    {s}", [fmt_frac(*r["by_source"][s]) for r in results]))
    rows += [
        ("other (spam/low-q)", [fmt_frac(*r["other_removed"]) for r in results]),
        ("toxic pages removed", [f"{r['toxic_pages_removed']:.1%} of {r['toxic_pages_n']}" for r in results]),
        ("  hate-only pages", [f"{r['hate_pages_removed']:.1%} of {r['hate_pages_n']}" for r in results]),
        ("  offensive pages", [f"{r['offensive_pages_removed']:.1%} of {r['offensive_pages_n']}" for r in results]),
        ("neutral pages removed", [f"{r['neutral_pages_removed']:.1%} of {r['neutral_pages_n']}" for r in results]),
        ("identity flips", [fmt_frac(*r["identity_flips"]) for r in results]),
    ]
    for g in EVAL_TERMS:
        rows.append((f"  {g}", [fmt_frac(*r["identity_flips_by_group"][g]) for r in results]))
    rows.append(("sentence threshold", [f"{r['sentence_threshold']:.3f}" for r in results]))
    rows.append(("identity sent. > thr", [fmt_frac(sum(v[0] for v in r["identity_sentences_over_threshold"].values()),
                                                   sum(v[1] for v in r["identity_sentences_over_threshold"].values()))
                                          for r in results]))
    for g in EVAL_TERMS:
        rows.append((f"  {g} mean P", [f"{r['identity_sentence_mean_p'][g]:.3f}" for r in results]))
    rows.append(("held-out post AUC", [f"{r['heldout_post_auc']:.4f}" for r in results]))
    rows.append(("pages w/ k of 12 toxic", [""] * len(results)))
    for k in (0, 2, 3, 4, 6, 12):
        rows.append((f"  k={k}", [f"{r['mixed_removed'][k]:.0%}" for r in results]))
    label_w = max(len(label) for label, _ in rows) + 2
    print("".ljust(label_w) + "".join(n.rjust(width + 2) for n in names))
    for label, cells in rows:
        print(label.ljust(label_w) + "".join(c.rjust(width + 2) for c in cells))
    print("\ntraining: " + ", ".join(f"{k} {v['seconds']:.1f} s ({v['model_bytes'] / 2**20:.1f} MiB)"
                                     for k, v in timings.items()))


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for r in results:
        ks = sorted(r["mixed_removed"], key=int)
        ax1.plot([int(k) for k in ks], [r["mixed_removed"][k] for k in ks], marker="o", ms=3, label=r["name"])
    ax1.set_xlabel(f"toxic posts in a page of {POSTS_PER_PAGE}")
    ax1.set_ylabel("pages removed")
    ax1.set_title("pages of held-out posts")
    ax1.legend(fontsize=7)
    sources = list(results[0]["by_source"])
    w = 0.8 / len(results)
    for i, r in enumerate(results):
        ax2.bar(np.arange(len(sources)) + i * w, [a / b for a, b in (r["by_source"][s] for s in sources)], w,
                label=r["name"])
    ax2.set_xticks(np.arange(len(sources)) + 0.4 - w / 2, sources, rotation=60, ha="right", fontsize=7)
    ax2.set_ylabel("clean documents removed")
    ax2.set_title("held-out clean prose by source")
    groups = list(EVAL_TERMS)
    for i, r in enumerate(results):
        ax3.bar(np.arange(len(groups)) + i * w, [a / b if b else 0 for a, b in
                                                 (r["identity_flips_by_group"][g] for g in groups)], w, label=r["name"])
    ax3.set_xticks(np.arange(len(groups)) + 0.4 - w / 2, groups, rotation=30, ha="right", fontsize=8)
    ax3.set_ylabel("kept pages removed once one is added")
    ax3.set_title("identity flips")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--json", default=str(ROOT / "bench" / "out" / "toxicity.json"), help="results as JSON")
    ap.add_argument("--plot", default=str(ROOT / "bench" / "out" / "toxicity.png"), help="PNG ('' for none)")
    ap.add_argument("--seed", type=int, default=0, help="the Davidson split and the identity insertions")
    ap.add_argument("--sweep", action="store_true", help="also sweep the new rule's thresholds (~1 min more)")
    args = ap.parse_args()
    data = Path(args.data)
    needed = [data / "html_pages" / "manifest.csv", data / "warc", data / "toxicity_davidson" / "labeled_data.csv",
              *(data / "domains" / t / "docs.jsonl" for t in DOMAINS)]
    if missing := [str(p) for p in needed if not p.exists()]:
        sys.exit(f"bench/toxicity.py: the shared data folder is missing or incomplete ({data}): "
                 f"{', '.join(missing)}; give it with --data")

    t0 = time.perf_counter()
    pages = web_pages(data)
    docs = domain_docs(data)
    texts, y, cls, held = davidson_split(data, args.seed)
    tox_idx, neutral_idx = np.flatnonzero(held & (cls != 2)), np.flatnonzero(held & (cls == 2))
    ev = {"clean": [d for d in pages + docs if d["clean"]], "other": [d for d in pages if not d["clean"]],
          "toxic": post_pages(texts, tox_idx, args.seed + 1, 2),
          "hate": post_pages(texts, np.flatnonzero(held & (cls == 0)), args.seed + 2, 10),
          "offensive": post_pages(texts, np.flatnonzero(held & (cls == 1)), args.seed + 3, 2),
          "neutral": post_pages(texts, neutral_idx, args.seed + 4, 10),
          "mixed": mixed_pages(texts, tox_idx, neutral_idx, 40, args.seed + 5),
          "identity": identity_eval(),
          "heldout_posts": [texts[i] for i in np.flatnonzero(held)], "heldout_labels": y[held]}
    print(f"data: {len(ev['clean'])} clean documents ({Counter(d['source'] for d in ev['clean'])}), "
          f"{len(ev['other'])} other web pages; Davidson held out {held.sum()} of {len(y)} posts: "
          f"{len(ev['toxic'])} toxic, {len(ev['hate'])} hate, {len(ev['neutral'])} neutral pages "
          f"(posts regrouped 2, 10, 10 times); "
          f"{len(ev['identity'])} identity sentences ({time.perf_counter() - t0:.1f} s)")

    cfg, groups = ToxicityConfig(), BiasConfig().groups_file
    tr_texts, tr_y = [t for t, h in zip(texts, held) if not h], y[~held]
    bg = [json.loads(line) for line in (ROOT / "sample" / "curation" / "background" / "docs.jsonl")
          .read_text(encoding="utf-8").split("\n") if line.strip()]
    legal_ref = [d["text"] for d in bg if d["topic"] == "legal"]
    timings, models = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-toxicity-") as tmp:
        tmp = Path(tmp)
        q = QualityConfig()
        for key, train in [
            ("old", lambda p: train_old(tr_texts, tr_y, cfg, p, load_reference(q.reference, q.chunk_words))),
            ("old-legal", lambda p: train_old(tr_texts, tr_y, cfg, p, legal_ref)),
            ("new-noid", lambda p: tox.train_toxicity(tr_texts, tr_y, cfg, p)),
            ("new", lambda p: tox.train_toxicity(tr_texts, tr_y, cfg, p, groups_file=groups)),
        ]:
            models[key] = tmp / f"{key}.bin"
            t1 = time.perf_counter()
            info = train(models[key])
            timings[key] = {"seconds": time.perf_counter() - t1, "model_bytes": info["model_bytes"],
                            **{k: v for k, v in info.items() if k.startswith(("heldout", "sentence_thr", "n_"))}}
        configs = [("old model+rule", "old", old_rule), ("old legal-ref", "old-legal", old_rule),
                   ("new model, old rule", "new", old_rule), ("old model, new rule", "old", new_rule),
                   ("old legal, new rule", "old-legal", new_rule), ("new, no id-aug", "new-noid", new_rule),
                   ("NEW", "new", new_rule)]
        results = [evaluate(name, models[m], rule, cfg, groups, ev, args.seed) for name, m, rule in configs]
        calibration = json.loads(tox.calibration_path(models["new"]).read_text())
        sweep = []
        if args.sweep:
            for floor in (0.5, 0.7, 0.9):
                for share in (0.15, 0.2, 0.3, 0.4):
                    for k in ((1, 2) if (floor, share) == (0.5, 0.3) else (2,)):
                        c = cfg.model_copy(update={"min_sentence_score": floor, "max_share": share,
                                                   "min_toxic_sentences": k})
                        sweep.append(evaluate(f"floor {floor} share {share} k>={k}", models["new"], new_rule,
                                              c, groups, ev, args.seed))
    print()
    print_table(results, timings)
    print(f"\ncalibration (new): {calibration}")
    if sweep:
        print("\nsweep over the new model (min_sentence_score, max_share, min_toxic_sentences):")
        print(f"{'':34}{'clean':>8}{'web':>7}{'toxic':>8}{'hate':>7}{'neutral':>9}{'k=2':>6}{'k=3':>6}{'flips':>7}")
        for r in sweep:
            print(f"{r['name']:34}{r['clean_removed']:8.2%}{r['web_removed'][0]:>7}{r['toxic_pages_removed']:8.1%}"
                  f"{r['hate_pages_removed']:7.1%}{r['neutral_pages_removed']:9.1%}{r['mixed_removed'][2]:6.0%}"
                  f"{r['mixed_removed'][3]:6.0%}{r['identity_flips'][0] / r['identity_flips'][1]:7.2%}")
    new = results[-1]
    print("\nreasons (NEW): " + "; ".join(f"{k}: {dict(v) or '-'}" for k, v in new["reasons"].items()))
    print("reasons (old model+rule): " + "; ".join(f"{k}: {dict(v) or '-'}" for k, v in results[0]["reasons"].items()))
    print("NEW removed clean documents: " + (", ".join(new["removed_ids"]) or "none"))
    print("old model+rule removed clean documents: " + ", ".join(results[0]["removed_ids"]))
    print(f"targets: clean removed {new['clean_removed']:.2%} (<= 2%), toxic pages removed "
          f"{new['toxic_pages_removed']:.1%} (>= 90%), identity flips "
          f"{new['identity_flips'][0] / max(new['identity_flips'][1], 1):.2%} (<= 1%); neutral pages removed "
          f"{new['neutral_pages_removed']:.1%}   [{time.perf_counter() - t0:.0f} s in all]")
    out = {"config": cfg.model_dump(), "timings": timings, "calibration": calibration, "results": results,
           "sweep": sweep,
           "data": {"clean": len(ev["clean"]), "other": len(ev["other"]), "heldout_posts": int(held.sum())}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"results -> {args.json}")
    if args.plot:
        plot(results, Path(args.plot))
        print(f"plot -> {args.plot}")


if __name__ == "__main__":
    main()
