"""Post-training int8 weight quantization: smaller exports, measured against the float model.

Scheme (weight-only, symmetric, per output channel, as LLM.int8()'s vector-wise weights and
GPTQ/AWQ's int8 baselines): for every nn.Linear weight row r, scale_r = max|w_r| / 127 and
q_r = round(w_r / scale_r) clamped to [-127, 127] (-128 unused: the grid stays symmetric). A row
gets its own scale because rows differ in range by orders of magnitude; one scale per matrix
would spend the 8 bits on the largest row. Activations, embeddings and norms stay float:
embeddings are lookups (no matmul to speed up) and norms are tiny and sensitive.

`Int8Linear` stores the int8 matrix and the float scales (real int8 storage: 1 byte per weight +
4 per row instead of 4 per weight, ~3.8x smaller) and dequantizes in forward (w = q * scale, then
F.linear). It saves memory and disk, not time: on CPU the dequantize costs a little per call.

Tied weights. A Linear whose weight is shared with another module (the LM head tied to the input
embeddings: our decoders up to 2048 wide, SmolLM2, T5, BERT's MLM decoder) is left in float and
stays tied. Quantizing it would either untie it (a second vocab x d matrix on disk, more bytes
than the int8 saves) or force int8 input embeddings; the embedding is stored once either way.

Saved format (a folder): model.safetensors (the state dict with int8 weights, tied duplicates
left out), config.json (the transformers config: `load_quantized` rebuilds the model from it),
quantization.json (which modules are int8, which keys are tied), plus the tokenizer if given.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.architectures import auto_class
from models.finetune import _atomic_dir

FORMAT = "refinery-int8/1"
SCHEME = "weight-only symmetric int8, absmax per output channel (scale = max|w_row| / 127)"
QMAX = 127
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 matrix, float32 scale per row) of a 2-D weight."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))   # an all-zero row: q = 0 with any scale
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight (buffer) and a float32 scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        # the bias stays float (out_features numbers); frozen: this module is for inference
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, scale = quantize_rows(linear.weight)
        m.weight_int8.copy_(q)
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.data = linear.bias.detach().clone().to(linear.weight.dtype)
        return m.to(linear.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for model code that reads `.weight` (T5 checks its dtype)."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


# ----------------------------------------------------------------------------------------------
# quantize, measure

def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (a tied weight once)."""
    seen = {}
    for t in tensors:
        seen.setdefault(id(t), t.numel() * t.element_size())
    return sum(seen.values())


