"""Helper of tests/test_data_ddp.py: real 2-process runs of ShardDataModule on CPU (gloo).

    python tests/ddp_data_worker.py DATA_DIR OUT_DIR PORT_PLAIN PORT_LIGHTNING

1. plain torch.distributed: two processes (torch.multiprocessing, forked) join a gloo group on
   127.0.0.1; each builds the DataModule with no rank given (it reads torch.distributed), iterates
   its train (even_batches=False: everything) and val loaders, and saves what it saw.
2. Lightning: Trainer(strategy="ddp_fork", accelerator="cpu", devices=2) (ddp_spawn's launcher with
   fork as start method, so the ranks need not import lightning again), one epoch of a trivial
   module that records its train and val batches (train with even_batches: equal counts per rank,
   which DDP's gradient all-reduce needs).
Outputs: OUT_DIR/{plain,lightning}-rank{r}.npz with train_input_ids, train_labels, val_input_ids,
val_labels (rows of every batch, concatenated) and train_batches.
It runs as its own process, not inside pytest: Lightning's DDP launchers re-run the main module.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.data import ShardDataModule  # noqa: E402

SEQ_LEN, BATCH, WORKERS = 32, 4, 1


def save(path: Path, train: list[dict], val: list[dict]) -> None:
    def cat(batches, key):
        return np.concatenate([b[key].numpy() for b in batches]) if batches else np.zeros((0, SEQ_LEN), np.int64)

    np.savez(path, train_input_ids=cat(train, "input_ids"), train_labels=cat(train, "labels"),
             val_input_ids=cat(val, "input_ids"), val_labels=cat(val, "labels"), train_batches=len(train))


def plain(rank: int, world: int, data: str, out: str, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dm = ShardDataModule(data, SEQ_LEN, BATCH, num_workers=WORKERS, even_batches=False)
        dm.setup("fit")
        assert dm.dist() == (rank, world)
        save(Path(out) / f"plain-rank{rank}.npz", list(dm.train_dataloader()), list(dm.val_dataloader()))
        dist.barrier()
    finally:
        dist.destroy_process_group()


class Recorder(L.LightningModule):
    def __init__(self, out: str):
        super().__init__()
        self.out = out
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.train_seen, self.val_seen = [], []

    def training_step(self, batch, batch_idx):
        self.train_seen.append({k: v.detach().clone() for k, v in batch.items()})
        return (self.w * batch["input_ids"].float().mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.val_seen.append({k: v.detach().clone() for k, v in batch.items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_fit_end(self):
        save(Path(self.out) / f"lightning-rank{self.global_rank}.npz", self.train_seen, self.val_seen)


def main() -> None:
    data, out, port_plain, port_lightning = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    # fork, not spawn: the children inherit the imports (importing lightning takes ~9 s here)
    torch.multiprocessing.start_processes(plain, args=(2, data, out, port_plain), nprocs=2, start_method="fork")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port_lightning)
    trainer = L.Trainer(strategy="ddp_fork", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0)
    trainer.fit(Recorder(out), datamodule=ShardDataModule(data, SEQ_LEN, BATCH, num_workers=WORKERS))


if __name__ == "__main__":
    main()
