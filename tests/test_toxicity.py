"""Toxicity: fastText on Davidson et al. (stratified held-out split) plus clean prose of many topics and
neutral identity sentences; a calibrated sentence threshold; documents judged on their share of toxic
text; the LDNOOBW word-list ratio that never counts identity terms.

Clean text the model never sees: tests/fixtures/toxicity (65 English web pages, 80 domain documents outside
the background corpus; see SOURCE.txt there). bench/toxicity.py measures the same on the full shared data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.config import BiasConfig, ToxicityConfig
from tasks import fasttext_model as ft
from tasks.quality import load_reference
from tasks.toxicity import (COLUMNS, IDENTITY_TEMPLATES, REASON_SHARE, REASON_WORDLIST, calibration_path, judge,
                            load_labeled, score_toxicity, sentence_threshold, split_sentences, train_toxicity,
                            wordlist_counts, wordlist_ratio)

HERE = Path(__file__).resolve().parent
REF = HERE.parent / "sample" / "curation" / "reference"
FIXTURES = HERE / "fixtures" / "toxicity"
GROUPS = BiasConfig().groups_file
# held-out identity sentences: none of these templates is a training template (IDENTITY_TEMPLATES)
NEUTRAL_TEMPLATES = ["My neighbour is {a}.", "He is a {a} man.", "She is a {a} woman.", "{A} families live here.",
                     "The two {a} women run a bakery.", "Our new teacher is {a}."]
NEUTRAL_TERMS = ["Muslim", "Jewish", "Christian", "Hindu", "atheist", "Black", "white", "Asian", "Hispanic", "Arab",
                 "gay", "lesbian", "bisexual", "transgender", "nonbinary", "disabled", "blind", "deaf", "autistic"]
NEUTRAL = [t.format(a=w, A=w[:1].upper() + w[1:]) for w in NEUTRAL_TERMS for t in NEUTRAL_TEMPLATES] + \
    ["The two women run a bakery.", "The two men run a bakery.", "My neighbour is a woman."]


def _read(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").split("\n") if line.strip()]


def _pages(texts: list[str], idx: np.ndarray, seed: int, per_page: int = 12) -> list[str]:
    idx = np.random.default_rng(seed).permutation(idx)
    return ["\n".join(texts[i] for i in idx[k:k + per_page]) for k in range(0, len(idx) - per_page + 1, per_page)]


@pytest.fixture(scope="module")
def data():
    cfg = ToxicityConfig()
    texts, y = load_labeled(cfg.training_data, cfg.text_column, cfg.label_column, cfg.toxic_labels)
    _, cls = load_labeled(cfg.training_data, cfg.text_column, cfg.label_column, ["0"])  # 1 = hate
    _, neither = load_labeled(cfg.training_data, cfg.text_column, cfg.label_column, ["2"])
    rng = np.random.default_rng(0)
    held = np.zeros(len(y), dtype=bool)
    for m in (cls == 1, (y == 1) & (cls == 0), neither == 1):  # stratified 20% of hate, offensive, neither
        idx = np.flatnonzero(m)
        held[rng.choice(idx, len(idx) // 5, replace=False)] = True
    return {"cfg": cfg, "texts": texts, "y": y, "held": held, "neither": neither == 1,
            "clean": _read("web_pages.jsonl") + _read("domain_docs.jsonl")}


@pytest.fixture(scope="module")
def model(data, tmp_path_factory):
    """The pipeline's model (default ToxicityConfig: clean_data, identity sentences, calibration) on 80%."""
    held = data["held"]
    path = tmp_path_factory.mktemp("toxicity") / "toxicity.bin"
    tr = [t for t, h in zip(data["texts"], held) if not h]
    return path, train_toxicity(tr, data["y"][~held], data["cfg"], path, groups_file=GROUPS)


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


def test_training_metrics_and_held_out_posts(data, model, capsys):
    path, m = model
    held = data["held"]
    te = [t for t, h in zip(data["texts"], held) if h]
    top, mean = score_toxicity(path, te)
    auc, auc_mean = ft.roc_auc(data["y"][held], top), ft.roc_auc(data["y"][held], mean)
    with capsys.disabled():
        print(f"\ntoxicity: {m}\n  held-out {held.sum()} posts: ROC-AUC max {auc:.4f} mean {auc_mean:.4f}")
    assert auc > 0.95 and auc_mean > 0.94  # measured 0.969 / 0.962
    assert m["n_clean_sentences"] > 30_000 and m["n_heldout_chunks"] > 100  # reference + background, 10% held out
    assert m["n_identity_sentences"] > 1000 and m["model_bytes"] == path.stat().st_size < 20 * 2**20
    assert m["calibration_path"] == str(calibration_path(path)) == str(path.with_suffix(".calibration.json"))


