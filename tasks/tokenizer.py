"""The tokenizer: a byte-level BPE trained on the kept text, or the user's own.

Byte-level, so every string round-trips exactly (no unknown token, no normalizer); special
tokens for all three architectures come first, at fixed ids: end of text (decoder-only packing
separator), padding, mask (encoder-only MLM) and T5-style sentinels (encoder-decoder span
corruption). Saved as a Hugging Face folder that `AutoTokenizer.from_pretrained` loads.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterable

from core.shard_format import EOS, MASK, PAD, sentinel

GENERAL_TEXT = Path(__file__).resolve().parent.parent / "sample" / "curation" / "reference"
_WORD = re.compile(r"[^\W\d_]{4,}")  # candidate domain words: letters only, 4+ long


def special_tokens(n_sentinels: int) -> list[str]:
    return [EOS, PAD, MASK] + [sentinel(i) for i in range(n_sentinels)]


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, n_sentinels: int):
    """A byte-level BPE `tokenizers.Tokenizer`. Training is deterministic for a given input order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=special_tokens(n_sentinels),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def hf_config(n_sentinels: int) -> dict:
    """tokenizer_config.json as transformers' `PreTrainedTokenizerFast.save_pretrained` writes it for
    ours (tests/test_general_tokenizer.py compares the two, so a transformers upgrade that changes it fails there)."""
    return {"backend": "tokenizers", "clean_up_tokenization_spaces": False, "eos_token": EOS,
            "extra_special_tokens": [sentinel(i) for i in range(n_sentinels)], "mask_token": MASK,
            "model_max_length": 1 << 30, "pad_token": PAD, "tokenizer_class": "TokenizersBackend"}


def save_hf(tok, out_dir: Path, n_sentinels: int) -> None:
    """Save as a transformers tokenizer folder (tokenizer.json + tokenizer_config.json), written
    directly: going through transformers imports torch, ~350 MiB and seconds of CPU in a run that
    never needs it."""
    import json

    from tokenizers.processors import TemplateProcessing

    out_dir.mkdir(parents=True, exist_ok=True)
    # what transformers sets on a tokenizer without one: the identity, made explicit
    tok.post_processor = TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(hf_config(n_sentinels), indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def load_trained(folder: Path):
    """Our own saved tokenizer as a `tokenizers.Tokenizer` (no transformers import)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


def native_special_ids(tok) -> tuple[dict, list[int]]:
    """special_ids for a `tokenizers.Tokenizer` that carries our special tokens."""
    vocab = tok.get_vocab(with_added_tokens=True)
    if EOS not in vocab:
        raise ValueError("the tokenizer has no end-of-text token: documents cannot be separated")
    return {"eos": vocab[EOS], "pad": vocab.get(PAD, vocab[EOS]), "mask": vocab.get(MASK)}, _sentinel_ids(vocab)


def _sentinel_ids(vocab: dict[str, int]) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... as long as they run unbroken."""
    ids = []
    while sentinel(len(ids)) in vocab:
        ids.append(vocab[sentinel(len(ids))])
    return ids


def load_user_tokenizer(path: str | Path):
    """A user's tokenizer.json, Hugging Face tokenizer or model folder, or GGUF model file, as a
    transformers tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    ggufs = sorted(p.glob("*.gguf")) if p.is_dir() and not (p / "tokenizer.json").is_file() else []
    if p.suffix == ".gguf" or len(ggufs) == 1:  # a GGUF model (e.g. SmolLM2) carries its tokenizer
        g = p if p.suffix == ".gguf" else ggufs[0]
        return AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    if p.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(p), clean_up_tokenization_spaces=False)
    if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(p))
    raise FileNotFoundError(f"{p}: not a tokenizer.json nor a tokenizer folder")


def special_ids(hf) -> tuple[dict, list[int]]:
    """(eos/pad/mask ids, sentinel ids) of a transformers tokenizer; a user's tokenizer may lack
    some (a GPT-style one has no mask nor sentinels: then MLM / span corruption are unavailable)."""
    vocab = hf.get_vocab()
    eos = hf.eos_token_id if hf.eos_token_id is not None else vocab.get(EOS)
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text token (eos_token): documents cannot be separated")
    pad = hf.pad_token_id if hf.pad_token_id is not None else eos
    mask = hf.mask_token_id if hf.mask_token_id is not None else vocab.get(MASK)
    return {"eos": eos, "pad": pad, "mask": mask}, _sentinel_ids(vocab)


def compression(tok, texts: list[str]) -> dict:
    """Characters and bytes per token on `texts` (held-out text: higher is better)."""
    n_tok = sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False)) if texts else 0
    chars = sum(len(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return {"texts": len(texts), "chars": chars, "tokens": n_tok,
            "chars_per_token": chars / n_tok if n_tok else None, "bytes_per_token": nbytes / n_tok if n_tok else None}


def domain_words(ours, general, texts: list[str], top: int = 30) -> list[dict]:
    """The most frequent words of `texts` that our tokenizer keeps whole (one token, with its
    leading space) while the general tokenizer splits them: what the domain tokenizer learned."""
    counts = Counter(w for t in texts for w in _WORD.findall(t))
    found = []
    for w, n in counts.most_common():
        piece = " " + w
        a = ours.encode(piece, add_special_tokens=False).ids
        if len(a) != 1:
            continue
        b = general.encode(piece, add_special_tokens=False).ids
        if len(b) > 1:
            found.append({"word": w, "count": n, "general_tokens": len(b)})
            if len(found) == top:
                break
    return found


def general_tokenizer(vocab_size: int, n_sentinels: int):
    """The baseline for `domain_words` when the user names none: a BPE of the same size trained
    the same way on bundled general English (WikiText-2, Gutenberg novels, inaugural addresses).
    It depends on nothing a run changes, so it is trained once per (text, size, code) and kept in
    the cache folder (core.io.cache_dir): it cost every `refinery shard` 18-25 s of CPU."""
    import hashlib
    import os

    from tokenizers import Tokenizer

    from core.io import cache_dir, file_sha256, write_text_atomic

    files = sorted(GENERAL_TEXT.rglob("*.txt"))
    key = hashlib.sha256("\x1f".join([str(vocab_size), str(n_sentinels), file_sha256(__file__),
                                      *(f"{f.relative_to(GENERAL_TEXT)}:{file_sha256(f)}" for f in files)])
                         .encode()).hexdigest()[:24]
    path = cache_dir("general-tokenizers") / f"bpe-{vocab_size}-{key}.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 - absent or unreadable: train it again
        pass
    texts = []
    for f in files:
        texts += [p for p in f.read_text(encoding="utf-8", errors="replace").split("\n\n") if p.strip()]
    # one thread: the report can wait 0.3 s, while the run's memory peak (this, beside the API
    # server and the flow's own tokenizer) would grow by ~110 MiB of per-thread word counts
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tok = train_bpe(texts, vocab_size, 2, n_sentinels)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    try:
        write_text_atomic(tok.to_str(), path)
    except OSError:
        pass                     # a read-only home: the report is the same, only slower next time
    return tok
