"""Token batches for training, streamed from the shards `refinery shard` writes.

One file, read top to bottom (in the spirit of nanoGPT's model.py):

    1. the shard directory  -> a table of *units*: one (file, Parquet row group), ~row_group_tokens tokens
    2. an epoch's *plan*    -> the units in an order shuffled by (seed, epoch), cut into S equal-token
                               *streams*, S = world_size * max(1, num_workers); stream g = rank * W + worker
    3. a stream             -> the documents of its units with EOS after each (documents shuffled inside a
                               unit, deterministically), one flat numpy buffer; whole batches are sliced
                               from it in the worker (no per-token Python, no collate in the main process)
    4. the objective        -> causal (packed, shifted), mlm (BERT 80/10/10) or span (T5 span corruption)
    5. ShardLoader          -> what Lightning iterates: one torch DataLoader per epoch, counts the batches
                               it hands out, and is the DataModule's checkpointable state
    6. ShardDataModule      -> setup() checks the manifest and every file's size/sha256 before training

Coverage. Streams are disjoint token ranges of the epoch's order and together are every token, so no
two ranks or workers ever see the same token. Each stream is cut into sequences on its own; only
the last sequence of a stream can be partial (padded with pad id, label -100), and only the last
batch of a stream can hold fewer than batch_size rows. The split into streams is by equal token
count (cut points may fall inside a row group: the two neighbours then each read that group and
keep their part), not by striding whole row groups: with equal streams every rank has the same
number of batches give or take one, which DDP needs (it deadlocks when one rank runs out early).
`even_batches=True` (the default for train) trims every rank to the smallest rank's count: at most
a few tail batches per epoch are skipped, different ones each epoch since the order is reshuffled.

Resume. The state is tiny: {epoch, batches handed out in this epoch, the layout they were handed
out under}. Everything else is recomputed, identically on every rank, from the manifest: how many
batches each stream has, which stream a torch DataLoader serves each batch from (round-robin over
workers, skipping exhausted ones), hence where every stream stands. A resumed run seeks each stream
to its position (unit + token offset: the units before it are not read) and rotates the worker
order so the first batch comes from the right worker. Guarantees:
  * same world_size, num_workers, batch_size, seq_len, objective: the resumed run yields exactly the
    batches the uninterrupted run would have (same tensors, same masks, same order), any number of
    times over. Each loader checks at run time that every batch comes from the stream it expects.
  * any of those changed: the rest of the epoch is every token not yet handed out, re-cut over the
    new layout (batches differ from an uninterrupted run; no token is predicted twice or skipped;
    the first token of each new stream is an input only, as at any stream start).
  * seed or the shard set changed: refused (ValueError), the saved positions mean nothing then.
The state is the same on every rank (DDP steps in lockstep), so rank 0's checkpoint suffices.
"Handed out" counts batches the loader yielded; Lightning asks for the next batch only when it is
about to train on it because the loader has a length (no look-ahead prefetch), so the count in a
checkpoint is exactly the batches trained on.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.shard_format import Manifest, ShardError, load_manifest, verify as verify_shards

IGNORE = -100                      # label of positions without a loss (torch's cross_entropy default)
OBJECTIVES = ("causal", "mlm", "span")
STATE_FORMAT = "refinery-loader/1"
TRAIN_SALT, VAL_SALT = 0, 1        # keeps train and val random streams apart


# ----------------------------------------------------------------------------------------------
# 1. units: one (file, row group); its token count includes the EOS packing adds after each doc

@dataclass
class Units:
    paths: list[str]               # absolute shard paths of one split
    file: np.ndarray               # unit -> index into paths
    group: np.ndarray              # unit -> row group in that file
    length: np.ndarray             # unit -> tokens + docs (one EOS each)
    fingerprint: str               # identifies the shard set (resume refuses another one)


def load_units(root: Path, manifest: Manifest, split: str) -> Units:
    """Read the `n_tokens` column of every file (4 bytes per document) to size every row group.
    Cheap next to training, and it lets every rank plan the epoch without reading tokens."""
    files = manifest.split(split).files
    paths, ufile, ugroup, ulen = [], [], [], []
    for fi, f in enumerate(files):
        path = root / f.path
        try:
            pf = pq.ParquetFile(path)
            lens = [pf.read_row_group(g, columns=["n_tokens"]).column(0).to_numpy()
                    for g in range(pf.num_row_groups)]
        except Exception as e:  # noqa: BLE001 - unreadable is one finding, whatever pyarrow calls it
            raise ShardError(f"{path}: cannot read the n_tokens column ({e})") from None
        rows = [len(x) for x in lens]
        if [r for r in rows if r] != [r for r in (f.row_groups or rows) if r]:
            raise ShardError(f"{path}: row groups {rows}, manifest says {f.row_groups}")
        paths.append(str(path))
        for g, x in enumerate(lens):
            if len(x):             # an empty split is written as one empty group: nothing to read
                ufile.append(fi), ugroup.append(g), ulen.append(int(x.sum()) + len(x))
    h = hashlib.sha256(json.dumps([(f.path, f.sha256) for f in files]).encode()).hexdigest()[:16]
    return Units(paths, np.array(ufile, np.int64), np.array(ugroup, np.int64), np.array(ulen, np.int64), h)


# ----------------------------------------------------------------------------------------------
# 2. plans: a piece is (unit, start, end), a token range of the unit's EOS-separated stream

def cut_even(pieces: list[tuple[int, int, int]], n: int) -> list[list[tuple[int, int, int]]]:
    """Cut a list of pieces into n consecutive lists of equal token count (+-1)."""
    total = sum(b - a for _, a, b in pieces)
    bounds = [total * (g + 1) // n for g in range(n)]
    out, cur, pos, g = [[] for _ in range(n)], 0, 0, 0
    for u, a, b in pieces:
        while a < b:
            while g < n - 1 and pos >= bounds[g]:
                g += 1
            take = min(b - a, bounds[g] - pos)
            if take == 0:          # only when a bound equals pos on the last list (total reached)
                break
            out[g].append((u, a, a + take))
            a, pos = a + take, pos + take
    return out


def skip_tokens(pieces: list[tuple[int, int, int]], n: int) -> list[tuple[int, int, int]]:
    """The pieces left after dropping the first n tokens (a seek: nothing is read)."""
    out = []
    for u, a, b in pieces:
        if n >= b - a:
            n -= b - a
            continue
        out.append((u, a + n, b))
        n = 0
    return out


def round_robin(totals: list[int], k: int) -> tuple[list[int], int]:
    """A torch DataLoader with W workers serves batch i from worker i % W, skipping workers that
    are exhausted. After k batches: how many each worker has produced, and which serves next."""
    t = np.asarray(totals, np.int64)
    k = min(int(k), int(t.sum()))
    lo, hi = 0, int(t.max(initial=0))
    while lo < hi:                 # the largest m with sum(min(t, m)) <= k: full rounds done
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if int(np.minimum(t, mid).sum()) <= k else (lo, mid - 1)
    produced = np.minimum(t, lo)
    alive = np.flatnonzero(t > lo)
    rem = k - int(produced.sum())
    produced[alive[:rem]] += 1
    return produced.tolist(), int(alive[rem]) if rem < len(alive) else 0


@dataclass
class Plan:
    """What one rank iterates in one epoch (or in the rest of it, after a resume)."""
    streams: list[list[tuple[int, int, int]]]  # per logical worker: pieces still to read
    stream_ids: list[int]                      # per logical worker: global stream id g
    first: list[int]                           # per logical worker: index of its next batch
    left: list[int]                            # per logical worker: batches it still has
    rotation: int                              # logical worker served first
    length: int                                # the epoch's batches for this rank (resumed ones included)
    done: int                                  # batches of the epoch handed out before this iteration
    segment: int                               # index of the layout segment (salts the masks' rng)
    segments: list[dict]                       # the state's layout history, this segment last


# ----------------------------------------------------------------------------------------------
# 3. + 4. the worker side: read pieces, pack, make whole batches

def t5_span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of T5's random_spans_noise_mask for a sequence of `length`,
    as in HF's run_t5_mlm_flax (spans <= min(noise, non-noise) / mean, so segmentation works)."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    return noise, max(int(round(min(noise, length - noise) / mean_span_length)), 1)


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """T5's noise mask: alternating non-noise / noise spans with random lengths, starting with
    non-noise and ending with noise; about noise_density of the tokens are noise."""
    n_noise, n_spans = t5_span_counts(length, noise_density, mean_span_length)

    def segment(n_items: int) -> np.ndarray:  # n_items split into n_spans random positive parts
        first = np.zeros(n_items, bool)
        first[1 + rng.permutation(n_items - 1)[:n_spans - 1]] = True
        return np.bincount(np.cumsum(first), minlength=n_spans)

    lengths = np.stack([segment(length - n_noise), segment(n_noise)], axis=1).reshape(-1)
    return np.repeat(np.arange(2 * n_spans) % 2 == 1, lengths)


@dataclass
class BatchSpec:
    """Everything a worker needs to turn tokens into batches (small: pickled to each worker)."""
    objective: str
    batch_size: int
    seq_len: int                   # model length: causal/mlm inputs, span encoder inputs
    step: int                      # stream tokens per sequence (span: the uncorrupted length)
    eos: int
    pad: int
    mask: int | None
    special: np.ndarray            # bool per token id: never masked
    sentinels: np.ndarray
    mlm_probability: float
    noise_density: float
    mean_span_length: float
    target_len: int                # span: decoder labels length
    seed: int
    shuffle_docs: bool

    def n_sequences(self, n_tokens: int) -> int:
        """Sequences a stream of n_tokens makes (causal windows overlap by the one shifted token)."""
        if self.objective == "causal":
            return -(-(n_tokens - 1) // self.step) if n_tokens > 1 else 0
        if self.objective == "mlm":
            return -(-n_tokens // self.step)
        return n_tokens // self.step + (n_tokens % self.step >= 2)  # a 1-token span tail is dropped

    def n_batches(self, n_tokens: int) -> int:
        return -(-self.n_sequences(n_tokens) // self.batch_size)


class ShardStream(IterableDataset):
    """One rank's streams; a DataLoader worker p plays logical stream (rotation + p) % W.
    Yields (batch dict of tensors, (logical stream, batch index)); ShardLoader strips the tag."""

    def __init__(self, units: Units, plan: Plan, spec: BatchSpec, epoch: int, salt: int):
        self.units, self.plan, self.spec, self.epoch, self.salt = units, plan, spec, epoch, salt

    def __iter__(self):
        info = get_worker_info()
        n_workers, p = (info.num_workers, info.id) if info else (1, 0)
        if n_workers != len(self.plan.streams):
            raise RuntimeError(f"planned {len(self.plan.streams)} streams for {n_workers} workers")
        w = (self.plan.rotation + p) % n_workers
        self._files, self._cached = {}, (None, None)
        for j, batch in enumerate(self.batches(w), start=self.plan.first[w]):
            yield batch, (w, j)

    # -- reading
    def read_unit(self, u: int) -> np.ndarray:
        """A unit as one flat array: its documents (shuffled by (seed, epoch, unit) if asked),
        each followed by EOS. Deterministic, so a token offset into it is a valid seek."""
        if self._cached[0] == u:
            return self._cached[1]
        f = int(self.units.file[u])
        if f not in self._files:
            self._files[f] = pq.ParquetFile(self.units.paths[f], memory_map=True)
        pf = self._files[f]
        col = pf.read_row_group(int(self.units.group[u]), columns=["input_ids"]).column(0).combine_chunks()
        offsets = np.asarray(col.offsets, np.int64)
        values = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
        offsets -= offsets[0]
        lens = np.diff(offsets)
        n_docs, n = len(lens), len(values) + len(lens)
        if self.spec.shuffle_docs:
            order = np.random.default_rng((self.spec.seed, self.epoch, u, self.salt)).permutation(n_docs)
            out_len = lens[order] + 1
            out_start = np.cumsum(out_len) - out_len
            # output position q of document d reads values[offsets[d] + q - out_start[d]]
            src = np.arange(n, dtype=np.int64) - np.repeat(out_start - offsets[:-1][order], out_len)
            out = values.take(src, mode="clip")
            out[out_start + out_len - 1] = self.spec.eos
        else:
            out = np.insert(values, offsets[1:], values.dtype.type(self.spec.eos))
        assert len(out) == self.units.length[u], f"{self.units.paths[f]}: row group size changed"
        self._cached = (u, out)
        return out

    # -- packing: one flat buffer, whole batches sliced off its front
    def batches(self, w: int):
        spec, B = self.spec, self.spec.batch_size
        extra = 1 if spec.objective == "causal" else 0    # causal windows need one more token
        need = B * spec.step + extra
        buf, j = None, self.plan.first[w]
        for u, a, b in self.plan.streams[w]:
            piece = self.read_unit(u)[a:b]
            buf = piece if buf is None or len(buf) == 0 else np.concatenate((buf, piece))
            while len(buf) >= need:
                yield self.make(buf[:need], B, w, j)
                buf, j = buf[B * spec.step:], j + 1
        if buf is not None and (n := spec.n_sequences(len(buf))) > 0:
            yield self.make(buf, n, w, j)

    def make(self, chunk: np.ndarray, n: int, w: int, j: int) -> dict:
        if self.spec.objective == "causal":
            return causal_batch(chunk, n, self.spec)
        rng = np.random.default_rng((self.spec.seed, self.epoch, self.salt, self.plan.segment,
                                     self.plan.stream_ids[w], j))
        if self.spec.objective == "mlm":
            return mlm_batch(chunk, n, self.spec, rng)
        return span_batch(chunk, n, self.spec, rng)


def causal_batch(chunk: np.ndarray, n: int, spec: BatchSpec) -> dict:
    """n rows of T inputs and the T next tokens: row i covers stream[i*T : i*T + T + 1].
    Windows overlap by one token so every token but the stream's first is a label once."""
    T = spec.step
    if len(chunk) < n * T + 1:     # the stream's last batch: pad inputs, no loss past its end
        r = len(chunk)
        padded = np.full(n * T + 1, spec.pad, chunk.dtype)
        padded[:r] = chunk
        x = padded[:-1].astype(np.int64)
        y = padded[1:].astype(np.int64)
        y[r - 1:] = IGNORE         # the stream's last token (EOS) is an input with nothing to predict
        return {"input_ids": torch.from_numpy(x.reshape(n, T)), "labels": torch.from_numpy(y.reshape(n, T))}
    win = np.lib.stride_tricks.as_strided(chunk, (n, T + 1), (T * chunk.itemsize, chunk.itemsize))
    return {"input_ids": torch.from_numpy(win[:, :-1].astype(np.int64)),
            "labels": torch.from_numpy(win[:, 1:].astype(np.int64))}


