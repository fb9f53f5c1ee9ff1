"""Curation steps as declarations, and the one runner and ledger that book them.

A document-filtering step is declared, not unrolled: `Step(name, section, fn, enabled)`.

- `name`: its funnel row and the `stage` of the rejected rows it causes.
- `section`: the dotted config path of its settings ("curate.rules.c4"); `fn` receives that value
  (None: a step without settings receives None).
- `fn(docs, settings) -> Verdicts`: one `Verdict` per document, in order. `docs` is an iterable of
  document dicts; `fn` reads them (the current `text`, `n_words`, any column) and never changes them.
  It may return a list or be a generator: consecutive generator steps then see one document at a
  time, as a DataTrove pipeline does (the two Gopher families share one tokenization that way),
  while a step that needs the whole batch (language ID) just reads all of `docs` first.
- `enabled(cfg) -> bool`: whether a run has the step at all (default: always). A step switched off
  by its own `enabled` setting is still in the funnel, passing everything; decontamination is absent
  without evaluation sets.

`run_steps` pushes documents through the steps and books, for every step, documents and tokens in
and out, drops and dropped tokens by reason and one rejected row per dropped document, in a `Ledger`.
No step books anything itself. Tokens are words (`core.text.count_words`): a step that edits the
text (C4's line rules) returns it in its verdict and the runner recounts; the next step sees the
edited text. A rejected row keeps the document's text as the phase received it, with the words the
rejecting step received.

The ordered list of filter steps is `tasks.curate.FILTER_STEPS`; stage names and funnel rows are
derived from it. The stages of the later phases are booked with the same `Ledger` (see tasks/curate.py
for why they are not filter steps).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from core.rejects import CURATE_REJECTS
from core.text import count_words

REJECT_COLUMNS = CURATE_REJECTS.names
DETAIL_CHARS = 300   # a rejected row's detail is cut to this length


@dataclass(frozen=True, slots=True)
class Verdict:
    """A step's decision on one document.

    keep: the document goes on. reason / detail: why not (the rejected row's `reason` and `detail`).
    text: the document's text after this step, for a step that edits it (None: unchanged).
    fields: columns the step adds to the document, kept or not (language ID: lang, lang_score).
    funnel_reason: the funnel's drop key when it differs from `reason` (language ID books
    `lang:xx` / `other language` where its rejected rows say `language`)."""
    keep: bool
    reason: str = ""
    detail: str = ""
    text: str | None = None
    fields: dict[str, Any] | None = None
    funnel_reason: str | None = None


KEEP = Verdict(True)

Fn = Callable[[Iterable[dict], Any], Iterable[Verdict]]


def _always(cfg) -> bool:
    return True


@dataclass(frozen=True)
class Step:
    name: str
    section: str | None          # dotted config path, "curate.rules.c4"; None: no settings
    fn: Fn
    enabled: Callable[[Any], bool] = _always
    columns: dict[str, str] = field(default_factory=dict)   # fields it adds: name -> Arrow type alias


def settings(cfg, section: str | None):
    """The value at a dotted config path, from the curate config (a leading "curate." is optional)."""
    if section is None:
        return None
    value = cfg
    for part in section.removeprefix("curate.").split("."):
        value = getattr(value, part)
    return value


def per_document(check: Callable[[str, Any], tuple[str, str | None, str]], edits: bool = False) -> Fn:
    """A step fn from a one-document check(text, settings) -> (text, reason or None, detail), the form of
    the rule modules' `check`s. `edits`: the check returns edited text (C4), which the runner recounts."""
    def fn(docs: Iterable[dict], cfg) -> Iterator[Verdict]:
        for d in docs:
            text, reason, detail = check(d["text"], cfg)
            if reason:
                yield Verdict(False, reason, detail)
            else:
                yield Verdict(True, text=text) if edits else KEEP
    fn.check = check   # the one-document form, for tasks.rules.apply_rules
    return fn


# ---- booking --------------------------------------------------------------------------------------

def new_stats(stages: Iterable[str]) -> dict:
    return {s: {"docs_in": 0, "docs_out": 0, "tokens_in": 0, "tokens_out": 0, "drops": {}, "dropped_tokens": {}}
            for s in stages}


def reject_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CURATE_REJECTS)


class Ledger:
    """Per-stage stats (documents and tokens in and out, drops and dropped tokens by reason) and the
    rejected rows of one phase over one shard. Every stage books through `keep` and `drop`."""

    def __init__(self, stages: Iterable[str]):
        self.stats = new_stats(stages)
        self.rejected: list[dict] = []

    def keep(self, stage: str, words_in: int, words_out: int) -> None:
        st = self.stats[stage]
        st["docs_in"] += 1
        st["docs_out"] += 1
        st["tokens_in"] += words_in
        st["tokens_out"] += words_out

    def drop(self, stage: str, doc: dict, words: int, reason: str, detail: str = "", funnel_reason: str | None = None,
             text: str | None = None) -> None:
        """`words`: the document's words as the stage received them; `text`: the text its rejected row keeps
        (default: the document's)."""
        st = self.stats[stage]
        st["docs_in"] += 1
        st["tokens_in"] += words
        key = funnel_reason or reason
        st["drops"][key] = st["drops"].get(key, 0) + 1
        st["dropped_tokens"][key] = st["dropped_tokens"].get(key, 0) + words
        self.rejected.append({"id": doc["id"], "url": doc["url"], "domain": doc["domain"], "source": doc["source"],
                              "stage": stage, "reason": reason, "detail": detail[:DETAIL_CHARS], "n_words": words,
                              "groups": doc.get("groups", []), "text": doc["text"] if text is None else text})

    def table(self) -> pa.Table:
        return reject_table(self.rejected)


# ---- the runner -----------------------------------------------------------------------------------

def enabled_steps(steps: Iterable[Step], cfg) -> list[Step]:
    return [s for s in steps if s.enabled(cfg)]


def run_steps(docs: list[dict], steps: Iterable[Step], cfg, ledger: Ledger) -> list[dict]:
    """Push `docs` through the enabled `steps` in order, booking every verdict in `ledger` (which must have
    a row for each enabled step); returns the documents every step kept, in input order, with their
    edited text, recounted `n_words` and `n_chars`, and the fields the steps added."""
    stream: Iterator[tuple[dict, str]] = ((d, d["text"]) for d in docs)   # (document, text as received)
    for step in enabled_steps(steps, cfg):
        stream = _run_step(step, settings(cfg, step.section), stream, ledger)
    return [d for d, _ in stream]


def _run_step(step: Step, section, stream: Iterator[tuple[dict, str]], ledger: Ledger) -> Iterator[tuple[dict, str]]:
    pulled: deque = deque()   # documents the step has read and not yet judged

    def feed() -> Iterator[dict]:
        for item in stream:
            pulled.append(item)
            yield item[0]

    docs = feed()
    for v in step.fn(docs, section):
        if not pulled:
            raise ValueError(f"step {step.name!r} returned more verdicts than documents (or one before reading "
                             f"its document)")
        d, original = pulled.popleft()
        if v.fields:
            d.update(v.fields)
        words = d["n_words"]
        if not v.keep:
            ledger.drop(step.name, d, words, v.reason, v.detail, v.funnel_reason, text=original)
            continue
        if v.text is not None:
            d["text"], d["n_words"], d["n_chars"] = v.text, count_words(v.text), len(v.text)
        ledger.keep(step.name, words, d["n_words"])
        yield d, original
    if pulled or next(docs, None) is not None:
        raise ValueError(f"step {step.name!r} returned fewer verdicts than documents")
