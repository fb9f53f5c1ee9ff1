"""`refinery plan`, `generate`, `quantize`, `eval`: quick model tools that need no flow."""
from __future__ import annotations

import json
from pathlib import Path

from core.config import RefineryConfig


def plan(args, cfg: RefineryConfig) -> int:
    from rich.console import Console
    from rich.table import Table

    from models import planner

    t = cfg.train          # the effective config: flags are overrides of it, as for `refinery train`
    given = {"mfu": args.mfu} if args.mfu is not None else {}   # else the planner's own default
    p = planner.plan(params=args.params, tokens=args.tokens, gpu_memory_gb=args.gpu_memory, gpus=t.devices,
                     nodes=t.nodes, hours=args.hours, gpu=t.gpu or "H100", precision=t.precision,
                     strategy="fsdp" if t.strategy == "fsdp" else "ddp", seq_len=t.seq_len, micro_batch=t.batch_size,
                     keep_ratio=cfg.curate.quality.target_keep_ratio,
                     activation_checkpointing=t.activation_checkpointing, **given)
    if args.json:
        print(json.dumps(p.to_dict(), indent=2, default=str))
        return 0
    table = Table(title="Training plan", show_header=False)
    for label, value in p.rows():
        table.add_row(label, value)
    Console().print(table)
    if not p.fits:
        Console().print(f"[red]does not fit[/red]: {p.reason}")
    return 0


def generate(args, cfg: RefineryConfig) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a training run's hf/ folder)")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    torch.manual_seed(args.seed)
    ids = tok(args.prompt, return_tensors="pt", add_special_tokens=False)
    sample = args.temperature > 0
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             temperature=args.temperature if sample else None, top_p=None, top_k=None,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                             eos_token_id=tok.eos_token_id)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def quantize(args, cfg: RefineryConfig) -> int:
    from models import quantize as q

    report = q.quantize_folder(args.model, args.out, data_dir=args.data, max_batches=args.batches)
    print(json.dumps(report, indent=2))
    return 0


def eval(args, cfg: RefineryConfig) -> int:  # noqa: A001 - the subcommand's name
    """`refinery eval`: bits per byte of one model on each data set -> OUT/eval.json and a table."""
    import sys

    from rich.console import Console

    from models.evaluate import evaluate, table, write_eval

    e = cfg.eval          # --data, --context, --batch-size, --device are its fields (validated there)
    if not e.data:
        raise ValueError("--data: name at least one data set (.txt, .jsonl, Parquet, a shard folder)")
    result = evaluate(args.model, e.data, context=e.context, batch_size=e.batch_size, device=e.device,
                      base=args.base, show_progress=not args.no_progress and sys.stderr.isatty())
    path = write_eval(result, args.out)
    Console().print(table(result))
    print(f"wrote {path}")
    return 0
