"""The `refinery` command. Configuration is validated before any work starts."""
from __future__ import annotations

import argparse
import json
import os
import sys

# Prefect reads these at import; an offline machine must not try to phone home.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# the embedded server's first start migrates its SQLite database: 20 s is not enough on 2 cores
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import yaml  # noqa: E402

from flows.config import ConfigError, RefineryConfig, load_config  # noqa: E402


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with crawl:, extract:, runner: sections")
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
    p.add_argument("--quality-model", dest="quality_model_path", help="a trained fastText quality .bin")
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

    p = sub.add_parser("run", help="the end-to-end job (bundled real sample by default)")
    p.add_argument("--out", default="runs/sample")
    p.add_argument("--inputs", nargs="*", help="WARC files or folders instead of the bundled sample")
    p.add_argument("--no-crawl-demo", action="store_true", help="skip the loopback crawl of bundled pages")
    _common(p)

    p = sub.add_parser("config", help="print the effective configuration")
    _common(p)
    return ap


def _overrides(args: argparse.Namespace) -> list[str]:
    flags = {"allow_private_hosts": "crawl", "follow_links": "crawl", "max_depth": "crawl", "max_pages": "crawl",
             "per_host_delay_s": "crawl", "user_agent": "crawl", "workers": "extract", "timeout_s": "extract",
             "target_keep_ratio": "curate.quality", "reference": "curate.quality",
             "quality_model_path": "curate.quality", "toxicity_model_path": "curate.toxicity",
             "vocab_size": "shard", "tokenizer_path": "shard"}
    out = list(args.set)
    for name, section in flags.items():
        v = getattr(args, name, None)
        if v not in (None, False):
            field = "model_path" if name.endswith("_model_path") else name
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
    if args.command == "score":
        from tasks.score import score_file

        try:
            print(json.dumps(score_file(args.kind, args.model, args.input, args.out), indent=2))
        except (FileNotFoundError, ValueError) as e:
            print(f"refinery: {e}", file=sys.stderr)
            return 2
        return 0

    from flows import progress  # Prefect imports are slow; only pay for them when working

    if not args.no_progress and sys.stderr.isatty():
        progress.start()
    try:
        result = _dispatch(args, cfg)
    except FileNotFoundError as e:
        print(f"refinery: {e}", file=sys.stderr)
        return 2
    finally:
        progress.stop()
    print(json.dumps(result, indent=2, default=str))
    return 0


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
            {"warning": funnel["warning"]} if "warning" in funnel else {})
    if args.command == "shard":
        manifest = with_concurrency(shard_flow, cfg)(args.input, args.out, cfg)
        return {"out": args.out, "tokenizer": manifest["tokenizer"]["vocab_size"],
                "splits": {s: {k: v[k] for k in ("docs", "tokens")} for s, v in manifest["splits"].items()},
                "compression": manifest["tokenizer_report"]["held_out"]["ours"]["chars_per_token"]}
    return with_concurrency(run_flow, cfg)(args.out, args.inputs, not args.no_crawl_demo, cfg)


if __name__ == "__main__":
    sys.exit(main())
