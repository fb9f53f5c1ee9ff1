"""The tokenized-shard format: the contract between `refinery shard` and training.

    DIR/tokenizer/            tokenizer.json + tokenizer_config.json (AutoTokenizer loads it)
    DIR/train/*.parquet       one row per document: doc_id (string), input_ids (list<uint16|uint32>),
    DIR/val/*.parquet         n_tokens (int32); zstd; row groups of ~row_group_tokens tokens
    DIR/manifest.json         see below; written last, so its presence means the shards are complete

manifest.json:
    {"format": "refinery-shards/1",
     "tokenizer": {"dir": "tokenizer", "sha256": <of tokenizer.json>, "vocab_size": int, "dtype": "uint16",
                   "name": str, "fingerprint": <sha256 of vocabulary + merges: tokenizer_fingerprint below>,
                   "special_ids": {"eos": int, "pad": int, "mask": int}, "sentinel_ids": [int, ...]},
     "source": {"inputs": [str, ...], "sha256": str}, "config": {...},
     "splits": {"train": {"docs": int, "tokens": int, "files": [
                    {"path": "train/...parquet", "sha256": str, "bytes": int, "rows": int, "tokens": int,
                     "row_groups": [rows per group, ...]}, ...]},
                "val": {...}},
     "totals": {"docs": int, "tokens": int}}

Paths in the manifest are relative to DIR. Documents carry no end-of-text token: packing adds it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.io import file_sha256

FORMAT = "refinery-shards/1"
SPLITS = ("train", "val")
EOS, PAD, MASK = "<|endoftext|>", "<|pad|>", "<|mask|>"


def sentinel(i: int) -> str:
    """Span-corruption sentinel i (T5 names them <extra_id_i>)."""
    return f"<extra_id_{i}>"


def token_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def shard_schema(vocab_size: int) -> pa.Schema:
    return pa.schema([("doc_id", pa.string()), ("input_ids", pa.list_(token_type(vocab_size))),
                      ("n_tokens", pa.int32())])


class ShardError(RuntimeError):
    """A shard directory that cannot be trusted; the message names the file."""


class _Record(BaseModel):
    # keys a later version adds survive a read and rewrite; the ones named here are checked
    model_config = ConfigDict(extra="allow")


class ShardFile(_Record):
    path: str                          # relative to the shard folder
    sha256: str
    bytes: int
    rows: int
    tokens: int
    row_groups: list[int] | None = None   # rows per group (absent in the oldest manifests)


class Split(_Record):
    docs: int = 0
    tokens: int = 0
    files: list[ShardFile] = Field(default_factory=list)


class TokenizerEntry(_Record):
    dir: str
    sha256: str
    vocab_size: int
    dtype: str = "uint16"
    trained: bool | None = None
    name: str | None = None
    fingerprint: str | None = None     # absent before names and fingerprints were recorded
    special_ids: dict[str, int | None]
    sentinel_ids: list[int] = Field(default_factory=list)


class Manifest(_Record):
    """manifest.json, read and written only here (the layout is in the module docstring)."""
    format: str = FORMAT
    tokenizer: TokenizerEntry
    source: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    splits: dict[str, Split]
    totals: dict[str, int] = Field(default_factory=dict)
    tokenizer_report: dict[str, Any] = Field(default_factory=dict)

    def split(self, name: str) -> Split:
        """A split, empty when the manifest has none of that name."""
        return self.splits.get(name) or Split()

    def files(self) -> list[ShardFile]:
        return [f for s in self.splits.values() for f in s.files]

    def write(self, data_dir: str | Path) -> Path:
        from core.io import write_text_atomic

        path = Path(data_dir) / "manifest.json"
        write_text_atomic(json.dumps(self.model_dump(mode="json"), indent=2) + "\n", path)
        return path


def load_manifest(data_dir: str | Path) -> Manifest:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise ShardError(f"{path}: no manifest (not a shard directory, or `refinery shard` did not finish)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ShardError(f"{path}: format {got!r}, expected {FORMAT!r}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise ShardError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def verify(data_dir: str | Path, manifest: Manifest, splits: tuple[str, ...] = SPLITS, full: bool = True) -> None:
    """Check every file the manifest lists: present, of its size, with its sha256 (if `full`),
    and a readable Parquet footer with its row count. Raises ShardError naming the file."""
    root = Path(data_dir)
    tok = manifest.tokenizer
    tok_file = root / tok.dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ShardError(f"{tok_file}: tokenizer missing")
    if full and file_sha256(tok_file) != tok.sha256:
        raise ShardError(f"{tok_file}: sha256 does not match the manifest (tokenizer changed after sharding)")
    for split in splits:
        for f in manifest.split(split).files:
            path = root / f.path
            if not path.is_file():
                raise ShardError(f"{path}: shard missing")
            size = path.stat().st_size
            if size != f.bytes:
                raise ShardError(f"{path}: {size} bytes, manifest says {f.bytes} (truncated or replaced)")
            if full and file_sha256(path) != f.sha256:
                raise ShardError(f"{path}: sha256 does not match the manifest (corrupt or replaced)")
            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except Exception as e:  # noqa: BLE001 - any unreadable footer is the same finding
                raise ShardError(f"{path}: not a readable Parquet file ({e})") from None
            if rows != f.rows:
                raise ShardError(f"{path}: {rows} rows, manifest says {f.rows}")


def write_shard(doc_ids: list[str], ids: list, vocab_size: int, path: Path, root: Path,
                row_group_tokens: int) -> dict:
    """Write one shard atomically (rows in the given order; `ids` are int sequences or numpy arrays)
    with row groups of about `row_group_tokens` tokens; returns its manifest entry."""
    import numpy as np

    from core.io import atomic_path

    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    dtype = token_type(vocab_size)
    flat = np.concatenate([np.asarray(x, dtype=dtype.to_pandas_dtype()) for x in ids]) if ids else np.zeros(0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    table = pa.table({"doc_id": pa.array(doc_ids, pa.string()),
                      "input_ids": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                                            pa.array(flat, dtype)),
                      "n_tokens": pa.array(lengths, pa.int32())}, schema=shard_schema(vocab_size))
    # cut row groups where the running token count crosses multiples of row_group_tokens
    cuts = np.searchsorted(offsets[1:], np.arange(row_group_tokens, int(offsets[-1]) + 1, row_group_tokens),
                           side="left") + 1
    bounds = sorted({0, *[int(c) for c in cuts if 0 < c < len(ids)], len(ids)})
    groups = [b - a for a, b in zip(bounds, bounds[1:])] or [0]
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, table.schema, compression="zstd") as w:
            for a, b in zip(bounds, bounds[1:]):
                w.write_table(table.slice(a, b - a), row_group_size=b - a)
            if not ids:
                w.write_table(table)
    return {"path": str(path.relative_to(root)), "sha256": file_sha256(path), "bytes": path.stat().st_size,
            "rows": len(ids), "tokens": int(offsets[-1]), "row_groups": groups}


def tokenizer_fingerprint(hf) -> str:
    """The identity of a tokenizer: sha256 of its vocabulary, merges and added tokens (not of a file:
    the same tokenizer read from a .gguf, a tokenizer.json or a saved folder gets the same hash, so
    shards and a base model can be compared wherever each came from)."""
    import hashlib
    import json

    backend = getattr(hf, "backend_tokenizer", hf)      # a transformers tokenizer, or a `tokenizers` one
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges") or []]
    added = sorted((t["id"], t["content"]) for t in spec.get("added_tokens") or [])
    if vocab is None:                   # a model without a vocab field (never seen): the whole spec
        vocab = {"spec": spec}
    if isinstance(vocab, list):         # Unigram: [[piece, score], ...]
        vocab = [[v[0], round(float(v[1]), 6)] for v in vocab]
    blob = json.dumps({"type": model.get("type"), "vocab": vocab, "merges": merges, "added": added},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
