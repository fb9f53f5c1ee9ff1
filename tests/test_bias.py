"""Bias audit: group mentions, removal-rate disparity, flags and the chart."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.config import BiasConfig
from tasks.bias import ALL, audit, counts, mentions, plot_audit

DOCS = [
    "Muslims and Christians met in the town hall.",            # religion (suffix wildcards, plural)
    "A HUMAN being, a woman of faith; ISLAMIC art.",           # gender ('woman'; not 'man' inside 'human'), religion
    "The womanizer and the manager talked about humanity.",    # none: terms only inside longer words
    "Blind and deaf athletes; wheelchairs were provided.",     # disability (wildcard plural)
    "She identifies as non-binary.",                           # gender (hyphenated term)
    "Nothing to see here: weather, football, and recipes.",    # none
]


@pytest.fixture
def groups_file(tmp_path):
    p = tmp_path / "groups.yaml"
    p.write_text("gender: [woman, women, man, men, non-binary]\nreligion: [muslim*, christian*, islam*]\n"
                 "disability: [blind, deaf, wheelchair*]\nempty: [zzzz]\n")
    return str(p)


def test_mentions_whole_words_wildcards_any_case(groups_file):
    found = mentions(DOCS, groups_file)
    assert set(found) == {"gender", "religion", "disability", "empty"}
    assert all(a.dtype == bool and a.shape == (len(DOCS),) for a in found.values())
    assert found["religion"].tolist() == [True, True, False, False, False, False]
    assert found["gender"].tolist() == [False, True, False, False, True, False]
    assert found["disability"].tolist() == [False, False, False, True, False, False]
    assert not found["empty"].any()
    assert counts(found) == {"gender": 2, "religion": 2, "disability": 1, "empty": 0}
    assert counts(found, np.array([True, True, False, False, False, False]))["religion"] == 2


def test_mentions_with_the_shipped_groups():
    found = mentions(["Black voters in South Carolina", "a transgender woman", "the mentally ill", "white paper"],
                     BiasConfig().groups_file)
    assert found["ethnicity"].tolist() == [True, False, False, True]   # a term list cannot tell 'white paper'
    assert found["gender"].tolist() == [False, True, False, False]
    assert found["disability"].tolist() == [False, False, True, False]
    assert mentions([], BiasConfig().groups_file)["gender"].shape == (0,)


def test_audit_flags_a_group_removed_three_times_as_often():
    cfg = BiasConfig(disparity_ratio=1.5, min_mentions=5)
    # 1000 docs, 200 removed: overall removal rate 0.2
    before = {"religion": 100, "gender": 50, "disability": 4}
    after = {"religion": 40, "gender": 40, "disability": 1}
    report = audit(before, after, 1000, 800, cfg)
    assert report["overall"] == {"docs_before": 1000, "docs_after": 800, "removed": 200, "removal_rate": 0.2}
    rel = report["groups"]["religion"]
    assert rel["removed"] == 60 and rel["removal_rate"] == pytest.approx(0.6) and rel["ratio"] == pytest.approx(3.0)
    assert rel["mention_rate_before"] == pytest.approx(0.1) and rel["mention_rate_after"] == pytest.approx(0.05)
    assert rel["flagged"]
    assert report["groups"]["gender"]["ratio"] == pytest.approx(1.0) and not report["groups"]["gender"]["flagged"]
    dis = report["groups"]["disability"]  # removed at 3.75x, but 4 mentions < min_mentions: reported, not flagged
    assert dis["ratio"] == pytest.approx(3.75) and not dis["flagged"]
    assert report["flagged"] == ["religion"]
    # every configured group is reported, also one never mentioned; a group with 0 mentions has no rates
    unseen = report["groups"]["sexual_orientation"]
    assert unseen["removal_rate"] is None and unseen["ratio"] is None and not unseen["flagged"]
    json.dumps(report)  # None -> null: the report is plain JSON


def test_audit_when_nothing_is_removed():
    report = audit({"gender": 10}, {"gender": 10}, 100, 100, BiasConfig())
    assert report["overall"]["removal_rate"] == 0 and report["groups"]["gender"]["ratio"] is None
    assert report["flagged"] == []


def test_audit_attributes_removals_to_stages():
    stages = {"langid": {"religion": 5, "gender": 5, ALL: 100}, "toxicity": {"religion": 55, "gender": 5, ALL: 100}}
    report = audit({"religion": 100, "gender": 50}, {"religion": 40, "gender": 40}, 1000, 800, BiasConfig(), stages)
    rel = report["groups"]["religion"]
    assert rel["removed_by_stage"] == {"langid": 5, "toxicity": 55}
    # toxicity removed 55% of religion docs vs 10% of all docs
    assert rel["stage_ratio"]["toxicity"] == pytest.approx(5.5) and rel["stage_ratio"]["langid"] == pytest.approx(0.5)
    assert report["groups"]["disability"]["removed_by_stage"] == {"langid": 0, "toxicity": 0}
    assert report["groups"]["disability"]["stage_ratio"] == {"langid": None, "toxicity": None}


def test_plot_audit_writes_a_png(tmp_path):
    report = audit({"religion": 100, "gender": 50, "disability": 4}, {"religion": 40, "gender": 40, "disability": 1},
                   1000, 800, BiasConfig())
    out = tmp_path / "sub" / "bias.png"
    plot_audit(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    plot_audit(audit({}, {}, 0, 0, BiasConfig()), tmp_path / "empty.png")  # an empty run still gets a chart
    assert (tmp_path / "empty.png").exists()
