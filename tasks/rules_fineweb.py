"""FineWeb's own filters (Penedo et al. 2024), after DataTrove 0.10's FineWebQualityFilter.

They run on the text as C4's line rules left it. Choices where the sources differ:

- Lines are the non-empty lines, stripped (DataTrove: non-empty, unstripped), so a trailing
  space does not hide a full stop.
- A line "ends in punctuation" if it ends in . ! ? … or a closing quote (" ' ” ’) or a CJK
  full stop: FineWeb's original stop characters plus their typographic twins. DataTrove
  later swapped in a table of every Unicode terminal mark, which is moot for English text.
- A short line is one of at most short_line_chars characters, as in DataTrove (the paper
  says "shorter than 30"), whose code is what FineWeb ran.
- A value equal to its threshold passes, as the config's min_/max_ names say and as current
  DataTrove does: punctuated lines >= 0.12, short lines <= 0.67, duplicated-line chars <= 0.01,
  newlines per word <= 0.3. The paper words the rules as removals at equality ("<= 0.12") and
  DataTrove's first version did so; only exact ties differ.
- Duplicated-line characters are those of lines repeating an earlier line, over the text's
  characters without newlines (DataTrove).
- Words for the newline-per-word ratio are whitespace-separated, as C4 counts them (DataTrove:
  NLTK tokens): the text C4 just rewrote is not tokenized again, which is 5x cheaper.
"""
from __future__ import annotations

from tasks.rules_gopher import dups

CODES = ["empty", "line_punct_ratio", "short_line_ratio", "dup_line_char_ratio", "list_ratio"]
_END = (".", "!", "?", "…", '"', "'", "”", "’", "。", "！", "？")


def check(text: str, cfg) -> tuple[str, str | None, str]:
    if not cfg.enabled:
        return text, None, ""
    fail = lambda rule, detail: (text, f"fineweb:{rule}", detail)  # noqa: E731

    lines = [s for s in (ln.strip() for ln in text.split("\n")) if s]
    if not lines:
        return fail("empty", "no non-empty line")
    n = len(lines)

    ratio = sum(1 for s in lines if s.endswith(_END)) / n
    if ratio < cfg.min_line_punct_ratio:
        return fail("line_punct_ratio", f"lines ending in punctuation {ratio:.3f} < {cfg.min_line_punct_ratio}")

    ratio = sum(1 for s in lines if len(s) <= cfg.short_line_chars) / n
    if ratio > cfg.max_short_line_ratio:
        return fail("short_line_ratio",
                    f"lines <= {cfg.short_line_chars} chars {ratio:.3f} > {cfg.max_short_line_ratio}")

    ratio = dups(lines)[1] / max(1, len(text) - text.count("\n"))
    if ratio > cfg.max_dup_line_char_ratio:
        return fail("dup_line_char_ratio", f"duplicated-line chars {ratio:.4f} > {cfg.max_dup_line_char_ratio}")

    words = len(text.split())
    ratio = text.count("\n") / words if words else float("inf")
    if ratio > cfg.max_newline_word_ratio:
        return fail("list_ratio", f"newlines per word {ratio:.3f} > {cfg.max_newline_word_ratio}")
    return text, None, ""
