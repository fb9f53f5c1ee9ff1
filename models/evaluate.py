"""Bits per byte: how well a causal LM predicts text, comparable across tokenizers.

    bits_per_byte = total negative log-likelihood of the text, in bits / its UTF-8 bytes

Per-token loss and perplexity depend on the tokenizer (a coarser one has fewer, harder tokens);
bits per byte do not, so a model trained here with an 8k BPE and SmolLM2 with its 49k vocabulary
compare on the same text (nanochat reports bpb for this reason; Paloma reports it per domain).

Every token of a document is scored exactly once: the document is prefixed with the tokenizer's
BOS token (EOS where there is none: the token a packed document follows in training), so the
first text token is predicted too and the bytes are exactly the document's bytes. Long documents
are cut into non-overlapping windows of `context` tokens (each window predicts its own tokens
from within itself: the standard, slightly pessimistic, non-overlapping evaluation).

A model is a Hugging Face causal-LM folder (our exports are ones), a .gguf file (or a folder
holding one), or a peft adapter folder (LoRA merged into its base for speed; prompt tuning kept
as an input). Masked LMs (encoder) and encoder-decoders have no next-token likelihood of a text:
they are refused by name rather than given a number that means something else.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from core.eval_data import EvalSet, load_eval_set


class EvalNotSupported(ValueError):
    """The model has no causal next-token likelihood; bits per byte would be a different quantity."""


@dataclass
class Score:
    bits_per_byte: float
    loss: float            # nats per token, over every scored token
    perplexity: float
    tokens: int            # scored (predicted) tokens
    bytes: int             # UTF-8 bytes of the scored documents
    documents: int


@dataclass
class Loaded:
    model: object
    tokenizer: object
    name: str
    prompt_tokens: int = 0     # prompt tuning: virtual tokens the logits start with


# ---------------------------------------------------------------------------------------------
# loading

def load_model(path: str | Path, base: str | Path | None = None, device: str = "cpu") -> Loaded:
    """A causal LM and its tokenizer from an export, a Hugging Face folder, a .gguf, or an adapter
    folder (its base from adapter_config.json, or `base` when the adapter was moved)."""
    from models.architectures import arch_of
    from models.finetune import load_base

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder (the model to evaluate)")
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return _load_adapter(p, base, device)
    model, tok = load_base(p)
    arch = arch_of(model.config)
    if arch != "decoder":
        raise EvalNotSupported(
            f"{p}: a {arch} model ({model.config.model_type}); bits per byte needs a causal (decoder-only) LM. "
            "A masked or denoising loss is not a text's likelihood and would not compare with causal models, "
            "so none is reported")
    if tok is None:
        raise FileNotFoundError(f"{p}: no tokenizer files beside the model (tokenizer.json, tokenizer_config.json)")
    return Loaded(model.to(device).eval(), tok, str(p))


def _load_adapter(p: Path, base: str | Path | None, device: str) -> Loaded:
    from peft import PeftConfig, PeftModel

    from models.architectures import arch_of
    from models.finetune import TOKENIZER_FILES, load_base

    cfg = PeftConfig.from_pretrained(str(p))
    if base is None and not cfg.base_model_name_or_path:
        raise FileNotFoundError(f"{p}: adapter_config.json names no base model; pass --base")
    base_path = Path(base or cfg.base_model_name_or_path).expanduser()
    if not base_path.is_absolute() and not base_path.exists():
        base_path = p / base_path                 # an adapter shipped beside its base, named relatively
    if not base_path.exists():
        raise FileNotFoundError(f"{p}: its base {base_path} does not exist here; pass --base PATH")
    model, tok = load_base(base_path)
    if arch_of(model.config) != "decoder":
        raise EvalNotSupported(f"{p}: an adapter on a {arch_of(model.config)} model; bits per byte needs a causal LM")
    peft_model = PeftModel.from_pretrained(model, str(p))
    virtual = 0
    if cfg.is_prompt_learning:
        virtual = cfg.num_virtual_tokens
        model = peft_model
    else:
        model = peft_model.merge_and_unload()     # W + BA: the same function, one matmul per layer
    if any((p / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(p))
    if tok is None:
        raise FileNotFoundError(f"{p}: no tokenizer in the adapter folder or its base {base_path}")
    return Loaded(model.to(device).eval(), tok, f"{p} (adapter on {base_path})", virtual)


# ---------------------------------------------------------------------------------------------
# scoring

def windows(ids: list[int], prefix: int, context: int) -> list[list[int]]:
    """[prefix] + ids cut into inputs of at most `context` tokens; window i's targets are its inputs
    shifted by one, so the windows' targets are exactly `ids`, each once."""
    seq = [prefix] + ids
    return [seq[s:s + context + 1] for s in range(0, len(ids), context)]


def prefix_id(tok) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        if (v := getattr(tok, attr, None)) is not None:
            return int(v)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a document with")


