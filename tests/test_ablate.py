"""`refinery ablate` on a tiny real crawl: every variant trains the same proxy model on the same
number of tokens, and each is scored in bits per byte on the same held-out text."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import SAMPLE, RefineryConfig


def test_variant_settings():
    from flows.ablate import variant_config

    cfg = RefineryConfig()
    assert variant_config("none", cfg) is None
    rules = variant_config("rules", cfg).curate
    assert not (rules.dedup.exact or rules.dedup.url or rules.dedup.minhash)
    assert not rules.toxicity.enabled and not rules.pii.enabled and rules.quality.target_keep_ratio == 1.0
    assert rules.rules == cfg.curate.rules and rules.langid == cfg.curate.langid
    dedup = variant_config("rules+dedup", cfg).curate
    assert dedup.dedup == cfg.curate.dedup and not dedup.toxicity.enabled
    assert variant_config("full-10", cfg).curate.quality.target_keep_ratio == 0.10
    assert variant_config("full-2", cfg).curate == cfg.curate.model_copy(
        update={"quality": cfg.curate.quality.model_copy(update={"target_keep_ratio": 0.02})})
    with pytest.raises(ValueError, match="unknown ablation variant 'fancy'"):
        variant_config("fancy", cfg)


def test_ablate_trains_equal_token_proxies_and_reports_held_out_bits_per_byte(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.ablate import ablate_flow

    held = tmp_path / "held.jsonl"
    lines = (SAMPLE / "curation" / "background" / "docs.jsonl").read_text().splitlines()[:6]
    held.write_text("\n".join(lines) + "\n")
    cfg = RefineryConfig.model_validate({
        "train": {"preset": "tiny", "seq_len": 64, "batch_size": 4, "max_steps": 8, "accelerator": "cpu"},
        "shard": {"vocab_size": 1024}, "eval": {"context": 128}})
    state = ablate_flow([str(SAMPLE / "warc" / "dolma-sample-0000.warc.gz")], str(tmp_path / "ab"), cfg,
                        str(held), ["none", "rules", "full-10"], return_state=True)
    assert state.is_completed(), state
    report = state.result()
    rows = {r["variant"]: r for r in report["variants"]}
    assert list(rows) == ["none", "rules", "full-10"]
    # equal compute: same steps and tokens for all, whatever each variant kept
    assert {r["tokens_seen"] for r in rows.values()} == {8 * 4 * 64} and report["equal_tokens"]
    assert rows["none"]["docs"] >= rows["rules"]["docs"] > rows["full-10"]["docs"] > 0
    assert rows["full-10"]["epochs"] > rows["none"]["epochs"]
    for r in rows.values():
        assert 1.0 < r["heldout_bits_per_byte"] < 12.0
    # one tokenizer for every variant: the shards name the same tokenizer file
    shas = {json.loads((tmp_path / "ab" / v / "shard" / "manifest.json").read_text())["tokenizer"]["sha256"]
            for v in rows}
    assert len(shas) == 1
    saved = json.loads((tmp_path / "ab" / "ablate.json").read_text())
    assert saved["variants"] == report["variants"] and saved["heldout_overlap_docs"] == 0
    assert (tmp_path / "ab" / "ablate.png").stat().st_size > 5000

    async def artifact():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ablate"])))
            return [a for a in arts if a.flow_run_id == state.state_details.flow_run_id]

    import asyncio
    arts = asyncio.run(artifact())
    assert len(arts) == 1 and {r["variant"] for r in json.loads(arts[0].data)} == set(rows)


def test_unknown_variant_fails_before_any_work(prefect_api, tmp_path):
    from flows.ablate import ablate_flow

    with pytest.raises(ValueError, match="unknown ablation variant"):
        ablate_flow([str(SAMPLE / "warc")], str(tmp_path / "ab"), RefineryConfig(), None, ["none", "best"])
    assert not Path(tmp_path / "ab").exists()
