"""Decontamination (tasks/decontaminate.py): the n-gram rule itself, then one curate flow run with an
evaluation set planted in one crawl document."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.decontaminate import build_index, load_index, ngram_hashes, words_of
from core.text import count_words
from tasks.extract import DOC_SCHEMA, doc_id, domain_of
from core.io import write_parquet_atomic
from tests.mix import CUR, wikitext_articles

ROOT = Path(__file__).resolve().parent.parent
EVAL = ("The committee measured the boiling point of water at several altitudes and found that it fell by "
        "roughly one degree for every three hundred metres of ascent, as the older tables had predicted.")


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture
def index(tmp_path):
    return build_index([str(_jsonl(tmp_path / "eval.jsonl", [EVAL, "Too short to index."]))], 13)


def test_a_shared_13_gram_is_flagged_whatever_its_case_and_punctuation(index):
    assert index.texts == 2 and index.skipped_short == 1 and len(index.hashes) == len(words_of(EVAL)) - 12
    w = EVAL.split()
    planted = " ".join(w[10:23]).upper().replace(" ", " -- ")   # 13 words, shouted, punctuated differently
    hit, detail = index.contaminated(f"An unrelated opening line.\n{planted}!\nAnd an unrelated ending.")
    assert hit
    assert '"' + " ".join(words_of(" ".join(w[10:23]))) + '"' in detail and "eval.jsonl" in detail
    assert index.contaminated(EVAL)[0]
    assert index.contaminated("“" + EVAL.replace(",", ";").lower() + "”")[0]


def test_twelve_shared_words_are_not_enough(index, tmp_path):
    w = EVAL.split()
    assert not index.contaminated("Some page: " + " ".join(w[10:22]) + " zebra " + " ".join(w[23:35]))[0]
    assert not index.contaminated("Too short to index. " * 5)[0]   # a short evaluation text is skipped
    assert not index.contaminated("")[0]
    assert build_index([str(_jsonl(tmp_path / "e12.jsonl", [EVAL]))], 12) \
        .contaminated(" ".join(w[10:22]))[0]   # ... unless n says 12


def test_hashes_are_stable_across_processes():
    """Python's hash() is salted per process; the index must not be (Dask workers, reruns)."""
    code = "from tasks.decontaminate import ngram_hashes, words_of; import sys; " \
           f"print(ngram_hashes(words_of({EVAL!r}), 13).tolist())"
    runs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert runs[0] == runs[1] == f"{ngram_hashes(words_of(EVAL), 13).tolist()}\n"


def test_the_index_is_built_once_and_rebuilt_when_its_files_change(tmp_path):
    path = _jsonl(tmp_path / "eval.jsonl", [EVAL])
    first = load_index([str(path)], 13)
    assert load_index([str(path)], 13) is first
    other = "Nothing in this second evaluation text is anywhere in the first one, not a single run of words."
    _jsonl(path, [EVAL, other])
    second = load_index([str(path)], 13)
    assert second is not first and second.contaminated(other)[0] and not first.contaminated(other)[0]


def test_stages_and_guard(tmp_path, monkeypatch):
    from core.config import RefineryConfig
    from core.guard import ENV, PathNotAllowed, confine
    from tasks.curate import stages

    off = RefineryConfig().curate
    assert stages(off) == ["langid", "gopher_repetition", "gopher_quality", "c4", "fineweb",
                           "dedup", "pii", "toxicity", "quality"]
    on = RefineryConfig.model_validate({"curate": {"decontaminate": {"paths": ["/etc/eval.jsonl"]}}})
    assert stages(on.curate)[5] == "decontaminate"
    monkeypatch.setenv(ENV, str(tmp_path))
    with pytest.raises(PathNotAllowed, match=r"config\.curate\.decontaminate\.paths"):
        confine(config=on)


# ---- through the flow ------------------------------------------------------------------------------

def _doc(url: str, text: str) -> dict:
    return {"id": doc_id(url, text), "url": url, "domain": domain_of(url), "fetch_time": None, "title": "",
            "date": "", "text": text, "n_chars": len(text), "n_words": count_words(text), "source": url,
            "charset": "utf-8"}