@torch.inference_mode()
def score_texts(lm: Loaded, texts: list[str], context: int = 1024, batch_size: int = 4,
                progress=None) -> Score:
    """Sum of -log p over every token of every text, in windows of `context`, `batch_size` at a time.
    Deterministic: fixed window order, fp32 loss accumulated in float64."""
    if context < 1 or batch_size < 1:
        raise ValueError("context and batch size must be positive")
    tok, model = lm.tokenizer, lm.model
    device = next(model.parameters()).device
    start = prefix_id(tok)
    wins, n_bytes, docs = [], 0, 0
    for text in texts:
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        if not ids:
            continue
        docs += 1
        n_bytes += len(text.encode("utf-8"))
        wins += windows(ids, start, context)
    nll, tokens = 0.0, 0
    for i in range(0, len(wins), batch_size):
        batch = wins[i:i + batch_size]
        width = max(len(w) for w in batch) - 1
        x = torch.zeros((len(batch), width), dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, w in enumerate(batch):
            n = len(w) - 1
            x[j, :n] = torch.tensor(w[:-1])
            y[j, :n] = torch.tensor(w[1:])
            mask[j, :n] = 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits[:, lm.prompt_tokens:]
        loss = F.cross_entropy(logits.float().transpose(1, 2), y.to(device), ignore_index=-100, reduction="sum")
        nll += float(loss.double())
        tokens += int((y != -100).sum())
        if progress:
            progress(len(batch))
    if tokens == 0:
        raise ValueError("no text to score (every document is empty)")
    loss = nll / tokens
    return Score(bits_per_byte=nll / math.log(2) / n_bytes, loss=loss, perplexity=math.exp(min(loss, 700.0)),
                 tokens=tokens, bytes=n_bytes, documents=docs)


def count_windows(lm: Loaded, texts: list[str], context: int) -> int:
    return sum(math.ceil(len(lm.tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]) / context)
               for t in texts)


# ---------------------------------------------------------------------------------------------
# the whole evaluation

# learned absolute position embeddings: a window longer than the table is an index error, not a score
_ABSOLUTE_POSITIONS = {"gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt"}


def usable_context(lm: Loaded, context: int) -> int:
    """`context`, capped at the position table of models that have one (rotary models are not capped:
    scoring past their training length is allowed, and worse, as a direct computation would be)."""
    cfg = lm.model.config
    if cfg.model_type in _ABSOLUTE_POSITIONS:
        limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        if limit:
            return min(context, int(limit) - lm.prompt_tokens)
    return context


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def unique_names(sets: list[EvalSet]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for s in sets:
        seen[s.name] = seen.get(s.name, 0) + 1
        out.append(s.name if seen[s.name] == 1 else f"{s.name}-{seen[s.name]}")
    return out


def evaluate(model: str | Path, data: list[str | Path], context: int = 1024, batch_size: int = 4,
             device: str = "auto", base: str | Path | None = None, show_progress: bool = True,
             lm: Loaded | None = None, max_documents: int | None = None) -> dict:
    """eval.json's content: {"model", "datasets": {NAME: Score fields}, and how it was computed}.
    `max_documents` scores only the first N documents of each set (the train flow's eval stage)."""
    torch.manual_seed(0)
    sets = [load_eval_set(d) for d in data]          # bad data fails before the model loads (seconds)
    for s in sets:
        s.texts = s.texts[:max_documents] if max_documents else s.texts
        if not s.texts:
            raise ValueError(f"{s.path}: no non-empty documents to evaluate")
    t0 = time.time()
    lm = lm or load_model(model, base=base, device=pick_device(device))
    load_s = time.time() - t0
    context = usable_context(lm, context)
    out = {"model": lm.name, "context": context, "batch_size": batch_size,
           "device": str(next(lm.model.parameters()).device), "datasets": {}}
    for name, s in zip(unique_names(sets), sets):
        t1 = time.time()
        with _bar(show_progress, f"eval {name}", count_windows(lm, s.texts, context)) as advance:
            score = score_texts(lm, s.texts, context, batch_size, advance)
        out["datasets"][name] = {**asdict(score), "path": s.path, "seconds": round(time.time() - t1, 2)}
    out["load_seconds"] = round(load_s, 2)
    return out


class _bar:
    """A rich progress bar over windows (a no-op when asked for none)."""

    def __init__(self, show: bool, label: str, total: int):
        self.show, self.label, self.total = show, label, total

    def __enter__(self):
        if not self.show:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          transient=False)
        self.p.start()
        task = self.p.add_task(self.label, total=self.total)
        return lambda n: self.p.advance(task, n)

    def __exit__(self, *exc):
        if self.show:
            self.p.stop()


def write_eval(result: dict, out_dir: str | Path) -> Path:
    from core.io import write_text_atomic

    path = Path(out_dir) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(result, indent=2), path)
    return path


def table(result: dict, title: str | None = None):
    from rich.table import Table

    t = Table(title=title or f"bits per byte of {result['model']}")
    for col in ("dataset", "documents", "tokens", "bytes", "loss", "perplexity", "bits/byte"):
        t.add_column(col, justify="left" if col == "dataset" else "right")
    for name, s in result["datasets"].items():
        t.add_row(name, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['bytes']:,}", f"{s['loss']:.4f}",
                  f"{s['perplexity']:,.2f}", f"{s['bits_per_byte']:.4f}")
    return t
