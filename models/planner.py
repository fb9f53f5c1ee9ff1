"""The planner: how big a model, on how many tokens, in how long, in how much memory, from how much crawl.

One file, pure arithmetic (no Prefect, no GPU), read top to bottom:

    1. parameters   count_params(config): the real model built on the meta device (no memory used)
    2. Chinchilla   D = 20 N tokens (Hoffmann et al. 2022, "Training Compute-Optimal LLMs", table 3)
    3. compute      C = 6 N D FLOPs (Kaplan et al. 2020, sec. 2.1); hours = C / (devices * peak * MFU);
                    a budget of hours gives the compute-optimal N = sqrt(C / 120) (C = 6 N * 20 N)
    4. memory       bytes per device: model states by precision, optimizer and strategy (ZeRO,
                    Rajbhandari et al. 2020), activations (counted per block, after Korthikanti et al.
                    2022), logits, CUDA context and a fragmentation margin
    5. crawl        curated tokens / keep ratio -> crawled tokens -> pages and bytes
    6. plan()       all of the above for one run, `check(plan)` refuses a run that does not fit

Bytes per parameter ("model states", per device before sharding), with AdamW:

    precision    weights                      grads  AdamW m, v  total   what holds them
    32-true      4                            4      8           16      fp32 everything
    bf16-mixed   4 fp32 + 2 bf16 copies       4      8           18      Lightning autocasts: the parameters
    16-mixed     (same)                                                  stay fp32 (they are the master
                                                                         weights, grads are fp32 too); autocast
                                                                         makes a 16-bit copy of each weight for
                                                                         its matmul, caches it for the forward
                                                                         and autograd keeps it for backward
    bf16-true    2                            2      4           8       everything bf16 (torch's AdamW keeps
                                                                         its states in the parameters' dtype)

ZeRO's table (sec. 3.1) counts classic fp16 mixed precision as 2 (fp16 weights) + 2 (fp16 grads) + 12
(fp32 master, m, v) = 16 B; Lightning's mixed modes are not that layout (no fp16 grads, the fp32
weights are the model's own), hence 18 here. SGD with momentum keeps one state (4 B, 2 in bf16-true);
8-bit AdamW (bitsandbytes) keeps two 1-byte states. DDP across several devices adds one gradient-sized
bucket buffer (torch's default gradient_as_bucket_view=False); FSDP (FULL_SHARD / ZeRO-3) divides
weights, grads and optimizer states by the world size and adds the all-gathered units it holds.

The sum is an upper bound on the peak: gradients fill in as activations are freed during backward,
and everything is counted as alive at once.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

GiB = 1 << 30
TOKENS_PER_PARAM = 20              # Chinchilla: D/N at the compute-optimal frontier (Hoffmann et al. 2022)
FLOPS_PER_PARAM_TOKEN = 6          # forward 2 + backward 4 multiply-adds per parameter per token (Kaplan 2020)
CUDA_CONTEXT_BYTES = 1 * GiB       # CUDA context, cuBLAS/NCCL workspaces: ~0.5-1 GiB in nvidia-smi; 0 on a CPU
FRAGMENTATION = 0.10               # caching-allocator fragmentation, on top of everything but the context
LOGIT_COPIES = 3                   # fp32 logits for the loss: log-softmax output, its gradient, the logits' gradient
DEFAULT_VOCAB = 32_000             # for a shape derived from a parameter count alone (Llama 2's vocabulary)
ASPECT = 128                       # d_model / n_layers of a derived shape: GPT-3 6.7B-175B and Llama 7B use ~128
HEAD_DIM = 128                     # per-head width of a derived shape (Llama)
TOKENS_PER_PAGE = 1_000            # tokens of extracted text per crawled HTML page (assumption: ~4-5 kB of text)
BYTES_PER_PAGE = 150_000           # uncompressed WARC bytes per page: Common Crawl's monthly crawls are
                                   # ~3 billion pages in ~400-450 TiB uncompressed, about 150 kB a page

from core.config import QualityConfig

# curation's keep target, defined once in the config (there it counts words; the plan applies it to tokens)
KEEP_RATIO: float = QualityConfig.model_fields["target_keep_ratio"].default

# Peak dense FLOP/s per device (no 2:4 sparsity), from NVIDIA's datasheets. "fp32" is the plain CUDA-core rate
# that torch uses by default; "tf32" applies after torch.set_float32_matmul_precision("high"). 16-bit rates
# are with fp32 accumulation (what torch uses; GeForce cards run fp16-accumulate at twice that).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100":      {"bf16": 989e12, "fp16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12},   # SXM5
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12},
    "H200":      {"bf16": 989e12, "fp16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12},   # H100's compute, more HBM
    "A100":      {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S":      {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L4":        {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "A10":       {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "A10G":      {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},        # AWS g5: no datasheet,
    "RTX 4090":  {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},  # commonly quoted figures
    "V100":      {"fp16": 125e12, "fp32": 15.7e12},      # SXM2; no bf16 or tf32 tensor cores
    "T4":        {"fp16": 65e12, "fp32": 8.1e12},        # no bf16 or tf32 tensor cores
}
GPU_MEMORY_GB: dict[str, float] = {  # GiB per device of the common variant (A100 and V100 also come smaller)
    "H100": 80, "H100 PCIe": 80, "H200": 141, "A100": 80, "L40S": 48, "L4": 24, "A10": 24, "A10G": 24,
    "RTX 4090": 24, "V100": 32, "T4": 16,
}
# Lightning's precision names -> the dtype the matmuls run in
MATMUL_DTYPE = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16", "bf16-true": "bf16", "bf16": "bf16",
                "16-mixed": "fp16", "16-true": "fp16", "16": "fp16", "fp32": "fp32", "tf32": "tf32", "fp16": "fp16"}
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "adamw8bit": 2}     # states per parameter
STRATEGIES = ("auto", "ddp", "fsdp")
# Activation bytes per saved element, measured with torch.autograd.graph.saved_tensors_hooks on HF's Llama
# block (transformers 5): autocast saves matmul outputs in 16 bits but RMSNorm upcasts and saves fp32, so
# mixed precision averages ~3 B; bf16-true still saves RMSNorm's fp32 internals (~2.2 B).
ACT_BYTES = {"32-true": 4.0, "bf16-mixed": 3.0, "16-mixed": 3.0, "bf16-true": 2.2, "16-true": 2.2}


class PlanError(ValueError):
    """A run the planner refuses: the message carries the numbers."""


# -- 1. parameters -----------------------------------------------------------------------------------------

def _meta_model(config):
    """The real model class for the config, built on the meta device: shapes without memory or init time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    if getattr(config, "is_encoder_decoder", False):
        cls = AutoModelForSeq2SeqLM
    elif config.model_type in ("bert", "roberta"):
        cls = AutoModelForMaskedLM
    else:
        cls = AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(config)


