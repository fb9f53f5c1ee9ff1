"""WARC/WET ingest and payload decoding on real files and real damage."""
from __future__ import annotations

import gzip
import random
import zlib
from pathlib import Path

import pytest

from tasks.decode import DecodeError, decode_content, decode_text, dechunk, to_text
from tasks.warc import ReadStats, file_problem, iter_records, looks_like_warc

SAMPLE = Path(__file__).resolve().parent.parent / "sample"
CC = SAMPLE / "warc" / "cc-main-2020-34_sample.resiliparse.warc.gz"
DOLMA = SAMPLE / "warc" / "dolma-sample-0000.warc.gz"


def _members(data: bytes) -> list[int]:
    starts, pos = [], 0
    while pos < len(data):
        starts.append(pos)
        d = zlib.decompressobj(31)
        d.decompress(data[pos:])
        pos = len(data) - len(d.unused_data)
    return starts


def read(path) -> tuple[list, ReadStats]:
    stats = ReadStats()
    return list(iter_records(path, stats)), stats


def test_common_crawl_slice_reads_every_record():
    recs, stats = read(CC)
    # warcinfo + 17 request / 16 response / 16 metadata records (SOURCE.txt of the slice)
    assert stats.records == 50 and stats.by_type["response"] == 16
    assert len(recs) == 16 and not stats.errors
    assert all(r.url.startswith("http") and r.status == 200 for r in recs)


def test_wget_warc11_uris_are_unwrapped():
    recs, _ = read(DOLMA)
    assert recs and all(not r.url.startswith("<") for r in recs)


def test_truncated_gzip_warc_yields_good_records_and_counts_the_cut(tmp_path):
    data = DOLMA.read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) // 2])
    full, _ = read(DOLMA)
    recs, stats = read(cut)
    good = [r for r in recs if not r.error]
    assert stats.errors["truncated record"] == 1
    assert [r.url for r in good] == [r.url for r in full[: len(good)]]
    assert [r.payload for r in good] == [r.payload for r in full[: len(good)]]


def test_garbage_between_members_is_skipped_and_reading_resumes(tmp_path):
    data = DOLMA.read_bytes()
    m = _members(data)[20]
    bad = tmp_path / "garbage.warc.gz"
    bad.write_bytes(data[:m] + b"\x00not a record" * 50 + data[m:])
    full, _ = read(DOLMA)
    recs, stats = read(bad)
    assert stats.errors["malformed record"] == 1
    assert [r.url for r in recs if not r.error] == [r.url for r in full]


def test_corrupt_member_loses_only_that_record(tmp_path):
    data = DOLMA.read_bytes()
    starts = _members(data)
    m = starts[21]
    bad = tmp_path / "corrupt.warc.gz"
    bad.write_bytes(data[: m + 40] + b"\xff" * 30 + data[m + 70:])
    full, _ = read(DOLMA)
    recs, stats = read(bad)
    assert sum(stats.errors.values()) == 1
    assert len([r for r in recs if not r.error]) >= len(full) - 1


def test_plain_warc_with_truncated_body_is_counted():
    recs, stats = read(SAMPLE / "warc" / "warcio-example-trunc.warc")
    assert stats.records == 4 and len(recs) == 1
    with pytest.raises(DecodeError) as e:
        decode_content(recs[0].payload, recs[0].http_headers.get("content-encoding"), 10**6)
    assert e.value.reason == "truncated payload"


def test_wet_records_with_lying_content_length_are_counted(tmp_path):
    shared_wet = Path(__file__).resolve().parent / "fixtures" / "ccnet-sample.wet.txt"
    recs, stats = read(shared_wet)
    # cc_net's sample declares lengths in characters, not bytes: every record disagrees
    assert stats.errors["content-length mismatch"] == len(recs) > 0


def test_wet_file_with_true_lengths_reads_as_conversion_records(tmp_path):
    texts = ["First document, plain text.\nSecond line.", "Deuxième document en français, é à ü."]
    out = b"".join(
        b"WARC/1.0\r\nWARC-Type: conversion\r\nWARC-Target-URI: http://example.org/%d\r\n"
        b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s\r\n\r\n" % (i, len(t.encode()), t.encode())
        for i, t in enumerate(texts))
    p = tmp_path / "x.warc.wet.gz"
    p.write_bytes(gzip.compress(out))
    recs, stats = read(p)
    assert not stats.errors and [r.payload.decode() for r in recs] == texts
    assert all(r.record_type == "conversion" for r in recs)


def test_sniffing_ignores_names(tmp_path):
    noise = tmp_path / "random.warc.gz"
    noise.write_bytes(bytes(range(256)) * 10)
    assert looks_like_warc(DOLMA) and not looks_like_warc(noise)
    empty = tmp_path / "empty.warc"
    empty.write_bytes(b"")
    assert not looks_like_warc(empty)


