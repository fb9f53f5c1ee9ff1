"""A realistic crawl mix built from bundled real data, as extracted-docs Parquet shards.

Mostly what a web crawl is mostly made of (boilerplate pages, spam and low-quality pages,
short social posts, non-English pages), with a minority of clean prose (WikiText articles,
inaugural addresses) and near-duplicate copies across shards. The quality reference used
with it is Gutenberg only, so no document of the mix was a training positive.
"""
from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pyarrow as pa

from core.text import count_words
from tasks.extract import DOC_SCHEMA, doc_id, domain_of
from core.io import write_parquet_atomic

ROOT = Path(__file__).resolve().parent.parent
CUR = ROOT / "sample" / "curation"
PII_LINE = "Contact the editor at jane.doe@example.org or call (555) 123-4567; server 192.168.10.24."


def _detok(s: str) -> str:
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".").replace("<unk>", "")
    s = re.sub(r" ([.,;:!?')])", r"\1", s)
    return re.sub(r"\( ", "(", s)


def wikitext_articles(name: str) -> list[str]:
    raw = (CUR / "reference" / "wikitext2" / name).read_text(encoding="utf-8")
    parts = re.split(r"\n = ([^=\n]+) = \n", raw)
    arts = []
    for i in range(1, len(parts) - 1, 2):
        body = "\n".join(_detok(ln.strip()) for ln in parts[i + 1].splitlines()
                         if ln.strip() and not ln.strip().startswith("="))
        arts.append(f"{parts[i].strip()}\n{body}")
    return arts


def build_docs(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    texts: list[tuple[str, str]] = []  # (kind, text)
    texts += [("wiki", a) for a in wikitext_articles("test.txt")]
    texts += [("inaugural", p.read_text(encoding="utf-8", errors="replace"))
              for p in sorted((CUR / "reference" / "inaugural").glob("*.txt"))]
    low = [json.loads(x)["text"] for x in open(CUR / "quality_negative" / "web_lowquality_fulltext.jsonl")]
    texts += [("lowq", t) for t in low]
    snippets = [json.loads(x)["text"] for x in open(CUR / "quality_negative" / "trafilatura_boilerplate_snippets.jsonl")]
    for i in range(0, len(snippets) - 40, 40):  # boilerplate pages: menus, footers, cookie banners
        texts.append(("boiler", "\n".join(snippets[i:i + 40])))
    with open(CUR / "toxicity" / "labeled_data.csv", encoding="utf-8") as f:
        tweets = [r["tweet"] for r in csv.DictReader(f)]
    for i in range(0, 6000, 30):  # social feeds: 30 posts a page
        texts.append(("social", "\n".join(tweets[i:i + 30])))
    good = [t for k, t in texts if k in ("wiki", "inaugural")]
    for t in good[:10]:  # pages carrying personal data
        texts.append(("pii", t + "\n" + PII_LINE))
    for t in good[10:25]:  # near duplicates: a few words changed, a boilerplate line added
        words = t.split(" ")
        for j in rng.sample(range(len(words)), max(1, len(words) // 100)):
            words[j] = words[j].upper()
        texts.append(("neardup", " ".join(words) + "\nShare this article on Facebook and Twitter."))
    for t in good[25:30]:  # exact copies
        texts.append(("exact", t))
    rng.shuffle(texts)
    docs = []
    for i, (kind, text) in enumerate(texts):
        url = f"https://{kind}.example.com/page/{i}"
        docs.append({"id": doc_id(url, text), "url": url, "domain": domain_of(url), "fetch_time": None,
                     "title": "", "date": "", "text": text, "n_chars": len(text), "n_words": count_words(text),
                     "source": f"mix@{i}", "charset": "utf-8"})
    return docs


def write_mix(out_dir: Path, shards: int = 3, seed: int = 0) -> list[Path]:
    docs = build_docs(seed)
    paths = []
    for s in range(shards):
        part = docs[s::shards]
        paths.append(write_parquet_atomic(pa.Table.from_pylist(part, schema=DOC_SCHEMA),
                                          out_dir / "docs" / f"mix-{s}.parquet"))
    return paths
