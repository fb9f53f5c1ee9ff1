"""Corpus-wide deduplication: exact text, URL and MinHash-LSH near duplicates.

The FineWeb/DataTrove recipe as map -> reduce -> apply, with the reduce in bounded memory:

    signatures       (map, per shard)    one row per document: its dedup keys
    find_duplicates  (reduce, once)      union-find over documents sharing any key -> rows to drop
    apply            (per shard)         the score step drops those rows (tasks/curate.py)

Keys are uint64 hashes, 0 meaning "no key" (URL dedup off, empty URL, no words). Every hash is
stable across processes and machines: blake2b for strings, fixed constants for the numpy mixers,
never Python's salted hash(). The map runs at ~2-3.5k web documents/s per core (~2.5M words/s,
8x datasketch's MinHash), all numpy past one str.lower() and one blake2b per document.
"""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core import faults
from core.config import DedupConfig
from core.io import TMP_PREFIX
from tasks.urls import normalize_url

U64 = np.uint64
# what a signature file must have been computed with for the reduce to use it
_MAP_FIELDS = ("shingle_words", "bands", "rows", "seed", "url", "minhash")
_META_KEY = b"refinery.dedup"
_TEXT_BATCH_CHARS = 1 << 20   # text per numpy batch: bounds the ~50 bytes/char of temporaries
_SHINGLE_CHUNK = 1 << 12      # shingles per permutation block: (perms x chunk) uint64 stays cache-sized
_P = U64(0x9E3779B97F4A7C15)  # odd multiplier of the word polynomial hash, and its inverse mod 2^64
_P_INV = U64(pow(int(_P), -1, 2**64))

DROP_SCHEMA = pa.schema([("shard", pa.string()), ("row", pa.int32()), ("id", pa.string()),
                         ("reason", pa.string()), ("survivor_id", pa.string())])


# ---- hashing helpers ------------------------------------------------------------------------

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 that spreads every input bit (wraps mod 2^64)."""
    x = x ^ (x >> U64(30))
    x = x * U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> U64(27))
    x = x * U64(0x94D049BB133111EB)
    return x ^ (x >> U64(31))


def _hash_bytes(s: bytes) -> int:
    """Stable 64-bit hash; never 0, which means "no key"."""
    return int.from_bytes(hashlib.blake2b(s, digest_size=8).digest(), "little") or 1


@functools.cache
def _char_table() -> np.ndarray:
    """Codepoint -> normalized codepoint: letters (str.isalnum) stay, decimal digits become "0",
    everything else (punctuation, symbols, whitespace) becomes a space. Built once per process."""
    table = "".join(("0" if c.isdecimal() else c) if c.isalnum() else " " for c in map(chr, range(0x110000)))
    return np.frombuffer(table.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _normalize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """DataTrove's simplify_text for a batch, in numpy: lowercase, punctuation -> space, digit runs
    -> "0", whitespace runs -> one space. Returns the normalized codepoints of all texts, one space
    apart, and the offset where each text starts. Case, spacing, punctuation and changed numbers
    (dates, counters) then no longer make documents distinct."""
    lowered = [t.lower() for t in texts]
    cp = np.frombuffer((" " + " ".join(lowered) + " ").encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    cp = _char_table()[cp]
    starts = np.cumsum([1] + [len(t) + 1 for t in lowered[:-1]])
    # drop a space or "0" that repeats the one before it: collapses whitespace and digit runs
    keep = np.r_[True, (cp[1:] != cp[:-1]) | ((cp[1:] != 32) & (cp[1:] != 48))]
    return cp[keep], np.cumsum(keep)[starts] - 1


def normalize_text(text: str) -> str:
    """The normalized text that `exact` hashes (for inspection and tests)."""
    cp, _ = _normalize([text])
    return cp.tobytes().decode("utf-32-le", "surrogatepass").strip()


def url_key(url: str) -> int:
    """Hash of the canonical URL (tasks.urls), scheme and a leading "www." ignored: http/https and
    www/bare spellings of one page serve the same document. 0 for an empty URL."""
    url = (url or "").strip()
    if not url:
        return 0
    try:
        url = normalize_url(url)
    except ValueError:
        pass  # not http(s) (e.g. "hard::file.html"): compare as written
    rest = url.split("://", 1)[-1]
    return _hash_bytes((rest[4:] if rest.startswith("www.") else rest).encode("utf-8", "surrogatepass"))


def _permutations(cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of bands*rows multiply-add-shift hashes h(x) = ((a*x + b) mod 2^64) >> 32, a family
    that is 2-independent for 32-bit x (Dietzfelbinger 1996). Derived from blake2b(seed, i) so
    every machine and numpy version draws the same ones."""
    n = cfg.bands * cfg.rows
    raw = [int.from_bytes(hashlib.blake2b(f"minhash:{cfg.seed}:{i}".encode(), digest_size=16).digest(), "little")
           for i in range(n)]
    a = np.array([(r & (2**64 - 1)) | 1 for r in raw], dtype=U64)
    b = np.array([r >> 64 for r in raw], dtype=U64)
    return a, b