def count_params(config) -> int:
    """Parameters of the model a transformers config builds; tied embeddings count once
    (Module.parameters() yields each tensor once)."""
    return sum(p.numel() for p in _meta_model(config).parameters())


def non_embedding_params(config) -> int:
    """Parameters minus the token and position embeddings and an untied output head: Kaplan et al.'s N."""
    import torch

    model = _meta_model(config)
    emb = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    if head is not None:
        emb[id(head.weight)] = head.weight
    return sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in emb.values())


@dataclass(frozen=True)
class ArchDims:
    """What the activation estimate needs. d_ff is the MLP width (SwiGLU's per branch); n_layers counts
    encoder plus decoder blocks; attention "eager" materialises the s x s scores, "sdpa"/flash does not."""
    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    d_ff: int | None = None
    tied: bool = True
    attention: str = "sdpa"

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model * (1 if self.tied else 2)


def arch_dims(config) -> ArchDims:
    """ArchDims of a Llama / BERT / T5 config."""
    g = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
    if getattr(config, "is_encoder_decoder", False):     # T5 aliases num_hidden_layers to the encoder's
        layers = config.num_layers + (g("num_decoder_layers") or config.num_layers)
    else:
        layers = g("num_hidden_layers", "num_layers")
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    return ArchDims(n_layers=layers, d_model=g("hidden_size", "d_model"), n_heads=g("num_attention_heads", "num_heads"),
                    vocab_size=config.vocab_size, d_ff=g("intermediate_size", "d_ff"),
                    tied=bool(getattr(config, "tie_word_embeddings", True)), attention=attn)


