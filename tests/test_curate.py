"""The curate flow end to end on a realistic mix, against a real Prefect API."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from core.text import count_words
from tests.mix import CUR, write_mix

EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")
PHONE = re.compile(r"\(\d{3}\)\s*\d{3}-\d{4}")
IPV4 = re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")


@pytest.fixture(scope="module")
def curated(prefect_api, tmp_path_factory):
    from core.config import RefineryConfig
    from flows.curate import curate_flow

    base = tmp_path_factory.mktemp("curate")
    write_mix(base / "mix")
    cfg = RefineryConfig.model_validate({"curate": {"quality": {
        "target_keep_ratio": 0.02, "reference": [str(CUR / "reference" / "gutenberg")]}}})
    state = curate_flow([str(base / "mix")], str(base / "out"), cfg, return_state=True)
    assert state.is_completed(), state
    return base, cfg, state


def test_funnel_invariants(curated):
    base, _, _ = curated
    out = base / "out"
    funnel = json.loads((out / "funnel.json").read_text())
    stages = funnel["stages"]
    assert [s["stage"] for s in stages] == ["langid", "gopher_repetition", "gopher_quality", "c4", "fineweb",
                                            "dedup", "pii", "toxicity", "quality"]
    assert stages[0]["docs_in"] == funnel["extracted"]["docs"] == 453
    assert stages[0]["tokens_in"] == funnel["extracted"]["tokens"]
    for a, b in zip(stages, stages[1:]):  # each stage's output is the next stage's input
        assert (a["docs_out"], a["tokens_out"]) == (b["docs_in"], b["tokens_in"]), (a["stage"], b["stage"])
    for s in stages:
        assert s["docs_in"] - s["docs_out"] == sum(s["drops"].values()), s["stage"]
    # kept + rejected = input, and the token counts recomputed from the files match the funnel
    kept = [r for p in sorted((out / "docs").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    rejected = [r for p in sorted((out / "rejected").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(kept) + len(rejected) == 453
    assert len({r["id"] for r in kept} & {r["id"] for r in rejected}) == 0
    assert sum(r["n_words"] for r in kept) == sum(count_words(r["text"]) for r in kept) == funnel["kept"]["tokens"]
    assert funnel["kept_token_ratio"] == pytest.approx(funnel["kept"]["tokens"] / funnel["extracted"]["tokens"])
    for r in rejected:
        assert r["stage"] and r["reason"]


def test_kept_ratio_lands_near_the_target(curated):
    funnel = json.loads((curated[0] / "out" / "funnel.json").read_text())
    assert funnel["quality_threshold"]["reachable"]
    assert 0.01 <= funnel["kept_token_ratio"] <= 0.03, funnel["kept_token_ratio"]


def test_kept_text_is_clean_prose_without_pii(curated):
    out = curated[0] / "out"
    kept = [r for p in sorted((out / "docs").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert kept and all(r["url"].split("//")[1].split(".")[0] in {"wiki", "inaugural", "pii", "neardup", "exact"}
                        for r in kept)
    for r in kept:
        assert not EMAIL.search(r["text"]) and not PHONE.search(r["text"]) and not IPV4.search(r["text"])
        for col in ("lang", "lang_score", "quality_score", "toxicity_score", "pii_email", "pii_phone", "pii_ip"):
            assert col in r
    # the PII pages that reached the masking stage were masked and counted
    funnel = json.loads((out / "funnel.json").read_text())
    pii = next(s for s in funnel["stages"] if s["stage"] == "pii")
    assert pii["docs_in"] == pii["docs_out"]


def test_duplicates_across_shards_leave_one_survivor(curated):
    out = curated[0] / "out"
    kept = [r for p in sorted((out / "docs").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    rejected = [r for p in sorted((out / "rejected").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    early = {"langid", "gopher_repetition", "gopher_quality", "c4", "fineweb", "dedup"}
    survivors = [r for r in rejected if r["stage"] not in early] + kept   # everything that passed dedup
    dedup = [r for r in rejected if r["stage"] == "dedup"]
    assert {r["reason"] for r in dedup} <= {"exact", "url", "near"}
    assert len([r for r in dedup if r["reason"] == "exact"]) >= 3   # of 5 exact copies (some fail rules)
    assert len([r for r in dedup if r["reason"] == "near"]) >= 8    # of 15 edited copies
    survivor_ids = {r["id"] for r in survivors}
    for r in dedup:  # each dropped copy points at a document that survived dedup
        assert r["detail"].removeprefix("duplicate of ") in survivor_ids
    # one survivor per cluster: no two surviving documents share a text (masking aside)
    texts = [" ".join(r["text"].split()).lower() for r in survivors]
    assert len(texts) == len(set(texts))
    shards = {r["source"] for r in dedup}
    assert len(shards) == len(dedup)


def test_outputs_models_plots_and_artifacts(curated):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    out = curated[0] / "out"
    for name in ("funnel.json", "bias.json", "funnel.png", "scores.png", "bias.png",
                 "models/quality.npz", "models/toxicity.bin", "models/toxicity.calibration.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    # evidence for each model stage: training sets (size, source), held-out separation, score histogram
    funnel = json.loads((out / "funnel.json").read_text())
    q, t = funnel["models"]["quality"], funnel["models"]["toxicity"]
    assert q["method"] == "tfidf" and q["training"]["positives"]["texts"] == q["n_pos"] > 100
    assert q["training"]["positives"]["source"] == [str(CUR / "reference" / "gutenberg")]
    assert q["training"]["negatives"]["crawl_docs"] == q["n_neg"] > 100 and q["holdout_auc"] > 0.9
    assert t["training"]["labelled"]["texts"] == 19830 and t["training"]["clean"]["sentences"] > 10_000
    assert t["training"]["identity_sentences"] > 0 and 0.5 <= t["sentence_threshold"] < 1
    tox = next(s for s in funnel["stages"] if s["stage"] == "toxicity")
    assert len(tox["histogram"]) == 50 and sum(tox["histogram"]) == tox["docs_in"]
    assert isinstance(funnel["warnings"], list)
    bias = json.loads((out / "bias.json").read_text())
    assert set(bias["groups"]) >= {"gender", "religion", "ethnicity", "sexual_orientation", "disability"}
    # per-stage attribution adds up: every removed document mentioning a group was removed by one stage
    import pyarrow.parquet as pq
    rejected = pq.read_table(out / "rejected").to_pylist()
    for g, row in bias["groups"].items():
        assert sum(row["removed_by_stage"].values()) == row["removed"], g
        for stage, n in row["removed_by_stage"].items():
            assert n == sum(1 for r in rejected if r["stage"] == stage and g in r["groups"]), (g, stage)
    fr = curated[2].state_details.flow_run_id
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr])))
    keys = {a.key for a in arts}
    assert {"curation-funnel", "curation-summary"} <= keys
    summary = next(a for a in arts if a.key == "curation-summary").data
    assert "## Models" in summary and "held-out ROC-AUC" in summary and "calibrated on" in summary


def final_task_runs(flow_run_id) -> list:
    """The flow run's task runs once all are final: their states reach the API as events, a moment later."""
    import time

    from tests.test_flows import _task_runs

    deadline = time.monotonic() + 30
    while True:
        runs = _task_runs(flow_run_id)
        if (runs and all(t.state.is_final() for t in runs)) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def test_rerun_is_cached(curated):
    from flows.curate import curate_flow

    base, cfg, _ = curated
    state = curate_flow([str(base / "mix")], str(base / "out"), cfg, return_state=True)
    runs = final_task_runs(state.state_details.flow_run_id)
    assert runs and all(t.state.name == "Cached" for t in runs), [(t.name, t.state.name) for t in runs]


