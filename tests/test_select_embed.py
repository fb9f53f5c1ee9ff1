"""Static-embedding domain selection (tasks/select_embed.py) with the shipped token vectors: a reference of
medical documents from the bundled background corpus, against the rest of that corpus as the unlabeled
crawl (legal, finance, science, general prose, with the other medical documents in it)."""
from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from tasks import select_embed as se
from tasks.fasttext_model import roc_auc
from tasks.select_io import method_of

ROOT = Path(__file__).resolve().parent.parent
EMB = ROOT / "sample" / "curation" / "embeddings"
BACKGROUND = ROOT / "sample" / "curation" / "background" / "docs.jsonl"
R = 20
# measured 0.964 (R=20, 31 medical documents among 267; 0.970 without the positive-unlabeled rounds)
MIN_AUC = 0.94


def _docs() -> list[dict]:
    return [json.loads(line) for line in BACKGROUND.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def task():
    """(reference texts, crawl texts, crawl labels: 1 = medical)"""
    docs = _docs()
    medical = sorted((d for d in docs if d["topic"] == "medical"), key=lambda d: zlib.crc32(d["id"].encode()))
    ref_ids = {d["id"] for d in medical[:R]}
    crawl = [d for d in docs if d["id"] not in ref_ids]
    return ([d["text"] for d in medical[:R]], [d["text"] for d in crawl],
            np.array([d["topic"] == "medical" for d in crawl], dtype=int))


@pytest.fixture(scope="module")
def model(task, tmp_path_factory):
    ref, crawl, _ = task
    path = tmp_path_factory.mktemp("embed") / "quality.npz"
    info = se.train(ref, crawl, path, seed=0)
    return path, info


def test_shipped_weights_small_and_as_recorded():
    """Each shipped file < 5 MiB; SOURCE.txt names the sha256 of the files that are there."""
    source = (EMB / "SOURCE.txt").read_text(encoding="utf-8")
    assert "Apache-2.0" in source
    for name in ("tokenizer.json", "vectors.npz"):
        data = (EMB / name).read_bytes()
        assert len(data) < 5 * 2**20, name
        assert hashlib.sha256(data).hexdigest() in source, f"{name} changed since SOURCE.txt was written"
    with np.load(EMB / "vectors.npz") as z:
        assert z["q"].dtype == np.int8 and z["q"].shape[1] == 128
        assert len(z["scale"]) == len(z["q"])


def test_ranks_the_domain_on_top(task, model):
    _, crawl, y = task
    path, info = model
    s = se.score(path, crawl)
    assert s.dtype == np.float64 and s.shape == (len(crawl),) and np.isfinite(s).all()
    auc = roc_auc(y, s)
    assert auc >= MIN_AUC, auc
    top = np.argsort(-s, kind="stable")[: y.sum() // 2]  # keep half the domain's documents' worth
    assert y[top].mean() >= 0.7, y[top].mean()  # measured 0.8 (12 of 15; the others: science articles)
    assert info["n_positive_chunks"] > R  # long reference documents were cut into chunks
    assert info["n_dropped_pu"] > 0
    assert method_of(path) == "embedding"  # tasks/quality.py dispatches score() on this tag


def test_deterministic(task, model, tmp_path):
    ref, crawl, _ = task
    path, _ = model
    again = tmp_path / "again.npz"
    se.train(ref, crawl, again, seed=0)
    a, b = se.load(path), se.load(again)
    assert np.array_equal(a["coef"], b["coef"]) and a["intercept"] == b["intercept"]
    assert np.array_equal(se.score(path, crawl[:50]), se.score(again, crawl[:50]))
    # the score of a text does not depend on the batch it comes in
    assert np.array_equal(se.score(path, crawl[:50])[7:9], se.score(path, crawl[7:9]))


def test_model_records_weights_hash_not_their_path(task, model, tmp_path):
    """The model stores the vectors' sha256; a copy of the folder elsewhere works, other vectors are refused."""
    _, crawl, _ = task
    path, info = model
    assert str(EMB) not in json.dumps(se.load(path)["info"]) and "embeddings_dir" not in info["params"]
    copy = tmp_path / "embeddings"
    shutil.copytree(EMB, copy)
    assert np.array_equal(se.score(path, crawl[:5], embeddings_dir=copy), se.score(path, crawl[:5]))
    with np.load(copy / "vectors.npz") as z:
        q, scale = z["q"].copy(), z["scale"].copy()
    q[1000, 0] = -q[1000, 0] - 1
    with open(copy / "vectors.npz", "wb") as f:
        np.savez(f, q=q, scale=scale)
    with pytest.raises(ValueError, match="retrain"):
        se.score(path, crawl[:5], embeddings_dir=copy)


def test_atomic_write(task, model, tmp_path, monkeypatch):
    """A failed write leaves the previous model whole; a good one leaves no temporary file beside it."""
    ref, crawl, _ = task
    path, _ = model
    out = tmp_path / "m.npz"
    shutil.copyfile(path, out)
    before = out.read_bytes()

    def broken(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", broken)
    with pytest.raises(OSError, match="disk full"):
        se.train(ref[:3], crawl[:30], out)
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert se.score(out, crawl[:3]).shape == (3,)
    for p in tmp_path.iterdir():  # the writer's half file is not the model; remove it for the next check
        if p != out:
            p.unlink()
    se.train(ref[:3], crawl[:30], out)
    assert out.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]


def test_empty_inputs(task, model):
    ref, crawl, _ = task
    path, _ = model
    with pytest.raises(ValueError):
        se.train([], crawl, path.parent / "x.npz")
    with pytest.raises(ValueError):
        se.train(ref, ["", "   "], path.parent / "x.npz")
    with pytest.raises(ValueError):  # no known token at all
        se.train(["\u0000\u0001"], crawl[:5], path.parent / "x.npz")
    assert not (path.parent / "x.npz").exists()
    empty = se.score(path, [])
    assert empty.dtype == np.float64 and empty.shape == (0,)
    s = se.score(path, ["", crawl[0], "   ", crawl[1]])
    assert np.isfinite(s).all()
    assert s[0] == s[2] < min(s[1], s[3])  # no text: below any text


def test_other_methods_params_ignored(task, tmp_path):
    """tasks/quality.py passes every method the same knobs (fastText's lr/dim, tfidf's c)."""
    ref, crawl, _ = task
    info = se.train(ref[:5], crawl[:40], tmp_path / "m.npz", seed=3, lr=0.3, epoch=10, dim=16, c=1.0,
                    pu_rounds=0, max_negatives=25)
    assert info["params"]["pu_rounds"] == 0 and "lr" not in info["params"] and info["seed"] == 3
    assert info["n_negatives_given"] == 40 and info["n_negatives"] == 25  # a seeded sample of the crawl


def test_matches_whole_text_tokenization():
    """The word cache gives the ids the tokenizer gives the whole (cut) text."""
    emb = se.load_embedder()
    texts = [d["text"] for d in _docs()[::7]] + ["Dr. O'Neil's e-mail: a_b@x.org, 3.5mg/dL; café ΔG≈−2 kJ"]
    for t in texts:
        assert emb.token_ids(t, 300) == emb.tokenizer.encode(t[:2400], add_special_tokens=False).ids[:300]