def test_clean_pages_are_kept(data, model, capsys):
    """Held-out clean prose: the web pages and domain documents of the fixtures, <= 2% removed. The old
    rule (any sentence > 0.9) removes several of them: one odd line ('Shit, run!', a table row) is enough."""
    path, _ = model
    docs = data["clean"]
    cols, reasons, details = judge(path, [d["text"] for d in docs], data["cfg"], GROUPS)
    removed = np.array([r is not None for r in reasons])
    single = cols["toxicity_score"] > 0.9
    by_source = {}
    for d, r in zip(docs, removed):
        a, b = by_source.get(d["source"], (0, 0))
        by_source[d["source"]] = (a + int(r), b + 1)
    with capsys.disabled():
        print(f"\n  clean documents removed: {removed.sum()}/{len(docs)} {by_source}; "
              f"with one sentence > 0.9 (the old rule): {single.sum()}")
        for d, det in zip(docs, details):
            if not det.startswith("share 0.00"):
                print(f"    {d['id']}: {det}")
    assert len(docs) == 145
    assert removed.mean() <= 0.02  # measured 0/145
    web = np.array([d["source"].startswith("web:") for d in docs])
    assert removed[web].sum() <= 1  # 65 pages: news, blogs, docs, Wikipedia, homepages


def test_toxic_pages_removed_neutral_pages_kept(data, model, capsys):
    """Pages of 12 held-out posts: hateful or offensive ones removed (>= 90%), ordinary ones mostly kept."""
    path, _ = model
    texts, y, held = data["texts"], data["y"], data["held"]
    toxic = _pages(texts, np.flatnonzero(held & (y == 1)), 1)
    neutral = []
    for seed in range(5):  # the 661 held-out 'neither' posts regrouped five times
        neutral += _pages(texts, np.flatnonzero(held & data["neither"]), 10 + seed)
    _, r_toxic, _ = judge(path, toxic, data["cfg"], GROUPS)
    _, r_neutral, _ = judge(path, neutral, data["cfg"], GROUPS)
    toxic_removed = np.mean([r is not None for r in r_toxic])
    neutral_removed = np.mean([r is not None for r in r_neutral])
    with capsys.disabled():
        print(f"\n  toxic pages removed {toxic_removed:.1%} of {len(toxic)}; neutral pages removed "
              f"{neutral_removed:.1%} of {len(neutral)}")
    assert len(toxic) >= 250 and toxic_removed >= 0.9  # measured 100%
    assert set(r_toxic) <= {REASON_SHARE, REASON_WORDLIST, None}
    assert neutral_removed <= 0.15  # measured ~4% (55% with the old rule)


def test_identity_sentence_flips_no_page(data, model, capsys):
    """A neutral sentence naming an identity group, inserted into a kept clean page, flips <= 1% of them;
    scored alone, such sentences are mostly far below the threshold."""
    path, _ = model
    cfg = data["cfg"]
    docs = [d["text"] for d in data["clean"]]
    _, reasons, _ = judge(path, docs, cfg, GROUPS)
    kept = [t for t, r in zip(docs, reasons) if r is None]
    rng = np.random.default_rng(0)
    trials = []
    for text in kept:
        lines = text.split("\n")
        for j in rng.choice(len(NEUTRAL), 8, replace=False):
            at = int(rng.integers(0, len(lines) + 1))
            trials.append("\n".join(lines[:at] + [NEUTRAL[j]] + lines[at:]))
    _, flipped, _ = judge(path, trials, cfg, GROUPS)
    flips = np.mean([r is not None for r in flipped])
    p = ft.prob_of(ft.load(path), NEUTRAL, "toxic")
    with capsys.disabled():
        print(f"\n  identity flips {flips:.2%} of {len(trials)}; sentences alone: median P {np.median(p):.3f}, "
              f"above the threshold {int((p > sentence_threshold(path, cfg)[0]).sum())}/{len(p)}: "
              + "; ".join(f"{s!r} {v:.2f}" for s, v in zip(NEUTRAL, p) if v > 0.3))
    assert len(trials) >= 1000 and flips <= 0.01  # measured 0
    assert np.median(p) < 0.05 and np.mean(p > 0.5) < 0.1  # 'queer' is Davidson's slur: still the worst


