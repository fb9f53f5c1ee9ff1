"""Heuristic rules: every rule just inside and just past its threshold, C4's line edits, real
prose and real boilerplate. Pure Python, no Prefect: the whole file runs in a few seconds."""
from __future__ import annotations

import glob
import json
import random
import re
from math import ceil
from pathlib import Path
from string import ascii_lowercase

import pytest

from core.config import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig, RulesConfig
from tasks import rules_c4, rules_fineweb
from tasks.rules import RULE_CODES, apply_rules
from tasks.rules_gopher import check_quality, check_repetition

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "curation"

# every threshold off, so one rule can be tested alone; `only` turns the named ones back on
RELAXED = {
    GopherQualityConfig: dict(min_words=0, max_words=10**9, min_mean_word_length=0, max_mean_word_length=1e9,
                              max_symbol_word_ratio=1e9, max_bullet_lines_ratio=1, max_ellipsis_lines_ratio=1,
                              min_alpha_words_ratio=0, min_stop_words=0),
    GopherRepetitionConfig: dict(dup_line_frac=1, dup_para_frac=1, dup_line_char_frac=1, dup_para_char_frac=1,
                                 top_ngram_char_frac={}, dup_ngram_char_frac={}),
    FineWebConfig: dict(min_line_punct_ratio=0, max_short_line_ratio=1, max_dup_line_char_ratio=1,
                        max_newline_word_ratio=1e9),
    C4Config: dict(drop_lines_without_terminal_punct=False, min_words_per_line=0, min_sentences=0,
                   drop_javascript_lines=False, drop_policy_lines=False, reject_lorem_ipsum=False,
                   reject_curly_braces=False, max_word_length=10**9),
}


def only(cls, **thresholds):
    return cls(**{**RELAXED[cls], **thresholds})


