"""Rebuild the bundled sample from the shared real-data folder (run once by maintainers).

    python sample/build_sample.py /path/to/shared/data

- warc/: real WARC files as shipped by their projects (Common Crawl slice, wget WARCs,
  a truncated WARC to show counted damage), copied unchanged;
- pages.warc.gz: the 45 trafilatura test pages with their original URLs as WARC/1.1
  response records, so the same pages feed extraction tests and the crawl demo server;
- gold_snippets.json: trafilatura's must-contain / must-not-contain strings for them.
"""
from __future__ import annotations

import csv
import io
import shutil
import sys
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

HERE = Path(__file__).parent
COPY = ["dolma-sample-0000.warc.gz", "dolma-sample-0001.warc.gz",
        "cc-main-2020-34_sample.resiliparse.warc.gz", "warcio-example-trunc.warc"]


def main(shared: Path) -> None:
    for name in COPY:
        shutil.copyfile(shared / "warc" / name, HERE / "warc" / name)
    pages = shared / "html_pages"
    shutil.copyfile(pages / "gold_snippets.json", HERE / "gold_snippets.json")
    rows = sorted(csv.DictReader(open(pages / "manifest.csv")), key=lambda r: r["file"])
    with open(HERE / "pages.warc.gz", "wb") as out:
        writer = WARCWriter(out, gzip=True, warc_version="1.1")
        for row in rows:
            body = (pages / "pages" / row["file"]).read_bytes()
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(body)))],
                                    protocol="HTTP/1.1")
            rec = writer.create_warc_record(row["url"], "response", payload=io.BytesIO(body), http_headers=http,
                                            warc_headers_dict={"WARC-Date": "2026-11-01T00:00:00Z",
                                                               "X-Sample-File": row["file"]})
            writer.write_record(rec)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
