"""ShardDataModule (models/data.py): packing, masking, span corruption, sharding across ranks and
workers, determinism, exact resume, and refusal of damaged shards.

Most fixtures use synthetic ids that are unique across the whole corpus (uint32 vocabulary):
then "which tokens did this rank see" is a set question, and any duplicate or loss shows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import IGNORE, ShardDataModule, cut_even, random_spans_noise_mask, round_robin
from core.io import file_sha256
from core.shard_format import FORMAT, ShardError, write_shard

EOS, PAD, MASK = 0, 1, 2
SENTINELS = list(range(3, 103))
FIRST_ID = 1000                    # synthetic document ids start here: never special


def write_manifest(root: Path, files: dict[str, list[dict]], vocab_size: int, special: dict | None = None,
                   sentinels: list[int] | None = None) -> dict:
    tok = root / "tokenizer" / "tokenizer.json"
    if not tok.exists():
        tok.parent.mkdir(parents=True, exist_ok=True)
        tok.write_text('{"synthetic": true}')
    splits = {s: {"docs": sum(f["rows"] for f in fl), "tokens": sum(f["tokens"] for f in fl), "files": fl}
              for s, fl in files.items()}
    manifest = {"format": FORMAT,
                "tokenizer": {"dir": "tokenizer", "sha256": file_sha256(tok), "vocab_size": vocab_size,
                              "dtype": "uint16" if vocab_size <= 1 << 16 else "uint32",
                              "special_ids": special or {"eos": EOS, "pad": PAD, "mask": MASK},
                              "sentinel_ids": SENTINELS if sentinels is None else sentinels},
                "source": {"inputs": [], "sha256": ""}, "config": {}, "splits": splits,
                "totals": {k: sum(s[k] for s in splits.values()) for k in ("docs", "tokens")}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def make_dataset(root: Path, files: dict[str, int] | None = None, docs_per_file=(15, 40), max_len=300,
                 row_group_tokens=900, seed=0) -> dict[str, list[np.ndarray]]:
    """Shards of documents whose token ids are unique corpus-wide; returns the docs per split."""
    rng = np.random.default_rng(seed)
    nxt, out, entries = FIRST_ID, {}, {}
    for split, n_files in (files or {"train": 3, "val": 2}).items():
        out[split], entries[split] = [], []
        for i in range(n_files):
            docs = []
            for _ in range(int(rng.integers(*docs_per_file))):
                n = int(rng.integers(1, max_len))
                docs.append(np.arange(nxt, nxt + n, dtype=np.uint32))
                nxt += n
            out[split] += docs
            entries[split].append(write_shard([f"{split}{i}-{k}" for k in range(len(docs))], docs, 1 << 20,
                                              root / split / f"{i:03d}.parquet", root, row_group_tokens))
    write_manifest(root, entries, 1 << 20)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict[str, list[np.ndarray]]]:
    root = tmp_path_factory.mktemp("shards")
    return root, make_dataset(root)


def collect(loader) -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy().copy() for k, v in b.items()} for b in loader]


def ids_seen(batches) -> np.ndarray:
    """Every non-special id seen, each as often as it is a label (causal windows overlap by one
    token, so inputs repeat the previous row's last label), plus the ids that are inputs only:
    the first token of each stream."""
    x = np.concatenate([b["input_ids"].reshape(-1) for b in batches])
    y = np.concatenate([b["labels"].reshape(-1) for b in batches])
    labels = y[y >= FIRST_ID]
    firsts = np.setdiff1d(x[x >= FIRST_ID], labels)
    return np.concatenate([labels, firsts])


def all_ids(docs) -> np.ndarray:
    return np.sort(np.concatenate(docs)).astype(np.int64)


def dm_for(root, **kw) -> ShardDataModule:
    kw.setdefault("seq_len", 32)
    kw.setdefault("batch_size", 4)
    dm = ShardDataModule(root, **kw)
    dm.setup()
    return dm


# ---------------------------------------------------------------------------------------------- planning

def test_cut_even_and_round_robin():
    pieces = [(0, 0, 10), (1, 0, 3), (2, 5, 12)]
    streams = cut_even(pieces, 3)
    assert [sum(b - a for _, a, b in s) for s in streams] == [6, 7, 7]
    assert streams == [[(0, 0, 6)], [(0, 6, 10), (1, 0, 3)], [(2, 5, 12)]]
    assert cut_even([(0, 0, 2)], 4) == [[], [(0, 0, 1)], [], [(0, 1, 2)]]
    # workers with 3, 1, 2 batches: order 0 1 2 0 2 0 -> after 4 batches: produced 2,1,1; next is 2
    assert round_robin([3, 1, 2], 4) == ([2, 1, 1], 2)
    assert round_robin([3, 1, 2], 5) == ([2, 1, 2], 0)
    assert round_robin([3, 1, 2], 6)[0] == [3, 1, 2]


class _Tagged(torch.utils.data.IterableDataset):
    """Worker p plays logical stream (rotation + p) % W and yields its `left` tags."""
    def __init__(self, plan):
        self.plan = plan

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = (self.plan.rotation + info.id) % info.num_workers
        for j in range(self.plan.left[w]):
            yield j, (w, self.plan.first[w] + j)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_torch_serves_workers_round_robin_skipping_exhausted():
    """What exact resume relies on: torch's order of batches from IterableDataset workers."""
    from models.data import Plan, _expected_order

    plan = Plan([[]] * 3, [0, 1, 2], first=[4, 0, 7], left=[5, 1, 3], rotation=1, length=9, done=0, segment=0,
                segments=[])
    loader = torch.utils.data.DataLoader(_Tagged(plan), batch_size=None, num_workers=3)
    assert [tuple(t) for _, t in loader] == list(_expected_order(plan)) == [
        (1, 0), (2, 7), (0, 4), (2, 8), (0, 5), (2, 9), (0, 6), (0, 7), (0, 8)]


# ---------------------------------------------------------------------------------------------- causal

def test_causal_packing_is_the_document_stream(data):
    root, docs = data
    dm = dm_for(root, seq_len=32, batch_size=4)
    batches = collect(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader())
    for b in batches[:-1]:
        assert b["input_ids"].shape == b["labels"].shape == (4, 32)
        assert (b["labels"] != IGNORE).all()              # padding only in the very last batch
    for b in batches:
        x, y = b["input_ids"], b["labels"]
        assert x.dtype == y.dtype == np.int64
        ok = y[:, :-1] != IGNORE
        assert (x[:, 1:][ok] == y[:, :-1][ok]).all()      # labels are the inputs shifted by one
        assert (x[1:, 0] == y[:-1, -1]).all()             # consecutive rows continue the stream
    # one worker, one rank: the stream is the first input followed by every label
    stream = np.concatenate([batches[0]["input_ids"][0, :1]] + [b["labels"][b["labels"] != IGNORE] for b in batches])
    assert stream[-1] == EOS
    cuts = np.flatnonzero(stream == EOS)
    got = sorted(map(tuple, np.split(stream, cuts + 1)[:-1]))
    assert got == sorted(tuple(d.tolist()) + (EOS,) for d in docs["train"])  # each doc whole, then EOS
    last = batches[-1]
    tail = last["labels"].reshape(-1)
    n_real = int((tail != IGNORE).sum())
    assert (tail[n_real:] == IGNORE).all() and (last["input_ids"].reshape(-1)[n_real + 1:] == PAD).all()


def test_val_is_unshuffled_and_complete(data):
    root, docs = data
    dm = dm_for(root, seq_len=16, batch_size=3)
    batches = collect(dm.val_dataloader())
    stream = np.concatenate([batches[0]["input_ids"][0, :1]] + [b["labels"][b["labels"] != IGNORE] for b in batches])
    expect = np.concatenate([np.append(d, EOS) for d in docs["val"]])
    assert np.array_equal(stream, expect)                 # manifest order, no shuffle
    assert collect(dm.val_dataloader())[0]["input_ids"].tolist() == batches[0]["input_ids"].tolist()


# ---------------------------------------------------------------------------------------------- mlm / span

def test_mlm_masks_at_the_target_rate_and_never_specials(data):
    root, docs = data
    dm = dm_for(root, objective="mlm", seq_len=64, batch_size=8, mlm_probability=0.15)
    batches = collect(dm.train_dataloader())
    x = np.concatenate([b["input_ids"].reshape(-1) for b in batches])
    y = np.concatenate([b["labels"].reshape(-1) for b in batches])
    att = np.concatenate([b["attention_mask"].reshape(-1) for b in batches])
    original = np.where(y != IGNORE, y, x)
    real = original[att == 1]
    assert sorted(real[real >= FIRST_ID]) == all_ids(docs["train"]).tolist()   # nothing lost or repeated
    assert (original[att == 0] == PAD).all()
    chosen = y != IGNORE
    assert not np.isin(y[chosen], [EOS, PAD, MASK, *SENTINELS]).any()          # specials never masked
    rate = chosen.sum() / ((original >= FIRST_ID) & (att == 1)).sum()
    assert 0.13 < rate < 0.17, rate
    as_mask = (x[chosen] == MASK).mean()
    kept = (x[chosen] == y[chosen]).mean()
    assert 0.76 < as_mask < 0.84 and 0.07 < kept < 0.13, (as_mask, kept)
    assert (x[chosen & (x != MASK) & (x != y)] >= 103).all()                   # random tokens are not special


def test_t5_noise_mask_statistics():
    rng = np.random.default_rng(0)
    masks = [random_spans_noise_mask(114, 0.15, 3.0, rng) for _ in range(200)]
    for m in masks:
        assert not m[0] and m[-1]                          # starts with non-noise, ends with noise
        assert m.sum() == 17                               # round(114 * 0.15)
    spans = [np.sum(np.diff(m.astype(int)) == 1) for m in masks]
    assert set(spans) == {6}                               # round(17 / 3)


def test_span_corruption_reconstructs_the_stream(data):
    root, docs = data
    dm = dm_for(root, objective="span", seq_len=48, batch_size=4, noise_density=0.15, mean_span_length=3.0)
    batches = collect(dm.train_dataloader())
    sentinel = set(SENTINELS)
    stream, noise, total, spans = [], 0, 0, 0
    for b in batches:
        assert b["input_ids"].shape[1] == 48 and b["labels"].shape[1] == dm.target_len
        for x, att, y in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            x, y = x[att == 1], y[y != IGNORE]
            assert x[-1] == EOS and y[-1] == EOS and (b["input_ids"][0][att == 0] == PAD).all()
            # targets: <s_i> span_i ... EOS; put each span back where its sentinel is in the inputs
            fill, cur = {}, None
            for t in y[:-1]:
                if t in sentinel:
                    cur = int(t)
                    fill[cur] = []
                else:
                    fill[cur].append(int(t))
            assert list(fill) == SENTINELS[:len(fill)]     # sentinels in order, one per span
            row = []
            for t in x[:-1]:
                row += fill.pop(int(t)) if t in sentinel else [int(t)]
            assert not fill
            stream += row
            noise += len(y) - 1 - len([t for t in y if t in sentinel])
            total += len(row)
            spans += len([t for t in y if t in sentinel])
    stream = np.array(stream)
    assert sorted(stream[stream >= FIRST_ID]) == all_ids(docs["train"]).tolist()
    assert (stream == EOS).sum() == len(docs["train"])
    assert 0.13 < noise / total < 0.17 and 2.5 < noise / spans < 3.5


def test_objectives_need_their_special_tokens(tmp_path):
    docs = [np.arange(FIRST_ID, FIRST_ID + 50, dtype=np.uint16)]
    e = write_shard(["a"], docs, 4096, tmp_path / "train" / "0.parquet", tmp_path, 100)
    write_manifest(tmp_path, {"train": [e], "val": []}, 4096, special={"eos": 0, "pad": 0, "mask": None}, sentinels=[])
    dm_for(tmp_path)                                       # causal needs only EOS
    with pytest.raises(ValueError, match="mask"):
        dm_for(tmp_path, objective="mlm")
    with pytest.raises(ValueError, match="sentinels"):
        dm_for(tmp_path, objective="span")


# ---------------------------------------------------------------------------------------------- ranks, workers

@pytest.mark.parametrize("world,workers", [(2, 0), (2, 2), (1, 2), (3, 1)])
def test_ranks_and_workers_are_disjoint_and_cover_everything(data, world, workers):
    root, docs = data
    seen = []
    for rank in range(world):
        dm = dm_for(root, rank=rank, world_size=world, num_workers=workers, even_batches=False)
        seen.append(ids_seen(collect(dm.train_dataloader())))
    for s in seen:
        assert len(s) == len(np.unique(s))                 # no token twice on one rank
    union = np.concatenate(seen)
    assert sorted(union) == all_ids(docs["train"]).tolist()  # ...nor on two ranks; none missing
    val = [ids_seen(collect(dm_for(root, rank=r, world_size=world, num_workers=workers).val_dataloader()))
           for r in range(world)]
    assert sorted(np.concatenate(val)) == all_ids(docs["val"]).tolist()


def test_even_batches_gives_every_rank_the_same_count(data):
    root, docs = data
    lengths, seen = [], []
    for rank in range(3):
        dm = dm_for(root, rank=rank, world_size=3, num_workers=1)
        loader = dm.train_dataloader()
        batches = collect(loader)
        lengths.append((len(loader), len(batches)))
        seen.append(ids_seen(batches))
    assert len({n for pair in lengths for n in pair}) == 1
    union = np.concatenate(seen)
    assert len(union) == len(np.unique(union))
    assert len(union) >= len(all_ids(docs["train"])) - 3 * 4 * 32  # at most one batch dropped per rank


# ---------------------------------------------------------------------------------------------- determinism

def test_same_seed_same_batches_new_epoch_new_order(data):
    root, _ = data
    a = collect(dm_for(root, seed=3).train_dataloader())
    b = collect(dm_for(root, seed=3).train_dataloader())
    assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b)) and len(a) == len(b)
    dm = dm_for(root, seed=3)
    loader = dm.train_dataloader()
    first, second = collect(loader), collect(loader)     # a finished epoch moves the counter on
    assert loader.epoch == 2
    assert np.array_equal(first[0]["input_ids"], a[0]["input_ids"])
    assert not np.array_equal(second[0]["input_ids"], first[0]["input_ids"])
    assert sorted(ids_seen(second)) == sorted(ids_seen(first))
    unshuffled = dm_for(root, seed=3, shuffle_docs=False).train_dataloader()  # the units' order alone
    e0, e1 = collect(unshuffled), collect(unshuffled)
    assert not np.array_equal(e0[0]["input_ids"], e1[0]["input_ids"])
    assert sorted(ids_seen(e0)) == sorted(ids_seen(e1))
    other = collect(dm_for(root, seed=4).train_dataloader())
    assert not np.array_equal(other[0]["input_ids"], first[0]["input_ids"])