def mlm_batch(chunk: np.ndarray, n: int, spec: BatchSpec, rng: np.random.Generator) -> dict:
    """BERT masking on packed rows of T: mlm_probability of the non-special tokens are chosen;
    of those 80% become <mask>, 10% a random non-special token, 10% stay; loss on chosen only."""
    T = spec.step
    ids = np.full(n * T, spec.pad, np.int64)
    ids[:len(chunk)] = chunk
    ids = ids.reshape(n, T)
    attention = (np.arange(n * T) < len(chunk)).reshape(n, T)
    chosen = (rng.random(ids.shape) < spec.mlm_probability) & ~spec.special[ids]
    action = rng.random(ids.shape)
    labels = np.where(chosen, ids, IGNORE)
    inputs = ids.copy()
    inputs[chosen & (action < 0.8)] = spec.mask
    rand = chosen & (action >= 0.8) & (action < 0.9)
    normal = np.flatnonzero(~spec.special)
    inputs[rand] = normal[rng.integers(0, len(normal), int(rand.sum()))]
    return {"input_ids": torch.from_numpy(inputs), "attention_mask": torch.from_numpy(attention.astype(np.int64)),
            "labels": torch.from_numpy(labels)}


def span_corrupt(tokens: np.ndarray, spec: BatchSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """T5: each noise span becomes one sentinel in the inputs; the targets are each sentinel
    followed by the span it replaced; both end with EOS."""
    noise = random_spans_noise_mask(len(tokens), spec.noise_density, spec.mean_span_length, rng)
    prev = np.concatenate(([False], noise[:-1]))
    starts = noise & ~prev                  # first token of noise span i -> sentinel i
    inputs = np.where(starts, spec.sentinels[np.cumsum(starts) - 1], tokens)[~noise | starts]
    # non-noise span i precedes noise span i (the mask starts with non-noise): its first token
    # carries sentinel i in the targets and the rest of it is dropped (HF's inverse-mask trick)
    keep_starts = ~noise & np.concatenate(([True], noise[:-1]))
    targets = np.where(keep_starts, spec.sentinels[np.cumsum(keep_starts) - 1], tokens)[noise | keep_starts]
    return np.append(inputs, spec.eos), np.append(targets, spec.eos)


def span_batch(chunk: np.ndarray, n: int, spec: BatchSpec, rng: np.random.Generator) -> dict:
    """Encoder-decoder rows: input_ids/attention_mask of seq_len, labels of target_len (pad -100);
    the model shifts labels right to make decoder_input_ids."""
    R = spec.step
    inputs = np.full((n, spec.seq_len), spec.pad, np.int64)
    attention = np.zeros((n, spec.seq_len), np.int64)
    labels = np.full((n, spec.target_len), IGNORE, np.int64)
    for i in range(n):
        x, y = span_corrupt(chunk[i * R:(i + 1) * R].astype(np.int64), spec, rng)
        inputs[i, :len(x)], attention[i, :len(x)], labels[i, :len(y)] = x, 1, y
    return {"input_ids": torch.from_numpy(inputs), "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels)}


# ----------------------------------------------------------------------------------------------
# 5. the loader Lightning iterates: plans epochs, runs a DataLoader, counts, saves, resumes

class ShardLoader:
    """An iterable with a length (the epoch's batches on this rank) and a state. Each iteration
    builds a fresh torch DataLoader (workers are not persistent: each epoch's plan differs)."""

    def __init__(self, dm: "ShardDataModule", split: str):
        self.dm, self.split = dm, split
        self.epoch = 0                     # used when no Trainer drives the epoch
        self.segments: list[dict] = []     # layout history of the current epoch (state)
        self.pending: dict | None = None   # a loaded state, applied by the next iteration
        self.active: tuple[int, Plan] | None = None  # (epoch, plan) of the iteration under way

    # -- epochs and plans
    def current_epoch(self) -> int:
        trainer = self.dm.trainer
        return int(trainer.current_epoch) if trainer is not None and self.split == "train" else self.epoch

    def set_epoch(self, epoch: int) -> None:
        """For use without a Trainer (with one, trainer.current_epoch decides)."""
        self.epoch = int(epoch)

    def _resume_segments(self, epoch: int) -> list[dict]:
        if self.pending is None or self.split != "train" or not self.pending["segments"]:
            return []
        if self.pending["epoch"] != epoch:
            warnings.warn(f"loader state is for epoch {self.pending['epoch']}, training is at epoch {epoch}:"
                          " starting the epoch from its beginning", stacklevel=3)
            return []
        return self.pending["segments"]

    def __len__(self) -> int:
        epoch = self.current_epoch()
        if self.pending is None and self.active is not None and self.active[0] == epoch:
            return self.active[1].length   # mid-iteration: the plan being run (maybe a resumed one)
        return self.dm._plan(self.split, epoch, self._resume_segments(epoch)).length

    def __iter__(self):
        dm, epoch = self.dm, self.current_epoch()
        plan = dm._plan(self.split, epoch, self._resume_segments(epoch))
        self.pending, self.active = None, (epoch, plan)
        self.segments = [dict(s) for s in plan.segments]
        if self.split == "train":
            self.epoch = epoch
        remaining = plan.length - plan.done
        if remaining <= 0:
            self._end_epoch()
            return
        salt = TRAIN_SALT if self.split == "train" else VAL_SALT
        dataset = ShardStream(dm.units[self.split], plan, dm.spec(self.split == "train"),
                              epoch if self.split == "train" else 0, salt)
        workers = dm.num_workers
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                            pin_memory=torch.cuda.is_available(),
                            prefetch_factor=dm.prefetch_factor if workers else None)
        expected = _expected_order(plan)
        for batch, tag in loader:
            want = next(expected)
            if tuple(tag) != want:  # would mean torch changed its worker order: resume would be wrong
                raise RuntimeError(f"batch came from stream/index {tuple(tag)}, expected {want}")
            self.segments[-1]["batches"] += 1
            remaining -= 1
            if remaining == 0:
                self._end_epoch()  # before the yield: a checkpoint after this batch is "epoch done"
            yield batch
            if remaining == 0:
                return

    def _end_epoch(self) -> None:
        if self.split == "train":
            self.epoch += 1
        self.segments, self.active = [], None

    # -- state
    def state_dict(self) -> dict:
        if self.pending is not None:
            return dict(self.pending)
        return {"format": STATE_FORMAT, "epoch": self.epoch,
                "segments": [dict(s) for s in self.segments], **self.dm._identity(self.split)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} loader state: {state.get('format')!r}")
        mine = self.dm._identity(self.split)
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise ValueError(f"loader state has {key}={state[key]!r}, this DataModule {value!r}: the saved"
                                 " position means nothing here (drop the state to start over)")
        self.pending = {**state, "segments": [dict(s) for s in state["segments"]]}
        self.epoch = int(state["epoch"])


def _as_is(batch):
    """The worker made the batch already (torch's default_convert would walk it again)."""
    return batch


def _expected_order(plan: Plan):
    """(logical stream, batch index) of each batch the DataLoader will yield: round-robin from
    `rotation`, skipping exhausted streams (torch's order for IterableDatasets)."""
    left, nxt = list(plan.left), list(plan.first)
    W, w = len(left), plan.rotation
    while any(left):
        if left[w]:
            yield (w, nxt[w])
            left[w] -= 1
            nxt[w] += 1
        w = (w + 1) % W


# ----------------------------------------------------------------------------------------------
# 6. the DataModule

class ShardDataModule(L.LightningDataModule):
    """Batches from a `refinery shard` directory for a causal LM, an MLM encoder or a T5-style
    encoder-decoder. rank/world_size default to torch.distributed's (or the Trainer's)."""

    def __init__(self, data_dir: str, seq_len: int, batch_size: int, objective: str = "causal",
                 seed: int = 0, num_workers: int = 0, mlm_probability: float = 0.15, noise_density: float = 0.15,
                 mean_span_length: float = 3.0, verify: str = "full", shuffle_docs: bool = True,
                 even_batches: bool = True, prefetch_factor: int = 4,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if verify not in ("full", "size", "none"):
            raise ValueError(f"verify must be 'full', 'size' or 'none', got {verify!r}")
        if seq_len < 2 or batch_size < 1 or num_workers < 0 or mean_span_length < 1 or not 0 < noise_density < 1:
            raise ValueError("need seq_len >= 2, batch_size >= 1, num_workers >= 0, mean_span_length >= 1"
                             " and 0 < noise_density < 1")
        data_dir = str(data_dir)  # hparams go into checkpoints: plain types load with weights_only
        self.save_hyperparameters()
        self.data_dir, self.seq_len, self.batch_size, self.objective = Path(data_dir), seq_len, batch_size, objective
        self.seed, self.num_workers, self.verify, self.shuffle_docs = seed, num_workers, verify, shuffle_docs
        self.mlm_probability, self.noise_density = mlm_probability, noise_density
        self.mean_span_length = mean_span_length
        self.even_batches, self.prefetch_factor = even_batches, prefetch_factor
        self._rank, self._world = rank, world_size
        self.manifest: Manifest | None = None
        self.units: dict[str, Units] = {}
        self._loaders: dict[str, ShardLoader] = {}
        self._plans: dict = {}

    # -- setup: fail before training, naming the file
    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        manifest = load_manifest(self.data_dir)
        if self.verify != "none":
            verify_shards(self.data_dir, manifest, full=self.verify == "full")
        tok = manifest.tokenizer
        ids = tok.special_ids
        self.vocab_size = tok.vocab_size
        self.eos_id, self.pad_id, self.mask_id = ids["eos"], ids.get("pad", ids["eos"]), ids.get("mask")
        self.sentinel_ids = list(tok.sentinel_ids)
        if self.pad_id is None:
            self.pad_id = self.eos_id
        if self.objective == "mlm" and self.mask_id is None:
            raise ValueError(f"{self.data_dir}: the tokenizer has no mask token: MLM is unavailable")
        specials = [i for i in (self.eos_id, self.pad_id, self.mask_id) if i is not None] + self.sentinel_ids
        self.special = np.zeros(max([self.vocab_size, *specials]) + 1, bool)
        self.special[specials] = True
        self.step, self.target_len = self.seq_len, 0
        if self.objective == "span":
            self.step, self.target_len, n_spans = self._span_lengths()
            if n_spans > len(self.sentinel_ids):
                raise ValueError(f"{self.data_dir}: span corruption of seq_len={self.seq_len} needs up to {n_spans}"
                                 f" sentinels, the tokenizer has {len(self.sentinel_ids)} (lower seq_len or raise"
                                 " mean_span_length)")
        self.units = {s: load_units(self.data_dir, manifest, s) for s in ("train", "val")}
        self.manifest = manifest

    def _span_lengths(self) -> tuple[int, int, int]:
        """T5's compute_input_and_target_lengths: the longest raw segment whose corrupted input
        (kept tokens + one sentinel per span + EOS) fits seq_len; checked for every shorter
        length too, since the stream's last segment is shorter. -> (raw length, target length,
        most spans)."""
        d, m = self.noise_density, self.mean_span_length

        def lengths(n: int) -> tuple[int, int, int]:
            noise, spans = t5_span_counts(n, d, m)
            return n - noise + spans + 1, noise + spans + 1, spans

        raw = 2
        while raw < 16 * self.seq_len and lengths(raw + 1)[0] <= self.seq_len:
            raw += 1
        stats = np.array([lengths(n) for n in range(2, raw + 1)])
        if lengths(2)[0] > self.seq_len or stats[:, 0].max() > self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} is too short for span corruption")
        return raw, int(stats[:, 1].max()), int(stats[:, 2].max())

    def spec(self, train: bool) -> BatchSpec:
        return BatchSpec(self.objective, self.batch_size, self.seq_len, self.step, self.eos_id, self.pad_id,
                         self.mask_id, self.special, np.asarray(self.sentinel_ids, np.int64), self.mlm_probability,
                         self.noise_density, self.mean_span_length, self.target_len, self.seed,
                         self.shuffle_docs and train)

    # -- distribution and layout
    def dist(self) -> tuple[int, int]:
        if self._rank is not None or self._world is not None:
            return self._rank or 0, self._world or 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def _layout(self) -> dict:
        _, world = self.dist()
        return {"world_size": world, "num_workers": max(1, self.num_workers), "batch_size": self.batch_size,
                "objective": self.objective, "step": self.step, "batches": 0}

    def _identity(self, split: str) -> dict:
        self.setup()
        return {"seed": self.seed, "data": self.units[split].fingerprint}

    # -- planning (the same on every rank: pure function of the manifest, seed, epoch, state)
    def _plan(self, split: str, epoch: int, segments: list[dict]) -> Plan:
        self.setup()
        rank, world = self.dist()
        key = (split, epoch, json.dumps(segments, sort_keys=True), rank, world)
        if key not in self._plans:
            self._plans = {key: self._make_plan(split, epoch, segments, rank)}  # keep one: plans can be big
        return self._plans[key]

    def _make_plan(self, split: str, epoch: int, segments: list[dict], rank: int) -> Plan:
        units, layout, train = self.units[split], self._layout(), split == "train"
        order = (np.random.default_rng((self.seed, epoch, TRAIN_SALT)).permutation(len(units.length)) if train
                 else np.arange(len(units.length)))
        pieces = [(int(u), 0, int(units.length[u])) for u in order]
        done = 0
        history = [dict(s) for s in segments]
        for i, seg in enumerate(history):
            W, spec = seg["num_workers"], self._spec_for(seg)
            streams = cut_even(pieces, seg["world_size"] * W)
            totals = [spec.n_batches(sum(b - a for _, a, b in s)) for s in streams]
            done += seg["batches"]
            same = all(seg[k] == layout[k] for k in ("world_size", "num_workers", "batch_size", "objective", "step"))
            if i == len(history) - 1 and same:       # exact continuation of the interrupted segment
                mine = slice(rank * W, (rank + 1) * W)
                produced, nxt = round_robin(totals[mine], seg["batches"])
                length = done - seg["batches"] + self._rank_length(totals, seg, train)
                return Plan([skip_tokens(s, p * spec.batch_size * spec.step) for s, p in zip(streams[mine], produced)],
                            list(range(rank * W, (rank + 1) * W)), produced,
                            [t - p for t, p in zip(totals[mine], produced)], nxt, length, done, i, history)
            pieces = []                              # layout changed: keep what no rank consumed
            # (causal: the token at a stream's position was already the last label; it leaves
            # with the consumed part, else the piece before it in the new cut would predict it again)
            overlap = 1 if spec.objective == "causal" else 0
            for r in range(seg["world_size"]):
                produced, _ = round_robin(totals[r * W:(r + 1) * W], seg["batches"])
                for s, t, p in zip(streams[r * W:(r + 1) * W], totals[r * W:(r + 1) * W], produced):
                    if p < t:
                        pieces += skip_tokens(s, p * spec.batch_size * spec.step + (overlap if p else 0))
        W = layout["num_workers"]
        streams = cut_even(pieces, layout["world_size"] * W)
        totals = [self._spec_for(layout).n_batches(sum(b - a for _, a, b in s)) for s in streams]
        mine = slice(rank * W, (rank + 1) * W)
        return Plan(streams[mine], list(range(rank * W, (rank + 1) * W)), [0] * W, totals[mine], 0,
                    done + self._rank_length(totals, layout, train), done, len(history), history + [layout])

    def _spec_for(self, seg: dict) -> BatchSpec:
        spec = self.spec(False)
        spec.batch_size, spec.objective, spec.step = seg["batch_size"], seg["objective"], seg["step"]
        return spec

    def _rank_length(self, totals: list[int], seg: dict, train: bool) -> int:
        """This rank's batches in a segment; with even_batches (train) the smallest rank's count,
        so DDP ranks step in lockstep."""
        W, rank = seg["num_workers"], self.dist()[0]
        per_rank = [sum(totals[r * W:(r + 1) * W]) for r in range(seg["world_size"])]
        return min(per_rank) if train and self.even_batches else per_rank[rank]

    # -- Lightning hooks
    def _loader(self, split: str) -> ShardLoader:
        if split not in self._loaders:
            self._loaders[split] = ShardLoader(self, split)
        return self._loaders[split]

    def train_dataloader(self) -> ShardLoader:
        self.setup()
        return self._loader("train")

    def val_dataloader(self) -> ShardLoader:
        self.setup()
        return self._loader("val")

    def state_dict(self) -> dict:
        """The train stream's position (Lightning stores it in checkpoints)."""
        return self._loader("train").state_dict() if "train" in self._loaders else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loader("train").load_state_dict(state_dict)
