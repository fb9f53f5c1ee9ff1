"""Killed runs: `refinery run` SIGKILLed mid-extraction, mid-dedup, mid-sharding and mid-training,
rerun each time in the same folder, ends byte-identical to a run nobody killed.

One out folder is driven through the whole chain (each rerun is killed at the next point), while an
uninterrupted reference run goes on beside it (its own folder and result cache): the two share no
state but the Prefect API. The crawl's own resume after SIGKILL is tests/test_crawler.py's
test_resume_after_sigkill. Kill points: core/faults.py (REFINERY_KILL_AT).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
REFINERY = [sys.executable, "-m", "flows.cli", "run", "--no-crawl-demo"]
# a short training run with checkpoints every 2 steps, so a kill after step 3 resumes from step 2; and a
# per-page deadline no page reaches even on a starved CPU (the reference runs at low priority): a page
# past the 30 s default is rejected as `timeout`, which would make the two runs differ by load, not by kill
SETTINGS = ["train.max_steps=6", "train.seq_len=128", "train.checkpoint_every=2", "train.val_every=2",
            "extract.timeout_s=600"]
CACHE_LINE = re.compile(r"- ([\w-]+): (\d+) task runs, (\d+) from cache, (\d+) computed")
DATA = ["extract/docs", "extract/rejected", "curate/docs", "curate/rejected",
        "shard/train", "shard/val", "shard/tokenizer"]


def test_exclusive_dir_sweeps_temporaries_and_refuses_a_second_writer(tmp_path):
    from core.io import DirectoryBusy, atomic_path, exclusive_dir

    d = tmp_path / "out"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / ".tmp-1234abcd-docs.parquet").write_bytes(b"half")   # what a killed writer leaves
    (d / "keep.parquet").write_bytes(b"done")
    with exclusive_dir(d):
        assert sorted(p.name for p in d.rglob("*") if p.is_file()) == ["keep.parquet"]
        with atomic_path(d / "new.txt") as tmp:
            tmp.write_text("x")
            # a second writer (here: another open of the folder) fails at once, deleting nothing
            with pytest.raises(DirectoryBusy, match="another run is writing"):
                with exclusive_dir(d):
                    pass
            assert tmp.exists()
    with exclusive_dir(d):                                                   # released on exit
        assert (d / "new.txt").read_text() == "x"


def test_a_checkpoint_cut_short_is_replaced_by_the_newest_complete_one(tmp_path):
    import zipfile

    from flows.train import restore_last_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("step=2.ckpt", "step=4.ckpt"):
        with zipfile.ZipFile(ckpts / name, "w") as z:     # torch.save writes a zip, its directory last
            z.writestr("data.pkl", name * 100)
    whole = (ckpts / "step=4.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(whole[: len(whole) // 2])     # killed while being copied into place
    (ckpts / "step=4.ckpt").write_bytes(whole[:-30])
    assert restore_last_checkpoint(tmp_path)
    assert (ckpts / "last.ckpt").read_bytes() == (ckpts / "step=2.ckpt").read_bytes()
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".")] == []
    for p in ckpts.glob("step=*"):
        p.unlink()
    (ckpts / "last.ckpt").write_bytes(whole[:100])
    assert not restore_last_checkpoint(tmp_path) and not (ckpts / "last.ckpt").exists()   # starts over


def _compare_tokenizer(path: Path) -> Path:
    """A small general tokenizer for the shard report: the default one is trained on the bundled
    English (~10 s per run), which this test does not need to pay twice."""
    from tasks.tokenizer import train_bpe

    text = (ROOT / "sample" / "curation" / "reference").rglob("*.txt")
    lines = [ln for f in sorted(text)[:1] for ln in f.read_text(errors="replace").splitlines()[:400] if ln.strip()]
    train_bpe(lines, 600, 2, 8).save(str(path))
    return path


def _processes_with(marker: str) -> list[str]:
    """Live processes started by our runs (they inherit the marker in their environment)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except OSError:
            pass
    return found


def _cache_counts(stderr: str) -> dict[str, tuple[int, int]]:
    """{task name: (from cache, computed)} from the lines flows/caching.map_shards logs."""
    return {m[1]: (int(m[3]), int(m[4])) for m in CACHE_LINE.finditer(stderr)}


def _temporaries(out: Path) -> list[str]:
    """Anything a writer leaves while at work: hidden temporaries, spill folders, open WARCs."""
    return [str(p.relative_to(out)) for p in out.rglob("*")
            if p.name.startswith(".") or ".tmp" in p.name or "spill" in p.name or p.name.endswith(".open")]


