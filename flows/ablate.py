"""`refinery ablate`: which curation setting trains the better model (DCLM's proxy-model method).

    extract the crawl once
    for each variant:  curate with the variant's settings -> shard with ONE shared tokenizer
                       -> train the same small model, same seed, same steps, same tokens per step
                       -> bits per byte on a held-out clean set (the train flow's eval stage)
    -> OUT/ablate.json, OUT/ablate.png, artifact `ablate`

Variants (names on the command line):
    none        every extracted document, unfiltered
    rules       language ID + Gopher, C4 and FineWeb rules (no dedup, PII, toxicity or quality cut)
    rules+dedup rules + exact, URL and MinHash dedup
    full-10     the whole curation, keeping 10% of the extracted words
    full-2      the whole curation, keeping 2%

Equal compute: every variant trains `train.max_steps` steps of the same batch, so a variant with
few kept tokens repeats them (the table shows the epochs) - the trade DCLM measures. Known gap: a
variant with fewer tokens than one batch trains on short batches (the loader does not pack repeated
epochs into a batch), so its tokens seen are fewer; the report's `equal_tokens` and a warning say so. The held-out
set is checked against the crawl for shared 13-grams and the count is reported: a held-out text
that leaked into the crawl would flatter the variants that keep it. Scale: the model, steps and
device are the config's `train` section (a GPU and a larger preset for a real crawl).
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from core.redact import install as install_redaction
from core.config import SAMPLE, RefineryConfig
from flows.curate import run_curate
from flows.extract import run_extract
from core.guard import confine
from flows.shard import run_shard
from flows.train import run_train
from core.eval_data import set_name
from core.io import atomic_path, write_text_atomic

VARIANTS = ("none", "rules", "rules+dedup", "full-10", "full-2")
DEFAULT_HELDOUT = SAMPLE / "curation" / "background" / "docs.jsonl"


def variant_config(name: str, cfg: RefineryConfig) -> RefineryConfig | None:
    """The curate settings of one variant (None: no curation at all)."""
    if name == "none":
        return None
    c = cfg.curate
    off = {"dedup": c.dedup.model_copy(update={"exact": False, "url": False, "minhash": False}),
           "toxicity": c.toxicity.model_copy(update={"enabled": False}),
           "pii": c.pii.model_copy(update={"enabled": False}),
           "quality": c.quality.model_copy(update={"target_keep_ratio": 1.0})}
    if name == "rules":
        update = off
    elif name == "rules+dedup":
        update = {k: v for k, v in off.items() if k != "dedup"}
    elif name.startswith("full-"):
        update = {"quality": c.quality.model_copy(update={"target_keep_ratio": int(name[5:]) / 100})}
    else:
        raise ValueError(f"unknown ablation variant {name!r}: choose from {', '.join(VARIANTS)} (full-N keeps N%)")
    return cfg.model_copy(update={"curate": c.model_copy(update=update)})


def proxy_config(cfg: RefineryConfig, heldout: str) -> RefineryConfig:
    """Every variant's training: the config's model, a fixed number of steps, the held-out set scored."""
    t = cfg.train
    steps = t.max_steps or 200
    train = t.model_copy(update={"max_steps": steps, "max_tokens": None, "val_every": steps,
                                 "checkpoint_every": steps})
    return cfg.model_copy(update={"train": train, "eval": cfg.eval.model_copy(update={"data": [heldout]})})


@flow(name="ablate", log_prints=True)
def ablate_flow(inputs: list[str] | None = None, out_dir: str = "runs/ablate", config: RefineryConfig | None = None,
                heldout: str | None = None, variants: list[str] | None = None) -> dict:
    install_redaction()    # a served run runs in a process of its own: scrub its logs from the start
    cfg = config or RefineryConfig()
    heldout = str(Path(heldout or DEFAULT_HELDOUT).expanduser().resolve())
    variants = list(variants or VARIANTS)
    for v in variants:
        variant_config(v, cfg)                           # an unknown name fails before any work
    confine(writes={"out_dir": out_dir}, reads={"inputs": inputs, "heldout": [heldout]}, config=cfg)
    log = get_run_logger()
    out = Path(out_dir)
    run_extract(list(inputs or [str(SAMPLE / "warc")]), str(out / "extract"), cfg)
    extracted_words, leaks = crawl_stats(out / "extract", heldout)
    if leaks:
        log.warning("ablate: %d crawl documents share a 13-gram with the held-out set", leaks)
    proxy = proxy_config(cfg, heldout)
    rows, tokenizer = [], None
    for name in sorted(variants, key=lambda v: v != "none"):     # `none` first: its text trains the tokenizer
        vdir = out / name
        vcfg = variant_config(name, proxy)
        docs = str(out / "extract")
        kept_words = None
        if vcfg is not None:
            funnel = run_curate([docs], str(vdir / "curate"), vcfg)
            docs, kept_words = str(vdir / "curate"), funnel.kept.tokens
        scfg = (vcfg or proxy).model_copy(deep=True)
        # one tokenizer for all: a variant's own BPE would make its loss, not its data, differ
        scfg.shard = scfg.shard.model_copy(update={"val_fraction": 0.0, "min_val_docs": 0,
                                                   **({"tokenizer_path": tokenizer} if tokenizer else {})})
        manifest = run_shard(docs, str(vdir / "shard"), scfg)
        tokenizer = tokenizer or str(vdir / "shard" / "tokenizer")
        result = run_train(str(vdir / "shard"), str(vdir / "train"), scfg)
        score = json.loads((vdir / "train" / "eval.json").read_text())["datasets"]
        held = score[set_name(heldout)]
        unique = manifest.split("train").tokens
        rows.append({"variant": name, "docs": manifest.split("train").docs, "words": kept_words
                     if kept_words is not None else extracted_words, "train_tokens": unique,
                     "tokens_seen": result.tokens_seen, "epochs": round(result.tokens_seen / max(unique, 1), 2),
                     "heldout_bits_per_byte": round(held["bits_per_byte"], 4), "final_train_loss": result.final_loss})
        log.info("ablate %s: %d docs, %d tokens (%.1f epochs) -> %.4f bits/byte on the held-out set", name,
                 rows[-1]["docs"], unique, rows[-1]["epochs"], held["bits_per_byte"])
    # a variant with fewer tokens than a batch gets short batches (models/data.py does not pack
    # repeated epochs into one batch): say so rather than present unequal runs as equal
    equal = len({r["tokens_seen"] for r in rows}) == 1
    if not equal:
        log.warning("ablate: training tokens differ between variants (%s): the smallest variants have fewer "
                    "tokens than one batch; compare them with care",
                    ", ".join(f"{r['variant']} {r['tokens_seen']:,}" for r in rows))
    report = {"heldout": heldout, "heldout_overlap_docs": leaks, "steps": proxy.train.max_steps,
              "equal_tokens": equal,
              "tokens_per_step": proxy.train.batch_size * proxy.train.seq_len * proxy.train.accumulate,
              "preset": proxy.train.preset, "seed": proxy.train.seed, "variants": rows}
    write_text_atomic(json.dumps(report, indent=2), out / "ablate.json")
    png = plot(rows, out / "ablate.png")
    create_table_artifact(key="ablate", table=rows, description="Curation variants: proxy models of equal steps"
                          + ("" if equal else " (NOT equal tokens: see tokens_seen)") + ", bits per byte on the held-out set")
    best = min(rows, key=lambda r: r["heldout_bits_per_byte"])
    create_markdown_artifact(key="ablate-summary", markdown="\n".join([
        f"# Curation ablation `{out}`", "",
        f"{len(rows)} variants, each a `{proxy.train.preset}` model trained {proxy.train.max_steps} steps x "
        f"{report['tokens_per_step']:,} tokens, seed {proxy.train.seed}; held-out set `{heldout}` "
        f"({leaks} crawl documents share a 13-gram with it)."
        + ("" if equal else " **Training tokens differ between variants** (a variant smaller than one batch "
                            "trains on short batches): see tokens seen."), "",
        "| variant | docs | train tokens | tokens seen | epochs | held-out bits/byte |", "|---|---:|---:|---:|---:|---:|"] +
        [f"| {r['variant']} | {r['docs']:,} | {r['train_tokens']:,} | {r['tokens_seen']:,} | {r['epochs']} | "
         f"{r['heldout_bits_per_byte']:.4f} |"
         for r in rows] + ["", f"Best: **{best['variant']}**. Plot: `{png}`"]))
    return report


def crawl_stats(docs_dir: Path, heldout: str) -> tuple[int, int]:
    """(extracted words, crawl documents sharing a 13-gram with the held-out set)."""
    import pyarrow.parquet as pq

    from tasks.decontaminate import load_index

    index = load_index([heldout], 13)
    words = leaks = 0
    for f in sorted((docs_dir / "docs").glob("*.parquet")):
        t = pq.read_table(f, columns=["text", "n_words"])
        words += sum(t.column("n_words").to_pylist())
        leaks += sum(index.contaminated(x)[0] for x in t.column("text").to_pylist())
    return words, leaks


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = [r["variant"] for r in rows]
    vals = [r["heldout_bits_per_byte"] for r in rows]
    bars = ax.bar(names, vals, color=["#999" if n == "none" else "#4c72b0" for n in names])
    for b, r in zip(bars, rows):
        ax.annotate(f"{r['heldout_bits_per_byte']:.3f}\n{r['epochs']} ep", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_ylim(min(vals) * 0.9, max(vals) * 1.08)
    ax.set_title("Curation variants, equal training tokens")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
