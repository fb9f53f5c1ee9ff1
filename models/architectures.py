"""The three model families, built from Hugging Face `transformers` configs so that an export is a
plain `from_pretrained` folder for the whole ecosystem.

    decoder          Llama-style (RMSNorm, SwiGLU, RoPE, grouped-query attention), causal LM
    encoder          BERT-style, masked LM (our tokenizer has <|mask|>)
    encoder-decoder  T5-style (gated GELU as in v1.1, relative position buckets; embeddings tied as in
                     v1.0, which scales the output by d_model^-0.5: untied, HF's init starts at loss ~50),
                     span corruption

Presets are shapes, not recipes: one name means the same depth and width for every family.
`tiny` trains in seconds on a CPU (tests, the bundled sample); 125m, 350m and 1b follow GPT-3's
table / Llama 3.2 1B, with the encoder-decoder split in half between encoder and decoder.
"""
from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("decoder", "encoder", "encoder-decoder")
OBJECTIVE = {"decoder": "causal", "encoder": "mlm", "encoder-decoder": "span"}


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    n_kv_heads: int | None = None     # decoder only: grouped-query attention


PRESETS: dict[str, Shape] = {
    "tiny": Shape(64, 2, 4, 256),
    "small": Shape(256, 4, 4, 1024),
    "25m": Shape(512, 6, 8, 1536),
    "125m": Shape(768, 12, 12, 2048),
    "350m": Shape(1024, 24, 16, 2816),
    "1b": Shape(2048, 16, 32, 8192, n_kv_heads=8),
}


def make_config(arch: str, preset: str, vocab_size: int, seq_len: int, special: dict):
    """A transformers config for `arch` at `preset`; `special` holds the tokenizer's eos/pad/mask ids.
    Dropout is off: pretraining on deduplicated data for about one epoch does not need it (Llama, T5 1.1)."""
    from transformers import BertConfig, LlamaConfig, T5Config

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    s = PRESETS[preset]
    eos, pad = special["eos"], special.get("pad", special["eos"])
    if arch == "decoder":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=s.d_model, intermediate_size=s.d_ff,
                           num_hidden_layers=s.n_layers, num_attention_heads=s.n_heads,
                           num_key_value_heads=s.n_kv_heads or s.n_heads, max_position_embeddings=seq_len,
                           rope_theta=10000.0, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
                           tie_word_embeddings=s.d_model <= 2048, attention_dropout=0.0)
    if arch == "encoder":
        if special.get("mask") is None:
            raise ValueError("an encoder trains with masked LM: the tokenizer needs a mask token")
        return BertConfig(vocab_size=vocab_size, hidden_size=s.d_model, num_hidden_layers=s.n_layers,
                          num_attention_heads=s.n_heads, intermediate_size=s.d_ff, max_position_embeddings=seq_len,
                          type_vocab_size=1, pad_token_id=pad, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    layers = max(1, s.n_layers // 2)
    return T5Config(vocab_size=vocab_size, d_model=s.d_model, d_kv=s.d_model // s.n_heads, d_ff=s.d_ff,
                    num_layers=layers, num_decoder_layers=layers, num_heads=s.n_heads,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=True,
                    pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad)


def auto_class(config):
    """The transformers Auto class that loads an export of this config."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    if getattr(config, "is_encoder_decoder", False):
        return AutoModelForSeq2SeqLM
    if config.model_type in ("bert", "roberta", "distilbert", "modernbert"):
        return AutoModelForMaskedLM
    return AutoModelForCausalLM


def arch_of(config) -> str:
    cls = auto_class(config).__name__
    return {"AutoModelForSeq2SeqLM": "encoder-decoder", "AutoModelForMaskedLM": "encoder"}.get(cls, "decoder")


def build_model(config):
    """A freshly initialised model (transformers' own init for the family) in fp32."""
    return auto_class(config).from_config(config)


def n_params(model) -> int:
    """Unique parameters (tied embeddings once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(config, n: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (Kaplan et al. 2020) plus attention scores
    and values, 12 * layers * d_model * seq_len (PaLM, Chowdhery et al. 2022, appendix B)."""
    layers = getattr(config, "num_hidden_layers", None) or (config.num_layers + config.num_decoder_layers)
    d = getattr(config, "hidden_size", None) or config.d_model
    return 6.0 * n + 12.0 * layers * d * seq_len
