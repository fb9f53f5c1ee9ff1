"""The real text the selection and toxicity benches draw from, rebuilt from the shared data folder.

    web_pages(data)    English web pages extracted with the pipeline's own extractor (tasks.extract):
                       the trafilatura test pages, DCLM's quality pairs, the dolma WARCs and the Common
                       Crawl slice; English by py3langid, >= 500 characters, exact duplicates once.
    domain_docs(data)  the domains/*/docs.jsonl documents NOT in the shipped background corpus
                       (sample/build_background.py: in_background), so no bench ever scores text that a
                       shipped model or default setting was built from.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sample"))

from build_background import DOMAINS, in_background  # noqa: E402

# page categories that are not clean prose (spam, server pages, thin pages)
NOT_CLEAN = {"spam_scam", "default_server_page", "low_quality"}
# Web pages whose text plainly belongs to a domain set's topic. A domain's mix leaves them out: as
# negatives they would count a Wikipedia article on t-SNE against "science", as positives they are not
# documents of that set. Judged by reading each page (bench/selection.py prints the topic counts).
WEB_TOPICS = {
    "science": ["positive_wikipedia_1", "positive_wikipedia_2", "positive_wikipedia_3", "positive_wikipedia_5",
                "tsne", "phys.org"],
    "general": ["news__en__", "positive_wikipedia_4", "http_sample", "boingboing", "spiceland",
                "womencantalksports", "redtri"],
}


def default_data() -> Path:
    return ROOT.parent / "shared" / "data"


def check_data(data: Path) -> Path:
    if not (data / "domains").is_dir() or not (data / "html_pages").is_dir():
        sys.exit(f"shared data not found at {data} (pass --data /path/to/shared/data)")
    return data


def web_pages(data: Path) -> list[dict]:
    """{"id", "text", "source": "web:<category>", "clean": bool, "topic": domain or "web"} per page."""
    import py3langid

    from core.config import ExtractConfig
    from tasks.extract import decode_payload, extract_html
    from tasks.warc import iter_records

    ecfg = ExtractConfig()
    opts = dict(include_comments=ecfg.include_comments, include_tables=ecfg.include_tables,
                favor=ecfg.favor, deduplicate=ecfg.deduplicate)
    out, seen = [], set()

    def add(pid: str, url: str, kind: str, html: str) -> None:
        d = extract_html(html, url, opts)
        if not d or len(d["text"]) < 500 or d["text"] in seen or py3langid.classify(d["text"])[0] != "en":
            return
        seen.add(d["text"])
        topic = next((t for t, keys in WEB_TOPICS.items() if any(k in pid for k in keys)), "web")
        out.append({"id": pid, "text": d["text"], "source": "web:" + kind, "clean": kind not in NOT_CLEAN,
                    "topic": topic})

    for row in csv.DictReader(open(data / "html_pages" / "manifest.csv", encoding="utf-8")):
        raw = (data / "html_pages" / "pages" / row["file"]).read_bytes().decode("utf-8", "replace")
        add("html:" + row["file"], row["url"], row["category"], raw)
    for p in sorted((data / "html_pages" / "dclm_quality_pairs").glob("*.html")):
        add("dclm:" + p.name, "", "wikipedia" if p.name.startswith("positive") else "low_quality",
            p.read_text(encoding="utf-8", errors="replace"))
    for name, kind in [("dolma-sample-0000.warc.gz", "dolma"), ("dolma-sample-0001.warc.gz", "dolma"),
                       ("cc-main-2020-34_sample.resiliparse.warc.gz", "low_quality")]:
        for rec in iter_records(data / "warc" / name):
            if rec.record_type != "response":
                continue
            try:
                raw, _, err = decode_payload(rec, ecfg)
            except Exception:  # noqa: BLE001 - undecodable records are not pages
                continue
            if not err and raw:
                add(f"warc:{name}/{rec.offset}", rec.url, kind, raw)
    return out


def domain_docs(data: Path) -> list[dict]:
    """{"id", "text", "source": domain, "clean": True, "topic": domain} per held-out domain document."""
    out = []
    for topic in DOMAINS:
        for line in (data / "domains" / topic / "docs.jsonl").read_text(encoding="utf-8").split("\n"):
            if line.strip() and not in_background((d := json.loads(line))["id"]):
                out.append({"id": d["id"], "text": d["text"], "source": topic, "clean": True, "topic": topic})
    return out