def derive_arch(params: float, vocab_size: int = DEFAULT_VOCAB) -> ArchDims:
    """A plausible Llama-like shape for a parameter count: N ~ 12 * n_layers * d_model^2 (Kaplan 2020:
    4d^2 attention + 8d^2 MLP per block) with d_model / n_layers ~ 128, d_model a multiple of 256, heads
    of 128 and a SwiGLU width of 8/3 d_model (Llama). 7B -> 34 x 4096 (Llama 7B: 32 x 4096)."""
    d = max(2 * HEAD_DIM, round((params * ASPECT / 12) ** (1 / 3) / 256) * 256)
    layers = max(1, round((params - vocab_size * d) / (12 * d * d)))
    ff = round(8 * d / 3 / 256) * 256 or 256
    return ArchDims(n_layers=layers, d_model=d, n_heads=d // HEAD_DIM, vocab_size=vocab_size, d_ff=ff)


# -- 2. Chinchilla and 3. compute ---------------------------------------------------------------------------

def chinchilla_tokens(params: float) -> float:
    return TOKENS_PER_PARAM * params


def chinchilla_params(tokens: float) -> float:
    return tokens / TOKENS_PER_PARAM


def training_flops(params: float, tokens: float) -> float:
    """6 N D (Kaplan et al. 2020); attention's extra 12 * layers * d * seq per token is left out, as in
    Chinchilla's own fits (it is a few percent at seq_len <= d_model)."""
    return FLOPS_PER_PARAM_TOKEN * params * tokens


def peak_flops(gpu: str | float, precision: str = "bf16-mixed") -> float:
    """Peak dense FLOP/s of one device. `gpu`: a table name or what torch.cuda.get_device_name() says
    ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"), matched by the longest table name it contains;
    or a number (a CPU, an unlisted device). `precision`: Lightning's names or bf16/fp16/fp32/tf32."""
    try:
        return float(gpu)
    except (TypeError, ValueError):
        pass
    dtype = MATMUL_DTYPE.get(precision)
    if dtype is None:
        raise ValueError(f"unknown precision {precision!r}; one of {sorted(MATMUL_DTYPE)}")
    key = lambda s: re.sub(r"[^A-Z0-9]", "", s.upper())
    name = key(gpu)
    hits = [g for g in PEAK_FLOPS if key(g) in name]
    if not hits:
        what = "a CPU has no table entry" if "CPU" in name else f"{gpu!r} is not in the table"
        raise ValueError(f"{what}: pass its peak FLOP/s as a number (known: {', '.join(PEAK_FLOPS)})")
    g = max(hits, key=lambda g: len(key(g)))
    if dtype not in PEAK_FLOPS[g]:
        raise ValueError(f"{g} has no {dtype} tensor cores (it has {', '.join(PEAK_FLOPS[g])}): use 16-mixed")
    return PEAK_FLOPS[g][dtype]


def device_memory_gb(gpu: str) -> float | None:
    """GiB per device of a table GPU (matched as in peak_flops), None if unknown."""
    key = lambda s: re.sub(r"[^A-Z0-9]", "", s.upper())
    hits = [g for g in GPU_MEMORY_GB if key(g) in key(str(gpu))]
    return GPU_MEMORY_GB[max(hits, key=len)] if hits else None


def compute_budget(hours: float, devices: int, peak: float, mfu: float = 0.4) -> float:
    """FLOPs that `devices` deliver in `hours` at a model FLOPs utilisation `mfu`."""
    return devices * peak * mfu * 3600 * hours


def compute_optimal_params(flops: float) -> float:
    """C = 6 N D with D = 20 N  =>  N = sqrt(C / 120)."""
    return math.sqrt(flops / (FLOPS_PER_PARAM_TOKEN * TOKENS_PER_PARAM))


def training_hours(flops: float, devices: int, peak: float, mfu: float = 0.4) -> float:
    return flops / (devices * peak * mfu) / 3600


# -- 4. memory ----------------------------------------------------------------------------------------------

@dataclass
class Memory:
    """Bytes per device at the peak of a training step (an upper bound: see the module docstring)."""
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    margin: float
    device: float | None = None          # bytes available per device, when known
    optimizer_name: str = "adamw"

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.logits
                + self.overhead + self.margin)

    @property
    def fits(self) -> bool:
        return self.device is None or self.total <= self.device

    def parts(self) -> str:
        div, unit = (GiB, "GiB") if self.total >= GiB else (1 << 20, "MiB")
        g = lambda b: f"{b / div:.1f}"
        return (f"weights {g(self.weights)}, grads {g(self.grads)}, {self.optimizer_name} {g(self.optimizer)}, "
                f"activations {g(self.activations)}, logits {g(self.logits)}, overhead {g(self.overhead)}, "
                f"margin {g(self.margin)} {unit}")

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "fits": self.fits}


