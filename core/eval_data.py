"""Evaluation sets as documents: what `refinery eval` scores and what decontamination protects.

An evaluation set is one path:

    FILE.txt            one document: the whole file, exactly as written
    FILE.jsonl          one document per line, its "text" field
    FILE.parquet        one document per row, its "text" column
    FOLDER              every .parquet under it (a documents folder such as OUT/docs), else every
                        .jsonl and .txt under it
    SHARDS              a `refinery shard` folder (manifest.json): its val split decoded with the
                        shards' own tokenizer (the train split when val is empty); SHARDS/train or
                        SHARDS/val picks a split

Text is returned as written: bits per byte divide by the UTF-8 bytes of exactly the text scored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

_NOT_TEXT = {"SOURCE.txt", "README.txt", "LICENSE.txt", "README.md"}


@dataclass
class EvalSet:
    name: str            # the file or folder stem: eval.json's key
    path: str
    texts: list[str]
    kind: str            # txt | jsonl | parquet | shards


class EvalDataError(ValueError):
    """An evaluation path that cannot be read as documents; the message names it."""


def set_name(path: str | Path) -> str:
    """eval.json's key for a set: the file or folder stem (SHARDS-val for a shard folder's split)."""
    p = Path(path).expanduser()
    if p.is_dir() and p.name in ("train", "val") and (p.parent / "manifest.json").is_file():
        return f"{p.parent.name}-{p.name}"
    return p.stem if p.is_file() else p.name


def load_eval_set(path: str | Path) -> EvalSet:
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalDataError(f"{p}: no such file or folder (an evaluation set)")
    name = set_name(p)
    if p.is_dir() and (p / "manifest.json").is_file():
        return EvalSet(name, str(p), _shard_texts(p, None), "shards")
    if p.is_dir() and p.name in ("train", "val") and (p.parent / "manifest.json").is_file():
        return EvalSet(name, str(p), _shard_texts(p.parent, p.name), "shards")
    if p.is_file():
        return EvalSet(name, str(p), _file_texts(p), p.suffix.lstrip(".").lower())
    from core.guard import files_under

    files = files_under(p, lambda f: f.suffix == ".parquet" and not f.name.startswith("."))
    kind = "parquet"
    if not files:
        files = files_under(p, lambda f: f.suffix.lower() in (".jsonl", ".txt") and f.name not in _NOT_TEXT
                            and not f.name.startswith("."))
        kind = "jsonl" if files and all(f.suffix.lower() == ".jsonl" for f in files) else "txt"
    if not files:
        raise EvalDataError(f"{p}: a folder with no .parquet, .jsonl or .txt files and no manifest.json")
    return EvalSet(name, str(p), [t for f in files for t in _file_texts(f)], kind)


def _file_texts(f: Path) -> list[str]:
    suffix = f.suffix.lower()
    if suffix == ".txt":
        text = f.read_text(encoding="utf-8", errors="replace")
        return [text] if text.strip() else []
    if suffix == ".jsonl":
        out = []
        with f.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"{f}:{i}: not JSON ({e.msg})") from None
                text = row.get("text") if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise EvalDataError(f"{f}:{i}: no \"text\" string field")
                if text.strip():
                    out.append(text)
        return out
    if suffix == ".parquet":
        schema = pq.read_schema(f)
        if "text" not in schema.names:
            if "input_ids" in schema.names:
                raise EvalDataError(f"{f}: a tokenized shard: give the shard folder (with manifest.json) instead")
            raise EvalDataError(f"{f}: no \"text\" column (columns: {', '.join(schema.names)})")
        return [t for t in pq.read_table(f, columns=["text"]).column("text").to_pylist() if t and t.strip()]
    raise EvalDataError(f"{f}: unsupported file type {suffix or '(none)'}: use .txt, .jsonl or .parquet")


def _shard_texts(shards: Path, split: str | None) -> list[str]:
    from tokenizers import Tokenizer

    from core.shard_format import load_manifest

    manifest = load_manifest(shards)
    if split is None:
        split = "val" if manifest.split("val").docs else "train"
    tok = Tokenizer.from_file(str(shards / manifest.tokenizer.dir / "tokenizer.json"))
    texts = []
    for entry in manifest.split(split).files:
        ids = pq.read_table(shards / entry.path, columns=["input_ids"]).column("input_ids").to_pylist()
        texts += tok.decode_batch(ids, skip_special_tokens=False)
    return [t for t in texts if t.strip()]
