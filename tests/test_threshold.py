"""The quality threshold reduce: a token-weighted quantile over every shard's scores."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.curate import choose_threshold


def _shards(tmp_path, *shards):
    paths = []
    for i, rows in enumerate(shards):
        p = tmp_path / f"s{i}.parquet"
        pq.write_table(pa.table({"quality_score": [float(s) for s, _ in rows], "n_words": [w for _, w in rows]}), p)
        paths.append(str(p))
    return paths


def _kept(paths, threshold):
    return sum(w for p in paths for s, w in zip(*pq.read_table(p).to_pydict().values()) if s >= threshold)


def test_threshold_spans_shards_and_lands_nearest_the_target(tmp_path):
    # 1000 extracted tokens, target 2% = 20: the best docs across both shards are 10 + 8 (=18) then 30
    paths = _shards(tmp_path, [(0.9, 10), (0.5, 30), (0.1, 100)], [(0.8, 8), (0.2, 50)])
    t = choose_threshold(paths, 1000, 0.02)
    assert t["reachable"] and t["threshold"] == 0.8 and _kept(paths, t["threshold"]) == 18
    t = choose_threshold(paths, 1000, 0.04)  # 40: 18 -> 48 is nearer than 18
    assert t["threshold"] == 0.5 and _kept(paths, t["threshold"]) == 48


def test_ties_at_the_threshold_are_kept_whole(tmp_path):
    paths = _shards(tmp_path, [(0.7, 10), (0.7, 10), (0.7, 10), (0.1, 970)])
    t = choose_threshold(paths, 1000, 0.02)
    assert t["threshold"] == 0.7 and _kept(paths, t["threshold"]) == 30


def test_unreachable_target_keeps_everything_and_says_so(tmp_path):
    paths = _shards(tmp_path, [(0.9, 5), (0.3, 5)])
    t = choose_threshold(paths, 1000, 0.02)
    assert not t["reachable"] and "not reachable" in t["note"] and _kept(paths, t["threshold"]) == 10
    empty = _shards(tmp_path, [])
    assert choose_threshold(empty, 1000, 0.02)["reachable"] is False


@pytest.mark.parametrize("target", [0.01, 0.02, 0.03])
def test_achieved_ratio_is_within_one_document_of_the_target(tmp_path, target):
    import random
    rng = random.Random(0)
    rows = [(rng.random(), rng.randint(50, 400)) for _ in range(2000)]
    paths = _shards(tmp_path, rows[:700], rows[700:])
    total = sum(w for _, w in rows)
    t = choose_threshold(paths, total, target)
    assert abs(_kept(paths, t["threshold"]) - target * total) <= 400