# ---- map: signatures ------------------------------------------------------------------------

def _batches(texts: list[str]) -> Iterator[tuple[int, int]]:
    """[start, end) ranges of about _TEXT_BATCH_CHARS characters (at least one text each)."""
    start = 0
    while start < len(texts):
        end, size = start + 1, len(texts[start])
        while end < len(texts) and size + len(texts[end]) <= _TEXT_BATCH_CHARS:
            size += len(texts[end])
            end += 1
        yield start, end
        start = end


def _words(cp: np.ndarray, doc_start: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every word of a normalized batch at once: (hash, start, end, doc index) per word.

    Words are the runs between spaces. A word's hash is the polynomial sum(cp_j * P^j) mod 2^64
    over its characters, mixed. One prefix sum gives all of them: the difference of the prefix
    at the word's ends is P^start times that polynomial, and P is odd, so P^-start undoes it.
    """
    is_word = cp != 32                     # cp starts and ends with a space: edges pair up
    edge = np.diff(is_word.astype(np.int8))
    starts, ends = np.flatnonzero(edge == 1) + 1, np.flatnonzero(edge == -1) + 1
    if not len(starts):
        return np.zeros(0, U64), starts, ends, starts
    powers = np.full(len(cp), _P, dtype=U64)
    powers[0] = 1
    prefix = np.cumsum(cp * np.cumprod(powers), dtype=U64)     # wraps mod 2^64, as intended
    powers[:] = _P_INV
    powers[0] = 1
    inverse = np.cumprod(powers)[starts]
    hashes = _mix64((prefix[ends - 1] - prefix[starts - 1]) * inverse)
    return hashes, starts, ends, np.searchsorted(doc_start, starts, side="right") - 1


def _shingles(words: np.ndarray, word_doc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every k consecutive words within one document (order-sensitive), and their doc."""
    n = len(words) - k + 1
    if n <= 0:
        return np.zeros(0, U64), np.zeros(0, np.int64)
    h = words[:n].copy()
    for j in range(1, k):
        h = _mix64(h) ^ words[j:j + n]
    keep = word_doc[:n] == word_doc[k - 1:]   # drop windows that run into the next document
    return _mix64(h[keep]), word_doc[:n][keep]


def _minhash(sh: np.ndarray, sh_doc: np.ndarray, n_docs: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(permutations, docs) uint32 minima over each doc's shingle set; docs without shingles stay at max.

    sh_doc is non-decreasing, so each block of shingles covers a contiguous run of documents and
    reduceat takes the per-doc minimum of all permutations in a handful of array operations.
    """
    sig = np.full((len(a), n_docs), np.iinfo(np.uint32).max, dtype=np.uint32)
    x = sh >> U64(32)                          # 32-bit inputs for the multiply-add-shift family
    for lo in range(0, len(sh), _SHINGLE_CHUNK):
        xs, ds = x[lo:lo + _SHINGLE_CHUNK], sh_doc[lo:lo + _SHINGLE_CHUNK]
        first = np.flatnonzero(np.r_[True, ds[1:] != ds[:-1]])
        h = a[:, None] * xs[None, :]
        h += b[:, None]
        # the top 32 bits of the smallest value are the smallest top 32 bits: shift after the min
        mins = (np.minimum.reduceat(h, first, axis=1) >> U64(32)).astype(np.uint32)
        docs = ds[first]
        sig[:, docs] = np.minimum(sig[:, docs], mins)  # a doc may continue from the previous block
    return sig


def _band_keys(sig: np.ndarray, bands: int, rows: int, has_shingles: np.ndarray) -> np.ndarray:
    """(bands, docs) uint64: one hash per band of `rows` minima; 0 for docs with no shingles."""
    out = np.zeros((bands, sig.shape[1]), dtype=U64)
    for i in range(bands):
        h = np.full(sig.shape[1], U64(i + 1))
        for r in sig[i * rows:(i + 1) * rows]:
            h = _mix64(h ^ r.astype(U64))
        out[i] = np.where(h == 0, U64(1), h)
    out[:, ~has_shingles] = 0
    return out


def signature_schema(cfg: DedupConfig) -> pa.Schema:
    fields = [("shard", pa.string()), ("row", pa.int32()), ("id", pa.string()), ("n_words", pa.int64()),
              ("exact", pa.uint64()), ("url_key", pa.uint64())]
    fields += [(f"band_{i}", pa.uint64()) for i in range(cfg.bands)]
    meta = {_META_KEY: json.dumps({f: getattr(cfg, f) for f in _MAP_FIELDS}, sort_keys=True).encode()}
    return pa.schema(fields, metadata=meta)


def signatures(table: pa.Table, shard: str, cfg: DedupConfig) -> pa.Table:
    """Map, per shard: the dedup keys of every document of `table` (id, url, text, n_words).

    One row per input row: shard, row (its index in `table`), id, n_words, `exact` (hash of
    normalize_text), `url_key` (url_key(url); 0 if cfg.url is off) and band_0..band_{bands-1}:
    MinHash-LSH band keys over word `shingle_words`-grams of the normalized text, bands*rows
    permutations seeded by cfg.seed (all 0 if cfg.minhash is off). A document shorter than one
    shingle has its whole text as its only shingle; one without words has band keys 0.
    The schema records the map-side config, so the reduce refuses mixed signatures.
    """
    n = table.num_rows
    texts = [t or "" for t in table.column("text").to_pylist()]
    exact = np.zeros(n, U64)
    bands = np.zeros((cfg.bands, n), dtype=U64)
    perms = _permutations(cfg)
    for start, end in _batches(texts):
        m = end - start
        cp, doc_start = _normalize(texts[start:end])
        words, w_start, w_end, word_doc = _words(cp, doc_start)
        first, stop = np.searchsorted(word_doc, np.arange(m)), np.searchsorted(word_doc, np.arange(m), side="right")
        for i in np.flatnonzero(stop > first):  # blake2b of the normalized text, first to last word
            exact[start + i] = _hash_bytes(cp[w_start[first[i]]:w_end[stop[i] - 1]].tobytes())
        if not cfg.minhash:
            continue
        sh, sh_doc = _shingles(words, word_doc, cfg.shingle_words)
        short = np.flatnonzero((stop > first) & (stop - first < cfg.shingle_words))
        if len(short):  # a text shorter than one shingle is its own one shingle: its exact hash
            sh, sh_doc = np.r_[sh, exact[start + short]], np.r_[sh_doc, short]
            order = np.argsort(sh_doc, kind="stable")
            sh, sh_doc = sh[order], sh_doc[order]
        sig = _minhash(sh, sh_doc, m, *perms)
        bands[:, start:end] = _band_keys(sig, cfg.bands, cfg.rows, stop > first)
    keys_url = np.array([url_key(u) if cfg.url else 0 for u in table.column("url").to_pylist()], dtype=U64)
    schema = signature_schema(cfg)
    cols = [pa.array([shard] * n, pa.string()), pa.array(np.arange(n, dtype=np.int32)),
            table.column("id").cast(pa.string()), table.column("n_words").cast(pa.int64()),
            pa.array(exact), pa.array(keys_url)] + [pa.array(bands[i]) for i in range(cfg.bands)]
    return pa.Table.from_arrays(cols, schema=schema)


# ---- reduce: clusters -----------------------------------------------------------------------

def _compress(parent: np.ndarray) -> None:
    """Pointer doubling until every node points at its root: O(N log depth)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def _union(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Merge the clusters of u[i] and v[i] for all i, vectorized. Expects `parent` compressed and
    leaves it so. The larger root is always hooked under the smaller, so every root is the
    smallest index of its cluster: the survivor falls out of the structure."""
    while len(u):
        ru, rv = parent[u], parent[v]
        open_ = ru != rv
        u, v, ru, rv = u[open_], v[open_], ru[open_], rv[open_]
        if not len(u):
            return
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
        _compress(parent)


def _read(path: Path, columns: list[str]) -> pa.Table:
    return pq.ParquetFile(path).read(columns=columns)  # ~10x less overhead than pq.read_table


def _signature_files(paths: list[str | Path], cfg: DedupConfig) -> list[tuple[str, Path, int]]:
    """(shard, path, rows) sorted by shard name, so global indices follow (shard, row)."""
    want = {f: getattr(cfg, f) for f in _MAP_FIELDS}
    out = []
    for p in map(Path, paths):
        meta = pq.read_metadata(p)
        got = json.loads((meta.schema.to_arrow_schema().metadata or {}).get(_META_KEY, b"null"))
        if got != want:
            raise ValueError(f"{p}: signatures computed with {got}, reduce configured with {want}; "
                             "recompute the signatures")
        if meta.num_rows == 0:
            continue
        t = _read(p, ["shard", "row"])
        shards = set(t.column("shard").unique().to_pylist())
        if len(shards) != 1:
            raise ValueError(f"{p}: one shard per signature file expected, found {sorted(shards)[:5]}")
        if np.any(np.diff(t.column("row").to_numpy()) <= 0):
            raise ValueError(f"{p}: rows must be strictly increasing")
        out.append((shards.pop(), p, meta.num_rows))
    names = [s for s, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate shard names among signature files: {sorted(names)}")
    return sorted(out, key=lambda x: x[0])


def _spill(files: list[tuple[str, Path, int]], base: np.ndarray, column: str, spill: Path,
           partitions: int) -> list[Path]:
    """Write (key, global index) uint64 pairs of one key column's non-zero keys into partition
    files by key hash: equal keys land in the same file."""
    paths = [spill / f"{column}-{p:05d}.bin" for p in range(partitions)]
    handles = [open(p, "wb") for p in paths]
    try:
        for (_, path, _), b0 in zip(files, base):
            key = _read(path, [column]).column(column).to_numpy()
            nz = np.flatnonzero(key)
            part = _mix64(key[nz]) % U64(partitions)
            order = np.argsort(part, kind="stable")
            pairs = np.stack([key[nz][order], (b0 + nz[order]).astype(U64)], axis=1)
            bounds = np.searchsorted(part[order], np.arange(partitions + 1, dtype=U64))
            for p, fh in enumerate(handles):
                pairs[bounds[p]:bounds[p + 1]].tofile(fh)
    finally:
        for fh in handles:
            fh.close()
    return paths


def find_duplicates(signature_files: list[str | Path], cfg: DedupConfig, work_dir: Path) -> pa.Table:
    """Reduce, once for the corpus: the documents to drop, as rows of DROP_SCHEMA
    (shard, row, id, reason, survivor_id), sorted by (shard, row).

    Clusters: documents linked by an equal `exact` hash (cfg.exact), an equal `url_key` (cfg.url)
    or an equal value in any one band (cfg.minhash; the pair's estimated Jaccard similarity is
    then likely above (1/bands)^(1/rows), ~0.72 for 14x8), closed transitively (union-find).
    The survivor of each cluster is its document with the smallest (shard, row); every other
    member is dropped with a reason relative to the survivor: 'exact' if its normalized text
    equals the survivor's, else 'url' if its url_key does, else 'near' (linked through MinHash
    bands, possibly via other members).

    Memory: each document gets a global index in (shard, row) order; the union-find parent array
    (4 bytes per document, 8 past 2^31 documents) is the only state that spans the corpus. Each
    key column in turn (exact, url_key, band_0, ...) is spilled as (key, index) pairs, 16 bytes
    per document, into cfg.partitions files under work_dir (peak disk: 16 bytes per document);
    each partition is then loaded alone, sorted by key, and equal keys are unioned: ~50 bytes
    per record while it is sorted, so ~50/partitions bytes per document; the last pass adds
    2 bytes per document (two flags). Resident in all: ~4 + 2 + 50/partitions bytes per document
    (~9 at the defaults), plus the output (O(dropped documents)) and one shard's columns;
    measured on 4M documents: 12 bytes/doc besides the output, ~110k docs/s. Past RAM, raise
    cfg.partitions with the corpus: what remains is 6 bytes per document (a billion: 6 GB).
    """
    files = _signature_files(signature_files, cfg)
    cols = (["exact"] if cfg.exact else []) + (["url_key"] if cfg.url else []) \
        + ([f"band_{i}" for i in range(cfg.bands)] if cfg.minhash else [])
    base = np.cumsum([0] + [n for _, _, n in files])
    n_docs = int(base[-1])
    parent = np.arange(n_docs, dtype=np.int32 if n_docs < 2**31 else np.int64)

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # private to this reduce; a temporary (TMP_PREFIX), so a killed reduce's spill files are swept
    spill = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}spill-", dir=work_dir))
    try:
        for column in cols if n_docs else []:   # one column at a time: keys of different columns never meet
            paths = _spill(files, base, column, spill, cfg.partitions)
            faults.maybe_kill("dedup-spill")    # chaos drills: die mid-reduce, spill files on disk
            for path in paths:
                pairs = np.fromfile(path, dtype=U64).reshape(-1, 2)
                path.unlink()
                if len(pairs) < 2:
                    continue
                order = np.argsort(pairs[:, 0])
                key, idx = pairs[order, 0], pairs[order, 1].astype(parent.dtype)
                head = np.r_[True, key[1:] != key[:-1]]          # first of each run of equal keys
                run_first = idx[np.maximum.accumulate(np.where(head, np.arange(len(key)), 0))]
                _union(parent, run_first[~head], idx[~head])  # every member of a run to its first
    finally:
        shutil.rmtree(spill, ignore_errors=True)

    return _drops(files, base, parent)


def _drops(files: list[tuple[str, Path, int]], base: np.ndarray, parent: np.ndarray) -> pa.Table:
    """One pass over the signatures: survivors' keys (needed for reasons) and the dropped rows."""
    dropped = parent != np.arange(len(parent), dtype=parent.dtype)
    is_root = np.zeros(len(parent), bool)
    is_root[parent[dropped]] = True
    surv, drops = [], []
    for (_, path, n), b0 in zip(files, base):
        s, d = np.flatnonzero(is_root[b0:b0 + n]), np.flatnonzero(dropped[b0:b0 + n])
        if not len(s) + len(d):
            continue
        t = _read(path, ["shard", "row", "id", "exact", "url_key"])
        surv.append((b0 + s, t.take(s)))
        drops.append((parent[b0 + d], t.take(d)))
    if not drops:
        return DROP_SCHEMA.empty_table()
    s_idx = np.concatenate([i for i, _ in surv])  # ascending: files and rows are in index order
    s_tab = pa.concat_tables([t for _, t in surv])
    d_root = np.concatenate([r for r, _ in drops])
    d_tab = pa.concat_tables([t for _, t in drops])
    at = np.searchsorted(s_idx, d_root)
    same = {}
    for c in ("exact", "url_key"):
        key = d_tab.column(c).to_numpy()
        same[c] = (key == s_tab.column(c).to_numpy()[at]) & (key != 0)
    reason = np.where(same["exact"], "exact", np.where(same["url_key"], "url", "near"))
    return pa.Table.from_arrays(
        [d_tab.column("shard"), d_tab.column("row"), d_tab.column("id"), pa.array(reason, pa.string()),
         s_tab.column("id").take(pa.array(at))], schema=DROP_SCHEMA)
