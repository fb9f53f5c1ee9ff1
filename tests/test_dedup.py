"""Dedup on real text: web pages extracted from the bundled WARC and U.S. inaugural addresses,
plus edited copies of them, spread across shards."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from core.config import DedupConfig, ExtractConfig
from tasks import dedup
from tasks.dedup import DROP_SCHEMA, find_duplicates, normalize_text, signatures
from core.io import write_parquet_atomic

SAMPLE = Path(__file__).resolve().parent.parent / "sample"
BOILERPLATE = "Subscribe to our newsletter for weekly updates. Copyright 2024, all rights reserved."


@pytest.fixture(scope="module")
def web() -> list[tuple[str, str]]:
    """(url, text) of the first English pages of the sample WARC with at least 300 words."""
    from tasks.extract import extract_html, payload_to_html
    from tasks.warc import iter_records

    cfg = ExtractConfig()
    out = []
    for rec in iter_records(SAMPLE / "pages.warc.gz"):
        try:
            html, _ = payload_to_html(rec, cfg)
        except Exception:
            continue
        doc = extract_html(html, rec.url, cfg.model_dump())
        words = doc["text"].lower().split() if doc else []
        if rec.url.startswith("http") and len(words) >= 300 \
                and sum(w in ("the", "and", "of", "to") for w in words) > 0.06 * len(words):
            out.append((rec.url, doc["text"]))
        if len(out) == 7:
            return out
    pytest.fail(f"only {len(out)} English pages in the sample")


@pytest.fixture(scope="module")
def inaugural() -> list[str]:
    return [p.read_text(errors="replace") for p in sorted((SAMPLE / "curation/reference/inaugural").glob("*.txt"))]


def replace_words(text: str, frac: float, rng: random.Random, contiguous: bool = False) -> str:
    """Replace a fraction of the words with words of another text (scattered, or one block)."""
    words = text.split()
    k = max(1, round(frac * len(words)))
    filler = "liberty union people nation government power country duty peace constitution".split()
    if contiguous:
        start = rng.randrange(len(words) - k)
        idx = range(start, start + k)
    else:
        idx = rng.sample(range(len(words)), k)
    for i in idx:
        words[i] = rng.choice(filler) + rng.choice(["", "s", "ly"])
    return " ".join(words)


def table(rows: list[dict]) -> pa.Table:
    return pa.table({"id": [r["id"] for r in rows], "url": [r.get("url", "") for r in rows],
                     "text": [r["text"] for r in rows], "n_words": [len(r["text"].split()) for r in rows]})


def write_shards(tmp: Path, shards: dict[str, list[dict]], cfg: DedupConfig) -> list[Path]:
    return [write_parquet_atomic(signatures(table(rows), name, cfg), tmp / "sig" / f"{name}.parquet")
            for name, rows in shards.items()]


def shingles(text: str, k: int = 5) -> set[tuple[str, ...]]:
    w = normalize_text(text).split()
    return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def band_hit(sig: pa.Table, i: int, j: int, bands: int) -> bool:
    return any(sig[f"band_{b}"][i] == sig[f"band_{b}"][j] for b in range(bands))


# ---- normalization and signatures -----------------------------------------------------------

def test_normalize_text():
    assert normalize_text("  Hello,\tWORLD!!  In 2024 (or 1999)... café’s\n") == "hello world in 0 or 0 café s"
    assert normalize_text("The  End.") == normalize_text("the end")
    assert normalize_text("?!") == ""


def test_signature_schema(web):
    cfg = DedupConfig()
    t = table([{"id": "a", "url": web[0][0], "text": web[0][1]}, {"id": "b", "text": "Too short."},
               {"id": "c", "text": "  ...  "}])
    sig = signatures(t, "s0", cfg)
    assert sig.column_names[:6] == ["shard", "row", "id", "n_words", "exact", "url_key"]
    assert sig.column_names[6:] == [f"band_{i}" for i in range(cfg.bands)]
    assert sig.schema.field("row").type == pa.int32() and sig.schema.field("band_0").type == pa.uint64()
    assert sig["shard"].to_pylist() == ["s0"] * 3 and sig["row"].to_pylist() == [0, 1, 2]
    assert sig["url_key"].to_pylist()[1:] == [0, 0]              # no URL: no key
    assert sig["exact"][2].as_py() == 0 and sig["band_0"][2].as_py() == 0  # no words: no keys
    assert sig["band_0"][1].as_py() != 0                          # short text: one shingle
    assert signatures(t.slice(0, 0), "s0", cfg).num_rows == 0
    off = signatures(t, "s0", DedupConfig(url=False, minhash=False))
    assert off["url_key"].to_pylist() == [0, 0, 0] and off["band_3"].to_pylist() == [0, 0, 0]


def test_signatures_independent_of_batching(web, monkeypatch):
    """A document's keys must not depend on its neighbours, the batch size or the block size."""
    cfg = DedupConfig()
    t = table([{"id": str(i), "url": u, "text": x} for i, (u, x) in enumerate(web)]
              + [{"id": "short", "text": "Hello there"}, {"id": "empty", "text": ""}])
    whole = signatures(t, "s", cfg)
    assert signatures(t, "s", cfg).equals(whole)
    monkeypatch.setattr(dedup, "_TEXT_BATCH_CHARS", 3000)    # most texts alone in a batch
    monkeypatch.setattr(dedup, "_SHINGLE_CHUNK", 97)         # every text split across blocks
    small = signatures(t, "s", cfg)
    keys = [c for c in whole.column_names if c not in ("shard", "row")]
    assert small.select(keys).equals(whole.select(keys))
    for i in (0, 3):
        assert signatures(t.slice(i, 1), "s", cfg).select(keys).equals(whole.slice(i, 1).select(keys))