def test_calibration_sidecar(data, model, tmp_path):
    path, m = model
    cfg = data["cfg"]
    cal = json.loads(calibration_path(path).read_text())
    assert cal["sentence_threshold"] == m["sentence_threshold"] >= cfg.min_sentence_score
    assert cal["heldout_sentences"] > 3000 and cal["heldout_sentence_fpr"] <= cfg.target_fpr
    assert cal["heldout_doc_fpr"] <= 0.02 and cal["target_fpr"] == cfg.target_fpr
    assert sentence_threshold(path, cfg) == (max(cal["sentence_threshold"], cfg.min_sentence_score),
                                             "calibration" if cal["sentence_threshold"] > cfg.min_sentence_score
                                             else "floor")
    # a higher floor in the config always wins
    assert sentence_threshold(path, cfg.model_copy(update={"min_sentence_score": 0.95})) == (0.95, "floor")
    # a copy without its sidecar, or with the sidecar of another model file: the config's threshold
    other = tmp_path / "other.bin"
    shutil.copyfile(path, other)
    assert sentence_threshold(other, cfg) == (cfg.min_sentence_score, "config")
    calibration_path(other).write_text(json.dumps({**cal, "sentence_threshold": 0.8, "model_sha256": "0" * 64}))
    assert sentence_threshold(other, cfg) == (cfg.min_sentence_score, "config")
    calibration_path(other).write_text(json.dumps({**cal, "sentence_threshold": 0.8}))
    assert sentence_threshold(other, cfg) == (0.8, "calibration")
    _, _, details = judge(other, ["A line.\nAnother line."], cfg, GROUPS)
    assert "> 0.80 calibration" in details[0]


def test_calibration_meets_its_target_on_unseen_text_of_the_kind(data, tmp_path, capsys):
    """A model trained on one book's prose: the threshold that lets 1% of its held-out sentences through
    lets about 1% of another book by the same author through (and far more of another author's: the
    calibration holds for text like clean_data, which is why clean_data covers many topics)."""
    cfg = ToxicityConfig(target_fpr=0.01, min_sentence_score=0.02, holdout=0.2, identity_augmentation=False)
    path = tmp_path / "narrow.bin"
    m = train_toxicity(data["texts"][:8000], data["y"][:8000], cfg, path,
                       clean_texts=load_reference([str(REF / "gutenberg" / "austen-persuasion.txt")], 200))
    cal = json.loads(calibration_path(path).read_text())
    sense = [s for c in load_reference([str(REF / "gutenberg" / "austen-sense.txt")], 200) for s in split_sentences(c)]
    fpr = float(np.mean(ft.prob_of(ft.load(path), sense, "toxic") > m["sentence_threshold"]))
    with capsys.disabled():
        print(f"\n  narrow model: threshold {m['sentence_threshold']:.3f} (quantile {cal['quantile']:.3f}), held-out "
              f"FPR {cal['heldout_sentence_fpr']:.4f} on {cal['heldout_sentences']} sentences, unseen book {fpr:.4f}")
    assert m["sentence_threshold"] == cal["quantile"] > cfg.min_sentence_score  # the calibration decided
    assert cal["heldout_sentence_fpr"] <= cfg.target_fpr
    assert 0.004 <= fpr <= 0.02  # measured 0.011