def test_a_run_into_a_new_folder_is_served_from_cache(curated):
    """Tasks cache on their inputs, not on the output folder: a run into another folder takes every task
    from cache and places the same files there (hard links here), and its funnel is the same."""
    import os

    from flows.curate import curate_flow

    base, cfg, _ = curated
    state = curate_flow([str(base / "mix")], str(base / "elsewhere"), cfg, return_state=True)
    assert state.is_completed(), state
    tr = final_task_runs(state.state_details.flow_run_id)
    runs = {t.name.rsplit("-", 1)[0]: t.state.name for t in tr}
    assert set(runs.values()) == {"Cached"}, runs
    old_files = sorted(p.relative_to(base / "out") for p in (base / "out").rglob("*.parquet"))
    new_files = sorted(p.relative_to(base / "elsewhere") for p in (base / "elsewhere").rglob("*.parquet"))
    assert old_files == new_files and len(new_files) > 10
    for rel in [Path("models/quality.npz"), Path("models/toxicity.bin"), *new_files]:
        a, b = base / "out" / rel, base / "elsewhere" / rel
        assert b.is_file() and os.stat(a).st_ino == os.stat(b).st_ino, rel
    old, new = (json.loads((base / d / "funnel.json").read_text()) for d in ("out", "elsewhere"))
    assert new["stages"] == old["stages"] and new["kept"] == old["kept"]
    assert str(base / "elsewhere" / "models") in json.dumps(new["models"])
    assert str(base / "out") not in json.dumps(new)


def test_unreachable_target_is_reported_plainly(prefect_api, tmp_path):
    from core.config import RefineryConfig
    from flows.curate import curate_flow

    write_mix(tmp_path / "mix", shards=1)
    cfg = RefineryConfig.model_validate({"curate": {"quality": {
        "target_keep_ratio": 0.9, "reference": [str(CUR / "reference" / "gutenberg")]}}})
    funnel = curate_flow([str(tmp_path / "mix")], str(tmp_path / "out"), cfg)
    assert not funnel.quality_threshold["reachable"]
    assert any("not reachable" in w for w in funnel.warnings) and funnel.kept_token_ratio < 0.9