def test_signatures_fixed_across_seeds_and_processes(web):
    """Keys are a pure function of (text, config): a fresh interpreter computes the same ones."""
    import subprocess
    import sys

    cfg = DedupConfig()
    t = table([{"id": "a", "url": web[1][0], "text": web[1][1]}])
    sig = signatures(t, "s", cfg)
    code = ("import sys, pyarrow as pa; from core.config import DedupConfig; from tasks.dedup import signatures;"
            f"t = pa.table({{'id': ['a'], 'url': [{web[1][0]!r}], 'text': [sys.stdin.read()], 'n_words': [1]}});"
            "s = signatures(t, 's', DedupConfig()); print(s['exact'][0], s['band_13'][0])")
    out = subprocess.run([sys.executable, "-c", code], input=web[1][1], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, env={"PYTHONHASHSEED": "123"}, check=True)
    assert out.stdout.split() == [str(sig["exact"][0]), str(sig["band_13"][0])]
    other = signatures(t, "s", DedupConfig(seed=2))
    assert other["exact"].equals(sig["exact"]) and not other["band_0"].equals(sig["band_0"])


def test_minhash_estimates_jaccard(inaugural):
    """The fraction of equal MinHash values estimates the shingle-set Jaccard similarity."""
    cfg = DedupConfig()
    rng = random.Random(1)
    base = inaugural[20]
    for frac in (0.01, 0.05, 0.15, 0.5):
        copy = replace_words(base, frac, rng)
        sigs = []
        for text in (base, copy):
            cp, starts = dedup._normalize([text])
            words, _, _, doc = dedup._words(cp, starts)
            sh, sh_doc = dedup._shingles(words, doc, cfg.shingle_words)
            sigs.append(dedup._minhash(sh, sh_doc, 1, *dedup._permutations(cfg))[:, 0])
        est, true = np.mean(sigs[0] == sigs[1]), jaccard(base, copy)
        # 112 permutations: standard error sqrt(J(1-J)/112) <= 0.047
        assert abs(est - true) < 0.15, (frac, est, true)


