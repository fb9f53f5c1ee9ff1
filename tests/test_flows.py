"""The Prefect flows against a real (temporary) Prefect API: caching, retries, artifacts."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

SAMPLE = Path(__file__).resolve().parent.parent / "sample"


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _run(inputs, out, cfg):
    from flows.extract import extract_flow

    state = extract_flow(inputs, str(out), cfg, return_state=True)
    assert state.is_completed(), state
    return state.result(), state.state_details.flow_run_id


@pytest.fixture()
def inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for name in ["dolma-sample-0001.warc.gz", "warcio-example-trunc.warc"]:
        shutil.copy(SAMPLE / "warc" / name, d / name)
    return [str(d)]


def test_rerun_is_cached_and_config_change_recomputes(prefect_api, tmp_path, inputs):
    from core.config import RefineryConfig

    cfg = RefineryConfig()
    out = tmp_path / "out"
    # the first run is cold: tasks cache on content, and another test may have extracted these files
    first, fr1 = _run(inputs, out, cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"refresh_cache": True})}))
    runs1 = [t for t in _task_runs(fr1) if t.name.startswith("extract-shard")]
    assert len(runs1) == 2 and all(t.state.name == "Completed" for t in runs1)
    docs = sorted((out / "docs").glob("*.parquet"))
    assert len(docs) == 2 and first["docs"] == sum(pq.read_metadata(p).num_rows for p in docs)
    before = {p.name: p.read_bytes() for p in docs}

    second, fr2 = _run(inputs, out, cfg)
    runs2 = [t for t in _task_runs(fr2) if t.name.startswith("extract-shard")]
    assert sorted(t.state.name for t in runs2) == ["Cached", "Cached"]
    assert second["docs"] == first["docs"]
    assert {p.name: p.read_bytes() for p in sorted((out / "docs").glob("*.parquet"))} == before

    changed = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"min_chars": 1000})})
    third, fr3 = _run(inputs, out, changed)
    assert all(t.state.name == "Completed" for t in _task_runs(fr3) if t.name.startswith("extract-shard"))
    assert third["rejected_by_reason"]["too short"] > 0 and "too short" not in first["rejected_by_reason"]

    # cached result whose files were deleted: recomputed, not trusted
    for p in (out / "docs").glob("*.parquet"):
        p.unlink()
    fourth, _ = _run(inputs, out, cfg)
    assert fourth["docs"] == first["docs"] and len(list((out / "docs").glob("*.parquet"))) == 2

    summary = json.loads((out / "extract_summary.json").read_text())
    assert summary["rejected_by_reason"]["truncated payload"] == 1


def test_a_task_that_fails_once_is_retried(prefect_api, tmp_path, inputs, monkeypatch):
    from core.config import RefineryConfig

    marker = tmp_path / "failed-once"
    monkeypatch.setenv("REFINERY_FAIL_ONCE", f"extract-shard:{marker}")
    # a cold run: tasks cache on content, and another test may have extracted this input already
    cfg = RefineryConfig.model_validate({"runner": {"task_retries": 1, "retry_delay_s": 0, "refresh_cache": True}})
    result, fr = _run(inputs[:1], tmp_path / "out", cfg)
    assert marker.exists()  # the fault really fired
    runs = [t for t in _task_runs(fr) if t.name.startswith("extract-shard")]
    assert all(t.state.name == "Completed" for t in runs)
    assert max(t.run_count for t in runs) == 2  # one failed attempt, one retry
    assert result["docs"] > 0


def test_counts_artifact_is_published(prefect_api, tmp_path, inputs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from core.config import RefineryConfig

    _, fr = _run(inputs, tmp_path / "out", RefineryConfig())
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["extract-counts"])))
    mine = [a for a in arts if a.flow_run_id == fr]
    assert mine and mine[0].type == "table"
    rows = json.loads(mine[0].data) if isinstance(mine[0].data, str) else mine[0].data
    assert rows[-1]["shard"] == "TOTAL" and rows[-1]["rejected: truncated payload"] == 1
