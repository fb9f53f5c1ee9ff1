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

DataTrove 0.10.1, the same steps as bench/curate.py (every threshold from our config defaults),
as five LocalPipelineExecutors run one after the other in a fresh process, N workers, one task per
WARC file: extract (WarcReader -> Trafilatura -> JsonlWriter), filter (JsonlReader -> language ID ->
GopherRepetition -> GopherQuality -> C4Quality -> FineWebQuality -> JsonlWriter ->
MinhashDedupSignature), MinhashDedupBuckets (14 tasks), MinhashDedupCluster (1 task),
JsonlReader -> MinhashDedupFilter -> JsonlWriter. Its LanguageFilter downloads a fastText model at
run time (impossible offline), so its language step is a LambdaFilter calling our py3langid code
with our threshold: the same work on both sides.

Memory and CPU: the parent samples the child's whole process tree (pool workers, extraction workers,
Prefect's API server, Dask workers, DataTrove's forkserver workers) every 0.2 s and sums PSS (shared
pages counted once) and RSS from /proc/PID/smaps_rollup, and each process's CPU time from
/proc/PID/stat; peaks are reported per run and per stage. Contention: the machine's busy CPU time
(/proc/stat) minus the tree's and this process's, per second of the run, printed as the cores other
jobs used meanwhile. On a shared machine, trust CPU-seconds over wall seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import html
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
# the code under test: this checkout, or (--src head, the default) a snapshot of its last commit, so
# uncommitted edits in a shared working tree never end up in the figures; children import from SRC
SRC = Path(os.environ.get("E2E_SRC", ROOT))
sys.path.insert(0, str(SRC))

SAMPLE_WARCS = [ROOT / "sample" / "pages.warc.gz"] + sorted((ROOT / "sample" / "warc").glob("*.warc.gz"))
OURS_STAGES = ["extract", "curate", "shard", "train"]
DT_STAGES = ["extract", "filter", "buckets", "cluster", "dedup_filter"]
# our sub-phases (map_shards task names) and the DataTrove executors they match
MATCH = {"extract": (["extract"], ["extract"]),
         "langid + rules + signatures": (["curate-filter"], ["filter"]),
         "MinHash dedup": (["dedup-reduce"], ["buckets", "cluster", "dedup_filter"])}


# ---- corpus ---------------------------------------------------------------------------------

def _detok_wikitext(line: str) -> str:
    s = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".").replace("<unk>", "")
    s = re.sub(r" ([.,;:!?%)\]'])", r"\1", s)
    s = re.sub(r"([(\[$]) ", r"\1", s)
    s = s.replace(" n't", "n't").replace('" ', '"', 1)
    return re.sub(r"\s+", " ", s).strip()


def load_text_pools() -> dict:
    """Real text from ../shared/data: English paragraphs and titles, non-English snippets,
    boilerplate snippets and low-quality page texts."""
    paras, titles = [], []
    for name in ("valid.txt", "test.txt"):
        for line in (SHARED / "quality_positive" / "wikitext2" / name).read_text().splitlines():
            s = line.strip()
            if re.fullmatch(r"= [^=].* =", s):
                t = _detok_wikitext(s.strip("= "))
                if len(t) > 3:
                    titles.append(t)
            elif s and not s.startswith("="):
                p = _detok_wikitext(s)
                if 30 <= len(p.split()) <= 300:
                    paras.append(p)
    for f in sorted((SHARED / "quality_positive" / "gutenberg").glob("*.txt")) + \
            sorted((SHARED / "quality_positive" / "inaugural").glob("*.txt")):
        for block in re.split(r"\n\s*\n", f.read_text(errors="replace")):
            p = " ".join(block.split())
            if 30 <= len(p.split()) <= 300 and "Gutenberg" not in p and "etext" not in p.lower():
                paras.append(p)
    foreign: dict[str, list[str]] = {}
    for line in (SHARED / "quality_positive" / "trafilatura_maincontent_snippets.jsonl").read_text().splitlines():
        r = json.loads(line)
        foreign.setdefault(r["url"], []).append(r["text"])
    boiler = [json.loads(x)["text"] for x in
              (SHARED / "quality_negative" / "trafilatura_boilerplate_snippets.jsonl").read_text().splitlines()]
    spam = [json.loads(x)["text"] for x in
            (SHARED / "quality_negative" / "web_lowquality_fulltext.jsonl").read_text().splitlines()]
    return {"paras": paras, "titles": titles, "foreign": [v for v in foreign.values() if sum(map(len, v)) > 200],
            "boiler": boiler, "spam": spam}


_BOILER_CLASS = re.compile(r"nav|menu|footer|header|sidebar|breadcrumb|cookie|related|share|social|newsletter|"
                           r"subscribe|banner|masthead|toolbar|widget|promo", re.I)
_BEFORE = re.compile(r"header|nav|menu|breadcrumb|masthead|banner|toolbar", re.I)


