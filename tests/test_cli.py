"""The README's commands, end to end, as a user runs them (subprocesses, real Prefect API)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from fastwarc.warc import ArchiveIterator, WarcRecordType

ROOT = Path(__file__).resolve().parent.parent
REFINERY = [sys.executable, "-m", "flows.cli"]


def _env(api_url: str | None) -> dict:
    env = dict(os.environ)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def test_invalid_config_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(REFINERY + ["extract", str(ROOT / "sample" / "warc"), "--out", str(out),
                                   "--set", "extract.timeout_s=-1", "--set", "extract.wokers=2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2
    assert "extract.timeout_s" in p.stderr and "extract.wokers" in p.stderr
    assert not out.exists()


def test_config_from_yaml_with_cli_overrides(tmp_path):
    from core.config import load_config

    y = tmp_path / "c.yaml"
    y.write_text("crawl:\n  per_host_delay_s: 3\nextract:\n  workers: 2\n")
    cfg = load_config(y, ["extract.workers=4", "crawl.allowed_content_types=[text/html]"])
    assert cfg.crawl.per_host_delay_s == 3 and cfg.extract.workers == 4
    assert cfg.crawl.allowed_content_types == ["text/html"] and cfg.extract.timeout_s == 30


def test_refinery_run_on_the_bundled_sample(prefect_api, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run(REFINERY + ["run", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       env=_env(prefect_api), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout)
    # the crawl demo: every bundled page fetched from the loopback server, the robots-disallowed one not
    log = pq.read_table(out / "crawl" / "crawl_log.parquet").to_pylist()
    outcomes = {r["outcome"] for r in log}
    assert outcomes == {"fetched", "robots"} and result["crawl"]["fetched"] > 30
    warcs = sorted((out / "crawl" / "warc").glob("*.warc.gz"))
    assert warcs and not list((out / "crawl" / "warc").glob("*.open"))
    responses = sum(1 for w in warcs for _ in ArchiveIterator(str(w), record_types=WarcRecordType.response, fsspec_args=False))
    assert responses == result["crawl"]["fetched"]
    # extraction: every page record accounted for, the truncated WARC's damage counted
    docs = sum(pq.read_metadata(f).num_rows for f in (out / "extract" / "docs").glob("*.parquet"))
    rej = sum(pq.read_metadata(f).num_rows for f in (out / "extract" / "rejected").glob("*.parquet"))
    ex = result["extract"]
    assert docs == ex["docs"] > 80 and rej == ex["rejected"] and ex["pages"] == docs + rej
    assert ex["rejected_by_reason"]["truncated payload"] == 1

    # curation ran on the extracted documents: funnel, models, and the scorer on a user's own JSONL
    cur = out / "curate"
    funnel = json.loads((cur / "funnel.json").read_text())
    assert funnel["extracted"]["docs"] == docs and result["curate"]["kept"]["docs"] == funnel["kept"]["docs"]
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "The committee approved the annual budget after a long debate.",
                                 "id": 1}) + "\n" + json.dumps({"text": "click here buy now cheap!!!", "id": 2}) + "\n")
    for kind in ("quality", "toxicity"):
        scored = tmp_path / f"{kind}.parquet"
        model = cur / "models" / ("quality.npz" if kind == "quality" else "toxicity.bin")
        p = subprocess.run(REFINERY + ["score", kind, "--model", str(model),
                                       "--input", str(texts), "--out", str(scored)],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        rows = pq.read_table(scored).to_pylist()
        assert [r["id"] for r in rows] == [1, 2] and all(0 <= r[f"{kind}_score"] <= 1 for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"no_text": 1}\n')
    p = subprocess.run(REFINERY + ["score", "quality", "--model", str(cur / "models" / "quality.npz"),
                                   "--input", str(bad), "--out", str(tmp_path / "x.parquet")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and "bad.jsonl:1" in p.stderr

    # sharding ran on the kept documents: a manifest whose files hold every kept document once
    sh = out / "shard"
    m = json.loads((sh / "manifest.json").read_text())
    kept = set(pq.read_table(cur / "docs", columns=["id"])["id"].to_pylist())
    ids = [i for s in ("train", "val") for f in m["splits"][s]["files"]
           for i in pq.read_table(sh / f["path"], columns=["doc_id"])["doc_id"].to_pylist()]
    assert sorted(ids) == sorted(kept) and m["totals"]["docs"] == len(kept) == result["shard"]["train"]["docs"] + 1
    assert (sh / "tokenizer" / "tokenizer_config.json").is_file()

    # training ran on those shards: a tiny decoder whose loss fell, exported, and it generates
    tr = result["train"]
    # first and final loss are means over 10 steps; validation at step 0 is the untrained model
    assert tr["arch"] == "decoder" and tr["steps"] == 40 and tr["final_loss"] < tr["first_loss"] - 0.5, tr
    assert tr["val_loss"] < tr["val_loss_start"] - 0.3, tr
    assert (out / "train" / "loss.png").is_file() and (Path(tr["export"]) / "model.safetensors").is_file()
    p = subprocess.run(REFINERY + ["generate", tr["export"], "--prompt", "The", "--max-new-tokens", "5"],
                       capture_output=True, text=True, cwd=ROOT, env=_env(prefect_api), timeout=300)
    assert p.returncode == 0 and p.stdout.startswith("The"), p.stderr[-2000:]

    # `refinery shard` on its own, with a user tokenizer; a missing input is a clear error
    p = subprocess.run(REFINERY + ["shard", str(cur), "--out", str(tmp_path / "sh2"), "--tokenizer",
                                   str(sh / "tokenizer")], capture_output=True, text=True, cwd=ROOT,
                       env=_env(prefect_api), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "sh2" / "manifest.json").read_text())["tokenizer"]["sha256"] == m["tokenizer"]["sha256"]
    p = subprocess.run(REFINERY + ["shard", str(tmp_path / "nothing"), "--out", str(tmp_path / "sh3")],
                       capture_output=True, text=True, cwd=ROOT, env=_env(prefect_api), timeout=300)
    assert p.returncode == 2 and "no curated documents" in p.stderr


def test_plan_prints_the_chinchilla_pairing_and_memory():
    p = subprocess.run(REFINERY + ["plan", "--params", "1.2e9", "--gpus", "8", "--gpu", "H100", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    plan = json.loads(p.stdout)
    assert plan["tokens"] == 2.4e10 and plan["flops"] == 6 * 1.2e9 * 2.4e10 and plan["fits"]
    assert plan["crawl"]["raw_tokens"] == 2.4e10 / 0.02
    # unset flags plan what `refinery train` would run: the effective config's train section
    assert (plan["seq_len"], plan["micro_batch"], plan["precision"]) == (256, 8, "32-true"), plan
    p = subprocess.run(REFINERY + ["plan", "--params", "1.2e9", "--json", "--set", "train.seq_len=2048",
                                   "--set", "train.precision=bf16-mixed", "--micro-batch", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    plan = json.loads(p.stdout)
    assert (plan["seq_len"], plan["micro_batch"], plan["precision"], plan["gpus"]) == (2048, 2, "bf16-mixed", 1)
    p = subprocess.run(REFINERY + ["plan", "--params", "7e9", "--gpu", "A100"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "does not fit" in p.stdout and "GiB per device" in p.stdout, p.stdout