def test_decode_chunked_gzip_and_bomb():
    assert dechunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n") == b"hello world"
    assert dechunk(b"<html>not chunked</html>") == b"<html>not chunked</html>"
    assert decode_content(gzip.compress(b"<p>hi</p>"), "gzip", 1000) == b"<p>hi</p>"
    bomb = gzip.compress(b"\0" * 50_000_000)
    with pytest.raises(DecodeError) as e:
        decode_content(bomb, "gzip", 1_000_000)
    assert e.value.reason == "decoded too large"


def test_mislabelled_charsets_fall_back_to_what_decodes():
    text = "Größe, café, naïve – “quoted”"
    assert to_text(text.encode("cp1252"), "utf-8")[0] == text          # header lies: utf-8
    assert to_text(text.encode("utf-8"), "iso-8859-1")[0] == text      # header lies: latin-1
    jp = ("日本語のテキストです。" * 100).encode("euc-jp")
    assert to_text(jp, None)[0].startswith("日本語")


def _response(url: str, body: bytes, lie: int = 0) -> bytes:
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + body
    return (b"WARC/1.1\r\nWARC-Type: response\r\nWARC-Target-URI: %s\r\n"
            b"Content-Type: application/http; msgtype=response\r\nContent-Length: %d\r\n\r\n"
            % (url.encode(), len(http) + lie) + http + b"\r\n\r\n")


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("lie", [400, 5, -5, -30])
def test_lying_content_length_is_counted_and_the_next_records_survive(tmp_path, gz, lie):
    # too long swallows the records after it, too short leaves a tail: both counted, neither
    # costs more than the liar itself, in gzip-per-record files as in plain ones
    recs = [_response(f"http://x/{i}", b"<p>page %d</p>" % i * 20, lie if i == 1 else 0) for i in range(4)]
    p = tmp_path / ("x.warc.gz" if gz else "x.warc")
    p.write_bytes(b"".join(gzip.compress(r) for r in recs) if gz else b"".join(recs))
    out, stats = read(p)
    assert dict(stats.errors) == {"content-length mismatch": 1}
    assert [(r.url, r.error) for r in out] == [("http://x/0", None), ("http://x/1", "content-length mismatch"),
                                               ("http://x/2", None), ("http://x/3", None)]
    assert all(r.payload == b"<p>page %d</p>" % i * 20 for i, r in enumerate(out) if not r.error)


def test_whole_file_gzip_cut_off_is_counted(tmp_path):
    rnd = random.Random(1)
    pages = [" ".join(str(rnd.random()) for _ in range(300)).encode() for _ in range(3)]  # compresses little
    data = gzip.compress(b"".join(_response(f"http://x/{i}", b) for i, b in enumerate(pages)))
    p = tmp_path / "x.warc.gz"
    p.write_bytes(data[: len(data) - 100])
    out, stats = read(p)
    assert stats.errors["truncated record"] == 1
    assert [r.payload for r in out if not r.error] == pages[:2] and out[-1].error == "truncated record"


def test_oversized_payload_is_skipped_unread(tmp_path):
    p = tmp_path / "x.warc.gz"
    p.write_bytes(gzip.compress(_response("http://x/big", b"a" * 3_000_000)) 
                  + gzip.compress(_response("http://x/ok", b"ok")))
    stats = ReadStats()
    out = list(iter_records(p, stats, max_payload=1_000_000))
    assert [(r.url, r.error, len(r.payload)) for r in out] == [("http://x/big", "too large", 0),
                                                               ("http://x/ok", None, 2)]
    assert out[0].payload_size >= 3_000_000 and not stats.errors


def test_files_that_are_not_warcs_say_why(tmp_path):
    cases = {"empty file": b"", "truncated gzip": gzip.compress(_response("http://x/", b"x"))[:12],
             "corrupt gzip": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 100,
             "not a warc file": b"<html>not a warc</html>"}
    for i, (reason, data) in enumerate(cases.items()):
        (tmp_path / f"{i}.warc.gz").write_bytes(data)
        assert file_problem(tmp_path / f"{i}.warc.gz") == reason
    assert file_problem(DOLMA) is None


def test_decode_repairs_are_named():
    text = "Größe, café, naïve – “quoted” words about the weather. " * 30   # over 1 KB: detection runs
    assert decode_text(text.encode("cp1252"), "utf-8") == (text, "cp1252", "charset label wrong")
    broken = text.encode()[:100] + b"\xff" + text.encode()[100:]
    got, cs, repair = decode_text(broken, "utf-8")
    assert (cs, repair) == ("utf-8", "invalid utf-8 replaced") and got.replace("\ufffd", "") == text
    assert decode_text(b"<p>plain ascii</p>", "shift_jis")[2] is None         # nothing to be wrong about
    assert decode_text(text.encode("cp1252"), "iso-8859-1")[2] is None       # latin-1 means windows-1252
