"""C4's cleaning rules (Raffel et al. 2020, Sec. 2.2): line rules edit the text, page rules reject it.

We follow the reference code that built C4 (TFDS c4_utils.clean_page, copied by DataTrove
0.10's C4QualityFilter) where it is more precise than the paper:

- Lines are stripped and checked in its order: a word over max_word_length drops the line;
  then (optional) no terminal punctuation; then fewer than min_words_per_line words; then
  "lorem ipsum" rejects the page; "javascript" drops the line; "{" rejects the page; policy
  phrases drop the line. So lorem ipsum and "{" reject only from a line that survived the line
  rules before them (the paper says "any page"): a two-word `{` fragment is dropped, not fatal.
- Kept lines are joined with "\\n", as DataTrove does: blank lines have no words and go too.
- Terminal punctuation is . ? ! and a closing quote (" ' ” ’), and a line ending in an ellipsis
  does not count, as in TFDS; the paper's "end quotation mark" includes the typographic ones.
- Sentences are counted with a regex instead of NLTK punkt: each kept line is one sentence,
  plus one for every . ! ? (and closing quotes) followed by a space and more text; counting
  stops at min_sentences. It splits after "Mr." where punkt would not, which only makes the
  page rule slightly looser.
- Not implemented: the bad-words page rule (the toxicity stage owns the word list) and
  DataTrove's removal of Wikipedia citation marks like [1] (not a C4 paper rule).
"""
from __future__ import annotations

import re

CODES = ["lorem_ipsum", "curly_braces", "too_few_sentences", "empty"]
# a "{" that opens anything but a bare number: "{12}" numbers paragraphs in court opinions (the Caselaw
# Access Project's text), and the rule meant to catch code removed a quarter of a legal set for it
_CODE_BRACE = re.compile(r"\{(?!\d{1,4}\})")
_END = (".", "?", "!", '"', "'", "”", "’")
_ELLIPSES = ("...", "…")
_POLICY = re.compile(r"terms of use|privacy policy|cookie policy|uses cookies|use of cookies|use cookies")
_SENTENCE_BREAK = re.compile(r"[.!?][\"'”’)\]]*[ \t]+(?=\S)")


def check(text: str, cfg) -> tuple[str, str | None, str]:
    if not cfg.enabled:
        return text, None, ""
    # one look at the whole page saves most per-line searches: these words are rare
    low_page = text.lower()
    lorem = cfg.reject_lorem_ipsum and "lorem ipsum" in low_page
    js = cfg.drop_javascript_lines and "javascript" in low_page
    curly = cfg.reject_curly_braces and "{" in text
    policy = cfg.drop_policy_lines and _POLICY.search(low_page) is not None
    kept = []
    for line, low in zip(text.split("\n"), low_page.split("\n")):  # lower() keeps every "\n"
        line = line.strip()
        words = line.split()
        # a line can only hold a too-long word if the line itself is that long
        if len(line) > cfg.max_word_length and max(map(len, words)) > cfg.max_word_length:
            continue
        if cfg.drop_lines_without_terminal_punct and (not line.endswith(_END) or line.endswith(_ELLIPSES)):
            continue
        if len(words) < cfg.min_words_per_line:
            continue
        if lorem and "lorem ipsum" in low:
            return text, "c4:lorem_ipsum", f"'lorem ipsum' in: {line[:60]}"
        if js and "javascript" in low:
            continue
        if curly and "{" in line and (not cfg.ignore_numbered_braces or _CODE_BRACE.search(line)):
            return text, "c4:curly_braces", f"'{{' in: {line[:60]}"
        if policy and _POLICY.search(low):
            continue
        kept.append(line)
    out = "\n".join(kept)
    sentences = sum(1 for k in kept if k)  # blank lines stay if min_words_per_line is 0
    # then the breaks inside lines, counted only until there are enough
    for _ in (_SENTENCE_BREAK.finditer(out) if sentences < cfg.min_sentences else ()):
        sentences += 1
        if sentences >= cfg.min_sentences:
            break
    if sentences < cfg.min_sentences:
        return text, "c4:too_few_sentences", f"{sentences} sentences < {cfg.min_sentences} after line edits"
    if not out:  # min_sentences == 0 but every line went: nothing left to keep
        return text, "c4:empty", "every line was removed"
    return out, None, ""