# ---------------------------------------------------------------------------------------------- resume

def equal(a, b) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("objective,workers", [("causal", 0), ("causal", 2), ("mlm", 2), ("span", 0)])
def test_resume_yields_exactly_the_uninterrupted_batches(data, objective, workers):
    root, _ = data
    kw = dict(objective=objective, num_workers=workers, seq_len=48 if objective == "span" else 32)
    ref_loader = dm_for(root, **kw).train_dataloader()
    ref = collect(ref_loader) + collect(ref_loader)        # epochs 0 and 1
    n = len(ref) // 2
    for k in ((1, 5, n - 1, n, n + 3) if workers == 0 else (5, n - 1, n + 3)):
        dm = dm_for(root, **kw)
        it = iter(dm.train_dataloader())
        first = [{kk: v.numpy().copy() for kk, v in next(it).items()} for _ in range(min(k, n))]
        if k > n:                                          # into the second epoch
            it = iter(dm.train_dataloader())
            first += [{kk: v.numpy().copy() for kk, v in next(it).items()} for _ in range(k - n)]
        state = json.loads(json.dumps(dm.state_dict()))    # what a checkpoint keeps
        del it
        resumed = dm_for(root, **kw)
        resumed.load_state_dict(state)
        loader = resumed.train_dataloader()
        rest = collect(loader)
        if k < n:                                          # the rest of epoch 0, then epoch 1
            rest += collect(loader)
        assert equal(first + rest, ref), (objective, workers, k)


