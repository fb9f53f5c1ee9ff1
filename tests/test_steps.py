"""Curation as a declared list of steps: a new filter is one function and one line in a list, and the
shared runner books its funnel row, its drops and its rejected rows, with nothing else to change."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import RefineryConfig
from core.io import write_parquet_atomic
from core.text import count_words
from tasks.curate import FILTER_STEPS, RULE_STAGES, SCORE_STAGES, SELECT_STAGES, filter_shard, filter_stages, stages
from tasks.extract import DOC_SCHEMA
from tasks.funnel import merge_stats
from tasks.steps import KEEP, Ledger, Step, Verdict, run_steps
from tests.mix import build_docs

WORD = "war"


def no_word(docs, cfg):
    """The tiny extra filter: drop documents that contain WORD (as a whole word, any case)."""
    for d in docs:
        words = {w.lower() for w in d["text"].split()}
        yield Verdict(False, f"word:{WORD}", f"contains {WORD!r}") if WORD in words else KEEP


WITH_EXTRA = [*FILTER_STEPS, Step("no_word", None, no_word)]   # the one added line


def _has_word(text: str) -> bool:
    return WORD in {w.lower() for w in text.split()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """60 real documents of the tests' crawl mix (WikiText, inaugural addresses, boilerplate, spam, social
    posts, PII and near-duplicate pages) through the filter phase, as declared and with the extra step."""
    base = tmp_path_factory.mktemp("steps")
    docs = build_docs()[:60]
    path = write_parquet_atomic(pa.Table.from_pylist(docs, schema=DOC_SCHEMA), base / "in" / "s.parquet")
    cfg = RefineryConfig().curate
    plain = filter_shard(str(path), "s", base / "plain", cfg)
    extra = filter_shard(str(path), "s", base / "extra", cfg, steps=WITH_EXTRA)
    return base, {d["id"]: d for d in docs}, cfg, plain, extra


def test_stage_names_come_from_the_list():
    cfg = RefineryConfig().curate
    assert filter_stages(cfg) == [s.name for s in FILTER_STEPS if s.name != "decontaminate"]
    assert stages(cfg) == filter_stages(cfg) + SCORE_STAGES + SELECT_STAGES
    assert stages(cfg, WITH_EXTRA) == filter_stages(cfg) + ["no_word"] + SCORE_STAGES + SELECT_STAGES
    on = RefineryConfig.model_validate({"curate": {"decontaminate": {"paths": ["/eval.jsonl"]}}}).curate
    assert filter_stages(on) == [s.name for s in FILTER_STEPS]
    assert RULE_STAGES == ["gopher_repetition", "gopher_quality", "c4", "fineweb"]


def test_the_runner_books_the_extra_step(runs):
    base, inputs, cfg, plain, extra = runs
    filtered = pq.read_table(base / "plain" / "filtered" / "s.parquet").to_pylist()
    hit = [d for d in filtered if _has_word(d["text"])]
    assert 0 < len(hit) < len(filtered)   # the word splits the survivors: the test has teeth

    # the funnel: one more row, fed by the previous step's output, its drops by reason
    rows = {r["stage"]: r for r in merge_stats([extra], filter_stages(cfg, WITH_EXTRA))}
    assert list(rows) == filter_stages(cfg) + ["no_word"]
    row, before = rows["no_word"], rows["fineweb"]
    assert (row["docs_in"], row["tokens_in"]) == (before["docs_out"], before["tokens_out"])
    assert row["drops"] == {f"word:{WORD}": len(hit)}
    assert row["dropped_tokens"] == {f"word:{WORD}": sum(d["n_words"] for d in hit)}   # C4-edited words
    assert row["docs_out"] == row["docs_in"] - len(hit)
    assert row["tokens_out"] == row["tokens_in"] - sum(d["n_words"] for d in hit)

    # every earlier step booked exactly what it books without the extra one
    for stage in filter_stages(cfg):
        assert extra["stats"][stage] == plain["stats"][stage], stage
    assert (extra["input_docs"], extra["input_tokens"]) == (plain["input_docs"], plain["input_tokens"])

    # one rejected row per dropped document: the text as extracted, the words the step received
    rejected = pq.read_table(base / "extra" / "rejected" / "s-filter.parquet").to_pylist()
    mine = [r for r in rejected if r["stage"] == "no_word"]
    assert [r["id"] for r in mine] == [d["id"] for d in hit]
    by_id = {d["id"]: d for d in hit}
    for r in mine:
        assert r["reason"] == f"word:{WORD}" and r["detail"] == f"contains {WORD!r}"
        assert r["n_words"] == by_id[r["id"]]["n_words"]
        assert r["text"] == inputs[r["id"]]["text"] and r["url"] == inputs[r["id"]]["url"]
        assert r["groups"] == by_id[r["id"]]["groups"]
    plain_rejected = pq.read_table(base / "plain" / "rejected" / "s-filter.parquet").to_pylist()
    assert [r for r in rejected if r["stage"] != "no_word"] == plain_rejected

    # what is kept: the plain run's survivors less the dropped ones, and their dedup signatures
    kept = pq.read_table(base / "extra" / "filtered" / "s.parquet").to_pylist()
    assert kept == [d for d in filtered if not _has_word(d["text"])]
    assert pq.read_table(base / "extra" / "signatures" / "s.parquet").num_rows == len(kept)
    # every input document is kept or rejected once
    assert len(kept) + len(rejected) == len(inputs)


def test_an_editing_step_is_recounted_and_the_next_step_sees_the_edit():
    docs = build_docs()[:12]
    seen = []

    def first_line_only(docs, cfg):
        return [Verdict(True, text=d["text"].split("\n")[0]) for d in docs]

    def record(docs, cfg):
        for d in docs:
            seen.append((d["text"], d["n_words"]))
            yield KEEP

    originals = [d["text"] for d in docs]
    steps = [Step("first_line", None, first_line_only), Step("record", None, record)]
    ledger = Ledger(["first_line", "record"])
    kept = run_steps(docs, steps, RefineryConfig().curate, ledger)
    firsts = [t.split("\n")[0] for t in originals]
    assert [d["text"] for d in kept] == firsts == [t for t, _ in seen]
    assert [d["n_words"] for d in kept] == [count_words(t) for t in firsts] == [w for _, w in seen]
    assert [d["n_chars"] for d in kept] == [len(t) for t in firsts]
    st = ledger.stats
    assert st["first_line"]["tokens_in"] == sum(count_words(t) for t in originals)
    assert st["first_line"]["tokens_out"] == st["record"]["tokens_in"] == st["record"]["tokens_out"] \
        == sum(count_words(t) for t in firsts)
    assert ledger.rejected == []


def test_settings_fields_and_a_disabled_step():
    cfg = RefineryConfig.model_validate({"curate": {"rules": {"c4": {"min_sentences": 7}}}}).curate
    docs = [{"id": str(i), "url": "u", "domain": "d", "source": "s", "text": t, "n_words": count_words(t)}
            for i, t in enumerate(["one two", "three"])]
    got = []

    def probe(docs, c4):
        got.append(c4.min_sentences)
        return [Verdict(i == 0, "odd", fields={"probe": i}) for i, _ in enumerate(docs)]

    steps = [Step("probe", "curate.rules.c4", probe), Step("never", None, no_word, enabled=lambda c: False)]
    ledger = Ledger(["probe"])
    kept = run_steps(docs, steps, cfg, ledger)
    assert got == [7] and [d["probe"] for d in kept] == [0] and docs[1]["probe"] == 1
    assert ledger.stats["probe"]["drops"] == {"odd": 1} and ledger.rejected[0]["id"] == "1"


def test_a_step_must_judge_every_document_once():
    cfg = RefineryConfig().curate
    docs = [{"id": str(i), "text": "a b", "n_words": 2} for i in range(3)]
    for bad in (lambda docs, c: [KEEP for _ in docs][:-1], lambda docs, c: [KEEP for _ in docs] + [KEEP]):
        with pytest.raises(ValueError, match="verdicts"):
            run_steps([dict(d) for d in docs], [Step("bad", None, bad)], cfg, Ledger(["bad"]))
