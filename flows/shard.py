"""The shard flow: curated documents -> a tokenizer and tokenized train/val Parquet shards.

    split cut (one pass over ids) -> tokenizer (train or copy; cached) -> tokenize (map, per
    curated shard; cached) -> manifest (written last: its presence means the shards are complete)

The same input and config give byte-identical shards and manifest; a rerun is served from cache.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from core.redact import install as install_redaction
from core import faults
from flows import progress
from flows.caching import input_fingerprint, map_shards, placed, shard_cache_key
from core.config import RefineryConfig, ShardConfig
from core.guard import confine
from core.retry import retry_options
from tasks import shard as steps
from core.io import exclusive_dir, file_sha256
from core.shard_format import SPLITS, Manifest, Split, TokenizerEntry


@task(name="shard-tokenizer", cache_key_fn=shard_cache_key, persist_result=True)
@placed
def tokenizer_task(doc_paths: list[str], input_sha256: str, out_dir: str, cut: int, config: ShardConfig) -> dict:
    out = Path(out_dir)
    info = steps.build_tokenizer(doc_paths, config, cut, out)
    info["report"] = steps.tokenizer_report(doc_paths, config, cut, out)
    tok_json = out / "tokenizer" / "tokenizer.json"
    info["sha256"] = file_sha256(tok_json)
    info["outputs"] = sorted(str(f) for f in (out / "tokenizer").rglob("*") if f.is_file())
    return info


@task(name="shard-tokenize", cache_key_fn=shard_cache_key, persist_result=True)
@placed
def tokenize_task(docs_path: str, input_sha256: str, out_dir: str, shard_name: str, cut: int, vocab_size: int,
                  config: ShardConfig) -> dict:
    faults.maybe_fail("shard-tokenize")
    return steps.tokenize_shard(docs_path, shard_name, Path(out_dir), config, cut, vocab_size)


def curated_docs(input_dir: str) -> list[Path]:
    p = Path(input_dir)
    docs = sorted((p / "docs").glob("*.parquet")) if (p / "docs").is_dir() else sorted(p.glob("*.parquet"))
    if p.suffix == ".parquet" and p.is_file():
        docs = [p]
    if not docs:
        raise FileNotFoundError(f"{input_dir}: no curated documents (expected DIR/docs/*.parquet)")
    return docs


def run_shard(input_dir: str, out_dir: str, config: RefineryConfig) -> Manifest:
    with exclusive_dir(out_dir):   # one writer per folder; what a killed run left half-written is swept
        return _shard(input_dir, Path(out_dir), config)


def _shard(input_dir: str, out: Path, config: RefineryConfig) -> Manifest:
    log = get_run_logger()
    cfg, runner = config.shard, config.runner
    opts = retry_options(runner)
    docs = curated_docs(input_dir)
    shas = {p: file_sha256(p) for p in docs}
    paths = [str(p) for p in docs]
    cut = steps.split_cut(paths, cfg)
    corpus_sha = hashlib.sha256("".join(shas[p] for p in docs).encode()).hexdigest()
    tok_sha = corpus_sha + (input_fingerprint(cfg.tokenizer_path) if cfg.tokenizer_path else "")
    tok = map_shards(tokenizer_task, [(paths, tok_sha, str(out), cut, cfg)], **opts)[0]
    log.info("tokenizer: vocabulary %d (%s)", tok["vocab_size"], "trained" if tok["trained"] else "given")

    names = {p: f"{p.stem}" for p in docs}
    args = [(str(p), f"{shas[p]}{tok['sha256']}{cut}", str(out), names[p], cut, tok["vocab_size"], cfg) for p in docs]
    done = map_shards(tokenize_task, args,
                      on_result=progress.phase("shard-progress", "shard: tokenize"), **opts)
    manifest = build_manifest(out, docs, shas, tok, done, cfg)
    remove_unlisted(out, manifest)
    manifest.write(out)
    report(out, manifest, tok)
    # what `serve.chain_train` listens for: a deployment trigger starts training on these shards
    emit_event("refinery.shard.completed", resource={"prefect.resource.id": f"refinery.shards.{out.resolve()}"},
               payload={"out_dir": str(out.resolve()), "train_tokens": manifest.split("train").tokens})
    return manifest


def build_manifest(out: Path, docs: list[Path], shas: dict, tok: dict, done: list[dict], cfg: ShardConfig) -> Manifest:
    splits = {}
    for split in SPLITS:
        files = [d["files"][split] for d in done]
        splits[split] = Split(docs=sum(f["rows"] for f in files), tokens=sum(f["tokens"] for f in files), files=files)
    vocab = tok["vocab_size"]
    return Manifest(
        tokenizer=TokenizerEntry(dir=tok["dir"], sha256=tok["sha256"], vocab_size=vocab, trained=tok["trained"],
                                 name=tok["name"], fingerprint=tok["fingerprint"],
                                 dtype="uint16" if vocab <= 1 << 16 else "uint32", special_ids=tok["special_ids"],
                                 sentinel_ids=tok["sentinel_ids"]),
        source={"inputs": [{"path": str(p.resolve()), "sha256": shas[p]} for p in docs]},
        config=cfg.model_dump(mode="json"),
        splits=splits,
        totals={"docs": sum(s.docs for s in splits.values()), "tokens": sum(s.tokens for s in splits.values()),
                "empty_docs_skipped": sum(d["empty_docs"] for d in done)},
        tokenizer_report=tok["report"],
    )


def remove_unlisted(out: Path, manifest: Manifest) -> None:
    """Shards of an earlier run on other input would otherwise sit beside the listed ones."""
    listed = {f.path for f in manifest.files()}
    for split in SPLITS:
        for p in (out / split).glob("*.parquet"):
            if str(p.relative_to(out)) not in listed:
                p.unlink()


def report(out: Path, manifest: Manifest, tok: dict) -> None:
    rep = tok["report"]
    ours, gen = rep["held_out"]["ours"], rep["held_out"]["general"]

    def cpt(x: dict) -> str:
        return f"{x['chars_per_token']:.2f}" if x["chars_per_token"] else "-"

    words = ", ".join(f"`{w['word']}` ({w['general_tokens']})" for w in rep["domain_words"][:20]) or "none found"
    md = [f"# Tokenized shards in `{out}`",
          f"Tokenizer: vocabulary {manifest.tokenizer.vocab_size}, "
          f"{'trained on the kept text' if tok['trained'] else 'given by the user'}.", "",
          "| split | documents | tokens | files |", "|---|---:|---:|---:|"]
    md += [f"| {s} | {v.docs} | {v.tokens} | {len(v.files)} |" for s, v in manifest.splits.items()]
    md += ["", f"Compression on {ours['texts']} held-out kept documents (characters per token, higher is better): "
               f"**ours {cpt(ours)}**, general {cpt(gen)} ({rep['general_tokenizer']}).", "",
           f"Domain words ours keeps whole that the general tokenizer splits (pieces): {words}"]
    create_markdown_artifact(key="tokenizer-report", markdown="\n".join(md), description="Tokenizer and shards")
    create_table_artifact(key="shard-files", table=[{"split": s, "path": f.path, "rows": f.rows, "tokens": f.tokens}
                                                    for s, v in manifest.splits.items() for f in v.files],
                          description="Tokenized shards")


@flow(name="shard", log_prints=True)
def shard_flow(input_dir: str, out_dir: str, config: RefineryConfig | None = None) -> Manifest:
    install_redaction()    # a served run runs in a process of its own: scrub its logs from the start
    cfg = config or RefineryConfig()
    confine(writes={"out_dir": out_dir}, reads={"input_dir": input_dir}, config=cfg)
    return run_shard(input_dir, out_dir, cfg)
