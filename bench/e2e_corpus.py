"""bench/e2e.py's corpus: the bundled real pages plus pages assembled from real parts of
../shared/data (text pools, boilerplate templates, near-duplicate edits), written as gzip-per-record
WARC files; what it holds and why: bench/e2e.py's docstring, "Corpus"."""
from __future__ import annotations

import gzip
import html
import json
import random
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
SAMPLE_WARCS = [ROOT / "sample" / "pages.warc.gz"] + sorted((ROOT / "sample" / "warc").glob("*.warc.gz"))


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