def activation_bytes(arch: ArchDims, micro_batch: int, seq_len: int, precision: str = "32-true",
                     checkpointing: bool = False) -> float:
    """Saved-for-backward activations of one micro-batch on one device.

    Per block and token, HF's Llama block saves about 10 d + 4 d_ff elements: each RMSNorm its input,
    normalised and scaled outputs (2 x 3d), q, k, v and the attention output (4d), and SwiGLU's gate,
    up, activation and product (4 d_ff); a saved_tensors_hooks probe measured 26.8 d at d_ff = 4d, this
    formula says 26 d + 4d / n_layers. It is the counting of Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", sec. 4.1), whose fused Megatron GPT block saves
    34 s b h bytes at 16 bits (17 d elements per token). Eager attention adds the scores and probabilities,
    2 * heads * seq_len elements per token (their 5 a s / h term); SDPA / flash attention saves none.
    With activation checkpointing only each block's input is kept (d per token, in the residual dtype),
    plus one block's full activations while it is recomputed. Once per model: the embedding output and
    the final norm (4d). Encoders with GELU MLPs save less (2 d_ff): conservative for them."""
    precision = _precision(precision)
    d, L = arch.d_model, arch.n_layers
    per_block = 10 * d + 4 * arch.ff + (2 * arch.n_heads * seq_len if arch.attention == "eager" else 0)
    b = ACT_BYTES[precision]
    tokens = micro_batch * seq_len
    if checkpointing:
        resid = 2 if precision in ("bf16-true", "16-true") else 4   # autocast keeps the residual stream fp32
        return tokens * (L * d * resid + (per_block + 4 * d) * b)
    return tokens * (L * per_block + 4 * d) * b


def memory(params: float, arch: ArchDims, precision: str = "bf16-mixed", optimizer: str = "adamw",
           strategy: str = "ddp", world_size: int = 1, seq_len: int = 2048, micro_batch: int = 1,
           activation_checkpointing: bool = False, device_memory_gb: float | None = None,
           on_gpu: bool = True) -> Memory:
    """Bytes per device for training `params` parameters (see the table in the module docstring)."""
    precision = _precision(precision)
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    p_bytes = 2 if precision in ("bf16-true", "16-true") else 4        # the parameters' own dtype
    state_bytes = 1 if optimizer == "adamw8bit" else p_bytes            # torch keeps states in the param dtype
    casts = 2 * params if precision.endswith("-mixed") else 0           # autocast's 16-bit weight copies
    weights, grads = p_bytes * params, p_bytes * params
    opt = OPTIMIZER_STATES[optimizer] * state_bytes * params
    if strategy == "fsdp" and world_size > 1:
        # ZeRO-3: each rank owns 1/world of every state. Each block is all-gathered when used and the next
        # one prefetched (2 blocks), the root unit (embeddings, head, final norm) stays gathered through
        # the step, and one block's unsharded gradient waits for its reduce-scatter.
        block = max(0.0, params - arch.embedding_params()) / arch.n_layers
        gathered = (2 * block + min(params, arch.embedding_params())) * p_bytes
        weights = weights / world_size + gathered
        grads = grads / world_size + block * p_bytes
        opt /= world_size
    elif world_size > 1:
        grads *= 2          # DDP's bucket buffers mirror the gradients (gradient_as_bucket_view=False)
    acts = activation_bytes(arch, micro_batch, seq_len, precision, activation_checkpointing)
    logits = LOGIT_COPIES * micro_batch * seq_len * arch.vocab_size * 4
    body = weights + casts + grads + opt + acts + logits
    return Memory(weights=weights + casts, grads=grads, optimizer=opt, activations=acts, logits=logits,
                  overhead=CUDA_CONTEXT_BYTES if on_gpu else 0, margin=FRAGMENTATION * body,
                  device=device_memory_gb * GiB if device_memory_gb else None, optimizer_name=optimizer)


