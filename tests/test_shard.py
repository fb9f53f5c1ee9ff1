"""`refinery shard` end to end: tokenizer, deterministic train/val shards, manifest, readers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.extract import DOC_SCHEMA
from core.io import write_parquet_atomic
from tests.mix import build_docs

VOCAB = 4096


def write_curated(out: Path, shards: int = 2) -> Path:
    """Kept-looking documents (real WikiText articles and inaugural addresses) plus the real
    pages of the bundled WARC (HTML-extracted text with its odd characters), as curate writes them."""
    docs = [d for d in build_docs(0) if d["url"].split("//")[1].split(".")[0] in ("wiki", "inaugural")]
    for s in range(shards):
        write_parquet_atomic(pa.Table.from_pylist(docs[s::shards], schema=DOC_SCHEMA),
                             out / "docs" / f"kept-{s}.parquet")
    return out


@pytest.fixture(scope="module")
def sharded(prefect_api, tmp_path_factory):
    from core.config import RefineryConfig
    from flows.shard import shard_flow

    base = tmp_path_factory.mktemp("shard")
    write_curated(base / "curated")
    cfg = RefineryConfig.model_validate({"shard": {"vocab_size": VOCAB, "val_fraction": 0.05,
                                                   "row_group_tokens": 20000}})
    state = shard_flow(str(base / "curated"), str(base / "a"), cfg, return_state=True)
    assert state.is_completed(), state
    return base, cfg, state


def _all_docs(base: Path) -> dict[str, str]:
    t = pq.read_table(base / "curated" / "docs", columns=["id", "text"])
    return dict(zip(t["id"].to_pylist(), t["text"].to_pylist()))


def test_tokenizer_loads_in_transformers_and_round_trips_real_text(sharded, sample_dir):
    from transformers import AutoTokenizer

    base, _, _ = sharded
    tok = AutoTokenizer.from_pretrained(str(base / "a" / "tokenizer"))
    assert len(tok) == VOCAB
    assert (tok.eos_token, tok.pad_token, tok.mask_token) == ("<|endoftext|>", "<|pad|>", "<|mask|>")
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [3, 102]
    texts = list(_all_docs(base).values())
    # and real web text the tokenizer never saw: extracted snippets of real pages in several languages
    with open(sample_dir / "curation" / "quality_negative" / "trafilatura_boilerplate_snippets.jsonl") as f:
        snippets = [json.loads(x)["text"] for x in f]
    assert len(snippets) > 1000
    texts += snippets
    texts += ["Tab\tand  double  spaces\r\nCRLF, ünïcödé, 中文, emoji 🦀, <|endoftext|> literally"]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == t


def test_split_is_by_document_hash_and_covers_every_document(sharded):
    base, _, _ = sharded
    out = base / "a"
    m = json.loads((out / "manifest.json").read_text())
    train = set(pq.read_table(out / "train", columns=["doc_id"])["doc_id"].to_pylist())
    val = set(pq.read_table(out / "val", columns=["doc_id"])["doc_id"].to_pylist())
    assert train and val and not train & val
    assert train | val == set(_all_docs(base))
    assert m["splits"]["train"]["docs"] == len(train) and m["splits"]["val"]["docs"] == len(val)
    # the tokens written are the tokenizer's encoding of the documents, nothing added
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    docs = _all_docs(base)
    t = pq.read_table(out / "val")
    assert t.schema.field("input_ids").type == pa.list_(pa.uint16())
    for doc_id, ids, n in zip(t["doc_id"].to_pylist(), t["input_ids"].to_pylist(), t["n_tokens"].to_pylist()):
        assert ids == tok.encode(docs[doc_id], add_special_tokens=False).ids and n == len(ids)


def test_reruns_are_byte_identical_and_cached(sharded):
    from flows.shard import shard_flow
    from tests.test_flows import _task_runs

    base, cfg, _ = sharded
    shard_flow(str(base / "curated"), str(base / "b"), cfg)
    for rel in ["manifest.json", "tokenizer/tokenizer.json"] + [
            str(p.relative_to(base / "a")) for p in sorted((base / "a").glob("*/*.parquet"))]:
        assert (base / "a" / rel).read_bytes() == (base / "b" / rel).read_bytes(), rel
    state = shard_flow(str(base / "curated"), str(base / "a"), cfg, return_state=True)
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs and all(r.state.name == "Cached" for r in runs), [(r.name, r.state.name) for r in runs]


def test_shards_load_in_pyarrow_duckdb_and_datasets_with_manifest_counts(sharded):
    import duckdb
    from datasets import load_dataset

    out = sharded[0] / "a"
    m = json.loads((out / "manifest.json").read_text())
    for split in ("train", "val"):
        want_docs, want_tokens = m["splits"][split]["docs"], m["splits"][split]["tokens"]
        files = [str(out / f["path"]) for f in m["splits"][split]["files"]]
        t = pq.read_table(files)
        assert (t.num_rows, pa.compute.sum(t["n_tokens"]).as_py()) == (want_docs, want_tokens)
        assert sum(len(x) for x in t["input_ids"].to_pylist()) == want_tokens
        (rows, tokens), = duckdb.sql(f"SELECT count(*), sum(len(input_ids)) FROM read_parquet({files!r})").fetchall()
        assert (rows, tokens) == (want_docs, want_tokens)
        ds = load_dataset("parquet", data_files=files, split="train", cache_dir=str(out.parent / "hf-cache"))
        assert ds.num_rows == want_docs and sum(ds["n_tokens"]) == want_tokens
    for f in m["splits"]["train"]["files"]:  # row groups sized for streaming, as the manifest lists
        md = pq.ParquetFile(out / f["path"]).metadata
        assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == f["row_groups"]
        assert len(f["row_groups"]) > 1


def test_corrupt_truncated_or_missing_shards_are_named(sharded, tmp_path):
    from core.shard_format import ShardError, load_manifest, verify

    src = sharded[0] / "a"
    m = load_manifest(src)
    verify(src, m)
    rel = m.split("train").files[0].path
    for damage in ("truncate", "flip", "remove"):
        d = tmp_path / damage
        shutil.copytree(src, d)
        p = d / rel
        data = bytearray(p.read_bytes())
        if damage == "truncate":
            p.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            data[len(data) // 2] ^= 0xFF
            p.write_bytes(bytes(data))
        else:
            p.unlink()
        with pytest.raises(ShardError, match=Path(rel).name):
            verify(d, load_manifest(d))
    (tmp_path / "nomanifest").mkdir()
    with pytest.raises(ShardError, match="manifest"):
        load_manifest(tmp_path / "nomanifest")


def test_a_user_tokenizer_is_used_as_given(sharded, tmp_path):
    from core.config import RefineryConfig
    from flows.shard import shard_flow

    base, _, _ = sharded
    given = base / "a" / "tokenizer"
    cfg = RefineryConfig.model_validate({"shard": {"tokenizer_path": str(given), "val_fraction": 0.05}})
    m = shard_flow(str(base / "curated"), str(tmp_path / "u"), cfg)
    assert m.tokenizer.trained is False
    assert (tmp_path / "u" / "tokenizer" / "tokenizer.json").read_bytes() == (given / "tokenizer.json").read_bytes()
    a = pq.read_table(base / "a" / "val").sort_by("doc_id")
    b = pq.read_table(tmp_path / "u" / "val").sort_by("doc_id")
    assert a["input_ids"].to_pylist() == b["input_ids"].to_pylist()


def test_tokenizer_report_compares_with_a_general_tokenizer(sharded):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    base, _, state = sharded
    rep = json.loads((base / "a" / "manifest.json").read_text())["tokenizer_report"]
    ours, general = rep["held_out"]["ours"], rep["held_out"]["general"]
    assert ours["texts"] > 0 and 3.0 < ours["chars_per_token"] < 6.0
    assert general["chars_per_token"] > 2.0
    assert rep["domain_words"] and all(w["general_tokens"] > 1 for w in rep["domain_words"])
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert {"tokenizer-report", "shard-files", "shard-progress"} <= {a.key for a in arts}


def test_missing_input_fails_clearly(tmp_path):
    from flows.shard import curated_docs

    with pytest.raises(FileNotFoundError, match="no curated documents"):
        curated_docs(str(tmp_path))