def _tree_bytes(root: Path, rel: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / rel).rglob("*")) if p.is_file()}


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = map(json.loads, (run / "train" / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _ids(files, column: str = "id") -> list[str]:
    return [i for f in files for i in pq.read_table(f, columns=[column])[column].to_pylist()]


def test_sigkilled_runs_rerun_to_the_uninterrupted_result(prefect_api, tmp_path):
    t0 = time.monotonic()
    cmp_tok = _compare_tokenizer(tmp_path / "compare-tokenizer.json")
    sets = [x for s in SETTINGS + [f"shard.compare_tokenizer={cmp_tok}"] for x in ("--set", s)]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("REFINERY_KILL_AT", None)
    ref, out = tmp_path / "ref", tmp_path / "chain"

    def start(folder: Path, home: str, marker: str, kill: str | None = None, nice: tuple = ()):
        e = {**env, "PREFECT_HOME": str(tmp_path / home), "REFINERY_TEST_MARKER": marker,
             **({"REFINERY_KILL_AT": kill} if kill else {})}
        return subprocess.Popen([*nice, *REFINERY, "--out", str(folder), *sets], cwd=ROOT, env=e, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # nobody kills this one; it runs on what CPU the chain leaves idle (the chain is the critical path)
    reference = start(ref, "home-ref", "reference", nice=("nice", "-n", "19"))
    try:
        def run(kill: str | None) -> tuple[subprocess.CompletedProcess, dict]:
            marker = uuid.uuid4().hex   # this run's processes, and their children, carry it
            p = start(out, "home-chain", marker, kill)
            t = time.monotonic()
            stdout, stderr = p.communicate(timeout=400)
            print(f"{kill or 'rerun'}: exit {p.returncode} after {time.monotonic() - t:.0f}s")
            want = -9 if kill else 0
            assert p.returncode == want, f"{kill}: exit {p.returncode}\n{stderr[-4000:]}"
            if kill:
                # nothing outlives the killed run: not its trainer, not its extraction workers
                deadline = time.monotonic() + 15
                while _processes_with(marker) and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert not _processes_with(marker), f"{kill}: orphans {_processes_with(marker)}"
            return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), _cache_counts(stderr)

        # 1. mid-extraction: killed once the first of the 4 input shards is extracted
        _, counts = run("extract-shard:1")
        docs = list((out / "extract" / "docs").glob("*.parquet"))
        assert 1 <= len(docs) < 4 and not (out / "extract" / "extract_summary.json").exists()

        # 2. mid-dedup: the rerun extracts only what was missing, then dies inside the dedup reduce
        _, counts = run("dedup-spill:1")
        cached, computed = counts["extract-shard"]
        assert cached >= 1 and computed >= 1 and cached + computed == 4, counts
        assert list((out / "curate" / "work" / "dedup").glob(".tmp-spill-*/*.bin"))    # it died mid-reduce
        assert not (out / "curate" / "work" / "dedup_drops.parquet").exists()

        # 3. mid-sharding: everything before the reduce comes from cache; killed after one tokenized shard
        _, counts = run("shard-tokenize:1")
        assert counts["extract-shard"] == (4, 0) and counts["curate-filter"] == (4, 0), counts
        assert counts["dedup-reduce"] == (0, 1), counts
        assert list((out / "shard" / "train").glob("*.parquet")) and not (out / "shard" / "manifest.json").exists()

        # 4. mid-training: `refinery run` itself is SIGKILLed after optimizer step 3 (checkpoint at 2)
        p, counts = run("train-step:3")
        for stage in ("extract-shard", "curate-filter", "dedup-reduce", "train-quality", "train-toxicity",
                      "curate-score", "curate-select", "shard-tokenizer"):
            assert counts[stage][1] == 0, (stage, counts)
        assert counts["shard-tokenize"][0] >= 1, counts
        train = out / "train"
        assert (train / "checkpoints" / "step=2.ckpt").exists() and not (train / "result.json").exists()
        killed_losses = [json.loads(r) for r in (train / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in killed_losses) == 3

        # 5. the last rerun completes: every data task from cache, training resumed from step 2
        p, counts = run(None)
        assert all(c[1] == 0 for c in counts.values()) and len(counts) == 9, counts
        assert "resuming from" in p.stderr
        chain_result = json.loads(p.stdout)
        assert json.loads((train / "result.json").read_text())["resumed"] is True
        flow_run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", p.stderr)[1]

        stdout, stderr = reference.communicate(timeout=400)
        assert reference.returncode == 0, stderr[-4000:]
        ref_result = json.loads(stdout)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    # the same documents, shards, tokenizer and manifest, byte for byte
    for rel in DATA:
        assert _tree_bytes(out, rel) == _tree_bytes(ref, rel), rel
    manifest = (out / "shard" / "manifest.json").read_text()
    assert manifest == (ref / "shard" / "manifest.json").read_text().replace(str(ref), str(out))
    assert {k: chain_result[k] for k in ("extract", "curate", "shard")} == \
        {k: ref_result[k] for k in ("extract", "curate", "shard")}
    # training resumed exactly: every step's loss (the replayed step 3 too) as in the uninterrupted run
    assert _losses(out) == _losses(ref) and len(_losses(out)) == 6
    assert [(r["step"], r["loss"]) for r in killed_losses if "loss" in r] == _losses(ref)[:3]
    assert chain_result["train"]["final_loss"] == ref_result["train"]["final_loss"]

    # no document twice: not among the curated documents, not across the shards (extraction keeps the
    # inputs' own duplicates for dedup to find, and its bytes equal the reference's above)
    ids = _ids((out / "curate" / "docs").glob("*.parquet"))
    assert len(ids) == len(set(ids)) > 0
    shard_ids = _ids((f for s in ("train", "val") for f in (out / "shard" / s).glob("*.parquet")), "doc_id")
    assert len(shard_ids) == len(set(shard_ids)) and set(shard_ids) <= set(ids)
    assert not _temporaries(out) and not _temporaries(ref)

    # the cache hits the log showed, as the Prefect API recorded them for the last rerun
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states = [r.state.name for r in runs]
    assert states.count("Cached") == 24 and len(states) == 25, sorted(states)   # all but the resumed training
    print(f"fault chain: {time.monotonic() - t0:.0f}s")
