"""Identity-term groups (tasks/bias_groups.yaml by default): one loader for the bias audit
and for the word-list rule, which must never drop a document for an identity term alone."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import yaml


@lru_cache(maxsize=8)
def load_groups(path: str) -> dict[str, tuple[str, ...]]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping of group name -> list of terms")
    return {str(g): tuple(str(t).lower().strip() for t in terms) for g, terms in data.items()}


def term_pattern(term: str) -> str:
    """Whole-word regex for a term; a trailing * matches any word suffix."""
    if term.endswith("*"):
        return r"\b" + re.escape(term[:-1]) + r"\w*"
    return r"\b" + re.escape(term) + r"\b"


@lru_cache(maxsize=8)
def group_regexes(path: str) -> dict[str, re.Pattern]:
    return {g: re.compile("|".join(term_pattern(t) for t in terms), re.I) for g, terms in load_groups(path).items()}


def is_identity_term(word: str, path: str) -> bool:
    w = word.lower()
    return any(re.fullmatch(term_pattern(t), w) for terms in load_groups(path).values() for t in terms)