def test_resume_twice_and_with_another_worker_count(data):
    root, docs = data
    ref = collect(dm_for(root, num_workers=2).train_dataloader())
    dm = dm_for(root, num_workers=2)
    it = iter(dm.train_dataloader())
    got = [{k: v.numpy().copy() for k, v in next(it).items()} for _ in range(4)]
    state = dm.state_dict()
    dm2 = dm_for(root, num_workers=2)
    dm2.load_state_dict(state)
    it = iter(dm2.train_dataloader())
    got += [{k: v.numpy().copy() for k, v in next(it).items()} for _ in range(6)]
    state = dm2.state_dict()
    assert state["segments"][-1]["batches"] == 10
    dm3 = dm_for(root, num_workers=2)
    dm3.load_state_dict(state)
    assert equal(got + collect(dm3.train_dataloader()), ref)
    # a different layout: the rest of the epoch is every token not yet handed out, once
    dm4 = dm_for(root, num_workers=1, batch_size=3)
    dm4.load_state_dict(state)
    loader = dm4.train_dataloader()
    length = len(loader)
    rest = collect(loader)
    assert length == 10 + len(rest)                        # Lightning counts from the saved position
    labels = np.concatenate([b["labels"].reshape(-1) for b in got + rest])
    labels = labels[labels >= FIRST_ID]
    assert len(labels) == len(np.unique(labels))           # no token predicted twice
    # (the token where the epoch was cut is the last label before and an input after)
    assert np.unique(np.concatenate([ids_seen(got), ids_seen(rest)])).tolist() == all_ids(docs["train"]).tolist()
    assert dm4.state_dict()["epoch"] == 1