@pytest.fixture(scope="module")
def planted(prefect_api, tmp_path_factory):
    from core.config import RefineryConfig
    from flows.curate import curate_flow
    from tasks import curate as steps
    from tasks.rules import apply_rules

    base = tmp_path_factory.mktemp("decontam")
    evals = [json.loads(x)["text"] for x in (CUR / "background" / "docs.jsonl").read_text().splitlines()][:40]
    eval_path = _jsonl(base / "eval.jsonl", evals)
    sentence = " ".join(evals[0].split()[40:60])   # 20 words of the first evaluation text
    cfg = RefineryConfig().curate
    docs, target = [], None
    for i, art in enumerate(a for a in wikitext_articles("test.txt") if count_words(a) < 3000):
        if len(docs) == 16:
            break
        if target is None and apply_rules(art, cfg.rules)[1] is None:
            paras = art.split("\n")
            art = "\n".join(paras[:3] + [sentence.upper().replace(",", ";")] + paras[3:])
            if apply_rules(art, cfg.rules)[1] is None:   # it must reach the decontaminate stage
                target = len(docs)
        docs.append(_doc(f"https://wiki.example.com/{i}", art))
    assert target is not None
    for s in range(2):
        write_parquet_atomic(pa.Table.from_pylist(docs[s::2], schema=DOC_SCHEMA), base / "crawl" / f"c{s}.parquet")
    # small model training sets: this test is about the filter phase
    with open(CUR / "toxicity" / "labeled_data.csv", encoding="utf-8") as f:
        rows = list(islice(csv.DictReader(f), 400))
    with open(base / "tox.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    clean = _jsonl(base / "clean.jsonl", [json.loads(x)["text"] for x in
                                          (CUR / "background" / "docs.jsonl").read_text().splitlines()[200:240]])
    config = RefineryConfig.model_validate({"curate": {
        "decontaminate": {"paths": [str(eval_path)]},
        "quality": {"target_keep_ratio": 0.5, "reference": [str(CUR / "reference" / "inaugural")],
                    "crossfit_folds": 1},
        "toxicity": {"training_data": str(base / "tox.csv"), "clean_data": [str(clean)]}}})
    (base / "config.json").write_text(config.model_dump_json())
    state = curate_flow([str(base / "crawl")], str(base / "out"), config, return_state=True)
    assert state.is_completed(), state
    # the same shards through the filter phase without decontamination, for comparison
    plain = [steps.filter_shard(str(p), p.stem, base / "plain", RefineryConfig().curate)
             for p in sorted((base / "crawl").glob("*.parquet"))]
    return base, docs[target]["id"], plain


def test_the_flow_removes_exactly_the_planted_document(planted):
    base, planted_id, plain = planted
    out = base / "out"
    rejected = pq.read_table(out / "rejected").to_pylist()
    decon = [r for r in rejected if r["stage"] == "decontaminate"]
    assert [r["id"] for r in decon] == [planted_id]
    assert decon[0]["reason"] == "eval 13-gram" and decon[0]["detail"].startswith('"')
    funnel = json.loads((out / "funnel.json").read_text())
    rows = {s["stage"]: s for s in funnel["stages"]}
    assert [s["stage"] for s in funnel["stages"]][4:7] == ["fineweb", "decontaminate", "dedup"]
    d = rows["decontaminate"]
    assert d["drops"] == {"eval 13-gram": 1} and d["docs_in"] - d["docs_out"] == 1
    assert (d["docs_in"], d["tokens_in"]) == (rows["fineweb"]["docs_out"], rows["fineweb"]["tokens_out"])
    assert (d["docs_out"], d["tokens_out"]) == (rows["dedup"]["docs_in"], rows["dedup"]["tokens_in"])
    assert d["dropped_tokens"]["eval 13-gram"] == decon[0]["n_words"]
    # nothing else changed: every earlier stage books what it books without decontamination, and the
    # filtered documents are the same but for the planted one
    for stage in steps_before_decontamination():
        assert rows[stage]["docs_out"] == sum(p["stats"][stage]["docs_out"] for p in plain), stage
        assert rows[stage]["tokens_out"] == sum(p["stats"][stage]["tokens_out"] for p in plain), stage
    with_decon = {r for p in (out / "work" / "filtered").glob("*.parquet") for r in pq.read_table(p)["id"].to_pylist()}
    without = {r for p in (base / "plain" / "filtered").glob("*.parquet") for r in pq.read_table(p)["id"].to_pylist()}
    assert without - with_decon == {planted_id} and with_decon < without
    assert all("decontaminate" not in p["stats"] for p in plain)


def steps_before_decontamination() -> list[str]:
    from tasks.curate import RULE_STAGES

    return ["langid", *RULE_STAGES]


def test_changed_evaluation_files_are_not_served_from_cache(planted):
    """Same paths, new content: the filter phase's cache key holds the files' hash, not only the config."""
    from core.config import RefineryConfig
    from flows.curate import curate_flow

    base, planted_id, _ = planted
    eval_path = base / "eval.jsonl"
    lines = eval_path.read_text(encoding="utf-8").splitlines(keepends=True)
    eval_path.write_text("".join(lines[1:]), encoding="utf-8")   # without the planted text
    config = RefineryConfig.model_validate(json.loads((base / "config.json").read_text()))
    state = curate_flow([str(base / "crawl")], str(base / "out"), config, return_state=True)
    assert state.is_completed(), state
    rows = {s["stage"]: s for s in json.loads((base / "out" / "funnel.json").read_text())["stages"]}
    assert rows["decontaminate"]["drops"] == {}
    assert not [r for r in pq.read_table(base / "out" / "rejected").to_pylist() if r["stage"] == "decontaminate"]
