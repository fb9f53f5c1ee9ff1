"""Fine-tuning an existing model: load a base, make part of it trainable, export what was learned.

    base     a Hugging Face model folder (config.json; our own OUT/hf is one), a .gguf file, or a
             folder holding exactly one .gguf (llama.cpp's format: transformers dequantizes it)
    method   full    every weight trains
             lora    low-rank adapters on the attention and MLP projections (Hu et al. 2021); the
                     base is frozen
             prompt  prompt tuning (Lester et al. 2021): `prompt_tokens` trainable input embeddings
                     prepended to every sequence; the whole model is frozen
             qlora   LoRA over a 4-bit NF4 base (Dettmers et al. 2023): needs a CUDA GPU and bitsandbytes
    export   full    OUT/hf: the model + the shards' tokenizer
             lora    OUT/hf: the merged model (W + BA, a plain model any tool loads) + tokenizer;
                     OUT/hf-adapter: the adapter alone (MBs) + tokenizer, whose config names the base
                     by absolute path: the base folder itself, or, for a .gguf base, OUT/hf-base (its
                     dequantized weights), so AutoPeftModelForCausalLM.from_pretrained(OUT/hf-adapter) works
             qlora   as lora, merged into the base reloaded in fp32 (not into its 4-bit copy, which
                     would bake the quantization error into the export)
             prompt  OUT/hf: the (unchanged) base + tokenizer; OUT/hf-adapter: the prompt. There is
                     nothing to merge: the prompt is an input, so load both:
                         base = AutoModelForCausalLM.from_pretrained("OUT/hf")
                         model = PeftModel.from_pretrained(base, "OUT/hf-adapter")
                     (or AutoPeftModelForCausalLM.from_pretrained("OUT/hf-adapter"), whose config
                     names OUT/hf by absolute path)

The base's tokenizer must also tokenize the fine-tuning text: `refinery shard --tokenizer BASE` makes
shards in the base's ids (`prepare_tokenizer(base, DIR)` writes it as a folder), and
`check_shards_tokenizer` refuses shards made with any other tokenizer before training starts.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from models.architectures import arch_of, auto_class, n_params

METHODS = ("full", "lora", "prompt", "qlora")

# LoRA on every projection of attention and MLP: the QLoRA paper finds that adapting all linear
# layers is what matches full fine-tuning; attention-only (peft's default for Llama) falls short
LORA_TARGETS = {
    "decoder": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],   # Llama
    "encoder": ["query", "key", "value", "dense"],                                             # BERT
    "encoder-decoder": ["q", "k", "v", "o", "wi_0", "wi_1", "wi", "wo"],  # T5 (wi: v1.0's ungated MLP)
}
# peft wraps by task so that prompt tuning handles labels and masks; it has no masked-LM task:
# the plain PeftModel passes the batch through unchanged, which is what MLM + LoRA needs
TASK_TYPE = {"decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM", "encoder": None}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "tokenizer.model")


# ----------------------------------------------------------------------------------------------
# loading

def resolve_base(path: str | Path) -> tuple[Path, str | None]:
    """(folder, .gguf file name or None) for a base given as a folder, a .gguf file or a folder
    with one .gguf. A folder with config.json is a Hugging Face model even if it also holds a .gguf."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder (the base model to fine-tune)")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return p.parent, p.name
        raise ValueError(f"{p}: not a .gguf file; the base is a Hugging Face model folder (config.json), "
                         "a .gguf file or a folder holding one .gguf")
    if (p / "config.json").is_file():
        return p, None
    ggufs = sorted(x.name for x in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return p, ggufs[0]
    if ggufs:
        raise ValueError(f"{p}: holds {len(ggufs)} .gguf files ({', '.join(ggufs)}): give the one to use")
    raise ValueError(f"{p}: neither a Hugging Face model folder (no config.json) nor a folder with a .gguf file")


def _gguf_guard(gguf: str | None, p: Path):
    if gguf is None:
        return
    try:
        import gguf as _  # noqa: F401 - transformers reads .gguf through it
    except ImportError:
        raise ImportError(f"{p / gguf}: loading a .gguf needs the `gguf` package (pip install gguf)") from None


def load_base(path: str | Path):
    """(model, tokenizer) of a base model, in fp32 on the CPU (quantized GGUF weights are
    dequantized). The tokenizer is None when a Hugging Face folder has none."""
    from transformers import AutoConfig

    folder, gguf = resolve_base(path)
    _gguf_guard(gguf, folder)
    kw = {"gguf_file": gguf} if gguf else {}
    config = AutoConfig.from_pretrained(str(folder), **kw)
    if gguf:
        from transformers import GgufConfig

        # dense weights: transformers would otherwise keep GGUF blocks (frozen, GgufLinear) where the
        # `kernels` package is installed; LoRA needs nn.Linear and a full fine-tune needs float weights
        kw["quantization_config"] = GgufConfig(dequantize=True)
    # the config decides causal / masked / seq2seq, as for our own exports
    model = auto_class(config).from_pretrained(str(folder), config=config, dtype=torch.float32, **kw)
    if gguf and getattr(model, "hf_quantizer", None) is not None:
        # dequantized, it is a plain fp32 model; the GGUF marker would make save_pretrained refuse
        model.hf_quantizer.remove_quantization_config(model)
    model._refinery_base = str(Path(path).expanduser().resolve())   # for the qlora export (fp32 re-merge)
    return model, _load_tokenizer(folder, gguf)


class TokenizerMismatch(ValueError):
    """Shards tokenized with another tokenizer than the base model's: their ids mean other words."""


class NeedsCUDA(RuntimeError):
    """A method that runs only on a CUDA GPU, asked for on a machine without one."""


def check_shards_tokenizer(shards_dir: str | Path, base: str | Path, base_tokenizer=None) -> str | None:
    """Refuse shards whose tokenizer is not the base's (same vocabulary, merges and added tokens).
    Ids from another tokenizer still index the embedding table, so nothing else would notice: the
    run would train at loss ~10 and export a model paired with the wrong tokenizer. Returns the
    shared fingerprint, or None when the base ships no tokenizer (nothing to compare with)."""
    from tokenizers import Tokenizer

    from core.shard_format import load_manifest, tokenizer_fingerprint

    manifest = load_manifest(shards_dir)
    info = manifest.tokenizer
    theirs = info.fingerprint or tokenizer_fingerprint(
        Tokenizer.from_file(str(Path(shards_dir) / info.dir / "tokenizer.json")))   # an older manifest
    if base_tokenizer is None:
        folder, gguf = resolve_base(base)
        _gguf_guard(gguf, folder)
        base_tokenizer = _load_tokenizer(folder, gguf)
        if base_tokenizer is None:
            return None
    ours = tokenizer_fingerprint(base_tokenizer)
    if ours == theirs:
        return ours
    inputs = manifest.source.get("inputs") or []
    src = str(Path(inputs[0]["path"]).parent) if inputs else "CURATED"
    raise TokenizerMismatch(
        f"{shards_dir}: the shards were tokenized with {info.name or 'another tokenizer'} "
        f"({info.vocab_size:,} ids, fingerprint {theirs[:12]}), but the base {base} uses its own tokenizer "
        f"({len(base_tokenizer):,} ids, fingerprint {ours[:12]}): its ids would mean other words. Make shards "
        f"with the base's tokenizer:\n    refinery shard {src} --out SHARDS --tokenizer {base}")


def base_identity(base: str | Path) -> dict:
    """{"path", "sha256"} of a base: the hash covers its weight files (and config), so a LoRA or prompt
    checkpoint, which holds only what training changed, resumes on exactly the base it was trained on."""
    import hashlib

    from core.io import file_sha256

    folder, gguf = resolve_base(base)
    files = [folder / gguf] if gguf else sorted(
        f for f in folder.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".bin", ".pt", ".gguf")
                                                        or f.name == "config.json"))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\x1f{file_sha256(f)}\x1e".encode())
    return {"path": str(Path(base).expanduser().resolve()), "sha256": h.hexdigest()}