def test_resume_refuses_another_seed_or_corpus(data, tmp_path):
    root, _ = data
    dm = dm_for(root)
    next(iter(dm.train_dataloader()))
    state = dm.state_dict()
    with pytest.raises(ValueError, match="seed"):
        dm_for(root, seed=1).load_state_dict(state)
    make_dataset(tmp_path, seed=1)
    with pytest.raises(ValueError, match="data"):
        dm_for(tmp_path).load_state_dict(state)


def test_lightning_checkpoint_resumes_mid_epoch(data, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input_ids"].clone())
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    root, _ = data
    opts = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    full = Recorder()
    L.Trainer(**opts, default_root_dir=tmp_path,
              callbacks=[ModelCheckpoint(tmp_path / "ck", every_n_train_steps=7, save_top_k=-1)]
              ).fit(full, datamodule=ShardDataModule(root, seq_len=32, batch_size=4, num_workers=2))
    n = len(full.seen) // 2
    ckpt = next(p for p in (tmp_path / "ck").iterdir() if "step=7." in p.name)
    resumed = Recorder()
    L.Trainer(**opts, default_root_dir=tmp_path).fit(
        resumed, datamodule=ShardDataModule(root, seq_len=32, batch_size=4, num_workers=2), ckpt_path=ckpt)
    assert len(resumed.seen) == 2 * n - 7
    assert all(torch.equal(a, b) for a, b in zip(resumed.seen, full.seen[7:]))
    assert not torch.equal(full.seen[0], full.seen[n])     # epoch 1 was reshuffled


# ---------------------------------------------------------------------------------------------- damaged shards

@pytest.mark.parametrize("damage", ["truncate", "flip", "missing", "manifest"])
def test_damaged_shards_fail_setup_naming_the_file(tmp_path, damage):
    make_dataset(tmp_path, files={"train": 2, "val": 1})
    victim = tmp_path / "train" / "001.parquet"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-100])
    elif damage == "flip":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    elif damage == "missing":
        victim.unlink()
    else:
        victim = tmp_path / "manifest.json"
        victim.unlink()
    with pytest.raises(ShardError, match=str(victim)):
        dm_for(tmp_path)
    if damage == "flip":                                   # same size: only the hash catches it
        dm_for(tmp_path, verify="size")


