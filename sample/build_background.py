"""Rebuild sample/curation/background/ from the shared domain sets (run once by maintainers).

    python sample/build_background.py /path/to/shared/data

A fixed, general background corpus shipped with the package: one document in five of each domain
folder (legal, medical, finance, science, general), chosen by a hash of its id. Domain selection uses it
as general text to contrast a reference with, and the toxicity classifier as clean prose of many topics.
The other four in five are never shipped here: bench/selection.py and bench/toxicity.py draw their
references, mixes and held-out sets from them only (`in_background` below is the one rule).
"""
from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

HERE = Path(__file__).parent
DOMAINS = ["legal", "medical", "finance", "science", "general"]


def in_background(doc_id: str) -> bool:
    return zlib.crc32(doc_id.encode()) % 5 == 0


def main(shared: Path) -> None:
    out = HERE / "curation" / "background"
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out / "docs.jsonl", "w", encoding="utf-8") as f:
        for domain in DOMAINS:
            for line in (shared / "domains" / domain / "docs.jsonl").read_text(encoding="utf-8").split("\n"):
                if not line.strip():
                    continue
                d = json.loads(line)
                if in_background(d["id"]):
                    f.write(json.dumps({"id": d["id"], "text": d["text"], "source": d["source"],
                                        "topic": domain}, ensure_ascii=False) + "\n")
                    n += 1
    print(f"{n} documents -> {out / 'docs.jsonl'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