def _precision(p: str) -> str:
    p = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}.get(str(p), str(p))
    if p not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {p!r}")
    return p


def max_params_that_fit(device_memory_gb: float, vocab_size: int = DEFAULT_VOCAB, **memory_kwargs) -> float:
    """The largest N (with a derived shape) whose memory fits: bisection on log N (memory grows with N)."""
    fits = lambda n: memory(n, derive_arch(n, vocab_size), device_memory_gb=device_memory_gb, **memory_kwargs).fits
    lo, hi = 1e6, 1e14
    if not fits(lo):
        return 0.0
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# -- 5. crawl -----------------------------------------------------------------------------------------------

def crawl_needed(tokens: float, keep_ratio: float = KEEP_RATIO, tokens_per_page: float = TOKENS_PER_PAGE,
                 bytes_per_page: float = BYTES_PER_PAGE) -> dict:
    """Crawl that yields `tokens` curated tokens when `keep_ratio` of the crawled tokens survive curation."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    raw = tokens / keep_ratio
    pages = raw / tokens_per_page
    return {"raw_tokens": raw, "pages": pages, "raw_bytes": pages * bytes_per_page}


# -- formatting ---------------------------------------------------------------------------------------------

def fmt_count(n: float) -> str:
    """1.2B, 350M, 1.4T."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def fmt_flops(f: float) -> str:
    """1.2e21."""
    mantissa, exp = f"{f:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


def fmt_hours(h: float | None) -> str:
    if h is None:
        return "unknown (no peak FLOP/s)"
    if h < 1:
        return f"{h * 60:.0f} min"
    return f"{h:.1f} h" if h < 48 else f"{h:,.0f} h ({h / 24:,.1f} days)"


def fmt_bytes(b: float) -> str:
    for div, unit in ((1 << 50, "PiB"), (1 << 40, "TiB"), (GiB, "GiB"), (1 << 20, "MiB")):
        if b >= div:
            return f"{b / div:.1f} {unit}"
    return f"{b:.0f} B"


# -- 6. the plan --------------------------------------------------------------------------------------------