def words(k: int, length: int = 5, first: str = "z", start: int = 0) -> list[str]:
    """k distinct lowercase words of `length` letters; starting with z, none is a stop word."""
    out = []
    for i in range(start, start + k):
        letters = [ascii_lowercase[i // 26**j % 26] for j in range(length - 1)]  # i in base 26
        out.append(first + "".join(letters))
    assert len(set(out)) == k, "not enough distinct words of that length"
    return out


def filler(nchars: int) -> str:
    """Exactly nchars characters of distinct words (starting with y: never in the z-words)."""
    s = " ".join(words(nchars // 5 + 1, 4, "y"))[:nchars]
    return s[:-1] + "y" if s.endswith(" ") else s


def rejects(result, code: str):
    text, reason, detail = result
    assert reason == code, (reason, detail)
    assert reason in RULE_CODES and detail
    return text


def passes(result):
    text, reason, detail = result
    assert reason is None, (reason, detail)
    return text


# ---- Gopher quality ------------------------------------------------------------------------

def test_word_count_bounds():
    cfg = only(GopherQualityConfig, min_words=50, max_words=60)
    doc = lambda n: " ".join(["the", "and", *words(n - 2)])  # noqa: E731
    passes(check_quality(doc(50), cfg))
    rejects(check_quality(doc(49), cfg), "gopher_quality:word_count")
    passes(check_quality(doc(60), cfg))
    rejects(check_quality(doc(61), cfg), "gopher_quality:word_count")


def test_mean_word_length_bounds():
    cfg = only(GopherQualityConfig, min_mean_word_length=3, max_mean_word_length=10)
    passes(check_quality(" ".join(words(50, 3)), cfg))  # mean 3.0
    rejects(check_quality(" ".join(words(49, 3) + ["za"]), cfg), "gopher_quality:mean_word_length")  # 2.98
    passes(check_quality(" ".join(words(50, 10)), cfg))  # mean 10.0
    rejects(check_quality(" ".join(words(49, 10) + words(1, 11)), cfg), "gopher_quality:mean_word_length")


@pytest.mark.parametrize("symbol", ["#", "...", "…"])
def test_symbol_word_ratio(symbol):
    cfg = only(GopherQualityConfig, max_symbol_word_ratio=0.1)
    doc = lambda k: " ".join(w + symbol if i < k else w for i, w in enumerate(words(50)))  # noqa: E731
    passes(check_quality(doc(5), cfg))  # 5 per 50 words = 0.1
    rejects(check_quality(doc(6), cfg), "gopher_quality:symbol_word_ratio")


def test_bullet_lines_ratio():
    cfg = only(GopherQualityConfig, max_bullet_lines_ratio=0.9)
    lines = [" ".join(words(5, start=5 * i)) for i in range(10)]
    glyphs = ["• ", "- ", "* ", "‣ ", "◦ ", "▪ ", "– ", "• ", "- ", "* "]
    doc = lambda k: "\n\n".join(g + ln if i < k else ln for i, (g, ln) in enumerate(zip(glyphs, lines)))  # noqa: E731
    passes(check_quality(doc(9), cfg))  # 9 of 10 non-empty lines; the blank ones do not count
    rejects(check_quality(doc(10), cfg), "gopher_quality:bullet_lines_ratio")


def test_ellipsis_lines_ratio():
    cfg = only(GopherQualityConfig, max_ellipsis_lines_ratio=0.3)
    lines = [" ".join(words(5, start=5 * i)) for i in range(10)]
    doc = lambda k: "\n".join(ln + ("..." if i % 2 else " …") * (i < k) for i, ln in enumerate(lines))  # noqa: E731
    passes(check_quality(doc(3), cfg))
    rejects(check_quality(doc(4), cfg), "gopher_quality:ellipsis_lines_ratio")


def test_alpha_words_ratio():
    cfg = only(GopherQualityConfig, min_alpha_words_ratio=0.8)
    # tokens without a letter: numbers and lone symbols; "word." and "e-mail" have letters
    other = ["1999", "|", "42", "»", "3.5", "--"]
    doc = lambda k: " ".join(words(98 - k, 4) + ["end.", "e-mail"] + [other[i % 6] for i in range(k)])  # noqa: E731
    passes(check_quality(doc(20), cfg))  # 80 of 100 tokens
    rejects(check_quality(doc(21), cfg), "gopher_quality:alpha_words_ratio")


def test_stop_words():
    cfg = only(GopherQualityConfig, min_stop_words=2)
    passes(check_quality("The " + " ".join(words(10)) + " and more.", cfg))  # case-insensitive
    rejects(check_quality("The " + " ".join(words(10)) + " then theory.", cfg), "gopher_quality:stop_words")


# ---- Gopher repetition ----------------------------------------------------------------------

def test_dup_line_frac():
    cfg = only(GopherRepetitionConfig, dup_line_frac=0.3)
    unique = [" ".join(words(8, start=8 * i)) for i in range(6)]
    doc = lambda copies: "\n".join(unique + ["zshort zline"] * copies)  # noqa: E731
    passes(check_repetition(doc(4), cfg))  # 3 repeats of 10 lines
    rejects(check_repetition(doc(5), cfg), "gopher_repetition:dup_line_frac")  # 4 of 11


@pytest.mark.parametrize("sep, rule", [("\n", "dup_line_char_frac"), ("\n\n", "dup_para_char_frac")])
def test_dup_char_frac(sep, rule):
    cfg = only(GopherRepetitionConfig, **{rule: 0.2})
    dup = "zdup zdup zdup zdup"  # 19 characters, twice: 19 / len(text) <= 0.2 needs len >= 95
    doc = lambda f: sep.join([dup, filler(f), dup])  # noqa: E731
    assert len(doc(95 - 38 - 2 * len(sep))) == 95
    passes(check_repetition(doc(95 - 38 - 2 * len(sep)), cfg))
    rejects(check_repetition(doc(94 - 38 - 2 * len(sep)), cfg), f"gopher_repetition:{rule}")


def test_dup_para_frac():
    cfg = only(GopherRepetitionConfig, dup_para_frac=0.3)
    unique = [" ".join(words(8, start=8 * i)) for i in range(6)]
    doc = lambda copies: "\n\n".join(unique + ["zshort zpara"] * copies)  # noqa: E731
    passes(check_repetition(doc(4), cfg))
    rejects(check_repetition(doc(5), cfg), "gopher_repetition:dup_para_frac")


@pytest.mark.parametrize("n, thr", [(2, 0.20), (3, 0.18), (4, 0.16)])
def test_top_ngram(n, thr):
    cfg = only(GopherRepetitionConfig, top_ngram_char_frac={n: thr})
    gram, k = words(n, 4), 10  # k times, each after a different word: only this n-gram repeats
    core = " ".join(w for i, u in enumerate(words(k, 3, "x")) for w in [u, *gram])
    least = ceil(k * 4 * n / thr)  # shortest text for which k * chars / len <= thr
    doc = lambda length: core + " " + filler(length - len(core) - 1)  # noqa: E731
    passes(check_repetition(doc(least), cfg))
    rejects(check_repetition(doc(least - 1), cfg), f"gopher_repetition:top_{n}gram")


def test_top_ngram_needs_a_repeat():
    # three distinct words: any 2-gram holds 59% of the text, but none repeats
    passes(check_repetition(" ".join(words(3)), only(GopherRepetitionConfig, top_ngram_char_frac={2: 0.2})))
    rejects(check_repetition(" ".join(words(2) * 2), only(GopherRepetitionConfig, top_ngram_char_frac={2: 0.2})),
            "gopher_repetition:top_2gram")


@pytest.mark.parametrize("n, thr", [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)])
def test_dup_ngram(n, thr):
    cfg = only(GopherRepetitionConfig, dup_ngram_char_frac={n: thr})
    phrase = " ".join(words(n, 4))  # twice: the second copy's 4n characters are duplicated
    least = ceil(4 * n / thr)
    doc = lambda length: phrase + " " + filler(length - 2 * len(phrase) - 2) + " " + phrase  # noqa: E731
    passes(check_repetition(doc(least), cfg))
    rejects(check_repetition(doc(least - 1), cfg), f"gopher_repetition:dup_{n}gram")


def _datatrove_dup_frac(ws: list[str], n: int, n_chars: int) -> float:
    """DataTrove 0.10's find_all_duplicate, written plainly: the reference for our fast version."""
    seen, dup, i = set(), 0, 0
    while i < len(ws) - n + 1:
        gram = tuple(ws[i:i + n])
        if gram in seen:
            dup += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return dup / n_chars


def test_dup_ngram_counts_like_datatrove():
    # overlapping repeats ("a b a b a b ...") are where a careless count goes wrong
    rng = random.Random(0)
    for _ in range(3000):
        ws = [rng.choice(["a", "bb", "ccc", "dddd", "e", "ff"][:rng.randint(1, 6)]) for _ in range(rng.randint(1, 60))]
        text = " ".join(ws)
        thr = {n: rng.random() * 0.5 for n in rng.sample(range(5, 11), 3)}
        expected = next((f"gopher_repetition:dup_{n}gram" for n in sorted(thr)
                         if len(ws) >= n and _datatrove_dup_frac(ws, n, len(text)) > thr[n]), None)
        assert check_repetition(text, only(GopherRepetitionConfig, dup_ngram_char_frac=thr))[1] == expected


# ---- C4 ----------------------------------------------------------------------------------

PROSE = ["The committee met on Tuesday to discuss the budget.",
         "The minutes were published the next day, as usual.",
         "Members asked many questions about the new plan!"]


def test_c4_line_edits():
    page = "\n".join([
        PROSE[0],
        "Please enable JavaScript to view the comments.",  # javascript
        "By using this site you agree to our Terms of Use.",  # policy
        "Home | About us",  # 4 words < 5
        "",
        "This website uses cookies to improve your experience.",  # policy
        PROSE[1],
        "A line holding one absurdly long token " + "x" * 1001,  # word > 1000 chars
        "   " + PROSE[2] + "   ",
        "Read more about it here",  # no terminal punctuation: kept by default
        "We will see what happens next...",
        'He said "yes, of course."',
    ])
    out = passes(rules_c4.check(page, C4Config()))
    assert out == "\n".join(PROSE + ["Read more about it here", "We will see what happens next...",
                                     'He said "yes, of course."'])
    out = passes(rules_c4.check(page, C4Config(drop_lines_without_terminal_punct=True)))
    assert out == "\n".join(PROSE + ['He said "yes, of course."'])  # the ellipsis line goes too


def test_c4_edits_reach_the_caller():
    text = "\n".join(PROSE + ["Share on Facebook"])
    assert apply_rules(text, RulesConfig(gopher_quality={"enabled": False}))[0] == "\n".join(PROSE)


def test_c4_lorem_ipsum():
    lorem = "Lorem ipsum dolor sit amet, consectetur adipiscing elit."
    rejects(rules_c4.check("\n".join(PROSE + [lorem]), C4Config()), "c4:lorem_ipsum")
    passes(rules_c4.check("\n".join(PROSE + [lorem]), C4Config(reject_lorem_ipsum=False)))
    # as in C4's code, only a line that survived the line rules can reject the page
    passes(rules_c4.check("\n".join(PROSE + ["Lorem ipsum"]), C4Config()))


def test_c4_curly_braces():
    code = "function init() { return true; }"
    rejects(rules_c4.check("\n".join(PROSE + [code]), C4Config()), "c4:curly_braces")
    passes(rules_c4.check("\n".join(PROSE + ["{ }"]), C4Config()))  # a short line: dropped first
    # paragraph numbers of court opinions are not code; anything else in braces still is
    opinion = "{12} The district court denied the motion, and the defendant appealed to this Court."
    passes(rules_c4.check("\n".join(PROSE + [opinion]), C4Config()))
    rejects(rules_c4.check("\n".join(PROSE + [opinion]), C4Config(ignore_numbered_braces=False)), "c4:curly_braces")
    rejects(rules_c4.check("\n".join(PROSE + ["{12} and then the template says {name} was here today."]),
                           C4Config()), "c4:curly_braces")


def test_c4_too_few_sentences():
    cfg = only(C4Config, min_sentences=3, min_words_per_line=5)
    two = "The cat sat on the mat. The dog lay by the door."
    rejects(rules_c4.check(two + "\nSee also", cfg), "c4:too_few_sentences")  # "See also" is dropped
    passes(rules_c4.check(two + " Then both of them fell asleep.", cfg))  # three on one line
    passes(rules_c4.check(two + "\nSee also", only(C4Config, min_sentences=3)))  # a kept line is one
    rejects(rules_c4.check(two + "\n\n\n", only(C4Config, min_sentences=3)), "c4:too_few_sentences")  # blanks are not
    passes(rules_c4.check("\n".join(PROSE), C4Config(min_sentences=3)))
    rejects(rules_c4.check("\n".join(PROSE), C4Config(min_sentences=4)), "c4:too_few_sentences")


def test_c4_empty():
    rejects(rules_c4.check("Home\nAbout\nContact", C4Config(min_sentences=0)), "c4:empty")


# ---- FineWeb -----------------------------------------------------------------------------

def _lines(k: int, length: int = 40) -> list[str]:
    """k distinct lines of exactly `length` characters, none ending in punctuation."""
    cut = [" ".join(words(length // 5 + 1, 4, start=50 * i))[:length] for i in range(k)]
    return [s[:-1] + "z" if s.endswith(" ") else s for s in cut]


def test_line_punct_ratio():
    cfg = only(FineWebConfig, min_line_punct_ratio=0.12)
    doc = lambda k: "\n".join(ln + "." * (i < k) for i, ln in enumerate(_lines(100)))  # noqa: E731
    passes(rules_fineweb.check(doc(12), cfg))
    rejects(rules_fineweb.check(doc(11), cfg), "fineweb:line_punct_ratio")


def test_short_line_ratio():
    cfg = only(FineWebConfig, max_short_line_ratio=0.67, short_line_chars=30)
    short, long_ = _lines(100, 30), _lines(100, 31)  # a line of exactly 30 characters is short
    assert {len(s) for s in short} == {30} and {len(s) for s in long_} == {31}
    doc = lambda k: "\n".join(short[:k] + long_[k:])  # noqa: E731
    passes(rules_fineweb.check(doc(67), cfg))
    rejects(rules_fineweb.check(doc(68), cfg), "fineweb:short_line_ratio")


def test_dup_line_char_ratio():
    cfg = only(FineWebConfig, max_dup_line_char_ratio=0.01)
    dup = "zdup zdupp"  # 10 characters twice: 10 / (20 + f) <= 0.01 needs f >= 980
    doc = lambda f: "\n".join([dup, filler(f), dup])  # noqa: E731
    passes(rules_fineweb.check(doc(980), cfg))
    rejects(rules_fineweb.check(doc(979), cfg), "fineweb:dup_line_char_ratio")


def test_list_ratio():
    cfg = only(FineWebConfig, max_newline_word_ratio=0.3)
    lines = [" ".join(words(3, start=3 * i)) for i in range(31)]  # 30 newlines, 93 words
    passes(rules_fineweb.check(" ".join(words(7, 4)) + " " + "\n".join(lines), cfg))  # 30 / 100 words
    rejects(rules_fineweb.check(" ".join(words(6, 4)) + " " + "\n".join(lines), cfg), "fineweb:list_ratio")


def test_fineweb_empty():
    rejects(rules_fineweb.check(" \n\n  ", FineWebConfig()), "fineweb:empty")


# ---- apply_rules -----------------------------------------------------------------------------

def test_families_run_in_fineweb_order():
    menu = "Home\nHome\nHome\nAbout"  # too short for Gopher quality, but repetition runs first
    rejects(apply_rules(menu, RulesConfig()), "gopher_repetition:dup_line_frac")
    cfg = RulesConfig(gopher_repetition={"enabled": False})
    rejects(apply_rules(menu, cfg), "gopher_quality:word_count")


def test_disabled_families_are_no_ops():
    off = {"enabled": False}
    cfg = RulesConfig(gopher_quality=off, gopher_repetition=off, c4=off, fineweb=off)
    page = "Home\nHome\nHome\n{ lorem ipsum }\n" + "x" * 2000  # fails every family
    assert apply_rules(page, cfg) == (page, None, "")
    for family in ("gopher_quality", "gopher_repetition", "c4", "fineweb"):
        one_on = RulesConfig(**{f: off for f in ("gopher_quality", "gopher_repetition", "c4", "fineweb")
                                if f != family})
        assert apply_rules(page, one_on)[1].startswith(family + ":")


def test_rule_codes():
    assert len(RULE_CODES) == len(set(RULE_CODES))
    assert all(re.fullmatch(r"(gopher_repetition|gopher_quality|c4|fineweb):[a-z0-9_]+", c) for c in RULE_CODES)


def _reflowed_paragraphs(path: str) -> list[str]:
    """A Gutenberg text as the web would give it: one line per paragraph, not hard-wrapped at 70."""
    text = Path(path).read_text(encoding="latin-1")
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def test_real_prose_passes():
    # inaugural addresses, whole; 2005-Bush.txt numbers every paragraph at its end, so its lines
    # do not end in punctuation and FineWeb's line rule rightly drops it
    for path in sorted(glob.glob(str(SAMPLE / "reference" / "inaugural" / "*.txt"))):
        if not path.endswith("2005-Bush.txt"):
            text = Path(path).read_text(encoding="latin-1")
            assert apply_rules(text, RulesConfig())[1] is None, path
    for path in sorted(glob.glob(str(SAMPLE / "reference" / "gutenberg" / "*.txt"))):
        paras = _reflowed_paragraphs(path)
        for i in range(100, len(paras) - 10, 150):  # past the licence header
            text = "\n\n".join(paras[i:i + 10])
            out, reason, detail = apply_rules(text, RulesConfig())
            assert reason is None, (path, i, reason, detail)
            # C4 dropped only the blank lines and the short ones ("CHAPTER V", "Yes, sir.")
            assert out == "\n".join(p for p in paras[i:i + 10] if len(p.split()) >= 5)


def test_boilerplate_fails():
    rows = [json.loads(line) for line in open(SAMPLE / "quality_negative" / "trafilatura_boilerplate_snippets.jsonl")]
    # menus, buttons, dates: the short snippets joined into one page
    menu = "\n".join([r["text"] for r in rows if len(r["text"].split()) < 5][:100])
    rejects(apply_rules(menu, RulesConfig()), "c4:too_few_sentences")
    # each page's boilerplate, joined: all but a few cookie and comment notices written as prose
    pages = {}
    for r in rows:
        pages.setdefault(r["url"], []).append(r["text"])
    reasons = [apply_rules("\n".join(p), RulesConfig())[1] for p in pages.values()]
    assert sum(r is None for r in reasons) <= len(reasons) // 100
    assert {r for r in reasons if r} <= set(RULE_CODES)