def load_templates(max_bytes: int = 250_000) -> list[dict]:
    """Boilerplate of the real pages: the <head> (its <title> and charset declarations removed)
    and the outermost header/nav/footer/aside/menu-like subtrees, in document order."""
    import lxml.html

    files = sorted((SHARED / "html_pages" / "pages").glob("*.html")) + \
        sorted((SHARED / "html_pages" / "dclm_quality_pairs").glob("*.html"))
    out = []
    for f in files:
        try:
            doc = lxml.html.fromstring(f.read_bytes().decode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - a page lxml cannot parse is no template
            continue
        head = doc.find("head")
        parts = []
        if head is not None:
            for el in list(head):
                if el.tag == "title" or (el.tag == "meta" and (el.get("charset") or
                                                              (el.get("http-equiv") or "").lower() == "content-type")):
                    continue
                parts.append(el)
        picked: list = []
        chosen = set()
        for el in doc.iter():
            if not isinstance(el.tag, str) or el.tag in ("html", "body", "head") or el is head:
                continue
            attrs = f"{el.get('class') or ''} {el.get('id') or ''} {el.get('role') or ''}"
            if el.tag in ("header", "nav", "footer", "aside") or _BOILER_CLASS.search(attrs):
                if any(a in chosen for a in el.iterancestors()) or (head is not None and head in el.iterancestors()):
                    continue
                if len(el.text_content()) > 3000:  # a wrapper around the main text, not boilerplate
                    continue
                chosen.add(el)
                picked.append(el)
        if not picked:
            continue
        tostr = lambda e: lxml.html.tostring(e, encoding="unicode", with_tail=False)  # noqa: E731
        head_parts = [tostr(e) for e in parts]
        # very large inline scripts/styles: drop the largest until the template fits max_bytes
        body_before = [tostr(e) for e in picked if el_is_before(e)]
        body_after = [tostr(e) for e in picked if not el_is_before(e)]
        while sum(map(len, head_parts + body_before + body_after)) > max_bytes and head_parts:
            head_parts.remove(max(head_parts, key=len))
        if sum(map(len, body_before + body_after)) > max_bytes:
            continue
        lang = f.name.split("__")[1] if "__" in f.name else "en"
        out.append({"name": f.name, "head": "".join(head_parts), "before": "".join(body_before),
                    "after": "".join(body_after), "lang": lang})
    return out


def el_is_before(el) -> bool:
    return el.tag in ("header", "nav") or bool(_BEFORE.search(f"{el.get('class') or ''} {el.get('id') or ''}"))


def render(tpl: dict, title: str, paras: list[str], byline: str, lang: str = "en", listy: bool = False) -> str:
    esc = html.escape
    if listy:
        body = "<ul>" + "".join(f"<li>{esc(p)}</li>" for p in paras) + "</ul>"
    else:
        body = "".join(f"<p>{esc(p)}</p>\n" for p in paras)
    return (f'<!DOCTYPE html>\n<html lang="{lang}"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'{tpl["head"]}</head>\n<body>{tpl["before"]}\n<main><article><h1>{esc(title)}</h1>'
            f'<p class="byline">{esc(byline)}</p>\n{body}</article></main>\n{tpl["after"]}</body></html>')


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def near_duplicate(paras: list[str], rng: random.Random) -> list[str]:
    """Small edits: two adjacent sentences swapped in one paragraph, numbers changed, a sentence added."""
    out = list(paras)
    order = list(range(len(out)))
    rng.shuffle(order)
    for i in order:
        sents = _SENT.split(out[i])
        if len(sents) >= 2:
            j = rng.randrange(len(sents) - 1)
            sents[j], sents[j + 1] = sents[j + 1], sents[j]
            out[i] = " ".join(sents)
            break
    out = [re.sub(r"\d+", lambda m: str(int(m.group()) + rng.randint(1, 9)), p) for p in out]
    out[-1] += rng.choice([" This article was updated to correct a detail.", " Additional reporting by staff.",
                           " Corrections were made to an earlier version of this text.",
                           " The original version of this page has been revised."])
    return out


def build_block(b: int, n: int, pools: dict, templates: list[dict], near_frac: float, exact_frac: float,
                n_real: int) -> tuple[list[tuple[str, str, str]], dict]:
    """Block b: n page records, (url, html, kind). Block 0 leaves room for the n_real real records."""
    rng = random.Random(1000 + b)
    n_syn = n - n_real
    n_near, n_exact = round(n_syn * near_frac), round(n_syn * exact_frac)
    n_orig = n_syn - n_near - n_exact
    en_tpl = [t for t in templates if t["lang"] == "en"] or templates
    pages, originals = [], []
    for i in range(n_orig):
        tpl = rng.choice(templates)
        host = f"www.site{rng.randrange(400):03d}.example"
        url = f"https://{host}/b{b}/p{i:05d}.html"
        byline = f"By staff writer {rng.randrange(90) + 10} | {2000 + rng.randrange(25)}-{1 + rng.randrange(12):02d}"
        kind = rng.random()
        if kind < 0.8:
            paras = rng.sample(pools["paras"], rng.randint(3, 8))
            title = rng.choice(pools["titles"])
            pages.append((url, render(tpl, title, paras, byline), "original"))
            originals.append((paras, title, byline))
        elif kind < 0.9:
            groups = rng.sample(pools["foreign"], rng.randint(2, 5))
            paras = [" ".join(g) for g in groups]
            pages.append((url, render(tpl, paras[0][:60], paras, byline, lang="de"), "original"))
        else:
            items = rng.sample(pools["boiler"], rng.randint(15, 60))
            if rng.random() < 0.3:
                items.append(rng.choice(pools["spam"]))
            pages.append((url, render(tpl, items[0][:60], items, byline, listy=True), "original"))
    for kind, count in (("near-duplicate", n_near), ("exact copy", n_exact)):
        for i in range(count):
            paras, title, byline = rng.choice(originals)
            url = f"https://www.mirror{rng.randrange(100):02d}.example/b{b}/{kind[:4]}{i:05d}.html"
            text = near_duplicate(paras, rng) if kind == "near-duplicate" else paras
            pages.append((url, render(rng.choice(en_tpl), title, text, byline), kind))
    rng.shuffle(pages)
    counts = {"original": n_orig, "near-duplicate": n_near, "exact copy": n_exact}
    return pages, counts


def warc_record(url: str, body: bytes, when: str, rid: int) -> bytes:
    http_head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    block = http_head + body
    head = (f"WARC/1.1\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:00000000-0000-4000-8000-{rid:012x}>\r\n"
            f"WARC-Date: {when}\r\nWARC-Target-URI: {url}\r\nWARC-Identified-Payload-Type: text/html\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(block)}\r\n\r\n").encode()
    return gzip.compress(head + block + b"\r\n\r\n", compresslevel=6, mtime=0)


def real_records() -> tuple[list[bytes], int]:
    """The bundled real WARCs (URI-fixed as in bench/curate.py) and the DCLM fixture pages."""
    from tasks.warc import iter_records

    sys.path.insert(0, str(ROOT / "bench"))
    from curate import with_target_uris  # bench/curate.py: same corpus fix for both sides

    chunks = [with_target_uris(p.read_bytes()) for p in SAMPLE_WARCS]
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, c in enumerate(chunks):
            (Path(tmp) / f"{i}.warc.gz").write_bytes(c)
            n += sum(1 for _ in iter_records(Path(tmp) / f"{i}.warc.gz"))
    for i, f in enumerate(sorted((SHARED / "html_pages" / "dclm_quality_pairs").glob("*.html"))):
        chunks.append(warc_record(f"https://dclm.invalid/{f.stem}", f.read_bytes(), "2024-01-01T00:00:00Z", 900000 + i))
        n += 1
    return chunks, n


def build_corpus(folder: Path, scale: int, pages: int, shard_pages: int, near_frac: float, exact_frac: float,
                 cache: dict) -> dict:
    """Blocks 0..scale-1 as WARC files of shard_pages pages; returns the corpus description."""
    if "pools" not in cache:
        cache["pools"], cache["templates"] = load_text_pools(), load_templates()
        cache["real"], cache["n_real"] = real_records()
    folder.mkdir(parents=True, exist_ok=True)
    totals = {"page records": 0, "real": 0, "original": 0, "near-duplicate": 0, "exact copy": 0}
    files, rid = 0, 0
    for b in range(scale):
        n_real = cache["n_real"] if b == 0 else 0
        recs, counts = build_block(b, pages, cache["pools"], cache["templates"], near_frac, exact_frac, n_real)
        for k, v in counts.items():
            totals[k] += v
        n_files = max(1, round(pages / shard_pages))
        outs = [bytearray() for _ in range(n_files)]
        for i, (url, page, _) in enumerate(recs):
            day = 1 + (rid % 28)
            outs[i % n_files] += warc_record(url, page.encode(), f"2026-11-{day:02d}T12:00:00Z", rid)
            rid += 1
        if b == 0:
            for i, chunk in enumerate(cache["real"]):
                outs[i % n_files] += chunk
            totals["real"] = n_real
        for i, data in enumerate(outs):
            (folder / f"b{b:02d}-{i:03d}.warc.gz").write_bytes(bytes(data))
        files += n_files
        totals["page records"] += pages
    totals["warc files"] = files
    totals["MiB"] = round(sum(p.stat().st_size for p in folder.glob("*.warc.gz")) / 2**20, 1)
    totals["templates"] = len(cache["templates"])
    totals["paragraph pool"] = len(cache["pools"]["paras"])
    return totals


def count_page_records(folder: Path) -> int:
    from tasks.warc import iter_records

    return sum(1 for p in sorted(folder.glob("*.warc.gz")) for _ in iter_records(p))


# ---- ours (child process) -------------------------------------------------------------------

def child_ours(args) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    t_import = time.time()
    from prefect import flow

    import flows.curate
    import flows.extract
    import flows.shard
    from core.config import load_config
    from flows.runners import with_concurrency

    out = Path(args.out)
    if args.variant == "warmup":  # migrates PREFECT_HOME's database, before anything is timed
        with_concurrency(flow(name="bench-e2e-warmup")(lambda: 1), load_config())()
        print(json.dumps({"warmup": True}))
        return
    sets = [f"extract.workers={args.workers}"]
    if args.variant == "dask":
        sets = ["extract.workers=1", "runner.kind=dask", f"runner.dask_workers={args.workers}"]
    if args.train_steps:
        sets += [f"train.max_steps={args.train_steps}", "train.seq_len=128", "train.val_every=1000",
                 f"train.checkpoint_every={args.train_steps}", "train.export=false"]
    cfg = load_config(None, sets)

    phases: list[dict] = []  # every map_shards call: task name, start, end, tasks

    def timed(orig):
        def wrapper(task, arg_lists, *a, **kw):
            t0 = time.time()
            try:
                return orig(task, arg_lists, *a, **kw)
            finally:
                phases.append({"name": task.name, "start": t0, "end": time.time(), "tasks": len(arg_lists)})
        return wrapper

    for mod in (flows.extract, flows.curate, flows.shard):
        mod.map_shards = timed(mod.map_shards)

    marks: dict[str, list[float]] = {}
    counts: dict = {}

    @flow(name="bench-e2e")
    def e2e() -> str:
        from prefect.runtime import flow_run

        marks["flow body"] = [time.time()]
        t = time.time()
        ex = flows.extract.run_extract([args.corpus], str(out / "extract"), cfg)
        marks["extract"] = [t, time.time()]
        counts.update(pages=ex["pages"], docs=ex["docs"], rejected=ex["rejected"])
        t = time.time()
        funnel = flows.curate.run_curate([str(out / "extract")], str(out / "curate"), cfg)
        marks["curate"] = [t, time.time()]
        rows = {r["stage"]: r for r in funnel["stages"]}
        counts.update(after_rules=rows["fineweb"]["docs_out"], dedup_dropped=sum(rows["dedup"]["drops"].values()),
                      dedup_by_reason=rows["dedup"]["drops"], kept=funnel["kept"]["docs"])
        t = time.time()
        manifest = flows.shard.run_shard(str(out / "curate"), str(out / "shard"), cfg)
        marks["shard"] = [t, time.time()]
        counts.update(train_tokens=manifest["splits"]["train"]["tokens"])
        if args.train_steps:
            from flows.train import run_train

            t = time.time()
            tr = run_train(str(out / "shard"), str(out / "train"), cfg)
            marks["train"] = [t, time.time()]
            counts.update(train_steps=tr.get("steps"), train_tokens_seen=tr.get("tokens_seen"))
        return str(flow_run.id)

    run_id = with_concurrency(e2e, cfg)()
    t_end = time.time()
    cached = count_cached(run_id)
    if cached:
        sys.exit(f"{cached} task runs were served from cache: the measurement would not compute")
    print(json.dumps({"import_start": t_import, "end": t_end, "marks": marks, "phases": phases, "counts": counts,
                      "cached": cached}))


def count_cached(run_id: str) -> int:
    """Task runs of this flow run that ended Cached (expected 0: every output folder is new)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    cached, offset = 0, 0
    with get_client(sync_client=True) as c:
        while True:
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])), limit=200,
                                    offset=offset)
            cached += sum(1 for r in runs if r.state is not None and r.state.name == "Cached")
            if len(runs) < 200:
                return cached
            offset += 200


# ---- DataTrove (child process) --------------------------------------------------------------

def _dt_langid(doc) -> bool:
    from core.config import CurateConfig
    from tasks.langid import identify, keep_language

    cfg = CurateConfig().langid
    lang, score = identify([doc.text], cfg)[0]
    return keep_language(lang, score, cfg)


def child_datatrove(args) -> None:
    t_import = time.time()
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter, LambdaFilter)
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    from core.config import CurateConfig, ExtractConfig

    ext, cur = ExtractConfig(), CurateConfig()
    gq, gr, c4, fw, dd = (cur.rules.gopher_quality, cur.rules.gopher_repetition, cur.rules.c4, cur.rules.fineweb,
                          cur.dedup)
    mh = MinhashConfig(n_grams=dd.shingle_words, num_buckets=dd.bands, hashes_per_bucket=dd.rows, seed=dd.seed)
    out, w = Path(args.out), args.workers
    n_files = len(list(Path(args.corpus).glob("*.warc.gz")))
    rules = [
        LambdaFilter(_dt_langid),  # stands in for LanguageFilter (its fastText model is a run-time download)
        GopherRepetitionFilter(dup_line_frac=gr.dup_line_frac, dup_para_frac=gr.dup_para_frac,
                               dup_line_char_frac=gr.dup_line_char_frac, dup_para_char_frac=gr.dup_para_char_frac,
                               top_n_grams=tuple(gr.top_ngram_char_frac.items()),
                               dup_n_grams=tuple(gr.dup_ngram_char_frac.items())),
        GopherQualityFilter(min_doc_words=gq.min_words, max_doc_words=gq.max_words,
                            min_avg_word_length=gq.min_mean_word_length, max_avg_word_length=gq.max_mean_word_length,
                            max_symbol_word_ratio=gq.max_symbol_word_ratio,
                            max_bullet_lines_ratio=gq.max_bullet_lines_ratio,
                            max_ellipsis_lines_ratio=gq.max_ellipsis_lines_ratio,
                            max_non_alpha_words_ratio=gq.min_alpha_words_ratio, min_stop_words=gq.min_stop_words),
        C4QualityFilter(remove_citations=False, filter_no_terminal_punct=c4.drop_lines_without_terminal_punct,
                        min_num_sentences=c4.min_sentences, min_words_per_line=c4.min_words_per_line,
                        max_word_length=c4.max_word_length, filter_lorem_ipsum=c4.reject_lorem_ipsum,
                        filter_javascript=c4.drop_javascript_lines, filter_curly_bracket=c4.reject_curly_braces,
                        filter_policy=c4.drop_policy_lines),
        FineWebQualityFilter(line_punct_thr=fw.min_line_punct_ratio, short_line_thr=fw.max_short_line_ratio,
                             short_line_length=fw.short_line_chars, char_duplicates_ratio=fw.max_dup_line_char_ratio,
                             new_line_ratio=fw.max_newline_word_ratio),
    ]
    logs = out / "logs"
    executors = {
        "extract": LocalPipelineExecutor(
            [WarcReader(args.corpus, glob_pattern="*.warc.gz"),
             Trafilatura(favour_precision=ext.favor == "precision", favor_recall=ext.favor == "recall",
                         deduplicate=ext.deduplicate, include_tables=ext.include_tables, timeout=ext.timeout_s),
             JsonlWriter(str(out / "extracted"))],
            tasks=n_files, workers=w, logging_dir=str(logs / "extract")),
        "filter": LocalPipelineExecutor(
            [JsonlReader(str(out / "extracted")), *rules, JsonlWriter(str(out / "filtered")),
             MinhashDedupSignature(str(out / "signatures"), config=mh)],
            tasks=n_files, workers=w, logging_dir=str(logs / "filter")),
        "buckets": LocalPipelineExecutor([MinhashDedupBuckets(str(out / "signatures"), str(out / "buckets"), config=mh)],
                                         tasks=mh.num_buckets, workers=w, logging_dir=str(logs / "buckets")),
        "cluster": LocalPipelineExecutor([MinhashDedupCluster(str(out / "buckets"), str(out / "remove_ids"), config=mh)],
                                         tasks=1, workers=1, logging_dir=str(logs / "cluster")),
        "dedup_filter": LocalPipelineExecutor(
            [JsonlReader(str(out / "filtered")), MinhashDedupFilter(str(out / "remove_ids")),
             JsonlWriter(str(out / "deduped"))],
            tasks=n_files, workers=w, logging_dir=str(logs / "dedup_filter")),
    }
    marks = {"flow body": [time.time()]}
    for name, ex in executors.items():
        t = time.time()
        ex.run()
        marks[name] = [t, time.time()]
    t_end = time.time()

    def stats(name):
        return json.loads((logs / name / "stats.json").read_text())

    fwd = lambda step: step["stats"].get("forwarded", 0)  # noqa: E731
    s_ex, s_fi, s_dd = stats("extract"), stats("filter"), stats("dedup_filter")
    # stats.json lists the steps in order: [reader, *rules, writer, signature] for the filter executor
    counts = {"docs": fwd(s_ex[1]), "after_rules": fwd(s_fi[len(rules)]), "kept": fwd(s_dd[1]),
              "dedup_dropped": fwd(s_fi[len(rules)]) - fwd(s_dd[1])}
    print(json.dumps({"import_start": t_import, "end": t_end, "marks": marks, "phases": [], "counts": counts}))


# ---- measurement (parent) -------------------------------------------------------------------

def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _mem_kib(pid: int) -> tuple[int, int]:
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


class TreeSampler(threading.Thread):
    """Sums PSS and RSS over a process and all its descendants every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval, self.samples = pid, interval, []
        self.cpu: dict[tuple[int, int], float] = {}  # (pid, start time) -> last seen utime + stime, seconds
        self.stop_ev = threading.Event()

    def run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self.stop_ev.is_set():
            pids = _tree(self.pid)
            pss = rss = 0
            for p in pids:
                a, b = _mem_kib(p)
                pss, rss = pss + a, rss + b
                try:
                    with open(f"/proc/{p}/stat") as f:
                        st = f.read().rsplit(")", 1)[1].split()
                    self.cpu[(p, int(st[19]))] = (int(st[11]) + int(st[12])) / tick
                except (OSError, ValueError, IndexError):
                    pass
            self.samples.append((time.time(), pss / 1024, rss / 1024, len(pids), sum(self.cpu.values())))
            self.stop_ev.wait(self.interval)

    def cpu_s(self) -> float:
        """CPU time of every process seen in the tree (to its last sample; a process that lived less
        than one interval may be missed)."""
        return sum(self.cpu.values())

    def stop(self) -> None:
        self.stop_ev.set()
        self.join()


def _busy_cpu_s() -> float:
    """CPU-seconds the whole machine has been busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def run_child(side: str, variant: str, corpus: Path, out: Path, workers: int, prefect_home: Path,
              train_steps: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    env.pop("PREFECT_API_URL", None)
    # SRC first for this process and every process it starts (extraction workers run `-m tasks.workers`
    # from the working directory; DataTrove's forkserver workers and Dask workers read PYTHONPATH)
    env["E2E_SRC"], env["PYTHONPATH"] = str(SRC), str(SRC)
    cmd = [sys.executable, __file__, "--child", side, "--variant", variant, "--corpus", str(corpus),
           "--out", str(out), "--workers", str(workers), "--train-steps", str(train_steps)]
    load = os.getloadavg()[0]
    busy0, me0 = _busy_cpu_s(), time.process_time()
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True, cwd=str(SRC))
    sampler = TreeSampler(p.pid)
    sampler.start()
    stdout, stderr = p.communicate()
    t1 = time.time()
    sampler.stop()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)  # leftovers of a failed pool, if any
    if p.returncode:
        sys.exit(f"{side}/{variant} failed ({p.returncode}):\n{stderr[-6000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    # wall: process start to the flow's (or the last executor's) return, imports and Prefect's
    # embedded API start included; the bookkeeping after it (cached-run count, exit) is not
    res["load_after"] = os.getloadavg()[0]
    # contention: CPU the rest of the machine used while we ran, in cores: machine busy time minus the
    # CPU time of the measured process tree and of this process (the sampler)
    busy1 = _busy_cpu_s()
    ours_cpu = sampler.cpu_s()
    res["cpu_s"] = ours_cpu
    sampler_cpu = time.process_time() - me0  # this process: the memory sampler
    res["others_cores"] = max(0.0, (busy1 - busy0) - ours_cpu - sampler_cpu) / (t1 - t0)
    res.update(start=t0, wall=res.get("end", t1) - t0, exit=t1, load_before=load, samples=sampler.samples)
    return res


def summarize(res: dict, pages: int, stages: list[str]) -> dict:
    """Per stage: seconds, share of the run's wall time, pages/s, peak PSS/RSS during the stage."""
    samples = res["samples"]

    def peak(t0, t1, col):
        v = [s[col] for s in samples if t0 <= s[0] <= t1]
        return max(v) if v else 0.0

    rows = {}
    body = res["marks"]["flow body"][0]
    rows["startup"] = {"seconds": body - res["start"], "t": (res["start"], body)}
    for s in stages:
        if s in res["marks"]:
            a, b = res["marks"][s]
            rows[s] = {"seconds": b - a, "t": (a, b)}
    last = max(v["t"][1] for v in rows.values())
    rows["finish"] = {"seconds": res["end"] - last, "t": (last, res["end"])}
    def cpu_at(t):  # the tree's CPU-seconds so far at time t (last sample at or before it)
        v = [x[4] for x in samples if len(x) > 4 and x[0] <= t]
        return v[-1] if v else 0.0

    for r in rows.values():
        r["share"] = r["seconds"] / res["wall"]
        r["cpu_s"] = cpu_at(r["t"][1]) - cpu_at(r["t"][0])
        r["pages_per_s"] = pages / r["seconds"] if r["seconds"] > 0 else None
        r["peak_pss_mib"] = peak(*r["t"], 1)
        r["peak_rss_mib"] = peak(*r["t"], 2)
    phases: dict[str, float] = {}
    for ph in res.get("phases", []):
        phases[ph["name"]] = phases.get(ph["name"], 0.0) + ph["end"] - ph["start"]
    return {"wall": res["wall"], "pages": pages, "pages_per_s": pages / res["wall"], "stages": rows,
            "phases": phases, "segments": segments(rows, phases), "peak_pss_mib": max((s[1] for s in samples), default=0),
            "peak_rss_mib": max((s[2] for s in samples), default=0), "load_after": res.get("load_after"),
            "max_procs": max((s[3] for s in samples), default=0), "counts": res["counts"],
            "load_before": res["load_before"], "others_cores": res["others_cores"], "cpu_s": res["cpu_s"],
            "mem_series": [(s[0] - res["start"], s[1]) for s in samples[::max(1, len(samples) // 400)]]}


# finer segments of a run's wall time, the same names on both sides where the work matches
SEGMENT_COLORS = {"startup": "#9e9e9e", "extract": "tab:blue", "langid + rules + signatures": "tab:orange",
                  "MinHash dedup": "tab:green", "train classifiers": "tab:purple", "score + select": "tab:brown",
                  "curate reduces + reports": "tab:pink", "tokenizer training": "tab:olive",
                  "tokenize + manifest": "tab:cyan", "train": "tab:red", "finish": "#d0d0d0"}


def segments(rows: dict, phases: dict) -> list[tuple[str, float]]:
    sec = lambda k: rows[k]["seconds"] if k in rows else 0.0  # noqa: E731
    if "filter" in rows:  # DataTrove
        return [("startup", sec("startup")), ("extract", sec("extract")),
                ("langid + rules + signatures", sec("filter")),
                ("MinHash dedup", sec("buckets") + sec("cluster") + sec("dedup_filter")), ("finish", sec("finish"))]
    ph = lambda *n: sum(phases.get(x, 0.0) for x in n)  # noqa: E731
    curate_maps = ph("curate-filter", "dedup-reduce", "train-quality", "train-toxicity", "curate-score",
                     "curate-select")
    out = [("startup", sec("startup")), ("extract", sec("extract")),
           ("langid + rules + signatures", ph("curate-filter")), ("MinHash dedup", ph("dedup-reduce")),
           ("train classifiers", ph("train-quality", "train-toxicity")),
           ("score + select", ph("curate-score", "curate-select")),
           ("curate reduces + reports", sec("curate") - curate_maps),
           ("tokenizer training", ph("shard-tokenizer")), ("tokenize + manifest", sec("shard") - ph("shard-tokenizer"))]
    if "train" in rows:
        out.append(("train", sec("train")))
    return out + [("finish", sec("finish"))]


def matched_seconds(summary: dict, side: str, key: str) -> float:
    ours_names, dt_names = MATCH[key]
    if side.startswith("ours"):
        if key == "extract":
            return summary["stages"]["extract"]["seconds"]
        return sum(summary["phases"].get(n, 0.0) for n in ours_names)
    return sum(summary["stages"][n]["seconds"] for n in dt_names)


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        return {"slope": None, "intercept": None, "r2": None}
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    icpt = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys))
    return {"slope": slope, "intercept": icpt, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


# ---- report ---------------------------------------------------------------------------------

def report(results: dict, corpora: dict, args) -> None:
    sides = [k for k in results if results[k]]
    scales = sorted(corpora)
    print()
    print(f"machine: {os.cpu_count()} cores; workers N = {args.workers}; rounds: {args.rounds} (best wall kept)")
    print("corpus per scale:")
    for s in scales:
        print(f"  {s}x: " + ", ".join(f"{k} {v}" for k, v in corpora[s].items()))
    for side in sides:
        stages = DT_STAGES if side == "datatrove" else OURS_STAGES
        print(f"\n== {side} ==")
        for s in scales:
            sm = results[side][s]
            print(f"  {s}x, {sm['pages']} page records: wall {sm['wall']:.1f}s, {sm['pages_per_s']:.2f} pages/s, "
                  f"peak PSS {sm['peak_pss_mib']:.0f} MiB (sum of RSS {sm['peak_rss_mib']:.0f}), up to "
                  f"{sm['max_procs']} processes; CPU {sm['cpu_s']:.0f}s; other processes used "
                  f"{sm['others_cores']:.2f} of {os.cpu_count()} cores meanwhile")
            print("     time: " + " | ".join(f"{k} {v:.1f}s {v / sm['wall']:.0%}" for k, v in sm["segments"] if v > 0.05))
            cells = []
            for st in ["startup"] + stages:
                r = sm["stages"].get(st)
                if r:
                    pps = f", {r['pages_per_s']:.1f} pages/s" if st not in ("startup", "train") else ""
                    cpu = f", CPU {r['cpu_s']:.0f}s" if r.get("cpu_s") else ""
                    cells.append(f"{st} {r['seconds']:.1f}s{pps}{cpu}, peak {r['peak_pss_mib']:.0f} MiB")
            print("     stages: " + " | ".join(cells))
            print(f"     counts: {sm['counts']}")
    print("\n== linearity: wall seconds = a + b x pages (least squares over the scales) ==")
    for side in sides:
        xs = [results[side][s]["pages"] for s in scales]
        names = [n for n, _ in results[side][scales[0]]["segments"]]
        seg = lambda s, n: dict(results[side][s]["segments"]).get(n, 0.0)  # noqa: E731
        for label, ys in [("whole run", [results[side][s]["wall"] for s in scales])] + \
                [(n, [seg(s, n) for s in scales]) for n in names if n != "finish"]:
            fit = linear_fit(xs, ys)
            per = ", ".join(f"{1000 * y / x:.1f}" for x, y in zip(xs, ys))
            if fit["slope"] is None:
                print(f"  {side:9} {label:27} ms/page at each scale: {per}")
                continue
            print(f"  {side:9} {label:27} b = {1000 * fit['slope']:6.1f} ms/page, a = {fit['intercept']:6.1f} s, "
                  f"R^2 = {fit['r2']:.3f}; ms/page at each scale: {per}")
        cpu = [results[side][s]["cpu_s"] for s in scales]
        fit = linear_fit(xs, cpu)
        if fit["slope"] is not None:  # CPU time: far less sensitive than wall time to other jobs on the cores
            print(f"  {side:9} {'CPU-seconds, process tree':27} b = {1000 * fit['slope']:6.1f} ms/page, a = "
                  f"{fit['intercept']:6.1f} s, R^2 = {fit['r2']:.3f}; ms/page at each scale: "
                  + ", ".join(f"{1000 * y / x:.1f}" for x, y in zip(xs, cpu)))
        mem = linear_fit(xs, [results[side][s]["peak_pss_mib"] for s in scales])
        if mem["slope"] is not None:
            print(f"  {side:9} {'peak PSS':27} b = {1000 * mem['slope']:.1f} MiB per 1000 pages, a = {mem['intercept']:.0f} "
                  f"MiB, R^2 = {mem['r2']:.4f}")
    for ours in [x for x in sides if x.startswith("ours") and "datatrove" in results]:
        print(f"\n== {ours} / DataTrove, pages/s on the matching steps (> 1: ours faster) ==")
        for s in scales:
            o, d = results[ours][s], results["datatrove"][s]
            cells = []
            for key in MATCH:
                so, sd = matched_seconds(o, "ours", key), matched_seconds(d, "datatrove", key)
                cells.append(f"{key}: {so:.1f}s vs {sd:.1f}s = {sd / so:.2f}x")
            so = sum(matched_seconds(o, "ours", k) for k in MATCH)
            sd = sum(matched_seconds(d, "datatrove", k) for k in MATCH)
            cells.append(f"all matching steps: {so:.1f}s vs {sd:.1f}s = {sd / so:.2f}x")
            cells.append(f"whole runs (ours does more): {o['wall']:.1f}s vs {d['wall']:.1f}s = {d['wall'] / o['wall']:.2f}x")
            cells.append(f"whole runs, CPU-seconds: {o['cpu_s']:.0f} vs {d['cpu_s']:.0f} = {d['cpu_s'] / o['cpu_s']:.2f}x")
            print(f"  {s}x: " + "; ".join(cells))
    for side in sides:
        if side.startswith("ours") and side != "ours" and "ours" in results:
            print(f"\n== {side} / ours (threads) whole run: " + ", ".join(
                f"{s}x {results['ours'][s]['wall'] / results[side][s]['wall']:.2f}x" for s in scales if s in results[side]))


def plots(results: dict, corpora: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    scales = sorted(corpora)
    sides = [k for k in results if results[k]]
    colors = {"ours": "tab:blue", "ours-dask": "tab:cyan", "datatrove": "tab:orange"}
    label = {"ours": "refinery (threads)", "ours-dask": "refinery (dask)", "datatrove": "DataTrove 0.10.1"}
    paths = []

    # 1. wall time and peak memory against pages, with the linear fits
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(12, 3.6))
    for side in sides:
        xs = [results[side][s]["pages"] for s in scales]
        for ax, ys in ((ax1, [results[side][s]["wall"] for s in scales]),
                       (ax3, [results[side][s]["cpu_s"] for s in scales]),
                       (ax2, [results[side][s]["peak_pss_mib"] for s in scales])):
            ax.plot(xs, ys, "o", color=colors.get(side))
            fit = linear_fit(xs, ys)
            if fit["slope"] is not None:
                grid = [0, max(xs) * 1.05]
                ax.plot(grid, [fit["intercept"] + fit["slope"] * g for g in grid], "-", color=colors.get(side),
                        label=f"{label.get(side, side)} (R²={fit['r2']:.3f})")
    if "ours" in results:  # the matching steps only: the comparable part of ours
        xs = [results["ours"][s]["pages"] for s in scales]
        ys = [sum(matched_seconds(results["ours"][s], "ours", k) for k in MATCH) for s in scales]
        ax1.plot(xs, ys, "s--", color=colors["ours"], alpha=0.6, label="refinery, matching steps only")
    ax1.set(xlabel="page records", ylabel="wall seconds", title="Wall time")
    ax2.set(xlabel="page records", ylabel="MiB (PSS, process tree)", title="Peak memory")
    ax3.set(xlabel="page records", ylabel="CPU-seconds (process tree)", title="CPU time")
    for ax in (ax1, ax3, ax2):
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(folder / "bench-e2e-scaling.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    # 2. where the time goes: segment seconds (left) and shares of the wall time (right), per side and scale
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 + 0.42 * len(scales) * len(sides) + 1.6), sharey=True)
    rows = [(s, side) for s in scales for side in sides]
    ys = [i + (i // len(sides)) * 0.5 for i in range(len(rows))]
    seen: set = set()
    for y, (s, side) in zip(ys, rows):
        sm = results[side][s]
        for ax, scale_by in ((axes[0], 1.0), (axes[1], 100.0 / sm["wall"])):
            left = 0.0
            for name, sec in sm["segments"]:
                if sec <= 0:
                    continue
                ax.barh(y, sec * scale_by, left=left, color=SEGMENT_COLORS[name], edgecolor="white", linewidth=0.5,
                        label=name if (name not in seen and ax is axes[0]) else None)
                if ax is axes[0]:
                    seen.add(name)
                left += sec * scale_by
    axes[0].set_yticks(ys, [f"{s}x {label.get(side, side)}" for s, side in rows], fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set(xlabel="wall seconds", title="Where the wall time goes")
    axes[1].set(xlabel="% of the run's wall time", xlim=(0, 100), title="Shares")
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=7, ncol=6, loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    paths.append(folder / "bench-e2e-stages.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    # 3. memory over time at the largest scale
    fig, ax = plt.subplots(figsize=(9, 3.2))
    s = scales[-1]
    for side in sides:
        series = results[side][s]["mem_series"]
        ax.plot([t for t, _ in series], [m for _, m in series], color=colors.get(side), label=label.get(side, side))
    for side in sides:  # where each run's stages start
        for st, r in results[side][s]["stages"].items():
            if st in ("startup", "finish", "cluster", "buckets", "dedup_filter"):
                continue
            x = r["t"][0] - results[side][s]["start"]
            ax.axvline(x, color=colors.get(side), lw=0.6, ls=":")
            ax.text(x, 5 if side == "datatrove" else ax.get_ylim()[1] * 0.93, f" {st}", fontsize=6,
                    color=colors.get(side), va="bottom" if side == "datatrove" else "top")
    ax.set(xlabel="seconds since start", ylabel="MiB (PSS, process tree)",
           title=f"Memory over time, {s}x ({results[sides[0]][s]['pages']} page records)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(folder / "bench-e2e-memory.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=750, help="page records per 1x block")
    ap.add_argument("--scales", default="1,2,4")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="runs per side and scale, interleaved; the best is kept")
    ap.add_argument("--shard-pages", type=int, default=500, help="page records per WARC file")
    ap.add_argument("--near-dup", type=float, default=0.20, help="fraction of a block's pages that are near duplicates")
    ap.add_argument("--exact-dup", type=float, default=0.05, help="fraction that are exact copies on another host")
    ap.add_argument("--ours", default="threads", help="comma list: threads, dask")
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
        report(results, corpora, argparse.Namespace(**saved["args"]))
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
        run_child("ours", "warmup", tmp, tmp / "warmup", args.workers, home, 0)
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
                                    args.train_steps)
                    sm = summarize(res, pages, DT_STAGES if side == "datatrove" else OURS_STAGES)
                    sm["start"] = res["start"]
                    print(f"  {s}x round {r + 1} {name}: {sm['wall']:.1f}s, {sm['pages_per_s']:.2f} pages/s, peak PSS "
                          f"{sm['peak_pss_mib']:.0f} MiB, others used {sm['others_cores']:.2f} cores, counts {sm['counts']}",
                          flush=True)
                    if name not in best or sm["wall"] < best[name]["wall"]:
                        best[name] = sm
                    shutil.rmtree(tmp / "out" / f"{name}-{s}x-{r}", ignore_errors=True)
            for name in best:
                results[name][s] = best[name]
            shutil.rmtree(corpus, ignore_errors=True)
    report(results, corpora, args)
    if args.src == "head":
        shutil.rmtree(SRC, ignore_errors=True)
    print(f"\nbenchmark wall time: {time.time() - t_all:.0f}s")
    if args.plots:
        for p in plots(results, corpora, Path(args.plots)):
            print(f"plot: {p} ({p.stat().st_size // 1024} KiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "corpora": corpora, "results": results},
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