@dataclass
class Plan:
    params: float
    tokens: float
    driver: str                             # what set the size: params, tokens, params+tokens, gpu_memory, hours
    arch: ArchDims
    arch_derived: bool
    gpu: str
    precision: str
    optimizer: str
    strategy: str
    gpus: int
    nodes: int
    seq_len: int
    micro_batch: int
    activation_checkpointing: bool
    mfu: float
    peak_flops: float | None                # per device
    flops: float
    hours: float | None                     # needed at `mfu`
    hours_budget: float | None
    compute_optimal_params: float | None    # for hours_budget
    max_params_fit: float | None            # for the device memory (gpu_memory driver)
    memory: Memory
    keep_ratio: float
    crawl: dict
    fits: bool = True
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    @property
    def steps(self) -> int:
        """Optimizer steps without gradient accumulation."""
        return math.ceil(self.tokens / (self.world_size * self.micro_batch * self.seq_len))

    @property
    def summary(self) -> str:
        t = fmt_hours(self.hours) if self.hours is not None else "time unknown"
        return (f"{fmt_count(self.params)} params on {fmt_count(self.tokens)} tokens "
                f"({self.tokens_per_param:.3g}/param), {fmt_flops(self.flops)} FLOPs, {t} on "
                f"{self.world_size} x {self.gpu}; {fmt_bytes(self.memory.total)} per device"
                + ("" if self.fits else " (does not fit)"))

    def rows(self) -> list[tuple[str, str]]:
        m = self.memory
        a = self.arch
        rows = [("driver", self.driver),
                ("parameters", fmt_count(self.params)),
                ("tokens", f"{fmt_count(self.tokens)} ({self.tokens_per_param:.1f} per parameter; Chinchilla 20)"),
                ("shape", f"{a.n_layers} layers x d_model {a.d_model}, {a.n_heads} heads, d_ff {a.ff}, "
                          f"vocab {a.vocab_size:,}" + (" (derived from N)" if self.arch_derived else "")),
                ("training FLOPs (6ND)", fmt_flops(self.flops)),
                ("devices", f"{self.gpus} x {self.gpu}" + (f" x {self.nodes} nodes" if self.nodes > 1 else "")),
                ("peak per device", f"{self.peak_flops / 1e12:,.1f} TFLOP/s" if self.peak_flops else "unknown"),
                (f"time at MFU {self.mfu:.0%}", fmt_hours(self.hours))]
        if self.compute_optimal_params is not None:
            rows.append(("hours budget", f"{self.hours_budget:g} h -> compute-optimal "
                                         f"{fmt_count(self.compute_optimal_params)} params"))
        if self.max_params_fit is not None:
            rows.append(("largest model that fits", fmt_count(self.max_params_fit)))
        rows += [("steps", f"{self.steps:,} of {self.world_size} x {self.micro_batch} x {self.seq_len} tokens"),
                 ("precision / optimizer / strategy", f"{self.precision} / {self.optimizer} / {self.strategy}"
                  + (" + activation checkpointing" if self.activation_checkpointing else "")),
                 ("memory: weights", fmt_bytes(m.weights)), ("memory: grads", fmt_bytes(m.grads)),
                 (f"memory: {self.optimizer} states", fmt_bytes(m.optimizer)),
                 ("memory: activations", fmt_bytes(m.activations)), ("memory: logits", fmt_bytes(m.logits)),
                 ("memory: overhead + margin", fmt_bytes(m.overhead + m.margin)),
                 ("memory per device", fmt_bytes(m.total) + (f" of {fmt_bytes(m.device)}" if m.device else "")),
                 ("fits", "yes" if self.fits else "no"),
                 ("crawl needed", f"{fmt_count(self.crawl['raw_tokens'])} tokens at keep ratio "
                                  f"{self.keep_ratio:g} = {fmt_count(self.crawl['pages'])} pages, "
                                  f"{fmt_bytes(self.crawl['raw_bytes'])} of WARC")]
        return rows + [("note", n) for n in self.notes]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory"] = self.memory.to_dict()
        d.update(world_size=self.world_size, tokens_per_param=self.tokens_per_param, steps=self.steps,
                 summary=self.summary)
        return d


