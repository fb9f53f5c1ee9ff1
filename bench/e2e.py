"""End to end: the whole pipeline on a corpus of 750 to 3,000 pages (1x, 2x, 4x), side by side with
DataTrove on the steps both have; each stage's share of wall time, pages/s, CPU time, peak memory,
and a linear fit of cost against pages.

    .venv-bench/bin/python bench/e2e.py [--pages 750] [--scales 1,2,4] [--workers 2] [--rounds 1]
                                        [--plots docs] [--json results.json] [--train-steps 0]
    .venv-bench/bin/python bench/e2e.py --report-from results.json [--plots docs]

Needs the bench environment (`make bench` builds `.venv-bench`: our stack plus datatrove==0.10.1).

Corpus (built at run time into a scratch folder, deleted at the end; never written to the repo):
../shared/data holds about 140 real pages, too few for a few thousand distinct ones, so most pages
are assembled from real parts. Every page of scale k belongs to one of k blocks of `--pages` pages;
block b is generated from seed b, so the 2x corpus is the 1x corpus plus a new block, and every
block adds *distinct* pages (the data allows it: no block repeats another's text).
  - real pages, block 0 only: the bundled WARC records (sample/pages.warc.gz, sample/warc/*.warc.gz,
    the same 5 URI fixes as bench/curate.py) and the 10 DCLM fixture pages;
  - originals (75% of a block): an HTML page built from a real page's <head> and boilerplate
    subtrees (header, nav, footer, aside, menus... of the 55 real pages in html_pages/) around an
    <article> of real text: 80% English prose (3-8 paragraphs drawn from WikiText-2, three Gutenberg
    novels and 55 inaugural addresses, so pages are collages of real paragraphs), 10% non-English
    (trafilatura's main-content snippets, mostly German), 10% boilerplate lists and spam text;
  - near-duplicate variants (20%): an original re-emitted on another host, inside another page's
    boilerplate, with two adjacent sentences swapped, its numbers changed and a sentence added;
  - exact copies (5%): an original's text on another host inside another page's boilerplate.
Pages are shuffled within a block and written as gzip-per-record WARC/1.1 response records
(`WARC-Identified-Payload-Type: text/html`), `--shard-pages` pages per file, so a variant and its
original usually sit in different files (the dedup reduce is global on both sides).

Ours: a fresh process runs one Prefect flow that calls the real flow bodies in order, as `refinery
run` does: run_extract -> run_curate (language ID, rules, dedup signatures, dedup reduce, training
both classifiers, PII, toxicity, quality scores, threshold, select, funnel, bias audit and plots)
-> run_shard (tokenizer training, tokenized Parquet shards, manifest) [-> run_train with
`--train-steps`]. Default configuration except `extract.workers=N` (the README's 2-core example:
N extraction processes per shard, shard tasks one at a time in threads); `--ours dask` also runs
the Dask runner (N worker processes, 1 extraction process each). Prefect's embedded API with one
PREFECT_HOME per benchmark, migrated by a warm-up run before timing, and a new output folder per
run: the output folder is part of every cache key, so each measured run computes every task (the
child counts Cached task runs and the run fails if there is one). Stage times are the wall time of
each stage's call; inside curate the map phases are timed by wrapping `map_shards` (timing only).

DataTrove 0.10.1, the same steps as bench/curate.py (bench/datatrove_settings.py: every threshold
from our config defaults), as five LocalPipelineExecutors run one after the other in a fresh
process, N workers, one task per WARC file: extract (WarcReader -> Trafilatura -> JsonlWriter),
filter (JsonlReader -> language ID -> GopherRepetition -> GopherQuality -> C4Quality ->
FineWebQuality -> JsonlWriter -> MinhashDedupSignature), MinhashDedupBuckets (14 tasks),
MinhashDedupCluster (1 task), JsonlReader -> MinhashDedupFilter -> JsonlWriter. Its LanguageFilter
downloads a fastText model at run time (impossible offline), so its language step is a LambdaFilter
calling our py3langid code with our threshold: the same work on both sides.

Memory and CPU: the parent samples the child's whole process tree (pool workers, extraction workers,
Prefect's API server, Dask workers, DataTrove's forkserver workers) every 0.2 s and sums PSS (shared
pages counted once) and RSS from /proc/PID/smaps_rollup, and each process's CPU time from
/proc/PID/stat; peaks are reported per run and per stage. Contention: the machine's busy CPU time
(/proc/stat) minus the tree's and this process's, per second of the run, printed as the cores other
jobs used meanwhile. On a shared machine, trust CPU-seconds over wall seconds.

This file is the entry point (options and the main sequence); the parts sit next to it:
e2e_corpus.py (the corpus builder), e2e_runners.py (the two child processes), e2e_measure.py (the
process-tree sampler, running a child, per-stage summaries), e2e_report.py (report and plots).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the parts, next to this file (none imports project code when loaded: that comes from SRC, below)
from e2e_corpus import ROOT, build_corpus, count_page_records  # corpus builder
from e2e_measure import DT_STAGES, OURS_STAGES, run_child, summarize  # process-tree sampler, run summaries
from e2e_report import plots, report  # printed report and plots
from e2e_runners import child_datatrove, child_ours  # the measured child processes

# the code under test: this checkout, or (--src head, the default) a snapshot of its last commit, so
# uncommitted edits in a shared working tree never end up in the figures; children import from SRC
SRC = Path(os.environ.get("E2E_SRC", ROOT))
sys.path.insert(0, str(SRC))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=750, help="page records per 1x block")
    ap.add_argument("--scales", default="1,2,4")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="runs per side and scale, interleaved; the best is kept")
    ap.add_argument("--shard-pages", type=int, default=500, help="page records per WARC file")
    ap.add_argument("--near-dup", type=float, default=0.20, help="fraction of a block's pages that are near duplicates")
    ap.add_argument("--exact-dup", type=float, default=0.05, help="fraction that are exact copies on another host")
    ap.add_argument("--ours", default="threads", help="comma list: threads, dask, nometa (extract.metadata=none)")
    ap.add_argument("--no-second-run", action="store_true",
                    help="skip the second run of ours into a new folder on the smallest corpus (caches warm)")
    ap.add_argument("--no-datatrove", action="store_true")
    ap.add_argument("--train-steps", type=int, default=0, help="also run training for this many steps (tiny preset)")
    ap.add_argument("--plots", help="folder for docs/bench-e2e-*.png")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--scratch", help="parent of the scratch folders (default: the system's temporary folder)")
    ap.add_argument("--src", choices=["head", "worktree"], default="head",
                    help="code to measure: a snapshot of HEAD (default) or this working tree as it is")
    ap.add_argument("--prefect-home", help="reuse this PREFECT_HOME (default: a new one, migrated before timing)")
    ap.add_argument("--report-from", help="print the report (and --plots) of a run saved with --json; runs nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "ours":
        return child_ours(args)
    if args.child == "datatrove":
        return child_datatrove(args)
    if args.report_from:  # re-render the report and plots of a saved run (--json)
        saved = json.loads(Path(args.report_from).read_text())
        results = {k: {int(s): v for s, v in r.items()} for k, r in saved["results"].items()}
        corpora = {int(s): v for s, v in saved["corpora"].items()}
        report(results, corpora, argparse.Namespace(**saved["args"]), saved.get("second"))
        if args.plots:
            for p in plots(results, corpora, Path(args.plots)):
                print(f"plot: {p} ({p.stat().st_size // 1024} KiB)")
        return

    global SRC
    if args.src == "head":
        src = Path(tempfile.mkdtemp(prefix="bench-e2e-src-", dir=args.scratch))
        subprocess.run(f"git -C {ROOT} archive HEAD | tar -x -C {src}", shell=True, check=True)
        SRC = src
        sys.path.insert(0, str(SRC))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"code under test: {'commit ' + commit if args.src == 'head' else 'working tree of ' + str(ROOT)} ({SRC})")
    scales = [int(x) for x in args.scales.split(",")]
    variants = [("ours" if v == "threads" else f"ours-{v}", "ours", v) for v in args.ours.split(",")]
    second: dict = {}
    if not args.no_datatrove:
        variants.append(("datatrove", "datatrove", "dt"))
    results: dict = {name: {} for name, _, _ in variants}
    corpora: dict = {}
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-", dir=args.scratch) as tmp:
        tmp = Path(tmp)
        home = Path(args.prefect_home) if args.prefect_home else tmp / "prefect-home"
        cache: dict = {}
        t = time.time()
        run_child("ours", "warmup", tmp, tmp / "warmup", args.workers, home, 0, SRC)
        print(f"Prefect home migrated in {time.time() - t:.1f}s (not timed below)", flush=True)
        for si, s in enumerate(scales):
            corpus = tmp / f"corpus-{s}x"
            t = time.time()
            corpora[s] = build_corpus(corpus, s, args.pages, args.shard_pages, args.near_dup, args.exact_dup, cache)
            pages = count_page_records(corpus)
            corpora[s]["page records (read back)"] = pages
            print(f"{s}x corpus: {corpora[s]} built in {time.time() - t:.1f}s", flush=True)
            best: dict = {}
            for r in range(args.rounds):
                order = variants if (si + r) % 2 == 0 else variants[::-1]  # alternate who runs first
                for name, side, v in order:
                    res = run_child(side, v, corpus, tmp / "out" / f"{name}-{s}x-{r}", args.workers, home,
                                    args.train_steps, SRC)
                    sm = summarize(res, pages, DT_STAGES if side == "datatrove" else OURS_STAGES)
                    sm["start"] = res["start"]
                    print(f"  {s}x round {r + 1} {name}: {sm['wall']:.1f}s, {sm['pages_per_s']:.2f} pages/s, peak PSS "
                          f"{sm['peak_pss_mib']:.0f} MiB, others used {sm['others_cores']:.2f} cores, counts {sm['counts']}",
                          flush=True)
                    if name not in best or sm["wall"] < best[name]["wall"]:
                        best[name] = sm
                    if name == "ours" and si == 0 and r == 0 and not args.no_second_run:
                        # the same corpus into a new folder, the first run's files and caches in place
                        res2 = run_child(side, "warm", corpus, tmp / "out" / f"{name}-{s}x-second", args.workers, home,
                                         args.train_steps, SRC, cache=Path(str(tmp / "out" / f"{name}-{s}x-{r}") + "-cache"))
                        second = {"scale": s, "first": sm, "second": summarize(res2, pages, OURS_STAGES),
                                  "cached": res2["cached"]}
                        print(f"  {s}x second run into a new folder: {second['second']['wall']:.1f}s "
                              f"({second['second']['wall'] / sm['wall']:.0%} of the first), {res2['cached']} task runs "
                              f"from cache, CPU {second['second']['cpu_s']:.0f}s", flush=True)
                        shutil.rmtree(tmp / "out" / f"{name}-{s}x-second", ignore_errors=True)
                    shutil.rmtree(tmp / "out" / f"{name}-{s}x-{r}", ignore_errors=True)
            for name in best:
                results[name][s] = best[name]
            shutil.rmtree(corpus, ignore_errors=True)
    report(results, corpora, args, second)
    if args.src == "head":
        shutil.rmtree(SRC, ignore_errors=True)
    print(f"\nbenchmark wall time: {time.time() - t_all:.0f}s")
    if args.plots:
        for p in plots(results, corpora, Path(args.plots)):
            print(f"plot: {p} ({p.stat().st_size // 1024} KiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "corpora": corpora, "results": results,
                                               "second": second},
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