def test_threshold_matches_lsh_curve_and_datasketch(inaugural):
    """Band collisions follow P(J) = 1 - (1 - J^rows)^bands, as datasketch's MinHashLSH does.

    With 5-word shingles a scattered word edit breaks 5 shingles, so "5% of words changed" means
    J ~ 0.63 and P ~ 0.3 at FineWeb's 14x8 (threshold ~0.72): near-duplicate means ~1-2% scattered
    edits, or a contiguous 5% edit (a changed paragraph, an added boilerplate line).
    """
    from datasketch import MinHash, MinHashLSH

    cfg = DedupConfig()
    n_perm = cfg.bands * cfg.rows
    rng = random.Random(7)
    curve = lambda j: 1 - (1 - j ** cfg.rows) ** cfg.bands  # noqa: E731

    def datasketch_minhash(sh: set) -> MinHash:  # datasketch's own hashing (sha1) and permutations
        m = MinHash(num_perm=n_perm, seed=cfg.seed)
        m.update_batch([" ".join(s).encode() for s in sh])
        return m

    bases = [t for t in inaugural if len(t.split()) > 1500][:4]
    base_sh = [shingles(b) for b in bases]
    lsh = MinHashLSH(num_perm=n_perm, params=(cfg.bands, cfg.rows))
    for k in range(2):
        lsh.insert(k, datasketch_minhash(base_sh[k]))
    for frac, contiguous, expect in [(0.01, False, "all"), (0.05, True, "all"), (0.05, False, "some"),
                                     (0.5, False, "none")]:
        copies = [(k, replace_words(bases[k], frac, rng, contiguous)) for k in range(len(bases)) for _ in range(10)]
        sig = signatures(table([{"id": str(i), "text": x} for i, x in enumerate(bases + [c for _, c in copies])]),
                         "s", cfg)
        hit, p, lsh_hit, lsh_p = [], [], [], []
        for i, (k, copy) in enumerate(copies):
            sh = shingles(copy)
            hit.append(band_hit(sig, k, len(bases) + i, cfg.bands))
            p.append(curve(len(sh & base_sh[k]) / len(sh | base_sh[k])))
            if k < 2:   # datasketch on a subset: its pure-Python hashing is slow
                lsh_hit.append(k in lsh.query(datasketch_minhash(sh)))
                lsh_p.append(p[-1])
        for hits, probs in ((hit, p), (lsh_hit, lsh_p)):  # within 3 standard deviations of the curve
            mean, sd = sum(probs), math.sqrt(sum(q * (1 - q) for q in probs))
            assert abs(sum(hits) - mean) <= 3 * sd + 1, (frac, contiguous, sum(hits), mean, sd)
        if expect == "all":
            assert all(hit) and all(lsh_hit)
        elif expect == "none":
            assert not any(hit) and not any(lsh_hit)
        else:
            assert 0 < sum(hit) < len(hit)


# ---- the reduce -----------------------------------------------------------------------------

def corpus(web, inaugural) -> tuple[dict[str, list[dict]], dict[str, tuple[str, str]]]:
    """Shards of real documents and edited copies; expected drops: id -> (reason, survivor id)."""
    rng = random.Random(3)
    W = [{"id": f"W{i}", "url": u, "text": x} for i, (u, x) in enumerate(web)]
    Inaug = [{"id": f"I{i}", "url": f"https://example.gov/inaugural/{i}", "text": x}
             for i, x in enumerate(inaugural[:20])]
    w0, w1, w2, w3, w4, w5, w6 = (d["text"] for d in W)
    near_w1 = replace_words(w1, 0.01, rng)
    shards = {
        "s0": [W[0], *Inaug[0:5],
               {"id": "W3+boiler", "url": "", "text": w3 + "\n" + BOILERPLATE}],
        "s1": [W[1], *Inaug[5:10],
               {"id": "W0~case", "url": "", "text": "  " + w0.upper().replace(". ", " .  ")},
               {"id": "W2~block", "url": "", "text": replace_words(w2, 0.05, rng, contiguous=True)},
               {"id": "W5@url", "url": W[5]["url"].replace("https://", "http://"), "text": inaugural[30]}],
        "s2": [W[2], W[3], *Inaug[10:15],
               {"id": "W4~half", "url": "", "text": replace_words(w4, 0.5, rng)},
               {"id": "W0=copy", "url": "https://mirror.example/copy", "text": w0},
               {"id": "W1~near", "url": "", "text": near_w1}],
        "s3": [W[4], W[5], W[6], *Inaug[15:20],
               {"id": "W1~near~case", "url": "", "text": near_w1.lower()}],
    }
    expected = {
        "W0~case": ("exact", "W0"), "W0=copy": ("exact", "W0"),
        "W3": ("near", "W3+boiler"),            # same: the boilerplate copy in s0 survives
        "W2": ("near", "W2~block"),             # the edited copy is in s1, before the original
        "W1~near": ("near", "W1"),
        "W1~near~case": ("near", "W1"),         # exact copy of a near copy: near to the survivor
        "W5": ("url", "W5@url"),                # same page by URL (http vs https), different text
    }
    return shards, expected


def test_find_duplicates_across_shards(web, inaugural, tmp_path):
    cfg = DedupConfig()
    shards, expected = corpus(web, inaugural)
    drops = find_duplicates(write_shards(tmp_path, shards, cfg), cfg, tmp_path / "work")
    assert drops.schema == DROP_SCHEMA
    got = {r["id"]: (r["reason"], r["survivor_id"]) for r in drops.to_pylist()}
    assert got == expected   # distinct documents (inaugurals, the 50% edit) never merged
    # rows point at the documents, and every survivor is kept and comes first in (shard, row)
    where = {d["id"]: (name, i) for name, rows in shards.items() for i, d in enumerate(rows)}
    for r in drops.to_pylist():
        assert where[r["id"]] == (r["shard"], r["row"])
        assert r["survivor_id"] not in got and where[r["survivor_id"]] < where[r["id"]]
    assert [(r["shard"], r["row"]) for r in drops.to_pylist()] == sorted(where[i] for i in got)
    assert list((tmp_path / "work").iterdir()) == []   # spill files removed


