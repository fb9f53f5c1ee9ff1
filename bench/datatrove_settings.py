"""The DataTrove 0.10.1 baseline's step settings, defined once for bench/curate.py and bench/e2e.py:
the extractor from our ExtractConfig defaults, every rule threshold and the MinHash parameters from
our CurateConfig defaults. Each script builds its own executors around these steps (curate.py: one
extract + filter executor; e2e.py: extract and filter apart, language ID before the rules).

DataTrove is only in the bench environment (`make bench` builds `.venv-bench`), and the project's
`core` package must come from whatever sys.path the calling script set up (bench/e2e.py measures a
snapshot of HEAD, not this checkout), so both are imported when a function is called, never here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.config import CurateConfig, ExtractConfig


def trafilatura_step(ext: ExtractConfig | None = None):
    """DataTrove's Trafilatura step with our extraction options. It calls trafilatura.extract (text
    only, no metadata); ours calls bare_extraction with metadata."""
    from datatrove.pipeline.extractors import Trafilatura

    from core.config import ExtractConfig

    ext = ext or ExtractConfig()
    return Trafilatura(favour_precision=ext.favor == "precision", favor_recall=ext.favor == "recall",
                       deduplicate=ext.deduplicate, include_tables=ext.include_tables, timeout=ext.timeout_s)


def rule_filters(cur: CurateConfig | None = None) -> list:
    """GopherRepetition -> GopherQuality -> C4Quality -> FineWebQuality, every threshold from our rules
    (C4: no citation removal, the terminal-punctuation rule as ours)."""
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)

    from core.config import CurateConfig

    cur = cur or CurateConfig()
    gq, gr, c4, fw = cur.rules.gopher_quality, cur.rules.gopher_repetition, cur.rules.c4, cur.rules.fineweb
    return [
        GopherRepetitionFilter(dup_line_frac=gr.dup_line_frac, dup_para_frac=gr.dup_para_frac,
                               dup_line_char_frac=gr.dup_line_char_frac, dup_para_char_frac=gr.dup_para_char_frac,
                               top_n_grams=tuple(gr.top_ngram_char_frac.items()),
                               dup_n_grams=tuple(gr.dup_ngram_char_frac.items())),
        GopherQualityFilter(min_doc_words=gq.min_words, max_doc_words=gq.max_words,
                            min_avg_word_length=gq.min_mean_word_length, max_avg_word_length=gq.max_mean_word_length,
                            max_symbol_word_ratio=gq.max_symbol_word_ratio,
                            max_bullet_lines_ratio=gq.max_bullet_lines_ratio,
                            max_ellipsis_lines_ratio=gq.max_ellipsis_lines_ratio,
                            max_non_alpha_words_ratio=gq.min_alpha_words_ratio, min_stop_words=gq.min_stop_words),
        C4QualityFilter(remove_citations=False, filter_no_terminal_punct=c4.drop_lines_without_terminal_punct,
                        min_num_sentences=c4.min_sentences, min_words_per_line=c4.min_words_per_line,
                        max_word_length=c4.max_word_length, filter_lorem_ipsum=c4.reject_lorem_ipsum,
                        filter_javascript=c4.drop_javascript_lines, filter_curly_bracket=c4.reject_curly_braces,
                        filter_policy=c4.drop_policy_lines),
        FineWebQualityFilter(line_punct_thr=fw.min_line_punct_ratio, short_line_thr=fw.max_short_line_ratio,
                             short_line_length=fw.short_line_chars, char_duplicates_ratio=fw.max_dup_line_char_ratio,
                             new_line_ratio=fw.max_newline_word_ratio),
    ]


def minhash_config(cur: CurateConfig | None = None):
    """MinhashConfig as our dedup signatures: shingle words, bands x rows, seed."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    from core.config import CurateConfig

    dd = (cur or CurateConfig()).dedup
    return MinhashConfig(n_grams=dd.shingle_words, num_buckets=dd.bands, hashes_per_bucket=dd.rows, seed=dd.seed)
