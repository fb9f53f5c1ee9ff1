"""Curation throughput against DataTrove 0.10.1, and the memory of our dedup reduce.

    .venv-bench/bin/python bench/curate.py [--repeat 4] [--rounds 2] [--workers 1,2] [--langid]
    .venv-bench/bin/python bench/curate.py --dedup-memory 200000 1000000

Needs the bench environment (`make bench` builds `.venv-bench`: our stack plus datatrove==0.10.1
without its `processing` extra, and the few packages its WARC reader and filters import).

Throughput: the same WARC shards go through
  ours       extract_shard -> filter_shard (rules + MinHash/exact/URL signatures), per shard in a
             pool of N processes; then find_duplicates (the global reduce) in the parent; then the
             drops applied per shard (what score_shard does first), written as Parquet.
             Plain functions, no Prefect: both sides run without orchestration overhead.
  DataTrove  WarcReader -> Trafilatura -> GopherRepetition -> GopherQuality -> C4Quality ->
             FineWebQuality -> JsonlWriter -> MinhashDedupSignature (N tasks), MinhashDedupBuckets
             (14 tasks), MinhashDedupCluster (1 task), JsonlReader -> MinhashDedupFilter ->
             JsonlWriter (N tasks); LocalPipelineExecutor with N workers.
Every rule threshold of the DataTrove steps is set from our CurateConfig defaults, the extractor
from our ExtractConfig defaults (bench/datatrove_settings.py, shared with bench/e2e.py). Our
language ID is switched off for the comparison (DataTrove's LanguageFilter downloads its fastText
model at run time, impossible offline); `--langid` adds a row with it on. The input is the bundled
WARCs concatenated `--repeat` times, split into N shard files (DataTrove parallelises by file).
Each run is a fresh process timed from start to exit; best of `--rounds` interleaved rounds.
docs/s/core = input page records / (seconds x N).

Dedup memory: N synthetic documents' signature files (the schema find_duplicates reads, realistic
duplicate structure), find_duplicates in a fresh process; its peak RSS (VmHWM, see peak_rss_kib)
minus that of a process that only imported the same modules, per million documents.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.config import CurateConfig, ExtractConfig  # noqa: E402
from datatrove_settings import minhash_config, rule_filters, trafilatura_step  # noqa: E402

RULE_STAGES = ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
SOURCES = [ROOT / "sample" / "pages.warc.gz"] + sorted((ROOT / "sample" / "warc").glob("*.warc.gz"))


# ---- input ------------------------------------------------------------------------------------

def with_target_uris(data: bytes) -> bytes:
    """A gzipped WARC whose response records all have a WARC-Target-URI. The spec requires one;
    sample/pages.warc.gz has 5 records without (pages saved from disk). fastwarc (ours) reads them,
    warcio (DataTrove's WarcReader) raises AttributeError and DataTrove fails the whole task. So
    the bench corpus gives them `https://sample.invalid/<X-Sample-File>`, for both sides alike."""
    import gzip
    import zlib

    out = []
    while data:  # one record per gzip member, as WARC writers do
        d = zlib.decompressobj(31)
        rec = d.decompress(data)
        data = d.unused_data
        head, sep, body = rec.partition(b"\r\n\r\n")
        if b"\r\nWARC-Type: response" in head and b"\r\nWARC-Target-URI:" not in head:
            name = re.search(rb"\r\nX-Sample-File: ([^\r]*)", head)
            uri = b"https://sample.invalid/" + (name.group(1) if name else b"page")
            rec = head + b"\r\nWARC-Target-URI: " + uri + sep + body
        out.append(gzip.compress(rec, mtime=0))
    return b"".join(out)


def build_shards(folder: Path, repeat: int, n: int) -> list[Path]:
    """The bundled WARCs `repeat` times over n shard files (gzip members concatenate). Copy r of
    file f goes to shard (r + f) % n, so with repeat a multiple of n every shard holds the same pages."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"shard-{i:02d}.warc.gz" for i in range(n)]
    handles = [open(p, "wb") for p in paths]
    sources = [with_target_uris(src.read_bytes()) for src in SOURCES]
    try:
        for r in range(repeat):
            for f, src in enumerate(sources):
                handles[(r + f) % n].write(src)
    finally:
        for h in handles:
            h.close()
    return paths


def count_pages(paths: list[Path]) -> int:
    from tasks.warc import iter_records

    return sum(1 for p in paths for r in iter_records(p) if not r.error)


# ---- ours -------------------------------------------------------------------------------------

def _no_langid() -> None:
    """Our language ID off: every document is English at probability 1 (the stage keeps all)."""
    import tasks.langid

    tasks.langid.identify = lambda texts, cfg: [("en", 1.0)] * len(texts)


def _ours_map(shard: str, out: str, langid: bool) -> dict:
    from tasks.curate import filter_shard
    from tasks.extract import extract_shard

    if not langid:
        _no_langid()
    name = Path(shard).name.removesuffix(".warc.gz")
    ex = extract_shard(shard, Path(out) / "extract", name, ExtractConfig(workers=1))
    res = filter_shard(ex.docs_path, name, Path(out) / "work", CurateConfig())
    return {"name": name, "extracted": ex.docs, "filtered": res["stats"]["fineweb"]["docs_out"],
            "stages": {s: res["stats"][s]["docs_out"] for s in RULE_STAGES}}


def _ours_apply(name: str, out: str, drops_path: str) -> int:
    """What score_shard does first: drop the reduce's rows from the filtered shard."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from core.io import write_parquet_atomic

    work = Path(out) / "work"
    table = pq.read_table(work / "filtered" / f"{name}.parquet")
    drops = pq.read_table(drops_path)
    rows = drops.filter(pc.equal(drops["shard"], name))["row"].to_numpy()
    keep = np.ones(table.num_rows, bool)
    keep[rows] = False
    kept = table.filter(keep)
    write_parquet_atomic(kept, Path(out) / "docs" / f"{name}.parquet")
    return kept.num_rows


def run_ours(shards: list[Path], out: Path, workers: int, langid: bool) -> dict:
    from tasks.dedup import find_duplicates
    from core.io import write_parquet_atomic

    cfg = CurateConfig()
    if workers == 1:  # in-process, as DataTrove's executor runs a single worker
        maps = [_ours_map(str(s), str(out), langid) for s in shards]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
        maps = list(pool.map(_ours_map, map(str, shards), [str(out)] * len(shards), [langid] * len(shards)))
    names = [m["name"] for m in maps]
    sig_files = [out / "work" / "signatures" / f"{n}.parquet" for n in names]
    drops = find_duplicates(sig_files, cfg.dedup, out / "work" / "dedup")
    drops_path = str(write_parquet_atomic(drops, out / "work" / "dedup_drops.parquet"))
    if workers == 1:
        kept = [_ours_apply(n, str(out), drops_path) for n in names]
    else:
        kept = list(pool.map(_ours_apply, names, [str(out)] * len(names), [drops_path] * len(names)))
        pool.shutdown()
    return {"extracted": sum(m["extracted"] for m in maps), "filtered": sum(m["filtered"] for m in maps),
            "survivors": sum(kept), "stages": {s: sum(m["stages"][s] for m in maps) for s in RULE_STAGES}}


# ---- DataTrove --------------------------------------------------------------------------------

def run_datatrove(shard_dir: Path, out: Path, workers: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                                  MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    mh = minhash_config()
    filters = [trafilatura_step(), *rule_filters()]  # settings shared with bench/e2e.py
    logs = out / "logs"
    s0 = LocalPipelineExecutor(
        [WarcReader(str(shard_dir), glob_pattern="*.warc.gz"), *filters, JsonlWriter(str(out / "filtered")),
         MinhashDedupSignature(str(out / "signatures"), config=mh)],
        tasks=workers, workers=workers, logging_dir=str(logs / "0"))
    s1 = LocalPipelineExecutor([MinhashDedupBuckets(str(out / "signatures"), str(out / "buckets"), config=mh)],
                               tasks=mh.num_buckets, workers=workers, logging_dir=str(logs / "1"), depends=s0)
    s2 = LocalPipelineExecutor([MinhashDedupCluster(str(out / "buckets"), str(out / "remove_ids"), config=mh)],
                               tasks=1, logging_dir=str(logs / "2"), depends=s1)
    s3 = LocalPipelineExecutor([JsonlReader(str(out / "filtered")), MinhashDedupFilter(str(out / "remove_ids")),
                                JsonlWriter(str(out / "deduped"))],
                               tasks=workers, workers=workers, logging_dir=str(logs / "3"), depends=s2)
    s3.run()
    stats0 = json.loads((logs / "0" / "stats.json").read_text())
    stats3 = json.loads((logs / "3" / "stats.json").read_text())
    forwarded = lambda step: step["stats"].get("forwarded", 0)  # noqa: E731
    return {"extracted": forwarded(stats0[1]), "filtered": forwarded(stats0[len(filters)]),
            "survivors": forwarded(stats3[1]),
            "stages": {s: forwarded(stats0[2 + i]) for i, s in enumerate(RULE_STAGES)}}


# ---- measurement ------------------------------------------------------------------------------

def child(args) -> None:
    side, _, rest = args.variant.partition("-")
    workers = int(rest.split("-")[0])
    shard_dir, out = Path(args.shards), Path(args.out)
    if side == "datatrove":
        counts = run_datatrove(shard_dir, out, workers)
    else:
        counts = run_ours(sorted(shard_dir.glob("*.warc.gz")), out, workers, langid=rest.endswith("langid"))
    print(json.dumps(counts))


def timed_subprocess(variant: str, shards: Path, out: Path) -> tuple[float, dict]:
    """Wall time of a fresh process, imports and worker start-up included: what a user pays."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, "--variant", variant, "--shards", str(shards), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stdout, stderr = p.communicate()
    seconds = time.perf_counter() - t0
    if p.returncode:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # a failed DataTrove task can leave pool workers behind
        sys.exit(f"{variant} failed:\n{stderr[-4000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return seconds, json.loads(stdout.strip().splitlines()[-1])


def throughput(args) -> None:
    worker_counts = [int(w) for w in args.workers.split(",")]
    rows = []  # (label, variant, workers)
    for w in worker_counts:
        rows += [(f"DataTrove 0.10.1, {w} worker{'s' * (w > 1)}", f"datatrove-{w}", w),
                 (f"refinery, {w} worker{'s' * (w > 1)}", f"ours-{w}", w)]
        if args.langid:
            rows.append((f"refinery + langid, {w} worker{'s' * (w > 1)}", f"ours-{w}-langid", w))
    with tempfile.TemporaryDirectory(prefix="bench-curate-") as tmp:
        shard_dirs = {w: Path(tmp) / f"in-{w}" for w in worker_counts}
        pages = {w: count_pages(build_shards(d, args.repeat, w)) for w, d in shard_dirs.items()}
        best: dict[str, tuple[float, dict]] = {}
        for _ in range(args.rounds):  # interleaved, so drift in machine load hits all variants alike
            for _, v, w in rows:
                s, counts = timed_subprocess(v, shard_dirs[w], Path(tmp) / "out")
                if v not in best or s < best[v][0]:
                    best[v] = (s, counts)
    n_pages = pages[worker_counts[0]]
    print(f"corpus: {n_pages} page records (bundled WARCs x{args.repeat}, split into N shard files), "
          f"cores: {os.cpu_count()}, best of {args.rounds} fresh-process runs each")
    print(f"{'run':34} {'extracted':>9} {'filtered':>8} {'survivors':>9} {'seconds':>8} {'docs/s':>7} "
          f"{'docs/s/core':>11}")
    rate = {}
    for label, v, w in rows:
        s, c = best[v]
        rate[v] = pages[w] / s / w
        print(f"{label:34} {c['extracted']:9d} {c['filtered']:8d} {c['survivors']:9d} {s:8.2f} "
              f"{pages[w] / s:7.2f} {rate[v]:11.2f}")
    print("documents out of each rule stage (the last worker count's runs):")
    print(f"{'run':34} " + " ".join(f"{s:>17}" for s in RULE_STAGES))
    for label, v, w in rows:
        if w == worker_counts[-1]:
            print(f"{label:34} " + " ".join(f"{best[v][1]['stages'][s]:17d}" for s in RULE_STAGES))
    for w in worker_counts:
        print(f"ours / DataTrove, {w} worker{'s' * (w > 1)}: {rate[f'ours-{w}'] / rate[f'datatrove-{w}']:.2f}x"
              " (docs/s/core; target >= 1.0)")


# ---- dedup memory -------------------------------------------------------------------------------

def synth_signatures(folder: Path, n: int, dup: float = 0.25, shard_rows: int = 100_000, seed: int = 0) -> list[Path]:
    """n documents' signatures in shards of shard_rows. A fraction `dup` of them duplicates a random
    earlier document: 40% of those are exact copies (every key equal), 40% near duplicates (3 of 14
    bands shared, the rest fresh), 20% re-crawled URLs (url_key shared); the rest are unique.
    Keys are random uint64, as band keys are hashes."""
    import numpy as np
    import pyarrow as pa

    from tasks.dedup import signature_schema
    from core.io import write_parquet_atomic

    cfg = CurateConfig().dedup
    rng = np.random.default_rng(seed)
    keys = rng.integers(1, 2**63, size=(2 + cfg.bands, n), dtype=np.uint64)  # exact, url, bands
    src = rng.integers(0, np.maximum(np.arange(n), 1))                        # an earlier document
    kind = rng.random(n)
    kind[0] = 1.0
    exact = kind < 0.4 * dup
    keys[:, exact] = keys[:, src[exact]]
    near = np.flatnonzero((kind >= 0.4 * dup) & (kind < 0.8 * dup))
    for j in range(3):
        band = rng.integers(0, cfg.bands, len(near))
        keys[2 + band, near] = keys[2 + band, src[near]]
    url = (kind >= 0.8 * dup) & (kind < dup)
    keys[1, url] = keys[1, src[url]]
    ids = np.char.mod("%032x", rng.integers(0, 2**63, n, dtype=np.int64)).astype(object)
    words = rng.integers(50, 3000, n)
    schema = signature_schema(cfg)
    paths = []
    for i, lo in enumerate(range(0, n, shard_rows)):
        hi = min(n, lo + shard_rows)
        name = f"synth-{i:05d}"
        cols = [pa.array([name] * (hi - lo), pa.string()), pa.array(np.arange(hi - lo, dtype=np.int32)),
                pa.array(ids[lo:hi], pa.string()), pa.array(words[lo:hi], pa.int64())]
        cols += [pa.array(keys[k, lo:hi]) for k in range(2 + cfg.bands)]
        paths.append(write_parquet_atomic(pa.Table.from_arrays(cols, schema=schema), folder / f"{name}.parquet"))
    return paths


def dedup_child(sig_dir: str, baseline: bool) -> None:
    import numpy as np  # noqa: F401 - the same imports in both modes: the baseline is their RSS
    import pyarrow as pa  # noqa: F401
    import pyarrow.parquet as pq  # noqa: F401

    from tasks.dedup import find_duplicates

    files = sorted(Path(sig_dir).glob("*.parquet"))
    t0 = time.perf_counter()
    dropped = 0
    if not baseline:
        work = Path(sig_dir).parent / "dedup-work"
        dropped = find_duplicates(files, CurateConfig().dedup, work).num_rows
    print(json.dumps({"peak_mib": peak_rss_kib() / 1024, "seconds": time.perf_counter() - t0, "dropped": dropped}))


def peak_rss_kib() -> int:
    """This process's peak RSS. Not ru_maxrss: Linux carries that across fork + exec from the parent
    (a child of the 1M-document generator starts at the generator's size); VmHWM is this image's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def dedup_memory(sizes: list[int], dup: float) -> None:
    print("find_duplicates peak RSS (fresh process, VmHWM) minus that of an import-only process; "
          f"{dup:.0%} duplicates, defaults: {CurateConfig().dedup.partitions} partitions, shards of 100k docs")
    print(f"{'docs':>9} {'dropped':>8} {'seconds':>8} {'baseline MiB':>12} {'peak MiB':>9} {'MiB per 1M docs':>15} "
          f"{'bytes/doc':>9}")
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
            sig = Path(tmp) / "signatures"
            synth_signatures(sig, n, dup)
            res = {}
            for mode in ("baseline", "run"):
                cmd = [sys.executable, __file__, "--dedup-child", str(sig)] + (["--baseline"] if mode == "baseline" else [])
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    sys.exit(f"dedup child failed:\n{p.stderr[-4000:]}")
                res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
        delta = res["run"]["peak_mib"] - res["baseline"]["peak_mib"]
        print(f"{n:9d} {res['run']['dropped']:8d} {res['run']['seconds']:8.2f} {res['baseline']['peak_mib']:12.1f} "
              f"{res['run']['peak_mib']:9.1f} {delta / n * 1e6:15.1f} {delta * 2**20 / n:9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=4, help="copies of the bundled WARCs (a multiple of every N)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per variant; the best is kept")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts N")
    ap.add_argument("--langid", action="store_true", help="also time ours with language ID on")
    ap.add_argument("--dedup-memory", type=int, nargs="+", metavar="N", help="measure the dedup reduce instead")
    ap.add_argument("--dup", type=float, default=0.25, help="--dedup-memory: fraction of duplicate documents")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--dedup-child", help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        child(args)
    elif args.dedup_child:
        dedup_child(args.dedup_child, args.baseline)
    elif args.dedup_memory:
        dedup_memory(args.dedup_memory, args.dup)
    else:
        throughput(args)


if __name__ == "__main__":  # DataTrove's executor and our pool start processes that re-import this file
    main()