def test_deterministic_and_independent_of_order(web, inaugural, tmp_path):
    cfg = DedupConfig()
    shards, _ = corpus(web, inaugural)
    files = write_shards(tmp_path, shards, cfg)
    first = find_duplicates(files, cfg, tmp_path / "w")
    assert find_duplicates(files, cfg, tmp_path / "w").equals(first)
    assert find_duplicates(files[::-1], cfg, tmp_path / "w").equals(first)
    rng = random.Random(0)
    for partitions in (1, 3, 64):
        shuffled = rng.sample(files, len(files))
        assert find_duplicates(shuffled, DedupConfig(partitions=partitions), tmp_path / "w").equals(first)


def test_config_switches(web, inaugural, tmp_path):
    shards, expected = corpus(web, inaugural)

    def run(**kw):
        cfg = DedupConfig(**kw)
        files = write_shards(tmp_path / str(sorted(kw.items())), shards, cfg)
        drops = find_duplicates(files, cfg, tmp_path / "w")
        return {r["id"]: (r["reason"], r["survivor_id"]) for r in drops.to_pylist()}

    assert run(url=False) == {k: v for k, v in expected.items() if v[0] != "url"}
    # without MinHash the exact copy of a near copy is only linked to that copy
    assert run(minhash=False) == {**{k: v for k, v in expected.items() if v[0] != "near"},
                                  "W1~near~case": ("exact", "W1~near")}
    # exact copies are also band collisions: still found, and still called exact
    assert run(exact=False) == expected
    assert run(exact=False, url=False, minhash=False) == {}


def test_short_and_empty_documents(tmp_path):
    cfg = DedupConfig()
    shards = {"a": [{"id": "hi", "text": "Hello world"}, {"id": "e1", "text": ""}, {"id": "p1", "text": "!!"}],
              "b": [{"id": "HI", "text": "hello, WORLD!"}, {"id": "hey", "text": "Hello there world"},
                    {"id": "e2", "text": ""}, {"id": "p2", "text": "??"}]}
    drops = find_duplicates(write_shards(tmp_path, shards, cfg), cfg, tmp_path / "w")
    assert drops.to_pylist() == [{"shard": "b", "row": 0, "id": "HI", "reason": "exact", "survivor_id": "hi"}]


def test_refuses_mixed_or_ambiguous_signatures(web, tmp_path):
    t = table([{"id": "a", "url": web[0][0], "text": web[0][1]}])
    a = write_parquet_atomic(signatures(t, "a", DedupConfig(bands=10)), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="recompute the signatures"):
        find_duplicates([a], DedupConfig(), tmp_path / "w")
    b = write_parquet_atomic(signatures(t, "a", DedupConfig()), tmp_path / "b.parquet")
    c = write_parquet_atomic(signatures(t, "a", DedupConfig()), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="duplicate shard names"):
        find_duplicates([b, c], DedupConfig(), tmp_path / "w")
    empty = write_parquet_atomic(signatures(t.slice(0, 0), "z", DedupConfig()), tmp_path / "z.parquet")
    assert find_duplicates([empty], DedupConfig(), tmp_path / "w").equals(DROP_SCHEMA.empty_table())
    assert find_duplicates([], DedupConfig(), tmp_path / "w").num_rows == 0


def test_union_find_matches_reference():
    """The vectorized union-find, fed edges in batches (as partitions are), against a plain one."""
    rng = np.random.default_rng(0)
    n = 3000
    parent = np.arange(n, dtype=np.int32)
    ref = list(range(n))

    def find(x):
        while ref[x] != x:
            ref[x] = ref[ref[x]]
            x = ref[x]
        return x

    chain = np.arange(n - 1)   # a long path, fed backwards, makes deep trees
    batches = [(chain[::-1][:1500], chain[::-1][:1500] + 1)] + \
              [tuple(rng.integers(0, n, (2, 400))) for _ in range(5)]
    for u, v in batches:
        dedup._union(parent, u, v)
        for a, b in zip(u.tolist(), v.tolist()):
            ra, rb = find(a), find(b)
            ref[max(ra, rb)] = min(ra, rb)
    assert parent.tolist() == [find(x) for x in range(n)]   # roots are each cluster's smallest index
    assert (parent[parent] == parent).all()
