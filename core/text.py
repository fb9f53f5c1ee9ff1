"""What a word is, defined once: a `\\w+` run (Unicode letters, digits, underscore).

Every token count in extraction and curation is this count (`n_words`, the funnel's tokens), and
the n-gram decontamination, TF-IDF / Moore-Lewis selection features and toxicity shares split text
into these words. (Gopher's rules and the embedding tokenizer split differently, on purpose: see
tasks/rules_gopher.py and tasks/select_embed.py.)
"""
from __future__ import annotations

import re

WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    return len(WORD.findall(text))