def memory_bytes(model: nn.Module) -> int:
    """Parameters + buffers in memory."""
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def _shared_params(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied weights)."""
    holders: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    return {k for k, n in holders.items() if n > 1}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()):
    """(model, report): every nn.Linear swapped for an Int8Linear, IN PLACE (copy.deepcopy first to
    keep the float model). Tied Linears and names ending in one of `skip` stay float."""
    shared = _shared_params(model)
    targets, skipped = [], {}
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        if id(m.weight) in shared:
            skipped[name] = "tied to another module's weight: kept float and tied"
        elif any(name == s or name.endswith("." + s) for s in skip):
            skipped[name] = "skipped on request"
        else:
            targets.append(name)
    mem_before = memory_bytes(model)
    lin_before = tensor_bytes([model.get_submodule(n).weight for n in targets])
    for name in targets:
        _set_module(model, name, Int8Linear.from_linear(model.get_submodule(name)))
    qs = [model.get_submodule(n) for n in targets]
    lin_after = tensor_bytes([t for q in qs for t in (q.weight_int8, q.weight_scale)])
    return model, {"scheme": SCHEME, "quantized": len(targets), "skipped": skipped,
                   "linear_weight_bytes_before": lin_before, "linear_weight_bytes_after": lin_after,
                   "linear_weight_ratio": round(lin_before / lin_after, 3) if lin_after else None,
                   "memory_bytes_before": mem_before, "memory_bytes_after": memory_bytes(model)}


def int8_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]


# ----------------------------------------------------------------------------------------------
# save, load

def _dedup_state(model: nn.Module) -> tuple[dict, dict]:
    """(state dict without tied duplicates, {dropped key: key kept}); safetensors refuses shared tensors."""
    state, tied, first = {}, {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else (k,)
        if key in first:
            tied[k] = first[key]
            continue
        first[key] = k
        state[k] = v.detach().contiguous().cpu()
    return state, tied


def save_quantized(model: nn.Module, dest: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """A folder `load_quantized` reads back (written to a temporary sibling, then swapped in)."""
    from safetensors.torch import save_file

    dest = Path(dest)
    state, tied = _dedup_state(model)
    info = {"format": FORMAT, "scheme": SCHEME, "int8_modules": int8_modules(model), "tied": tied}
    with _atomic_dir(dest) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "quantization": FORMAT})
        model.config.save_pretrained(str(tmp))
        (tmp / "quantization.json").write_text(json.dumps(info, indent=2))
        if tokenizer_dir is not None:   # a tokenizer folder (the shards' tokenizer/): tokenizer files only
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
    return dest


def load_quantized(src: str | Path) -> nn.Module:
    """The model `save_quantized` wrote: built from its config, the int8 modules swapped in, weights loaded."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    src = Path(src)
    qpath = src / "quantization.json"
    if not qpath.is_file():
        raise FileNotFoundError(f"{src}: no quantization.json (not a folder save_quantized wrote)")
    info = json.loads(qpath.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{qpath}: format {info.get('format')!r}, this reader knows {FORMAT!r}")
    config = AutoConfig.from_pretrained(str(src))
    model = auto_class(config).from_config(config)
    for name in info["int8_modules"]:
        lin = model.get_submodule(name)
        _set_module(model, name, Int8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None))
    missing, unexpected = model.load_state_dict(load_file(str(src / "model.safetensors")), strict=False)
    # the tied keys are missing by design: the module rebuilt from config shares them already
    bad_missing = [k for k in missing if k not in info["tied"]]
    if bad_missing or unexpected:
        raise ValueError(f"{src}: state dict does not fit the config (missing {bad_missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    params = dict(model.named_parameters(remove_duplicate=False))
    for k, kept in info["tied"].items():
        if k in params and params[k] is not params.get(kept):
            raise ValueError(f"{src}: {k} should be tied to {kept}; the model built from the config does not tie them")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# the report: sizes and validation perplexity, float vs int8

@torch.no_grad()
def eval_loss(model: nn.Module, objective: str, batches: list[dict]) -> float:
    """Mean validation loss over `batches`, with LMModule's own loss (causal: cross-entropy of the
    logits against the already shifted labels, ignore_index -100; mlm / span: the model's loss)."""
    from models.module import LMModule

    was_training = model.training
    model.eval()
    lm = LMModule(model, objective)
    losses = [float(lm.loss(b)) for b in batches]
    model.train(was_training)
    if not losses:
        raise ValueError("no validation batches")
    return sum(losses) / len(losses)


def take_batches(loader, max_batches: int) -> list[dict]:
    """The first max_batches batches, kept so that both models see exactly the same tokens."""
    out = []
    for b in loader:
        if len(out) >= max_batches:
            break
        out.append(b)
    return out


def dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weights_file_bytes(path: str | Path) -> int:
    """Bytes of the weight files of a model folder (*.safetensors)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def quantization_report(float_model: nn.Module, quantized_model: nn.Module, loader, objective: str,
                        max_batches: int = 20, float_dir: str | Path | None = None,
                        quantized_dir: str | Path | None = None) -> dict:
    """Bytes before/after (in memory; on disk when the saved folders are given) and validation
    loss / perplexity before/after on the first `max_batches` batches of `loader`."""
    batches = take_batches(loader, max_batches)
    before, after = eval_loss(float_model, objective, batches), eval_loss(quantized_model, objective, batches)
    ppl_b, ppl_a = math.exp(min(before, 30.0)), math.exp(min(after, 30.0))
    rep = {"val_batches": len(batches), "val_tokens": sum(int(b["input_ids"].numel()) for b in batches),
           "val_loss_before": round(before, 6), "val_loss_after": round(after, 6),
           "val_ppl_before": round(ppl_b, 4), "val_ppl_after": round(ppl_a, 4),
           "ppl_change": round(ppl_a / ppl_b - 1, 6),
           "memory_bytes_before": memory_bytes(float_model), "memory_bytes_after": memory_bytes(quantized_model)}
    if float_dir is not None and quantized_dir is not None:
        rep.update(weights_bytes_before=weights_file_bytes(float_dir),
                   weights_bytes_after=weights_file_bytes(quantized_dir),
                   folder_bytes_before=dir_bytes(float_dir), folder_bytes_after=dir_bytes(quantized_dir))
    return rep


def quantize_folder(src: str | Path, dest: str | Path, data_dir: str | Path | None = None, seq_len: int = 256,
                    batch_size: int = 8, max_batches: int = 20) -> dict:
    """A CLI's worth: a base (HF folder, OUT/hf, or .gguf) -> an int8 folder at dest (+ its tokenizer),
    and with shards (`data_dir`, made with this model's tokenizer) the perplexity before/after."""
    from models.architectures import OBJECTIVE, arch_of
    from models.finetune import load_base, save_tokenizer

    float_model, tok = load_base(src)
    q, rep = quantize_int8(copy.deepcopy(float_model))
    with tempfile.TemporaryDirectory(prefix="refinery-tok-") as tmp:
        tok_dir = save_tokenizer(tok, Path(tmp) / "tokenizer") if tok is not None else None
        save_quantized(q, dest, tokenizer_dir=tok_dir)
    out = {"quantize": rep, "dest": str(dest)}
    if data_dir is not None:
        from models.data import ShardDataModule

        objective = OBJECTIVE[arch_of(float_model.config)]
        dm = ShardDataModule(str(data_dir), seq_len=seq_len, batch_size=batch_size, objective=objective)
        dm.setup()
        out["report"] = quantization_report(float_model, q, dm.val_dataloader(), objective, max_batches)
    return out