def _load_tokenizer(folder: Path, gguf: str | None):
    from transformers import AutoTokenizer

    if gguf:
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(folder))
    return None


@contextmanager
def _atomic_dir(dest: Path):
    """Write into a temporary sibling, then swap it in: a crash leaves the old folder or none."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)       # mkdtemp's 0700 would hide an export from the other users of a machine
    try:
        yield tmp
        old = dest.parent / f".{dest.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_tokenizer(tokenizer, dest: str | Path) -> Path:
    """A Hugging Face tokenizer folder (tokenizer.json + config): `refinery shard --tokenizer dest`
    then tokenizes the fine-tuning text into the base's ids."""
    dest = Path(dest)
    with _atomic_dir(dest) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return dest


def prepare_tokenizer(base_path: str | Path, dest: str | Path) -> Path:
    """The base's tokenizer as a folder (without loading the weights)."""
    folder, gguf = resolve_base(base_path)
    _gguf_guard(gguf, folder)
    tok = _load_tokenizer(folder, gguf)
    if tok is None:
        raise FileNotFoundError(f"{folder}: the base has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return save_tokenizer(tok, dest)


# ----------------------------------------------------------------------------------------------
# methods

def default_lora_targets(model) -> list[str]:
    """The family's projection names that exist in this model (peft matches name suffixes)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    found = [t for t in LORA_TARGETS[arch_of(model.config)] if t in names]
    if not found:
        raise ValueError(f"{type(model).__name__}: none of the default LoRA targets "
                         f"{LORA_TARGETS[arch_of(model.config)]} are linear layers of this model: set "
                         f"finetune.lora_target (its linear layers: {sorted(names)})")
    return found


def apply_method(model, method: str, lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
                 lora_target: list[str] | None = None, prompt_tokens: int = 20, prompt_init_text: str | None = None,
                 tokenizer=None):
    """(model to train, report). The report counts as peft does: {"method", "trainable_params",
    "total_params", "trainable_fraction"} (total includes the adapter's own weights).
    Prompt tuning starts from peft's RANDOM init (N(0, 1) rows) unless `prompt_init_text` and the
    base's `tokenizer` are given (then from that text's token embeddings)."""
    if method not in METHODS:
        raise ValueError(f"finetune method must be one of {METHODS}, got {method!r}")
    arch = arch_of(model.config)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        total = n_params(model)
        return model.train(), _report(method, total, total)

    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    if method == "prompt":
        if arch == "encoder":
            # peft's prompt tuning needs a task wrapper that shifts labels past the virtual tokens;
            # there is none for masked LM
            raise ValueError("prompt tuning supports decoder and encoder-decoder bases, not a masked-LM encoder: "
                             "use lora")
        if prompt_init_text and tokenizer is None:
            raise ValueError("prompt_init_text needs the base's tokenizer")
        cfg = PromptTuningConfig(task_type=TASK_TYPE[arch], num_virtual_tokens=prompt_tokens,
                                 prompt_tuning_init="RANDOM",
                                 num_transformer_submodules=1)   # T5: prompt the encoder only
        model = get_peft_model(model, cfg)
        if prompt_init_text:
            _init_prompt_from_text(model, prompt_init_text, tokenizer, prompt_tokens)
    else:
        if method == "qlora":
            model = _reload_4bit(model)
        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         target_modules=list(lora_target) if lora_target else default_lora_targets(model),
                         task_type=TASK_TYPE[arch], bias="none")
        model = get_peft_model(model, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    # from_pretrained hands back eval mode and Lightning keeps a module's mode: train it in train mode
    return model.train(), _report(method, trainable, total)


def _report(method: str, trainable: int, total: int) -> dict:
    return {"method": method, "trainable_params": int(trainable), "total_params": int(total),
            "trainable_fraction": round(trainable / total, 6) if total else 0.0}


def _init_prompt_from_text(model, text: str, tokenizer, n: int) -> None:
    """Lester et al.'s better initialisation: the embeddings of a task description's tokens,
    repeated or cut to n (what peft's TEXT init does, without needing a tokenizer on disk)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("prompt_init_text tokenizes to nothing")
    ids = (ids * (n // len(ids) + 1))[:n]
    emb = model.prompt_encoder[model.active_adapter].embedding
    with torch.no_grad():
        emb.weight.copy_(model.word_embeddings(torch.tensor(ids, device=emb.weight.device)).to(emb.weight.dtype))


def _reload_4bit(model):
    """QLoRA's base: the same weights reloaded as NF4 with double quantization, bf16 compute."""
    if not torch.cuda.is_available():
        raise NeedsCUDA("QLoRA needs a CUDA GPU and bitsandbytes (its 4-bit kernels are CUDA-only); "
                           "no CUDA device here: use method 'lora', which trains the same adapters on an fp32 base")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError("QLoRA needs a CUDA GPU and bitsandbytes: pip install bitsandbytes "
                           "(or use method 'lora', which needs neither)") from None
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    base = getattr(model, "_refinery_base", None)
    with tempfile.TemporaryDirectory(prefix="refinery-qlora-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)   # any base (a .gguf too) as an HF folder
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = auto_class(model.config).from_pretrained(tmp, quantization_config=q, device_map={"": 0})
    model._refinery_base = base
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


# ----------------------------------------------------------------------------------------------
# export

def _is_prompt(model) -> bool:
    cfg = getattr(model, "active_peft_config", None)
    return bool(cfg is not None and cfg.is_prompt_learning)


def merge_for_export(model):
    """The model to save as a plain Hugging Face folder: LoRA merged into the base weights
    (merge_and_unload: no peft needed to load it, no extra matmuls at inference); a full
    fine-tune as is; prompt tuning stays a peft model (a prompt is an input, not a weight:
    save the base and the adapter, see the module docstring)."""
    if _is_prompt(model) or not hasattr(model, "merge_and_unload"):
        return model
    return model.merge_and_unload()


def export_finetuned(model, method: str, tokenizer_dir: str | Path | None, dest: str | Path) -> dict:
    """Write the fine-tuned model as the module docstring lists; each folder is written to a temporary
    sibling and swapped in. Returns {"method", "hf": dest, "adapter": dest-adapter or None, "load": how}."""
    dest = Path(dest)
    adapter_dest = dest.parent / f"{dest.name}-adapter"
    out = {"method": method, "hf": str(dest), "adapter": None}
    if method == "full" or not hasattr(model, "peft_config"):
        _write_hf(model, tokenizer_dir, dest)
    elif _is_prompt(model):
        # the base first: the adapter's config names it, and peft reads it while saving
        _write_hf(model.get_base_model(), tokenizer_dir, dest)
        _write_adapter(model, adapter_dest, str(dest.resolve()), tokenizer_dir)
        out["adapter"] = str(adapter_dest)
        out["load"] = f"PeftModel.from_pretrained(AutoModel...from_pretrained('{dest}'), '{adapter_dest}')"
    else:
        # the adapter before merging (merge_and_unload folds it into the base, in place)
        base = getattr(model, "_refinery_base", None)
        loadable = _loadable_base(base, tokenizer_dir, dest.parent / f"{dest.name}-base")
        _write_adapter(model, adapter_dest, loadable or base, tokenizer_dir)
        out["adapter"], out["adapter_base"] = str(adapter_dest), loadable
        merged = _merge_into_fp32_base(model, base) if method == "qlora" else merge_for_export(model)
        _write_hf(merged, tokenizer_dir, dest)
        model = merged
    out.setdefault("load", f"{auto_class(model.config).__name__}.from_pretrained('{dest}')")
    return out


def _write_hf(model, tokenizer_dir: str | Path | None, dest: Path) -> None:
    with _atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)


def _loadable_base(base: str | None, tokenizer_dir, dest: Path) -> str | None:
    """The base as a Hugging Face folder an adapter can name (peft's Auto classes load nothing else):
    the base itself when it is one, else (a .gguf) its dequantized weights written to `dest`."""
    if base is None:
        return None
    folder, gguf = resolve_base(base)
    if gguf is None:
        return str(folder.resolve())
    fp32, _ = load_base(base)       # reloaded: the trained model's base has adapters wired into it
    _write_hf(fp32, tokenizer_dir, dest)
    return str(dest.resolve())


def _write_adapter(model, dest: Path, base: str | None, tokenizer_dir=None) -> None:
    """adapter_config.json + adapter_model.safetensors (+ the tokenizer, so AutoTokenizer loads from
    the same folder); base_model_name_or_path says what to load it on, by absolute path."""
    model.active_peft_config.base_model_name_or_path = base
    with _atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)


def _merge_into_fp32_base(model, base: str | None):
    """QLoRA: the trained adapter applied to the base reloaded in fp32, then merged."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if base is None:
        raise ValueError("qlora export: the base path is unknown (load the base with finetune.load_base)")
    fp32, _ = load_base(base)
    cfg = model.active_peft_config
    merged = get_peft_model(fp32, cfg)
    set_peft_model_state_dict(merged, {k: v.float().cpu() for k, v in get_peft_model_state_dict(model).items()})
    return merged.merge_and_unload()