def test_judge_columns_and_reasons(model):
    path, _ = model
    cfg = ToxicityConfig()
    clean = ("The council met on Tuesday to discuss the new library. Members agreed to extend its opening "
             "hours during the summer. A local bakery will provide refreshments for the opening event. "
             "The budget for the project was approved without changes. Residents can read the minutes online. ")
    one_bad = clean + "\nShut up you stupid bitch, fuck off!\n" + clean
    rant = "\n".join(["Shut up you stupid bitch, fuck off!", "these hoes ain't loyal", "fuck that nigga",
                      "you ugly ass bitch", "The weather is nice."])
    clinical = ("Sex differences in the response to treatment were examined. The effect of sex on outcome was "
                "adjusted for age. Sex and age were recorded at baseline. " + clean)
    listed = clean * 3 + "\nWhat a fucking shit show, you dumb ass!\n"
    texts = [clean, one_bad, rant, clinical, listed, "", "   \n  "]
    cols, reasons, details = judge(path, texts, cfg, GROUPS)
    assert tuple(cols) == COLUMNS == ("toxicity_score", "toxicity_mean", "toxicity_share", "toxicity_sentences",
                                      "wordlist_ratio", "wordlist_terms")
    assert all(v.dtype == np.float64 and v.shape == (len(texts),) for v in cols.values())
    assert len(reasons) == len(details) == len(texts) and all(isinstance(d, str) for d in details)
    assert reasons[0] is None and cols["toxicity_share"][0] == 0 and cols["toxicity_score"][0] < 0.5
    # one toxic sentence in a clean page: the highest score is high, the page stays
    assert reasons[1] is None and cols["toxicity_score"][1] > 0.9 and cols["toxicity_sentences"][1] == 1
    assert 0 < cols["toxicity_share"][1] < 0.1
    assert reasons[2] == REASON_SHARE and cols["toxicity_share"][2] > 0.7 and cols["toxicity_sentences"][2] >= 4
    # clinical words of the list ('sex' x3) without a toxic sentence: kept
    assert cols["wordlist_terms"][3] == 3 and cols["wordlist_ratio"][3] > cfg.max_wordlist_ratio and reasons[3] is None
    # list words beside a toxic sentence, too little toxic text for the share rule: the word list drops it
    assert cols["toxicity_sentences"][4] == 1 and cols["wordlist_terms"][4] >= 3 and reasons[4] == REASON_WORDLIST
    assert reasons[5] is None and reasons[6] is None and all(cols[c][5] == 0 for c in COLUMNS)
    assert details[2].startswith("share ") and "wordlist" in details[2]
    # batching changes nothing; an empty batch is fine
    alone = judge(path, [rant], cfg, GROUPS)[0]
    assert all(alone[c][0] == pytest.approx(cols[c][2]) for c in COLUMNS)
    empty = judge(path, [], cfg, GROUPS)
    assert all(v.shape == (0,) for v in empty[0].values()) and empty[1] == [] and empty[2] == []


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
    alone = score_toxicity(path, [doc])
    assert alone[0][0] == pytest.approx(top[0]) and alone[1][0] == pytest.approx(mean[0])


def test_wordlist_ratio_counts_list_terms_not_identity_terms(tmp_path):
    wl = ToxicityConfig().wordlist
    r = wordlist_ratio(["What the fuck is this shit", "Gay and Muslims people live in the city.",
                        "a big black dog; a girl on a bike", "gay sex", "", "s&m club"], wl, GROUPS)
    assert r.tolist() == pytest.approx([2 / 6, 0, 0, 1 / 2, 0, 1 / 3])  # 'gay sex': only 'sex' counts
    ratio, terms = wordlist_counts(["What the fuck is this shit", ""], wl, GROUPS)
    assert terms.tolist() == [2, 0] and ratio.tolist() == pytest.approx([2 / 6, 0])
    # even when the list itself contains identity terms, they never count
    own = tmp_path / "list"
    own.write_text("gay\nmuslims\ndamn\nmentally ill people\n")
    r = wordlist_ratio(["Damn, gay muslims!", "Mentally ill people", "gay"], own, GROUPS)
    assert r.tolist() == pytest.approx([1 / 3, 0, 0])


def test_identity_templates_fill_every_group(data):
    from tasks.toxicity import identity_forms, identity_sentences

    prose = [s for c in load_reference([str(REF / "inaugural")], 200) for s in split_sentences(c)]
    texts = data["texts"][:5000] + prose + ["A Muslim family met two Native Americans.", "Muslims pray."]
    labels = np.r_[data["y"][:5000], np.zeros(len(prose) + 2)]  # toxic share ~40%
    forms = identity_forms(GROUPS, texts)  # plain terms as written, wildcard terms as found in the texts
    assert {"women", "muslim", "muslims", "black", "gay", "disabled", "native americans"} <= set(forms)
    assert not any(f.startswith("buddhis") for f in forms)  # no completion in these texts: no form
    sents = identity_sentences(GROUPS, texts, labels)
    # every form at least once per template; forms that are mostly toxic in the posts many times more
    n_with = {w: sum(w in ft.tokens(s) for s in sents) for w in ("gay", "muslim")}
    assert n_with["gay"] > len(IDENTITY_TEMPLATES) and n_with["muslim"] == len(IDENTITY_TEMPLATES)
    assert len(sents) >= len(forms) * len(IDENTITY_TEMPLATES)


def test_model_deterministic_with_its_calibration(data, tmp_path):
    cfg = ToxicityConfig()
    clean = load_reference([str(REF / "inaugural")], 200)
    for i in range(2):
        train_toxicity(data["texts"][:3000], data["y"][:3000], cfg, tmp_path / f"m{i}.bin", clean_texts=clean,
                       groups_file=GROUPS)
    assert (tmp_path / "m0.bin").read_bytes() == (tmp_path / "m1.bin").read_bytes()
    c0, c1 = (json.loads(calibration_path(tmp_path / f"m{i}.bin").read_text()) for i in range(2))
    assert c0 == c1 and c0["heldout_chunks"] > 0
