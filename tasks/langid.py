"""Language identification: (ISO 639-1 code, probability) per document, and the keep rule.

Two backends (`curate.langid.backend`):
- py3langid (default): ships its model, no download. Normalized probabilities, which the
  library calibrates by text length (softmax temperature sqrt(bytes)).
- fasttext: a lid.176.bin / lid.218e.bin you provide (`curate.langid.model_path`), as
  FineWeb / DCLM use. lid.218e labels (eng_Latn) are mapped to ISO 639-1 where one exists.
Only a prefix of each text is classified: the language of a page is settled long before
2,000 characters, and the cost grows linearly with length. `langid_step` is the curation filter
step (tasks.curate.FILTER_STEPS) over a batch of documents.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from core.config import LangIdConfig
from tasks.steps import Verdict

PREFIX_CHARS = 2000
UNKNOWN = ("und", 0.0)  # ISO 639 "undetermined": text without a single letter

# py3langid also outputs varieties of a macrolanguage that has an ISO 639-1 code; their
# probabilities are added to the parent, else short Chinese text splits between zh/yue/wuu.
MACRO = {"yue": "zh", "wuu": "zh", "ary": "ar", "arz": "ar", "uzs": "uz"}


def _prefix(text: str) -> str:
    # one line (fastText requires it) and bounded length; split() also collapses runs of spaces
    return " ".join(text[:PREFIX_CHARS].split())


def to_iso639_1(code: str) -> str:
    """'en', 'eng', 'eng_Latn', 'zho_Hans' -> 'en', 'en', 'en', 'zh'; codes without a 2-letter form pass through."""
    base = code.split("_")[0].lower()
    if len(base) == 3:
        try:
            from babel.core import get_global  # installed with trafilatura (courlan); CLDR's 639-3 -> 639-1
            alias = get_global("language_aliases").get(base, "").split("_")[0]
        except ImportError:
            alias = ""
        base = alias if len(alias) == 2 else base
    return MACRO.get(base, base)


@lru_cache(maxsize=1)
def _py3langid():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@lru_cache(maxsize=4)
def _fasttext(path: str, _mtime_ns: int):
    import fasttext  # keyed by mtime too: a model replaced at the same path is loaded afresh

    return fasttext.load_model(path)


def _fasttext_model(cfg: LangIdConfig):
    if not cfg.model_path:
        raise ValueError("langid.backend is 'fasttext' but langid.model_path is not set: give the path of a "
                         "fastText language-ID model (lid.176.bin or lid.218e.bin), or use backend 'py3langid'")
    path = Path(cfg.model_path).expanduser()
    if not path.is_file():
        raise ValueError(f"langid.model_path: no such file: {path}")
    return _fasttext(str(path.resolve()), path.stat().st_mtime_ns)


def _classify_py3langid(texts: list[str]) -> list[tuple[str, float]]:
    ident = _py3langid()
    out = []
    for t in texts:
        totals: dict[str, float] = {}
        for code, p in ident.rank(t):  # full distribution, so macrolanguage members can be summed
            iso = MACRO.get(code, code)
            totals[iso] = totals.get(iso, 0.0) + p
        lang = max(totals, key=totals.get)
        out.append((lang, min(1.0, totals[lang])))
    return out


def _classify_fasttext(model, texts: list[str]) -> list[tuple[str, float]]:
    labels, probs = model.predict(texts, k=1)
    # fastText's softmax can exceed 1 by rounding
    return [(to_iso639_1(lab[0].removeprefix("__label__")), float(min(1.0, p[0]))) for lab, p in zip(labels, probs)]


def identify(texts: list[str], cfg: LangIdConfig) -> list[tuple[str, float]]:
    """(language, probability in [0, 1]) per text; ('und', 0.0) for texts without letters."""
    model = _fasttext_model(cfg) if cfg.backend == "fasttext" else None  # a bad model path fails even on no texts
    prefixes = [_prefix(t or "") for t in texts]
    # no letters, no language: py3langid would return a near-uniform guess for these
    todo = [i for i, p in enumerate(prefixes) if any(c.isalpha() for c in p)]
    out = [UNKNOWN] * len(texts)
    if not todo:
        return out
    batch = [prefixes[i] for i in todo]
    found = _classify_fasttext(model, batch) if model is not None else _classify_py3langid(batch)
    for i, r in zip(todo, found):
        out[i] = r
    return out


def keep_language(lang: str, score: float, cfg: LangIdConfig) -> bool:
    """Keep a document in one of `cfg.languages` at `cfg.min_score` or above; an empty list means any language."""
    return (not cfg.languages or lang in cfg.languages) and score >= cfg.min_score


LANGID_COLUMNS = {"lang": "string", "lang_score": "float64"}   # what the step adds to every document


def langid_step(docs, cfg: LangIdConfig) -> list[Verdict]:
    """The filter step (tasks.curate.FILTER_STEPS): every document gets `lang` and `lang_score`; those
    outside `keep_language` are dropped, booked in the funnel as `lang:xx` when xx is a kept language
    below its score, else `other language`."""
    docs = list(docs)   # one batch: the classifier runs over all of them
    out = []
    for lang, score in identify([d["text"] for d in docs], cfg):
        fields = {"lang": lang, "lang_score": float(score)}
        if keep_language(lang, score, cfg):
            out.append(Verdict(True, fields=fields))
        else:
            out.append(Verdict(False, "language", f"{lang} {score:.2f}", fields=fields,
                               funnel_reason=f"lang:{lang}" if lang in cfg.languages else "other language"))
    return out