def plan(params: float | None = None, tokens: float | None = None, gpu_memory_gb: float | None = None,
         gpus: int = 1, nodes: int = 1, hours: float | None = None, gpu: str = "H100",
         precision: str = "bf16-mixed", optimizer: str = "adamw", strategy: str = "ddp", mfu: float = 0.4,
         seq_len: int = 2048, micro_batch: int = 1, keep_ratio: float | None = KEEP_RATIO,
         activation_checkpointing: bool = False, arch_dims: ArchDims | dict | None = None,
         peak: float | None = None, tokens_per_page: float = TOKENS_PER_PAGE,
         bytes_per_page: float = BYTES_PER_PAGE) -> Plan:
    """One run, sized by params, tokens (or both), else the device memory, else the hours budget.

    With params or tokens given, gpu_memory_gb is the memory to check against (default: the GPU's from
    the table). With only gpu_memory_gb, the model is min(largest that fits, compute-optimal for `hours`).
    `gpu` "cpu" (or any unlisted device) needs `peak` FLOP/s for a time; "cpu" also has no CUDA context."""
    precision = _precision(precision)
    keep_ratio = KEEP_RATIO if keep_ratio is None else keep_ratio
    world = gpus * nodes
    if world < 1 or not 0 < mfu <= 1:
        raise ValueError(f"need gpus * nodes >= 1 and 0 < mfu <= 1, got {gpus} x {nodes}, mfu {mfu}")
    on_gpu = str(gpu).lower() != "cpu"
    if peak is None and on_gpu:
        peak = peak_flops(gpu, precision)
    memory_given = gpu_memory_gb is not None
    if not memory_given and on_gpu:
        gpu_memory_gb = device_memory_gb(gpu)
    if isinstance(arch_dims, dict):
        arch_dims = ArchDims(**arch_dims)
    vocab = arch_dims.vocab_size if arch_dims else DEFAULT_VOCAB
    mem_kw = dict(precision=precision, optimizer=optimizer, strategy=strategy, world_size=world, seq_len=seq_len,
                  micro_batch=micro_batch, activation_checkpointing=activation_checkpointing, on_gpu=on_gpu)
    optimal = compute_optimal_params(compute_budget(hours, world, peak, mfu)) if hours and peak else None
    max_fit, notes = None, []

    if params is not None and tokens is not None:
        driver = "params+tokens"
    elif params is not None:
        driver, tokens = "params", chinchilla_tokens(params)
    elif tokens is not None:
        driver, params = "tokens", chinchilla_params(tokens)
    elif memory_given:
        driver = "gpu_memory"
        max_fit = max_params_that_fit(gpu_memory_gb, vocab, **mem_kw)
        if max_fit == 0:
            raise PlanError(f"nothing fits in {gpu_memory_gb:g} GiB per device (not even 1M parameters with "
                            f"seq_len {seq_len} x micro_batch {micro_batch} and a {vocab:,} vocabulary)")
        params = max_fit if optimal is None else min(max_fit, optimal)
        if optimal is not None and max_fit < optimal:
            notes.append(f"memory-bound: the compute-optimal {fmt_count(optimal)} does not fit; the largest "
                         f"that does ({fmt_count(max_fit)}) on 20 tokens/param finishes early")
        tokens = chinchilla_tokens(params)
        arch_dims = None        # the shape follows the size found
    elif optimal is not None:
        driver, params = "hours", optimal
        tokens = chinchilla_tokens(params)
    else:
        raise ValueError("give params, tokens, gpu_memory_gb or hours (hours need a known peak FLOP/s)")

    arch = arch_dims or derive_arch(params, vocab)
    mem = memory(params, arch, device_memory_gb=gpu_memory_gb, **mem_kw)
    flops = training_flops(params, tokens)
    need_h = training_hours(flops, world, peak, mfu) if peak else None
    problems = []
    if not mem.fits:
        problems.append(f"needs {mem.total / GiB:.1f} GiB per device, has {mem.device / GiB:.1f} GiB: {mem.parts()}"
                        + _hints(params, arch, mem_kw))
    if hours and need_h and need_h > hours * 1.0001:
        problems.append(f"needs {fmt_hours(need_h)} at MFU {mfu:.0%} on {world} x {gpu}, budget {hours:g} h")
    reason = "; ".join(problems) or (f"fits: {mem.total / GiB:.1f} of {mem.device / GiB:.1f} GiB per device "
                                     f"({mem.total / mem.device:.0%})" if mem.device else
                                     "no device memory given: not checked")
    return Plan(params=float(params), tokens=float(tokens), driver=driver, arch=arch, arch_derived=arch_dims is None,
                gpu=str(gpu), precision=precision, optimizer=optimizer, strategy=strategy, gpus=gpus, nodes=nodes,
                seq_len=seq_len, micro_batch=micro_batch, activation_checkpointing=activation_checkpointing, mfu=mfu,
                peak_flops=peak, flops=flops, hours=need_h, hours_budget=hours, compute_optimal_params=optimal,
                max_params_fit=max_fit, memory=mem, keep_ratio=keep_ratio,
                crawl=crawl_needed(tokens, keep_ratio, tokens_per_page, bytes_per_page),
                fits=not problems, reason=reason, notes=notes)


def _hints(params: float, arch: ArchDims, mem_kw: dict) -> str:
    """What would fit instead: the two cheapest changes, with their numbers."""
    hints = []
    if mem_kw["strategy"] != "fsdp" and mem_kw["world_size"] > 1:
        m = memory(params, arch, **{**mem_kw, "strategy": "fsdp"})
        hints.append(f"fsdp: {m.total / GiB:.1f} GiB")
    if not mem_kw["activation_checkpointing"]:
        m = memory(params, arch, **{**mem_kw, "activation_checkpointing": True})
        hints.append(f"activation checkpointing: {m.total / GiB:.1f} GiB")
    return f" (with {'; '.join(hints)})" if hints else ""


def check(p: Plan) -> Plan:
    """The plan if it fits, else PlanError with the numbers (the trainer calls this before a run)."""
    if not p.fits:
        raise PlanError(p.reason)
    return p
