"""Toxicity: fastText on Davidson et al. (stratified held-out split), per-sentence max/mean
aggregation, and the LDNOOBW word-list ratio that never counts identity terms."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.config import BiasConfig, ToxicityConfig
from tasks import fasttext_model as ft
from tasks.quality import load_reference
from tasks.toxicity import load_labeled, score_toxicity, split_sentences, train_toxicity, wordlist_ratio

REF = Path(__file__).resolve().parent.parent / "sample" / "curation" / "reference"
GROUPS = BiasConfig().groups_file


def _f1(pred: np.ndarray, y: np.ndarray) -> float:
    return float(2 * (pred & (y == 1)).sum() / (pred.sum() + (y == 1).sum()))


@pytest.fixture(scope="module")
def data():
    cfg = ToxicityConfig()
    texts, y = load_labeled(cfg.training_data, cfg.text_column, cfg.label_column, cfg.toxic_labels)
    rng = np.random.default_rng(0)
    held = np.zeros(len(y), dtype=bool)
    for c in (0, 1):  # stratified 20%
        idx = np.flatnonzero(y == c)
        held[rng.choice(idx, len(idx) // 5, replace=False)] = True
    split = lambda m: [t for t, k in zip(texts, m) if k]  # noqa: E731
    clean_train = load_reference([str(REF / "gutenberg" / "austen-sense.txt"), str(REF / "wikitext2" / "valid.txt")], 200)
    clean_held = load_reference([str(REF / "gutenberg" / "chesterton-brown.txt"), str(REF / "inaugural"),
                                 str(REF / "wikitext2" / "test.txt")], 200)
    return cfg, split(~held), y[~held], split(held), y[held], clean_train, clean_held


@pytest.fixture(scope="module")
def model(data, tmp_path_factory):
    cfg, tr, ytr, _, _, clean_train, _ = data
    path = tmp_path_factory.mktemp("toxicity") / "toxicity.bin"
    return path, train_toxicity(tr, ytr, cfg, path, clean_texts=clean_train)


def test_load_labeled_csv_and_jsonl(tmp_path):
    cfg = ToxicityConfig()
    texts, y = load_labeled(cfg.training_data, cfg.text_column, cfg.label_column, cfg.toxic_labels)
    assert len(texts) == len(y) == 19830 and y.dtype == np.int8
    assert abs(y.mean() - (1168 + 15357) / 19830) < 1e-9  # classes 0 and 1 are toxic
    assert not any("&amp;" in t or "&#" in t for t in texts)
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join(json.dumps(d) for d in [{"t": "hi there", "l": 0}, {"t": "you suck", "l": 1}]) + "\n")
    texts, y = load_labeled(p, "t", "l", ["1"])
    assert texts == ["hi there", "you suck"] and y.tolist() == [0, 1]


def test_held_out_auc_f1_and_clean_prose(data, model, tmp_path, capsys):
    cfg, tr, ytr, te, yte, _, clean_held = data
    path, metrics = model
    top, mean = score_toxicity(path, te)
    auc, auc_mean = ft.roc_auc(yte, top), ft.roc_auc(yte, mean)
    f1, f1_mean = _f1(top > cfg.max_score, yte), _f1(mean > cfg.max_mean_score, yte)
    c_top, c_mean = score_toxicity(path, clean_held)
    dropped = ((c_top > cfg.max_score) | (c_mean > cfg.max_mean_score)).mean()
    # the same tweets without clean prose: a clean chunk is dropped far more often
    plain = tmp_path / "plain.bin"
    train_toxicity(tr, ytr, cfg, plain)
    p_top, p_mean = score_toxicity(plain, clean_held)
    dropped_plain = ((p_top > cfg.max_score) | (p_mean > cfg.max_mean_score)).mean()
    neutral = ["She went to the market with her sister.", "The women of the village met on Sunday.",
               "He is a gay man.", "My neighbour is Muslim.", "Disabled people deserve access.",
               "Black and white families live here."]
    n_top, _ = score_toxicity(path, neutral)
    with capsys.disabled():
        print(f"\ntoxicity: {metrics}\n  held-out {len(yte)} tweets: ROC-AUC max {auc:.4f} mean {auc_mean:.4f}; "
              f"F1 max>{cfg.max_score} {f1:.4f}, mean>{cfg.max_mean_score} {f1_mean:.4f}\n"
              f"  clean prose chunks dropped: {dropped:.3%} (tweets only: {dropped_plain:.1%}, "
              f"ROC-AUC {ft.roc_auc(yte, score_toxicity(plain, te)[0]):.4f})")
        print("  neutral identity sentences: " + "; ".join(f"{s!r} {v:.3f}" for s, v in zip(neutral, n_top)))
    assert auc > 0.95 and auc_mean > 0.94  # measured 0.972 / 0.965
    assert f1 > 0.92  # measured 0.95
    assert dropped < 0.02 and dropped_plain > 5 * dropped  # measured 0.4% vs 16%
    assert np.median(n_top) < 0.1 and n_top[:5].max() < 0.5  # 'Black and white families live here.' scores 0.98


def test_per_sentence_max_and_mean(model):
    path, _ = model
    doc = ("The weather was pleasant this morning. We walked to the park and fed the ducks.\n"
           "Shut up you stupid bitch, fuck off!\nThen we went home for lunch.")
    sentences = split_sentences(doc)
    assert len(sentences) == 4
    per = ft.prob_of(ft.load(path), sentences, "toxic")
    top, mean = score_toxicity(path, [doc, "", "A quiet afternoon in the library."])
    assert top[0] == pytest.approx(per.max()) and mean[0] == pytest.approx(per.mean())
    assert per[2] > 0.9 and per[[0, 1, 3]].max() < 0.5 and mean[0] < 0.5 < top[0]
    assert top[1] == mean[1] == 0.0 and top[2] < 0.5
    # batching many documents changes nothing
    alone = score_toxicity(path, [doc])
    assert alone[0][0] == pytest.approx(top[0]) and alone[1][0] == pytest.approx(mean[0])


def test_wordlist_ratio_counts_list_terms_not_identity_terms(tmp_path):
    wl = ToxicityConfig().wordlist
    r = wordlist_ratio(["What the fuck is this shit", "Gay and Muslims people live in the city.",
                        "a big black dog; a girl on a bike", "gay sex", "", "s&m club"], wl, GROUPS)
    assert r.tolist() == pytest.approx([2 / 6, 0, 0, 1 / 2, 0, 1 / 3])  # 'gay sex': only 'sex' counts
    # even when the list itself contains identity terms, they never count
    own = tmp_path / "list"
    own.write_text("gay\nmuslims\ndamn\nmentally ill people\n")
    r = wordlist_ratio(["Damn, gay muslims!", "Mentally ill people", "gay"], own, GROUPS)
    assert r.tolist() == pytest.approx([1 / 3, 0, 0])


def test_model_small_loads_back_and_is_deterministic(data, model, tmp_path):
    cfg, tr, ytr, *_ = data
    path, metrics = model
    assert metrics["model_bytes"] == path.stat().st_size < 20 * 2**20
    assert ft.load(path).get_labels() == ["__label__toxic", "__label__clean"] or \
        sorted(ft.load(path).get_labels()) == ["__label__clean", "__label__toxic"]
    for i in range(2):
        train_toxicity(tr[:3000], ytr[:3000], cfg, tmp_path / f"m{i}.bin")
    assert (tmp_path / "m0.bin").read_bytes() == (tmp_path / "m1.bin").read_bytes()
