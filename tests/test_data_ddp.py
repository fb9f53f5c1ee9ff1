"""ShardDataModule under a real 2-process gloo group (plain torch.distributed, then Lightning's
ddp_fork): each rank takes its rank and world size from the process group; the ranks' tokens
are disjoint and together every token. The processes run in tests/ddp_data_worker.py, launched
as a subprocess (Lightning's launchers must not re-run pytest)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from models.data import IGNORE
from test_data import FIRST_ID, make_dataset

WORKER = Path(__file__).resolve().parent / "ddp_data_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seen(npz, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(label ids, all ids) of one rank: labels are unique per token; inputs add stream starts."""
    x, y = npz[f"{split}_input_ids"].reshape(-1), npz[f"{split}_labels"].reshape(-1)
    labels = y[y >= FIRST_ID]
    return labels, np.union1d(labels, x[x >= FIRST_ID])


def test_two_gloo_ranks_see_disjoint_tokens_covering_everything(tmp_path):
    docs = make_dataset(tmp_path / "data", files={"train": 4, "val": 2}, seed=5)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "data"), str(out), str(free_port()),
                        str(free_port())], capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    everything = {s: np.sort(np.concatenate(docs[s])).astype(np.int64) for s in ("train", "val")}
    for run in ("plain", "lightning"):
        ranks = [np.load(out / f"{run}-rank{r}.npz") for r in range(2)]
        for split in ("train", "val"):
            (lab0, ids0), (lab1, ids1) = seen(ranks[0], split), seen(ranks[1], split)
            assert len(ids0) and len(ids1), (run, split)               # both ranks got work
            for lab in (lab0, lab1):
                assert len(lab) == len(np.unique(lab)), (run, split)   # no token twice on a rank
            assert not np.intersect1d(ids0, ids1).size, (run, split)   # nor on both ranks
            union = np.union1d(ids0, ids1)
            assert set(union) <= set(everything[split])
            if run == "plain" or split == "val":
                assert np.array_equal(union, everything[split]), (run, split)  # every token
        if run == "lightning":  # DDP training: the ranks stepped in lockstep, each dropping at most a batch
            n = [int(r["train_batches"]) for r in ranks]
            assert n[0] == n[1] > 0, n
            union = np.union1d(seen(ranks[0], "train")[1], seen(ranks[1], "train")[1])
            assert len(everything["train"]) - len(union) < 2 * 4 * 32
        for r in ranks:
            assert (r["train_labels"][r["train_labels"] != IGNORE] >= 0).all()