# ---------------------------------------------------------------------------------------------- real text

def test_real_text_through_a_byte_level_bpe(tmp_path, sample_dir):
    """Shards of real pages tokenized by a ByteLevel BPE with the project's special tokens: the
    causal batches decode back to the pages, separated by <|endoftext|>."""
    from tokenizers import Tokenizer

    from tasks.tokenizer import save_hf, special_tokens, train_bpe

    pages = sorted((sample_dir / "curation" / "reference" / "inaugural").glob("*.txt"))[:6]
    texts = [p.read_text(encoding="utf-8") for p in pages]
    tok = train_bpe(texts, 600, 2, n_sentinels=4)
    save_hf(tok, tmp_path / "tokenizer", 4)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer" / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in special_tokens(4)}
    docs = [np.array(e.ids, np.uint16) for e in tok.encode_batch(texts, add_special_tokens=False)]
    e = write_shard([p.name for p in pages], docs, tok.get_vocab_size(), tmp_path / "train" / "0.parquet",
                    tmp_path, 2000)
    write_manifest(tmp_path, {"train": [e], "val": []}, tok.get_vocab_size(),
                   special={"eos": ids["<|endoftext|>"], "pad": ids["<|pad|>"], "mask": ids["<|mask|>"]},
                   sentinels=[ids[f"<extra_id_{i}>"] for i in range(4)])
    dm = dm_for(tmp_path, seq_len=128, batch_size=4, shuffle_docs=False)
    batches = collect(dm.train_dataloader())
    stream = [int(batches[0]["input_ids"][0, 0])] + [int(t) for b in batches for t in b["labels"].reshape(-1)
                                                     if t != IGNORE]
    text = tok.decode(stream, skip_special_tokens=False)
    # units (row groups) are shuffled by the epoch; the pages inside each stay whole and separated
    assert sorted(t for t in text.split("<|endoftext|>") if t) == sorted(texts)
    mlm = collect(dm_for(tmp_path, objective="mlm", seq_len=128, batch_size=4).train_dataloader())
    assert any((b["input_ids"] == ids["<|mask|>"]).any() for b in mlm)
