"""Typed configuration: the one source of truth for every stage.

A `RefineryConfig` is built from defaults, then a YAML file, then CLI overrides
(`--set extract.timeout_s=5`). Pydantic validates all of it before any work starts,
so a bad value fails at once with the field's dotted name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Model(BaseModel):
    # Unknown keys are typos, not extensions: refuse them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CrawlConfig(_Model):
    user_agent: str = Field("llm-refinery/0.1 (+https://github.com/llm-refinery/llm-refinery)", min_length=1)
    concurrency: int = Field(16, ge=1, le=1024, description="requests in flight across all hosts")
    per_host_concurrency: int = Field(1, ge=1, le=64)
    per_host_delay_s: float = Field(1.0, ge=0, description="minimum gap between request starts to one host")
    max_crawl_delay_s: float = Field(30.0, ge=0, description="cap on a robots.txt Crawl-delay")
    timeout_s: float = Field(20.0, gt=0, description="connect/read timeout per request")
    max_retries: int = Field(3, ge=0, le=20, description="retries on timeouts, 5xx and 429")
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    max_retry_after_s: float = Field(120.0, ge=0, description="longest Retry-After honoured; longer gives up")
    max_bytes: int = Field(10 * 2**20, ge=1024, description="abort a body past this size")
    allowed_content_types: list[str] = Field(
        default_factory=lambda: ["text/html", "application/xhtml+xml", "text/plain"]
    )
    max_redirects: int = Field(5, ge=0, le=30)
    respect_robots: bool = True
    follow_links: bool = False
    max_depth: int = Field(1, ge=0, description="link-following depth from the seeds")
    max_pages: int = Field(1000, ge=1, description="page budget, seeds included")
    allow_private_hosts: bool = Field(False, description="permit loopback/private/link-local targets")
    warc_max_bytes: int = Field(1 * 2**30, ge=1024, description="rotate WARC files past this size")


class ExtractConfig(_Model):
    timeout_s: float = Field(30.0, gt=0, description="per-page wall-clock limit; the worker is killed past it")
    workers: int = Field(1, ge=1, le=256, description="extraction processes per shard task")
    max_html_bytes: int = Field(20 * 2**20, ge=1024, description="decoded payloads above this are rejected")
    min_chars: int = Field(1, ge=0, description="extracted texts shorter than this are rejected")
    include_comments: bool = False
    include_tables: bool = True
    favor: Literal["balanced", "precision", "recall"] = "balanced"
    deduplicate: bool = False
    metadata: Literal["fast", "full", "none"] = Field(
        "fast", description="title and date: fast = meta tags, JSON-LD, <title> and htmldate's quick search; "
                            "full = trafilatura's whole metadata pass (2x the extraction cost); none = no title or date")
    worker_max_pages: int = Field(2000, ge=1, description="recycle a worker after this many pages (bounds memory)")


SAMPLE = Path(__file__).resolve().parent.parent / "sample"


class LangIdConfig(_Model):
    languages: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep")
    min_score: float = Field(0.65, ge=0, le=1, description="FineWeb/DCLM keep English at >= 0.65")
    backend: Literal["py3langid", "fasttext"] = "py3langid"
    model_path: str | None = Field(None, description="a fastText lid.176.bin / lid.218e.bin you provide")


class GopherQualityConfig(_Model):
    # Rae et al. 2021 (MassiveText), Appendix A.1; the same values as DataTrove's GopherQualityFilter
    enabled: bool = True
    min_words: int = Field(50, ge=0)
    max_words: int = Field(100_000, ge=1)
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = Field(0.1, ge=0, description="'#' and '...' per word")
    max_bullet_lines_ratio: float = Field(0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: float = Field(0.3, ge=0, le=1)
    min_alpha_words_ratio: float = Field(0.8, ge=0, le=1)
    min_stop_words: int = Field(2, ge=0, description="of: the, be, to, of, and, that, have, with")


class GopherRepetitionConfig(_Model):
    # Rae et al. 2021, Table A1
    enabled: bool = True
    dup_line_frac: float = 0.30
    dup_para_frac: float = 0.30
    dup_line_char_frac: float = 0.20
    dup_para_char_frac: float = 0.20
    top_ngram_char_frac: dict[int, float] = Field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    dup_ngram_char_frac: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


class C4Config(_Model):
    # Raffel et al. 2020, Sec. 2.2; line rules edit the text, page rules reject it
    enabled: bool = True
    drop_lines_without_terminal_punct: bool = Field(
        False, description="the paper's rule; FineWeb turns it off as too aggressive for web text")
    min_words_per_line: int = Field(5, ge=0, description="shorter lines are removed (C4: 5; FineWeb keeps 3)")
    min_sentences: int = Field(3, ge=0, description="pages with fewer sentences are rejected")
    drop_javascript_lines: bool = True
    drop_policy_lines: bool = True
    reject_lorem_ipsum: bool = True
    reject_curly_braces: bool = True
    ignore_numbered_braces: bool = Field(True, description="'{12}' (paragraph numbers of court opinions) is not code")
    max_word_length: int = Field(1000, ge=1, description="lines with a longer word are removed")


class FineWebConfig(_Model):
    # Penedo et al. 2024, FineWeb's custom filters
    enabled: bool = True
    min_line_punct_ratio: float = Field(0.12, ge=0, le=1)
    max_short_line_ratio: float = Field(0.67, ge=0, le=1, description="lines under short_line_chars")
    short_line_chars: int = 30
    max_dup_line_char_ratio: float = Field(0.01, ge=0, le=1)
    max_newline_word_ratio: float = Field(0.3, ge=0, description="list-like pages: newlines per word")


class RulesConfig(_Model):
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)


class DedupConfig(_Model):
    exact: bool = True
    url: bool = True
    minhash: bool = True
    shingle_words: int = Field(5, ge=1, description="FineWeb: 5-word shingles")
    bands: int = Field(14, ge=1, description="FineWeb: 14 bands x 8 rows = 112 hashes")
    rows: int = Field(8, ge=1)
    seed: int = 1
    partitions: int = Field(16, ge=1, description="hash partitions of the reduce: each fits in RAM alone")


class QualityConfig(_Model):
    """Model-based selection: keep the crawl text most like `reference` (clean prose for quality, or a
    few dozen documents of a domain for domain selection). bench/selection.py compares the methods."""
    target_keep_ratio: float = Field(0.02, gt=0, le=1, description="kept words / extracted words after all stages")
    method: Literal["tfidf", "fasttext", "dsir", "moore-lewis", "embedding"] = Field(
        "tfidf", description="tfidf: logistic regression on hashed TF-IDF word 1-2-grams (best on bench/selection.py); "
                             "fasttext: DCLM-style classifier; dsir: hashed n-gram importance weights; moore-lewis: "
                             "bigram LM cross-entropy difference; embedding: static embeddings + logistic regression")
    model_path: str | None = Field(None, description="a trained model (quality.bin / quality.npz); else one is trained")
    reference: list[str] = Field(default_factory=lambda: [str(SAMPLE / "curation" / "reference")],
                                 description="positives: .txt / .jsonl / .parquet files or folders")
    negatives: Literal["crawl", "background", "crawl+background"] = Field(
        "crawl", description="what the reference is contrasted with: a sample of the crawl itself, the general "
                             "background corpus, or both")
    background: list[str] = Field(default_factory=lambda: [str(SAMPLE / "curation" / "background" / "docs.jsonl")],
                                  description="general text of many topics (shipped: one in five of the domain sets)")
    pu_rounds: int = Field(0, ge=0, le=5, description="retrain after dropping crawl negatives scored like the reference")
    crossfit_folds: int = Field(2, ge=1, le=10, description="crawl documents are scored by a model that did not "
                                                            "train on them, one per fold of the crawl (1: off)")
    max_negatives: int = Field(20_000, ge=10, description="crawl documents sampled as negatives")
    chunk_words: int = Field(200, ge=10, description="reference text is cut into chunks of about this size")
    min_holdout_auc: float = Field(0.9, ge=0, le=1, description="warn when held-out training data separates worse")
    tfidf_c: float = Field(1.0, gt=0, description="tfidf: inverse L2 regularisation strength")
    epoch: int = Field(10, ge=1, description="fasttext")
    lr: float = Field(0.3, gt=0, description="fasttext")
    word_ngrams: int = Field(2, ge=1, description="fasttext")
    dim: int = Field(16, ge=2, description="fasttext: 16 keeps the model ~15 MB at the same AUC as 64 (58 MB)")
    bucket: int = Field(200_000, ge=1000, description="fasttext: hashed n-gram rows: bucket x dim x 4 bytes of model")
    seed: int = 0


class ToxicityConfig(_Model):
    enabled: bool = Field(True, description="drop toxic documents (off: every document passes with score 0; "
                                            "`refinery ablate` turns it off for its rules-only variants)")
    model_path: str | None = None
    training_data: str = Field(str(SAMPLE / "curation" / "toxicity" / "labeled_data.csv"),
                               description="CSV/JSONL with a text column and a label column")
    text_column: str = "tweet"
    label_column: str = "class"
    toxic_labels: list[str] = Field(default_factory=lambda: ["0", "1"],
                                    description="Davidson et al.: 0 hate speech, 1 offensive, 2 neither")
    clean_data: list[str] = Field(
        default_factory=lambda: [str(SAMPLE / "curation" / "reference"),
                                 str(SAMPLE / "curation" / "background" / "docs.jsonl")],
        description="clean prose of many topics (.txt / .jsonl / .parquet files or folders), one clean "
                    "example per sentence; a held-out part calibrates the sentence threshold")
    identity_augmentation: bool = Field(True, description="add neutral sentences naming the identity terms of "
                                                          "bias.groups_file as clean examples (Dixon et al. 2018)")
    holdout: float = Field(0.1, gt=0, lt=0.5, description="share of clean_data held out of training to calibrate")
    target_fpr: float = Field(0.002, gt=0, lt=0.5, description="calibration: the sentence threshold is raised "
                                                               "until at most this share of held-out clean "
                                                               "sentences is above it")
    min_sentence_score: float = Field(0.5, gt=0, lt=1, description="the sentence threshold never goes below this "
                                                                   "(and is this without a calibration file)")
    max_share: float = Field(0.3, gt=0, le=1, description="drop if the words of toxic sentences are more than "
                                                          "this share of the document's words")
    min_toxic_sentences: int = Field(2, ge=1, description="... and there are at least this many toxic sentences")
    wordlist: str = Field(str(SAMPLE / "curation" / "wordlists" / "en"), description="LDNOOBW-format list")
    max_wordlist_ratio: float = Field(0.01, ge=0, le=1, description="matched words / words (C4 drops any match)")
    min_wordlist_terms: int = Field(3, ge=1, description="the word-list rule needs at least this many matches and "
                                                         "one toxic sentence: clinical or legal words alone never drop")
    warn_removal: float = Field(0.05, gt=0, le=1, description="the run warns when toxicity removes more than this "
                                                             "share of the documents that reach it")
    epoch: int = Field(10, ge=1)
    seed: int = 0


class PiiConfig(_Model):
    enabled: bool = True
    email: bool = True
    phone: bool = True
    ip: bool = True


class BiasConfig(_Model):
    groups_file: str = Field(str(SAMPLE.parent / "tasks" / "bias_groups.yaml"))
    disparity_ratio: float = Field(1.5, gt=1, description="flag groups removed this many times the overall rate")
    min_mentions: int = Field(5, ge=1, description="groups with fewer mentions are reported, not flagged")


class DecontaminateConfig(_Model):
    """Remove crawl documents that share a word n-gram with an evaluation set (GPT-3, DataTrove)."""
    paths: list[str] = Field(default_factory=list,
                             description="evaluation sets (.txt / .jsonl / .parquet files, folders, shard folders) "
                                         "to protect; empty: the stage is off")
    ngram: int = Field(13, ge=1, description="a document sharing any n consecutive words (lowercased \\w+ "
                                             "words) with an evaluation text is removed (GPT-3: 13)")


class CurateConfig(_Model):
    """Token counts everywhere in curation are words (`\\w+`, as `n_words` in extraction)."""
    langid: LangIdConfig = Field(default_factory=LangIdConfig)
    rules: RulesConfig = Field(default_factory=RulesConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    toxicity: ToxicityConfig = Field(default_factory=ToxicityConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    bias: BiasConfig = Field(default_factory=BiasConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)


class ShardConfig(_Model):
    """Tokenizer and tokenized shards. Token counts here are tokenizer tokens (not words)."""
    tokenizer_path: str | None = Field(None, description="a tokenizer.json or HF tokenizer folder to use instead "
                                                         "of training one (required to fine-tune an existing model)")
    vocab_size: int = Field(8192, ge=512, le=1 << 20, description="BPE vocabulary incl. special tokens; "
                                                                  "<= 65536 stores ids as uint16")
    min_frequency: int = Field(2, ge=1, description="a merge must occur this often")
    sentinels: int = Field(100, ge=0, le=1000, description="span-corruption sentinels <extra_id_i> (T5: 100)")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="documents held out for validation, by hash")
    min_val_docs: int = Field(1, ge=0, description="at least this many val documents on a small corpus")
    seed: int = Field(0, description="salt of the split hash: change it for another split")
    row_group_tokens: int = Field(1 << 20, ge=1, description="tokens per Parquet row group (the streaming unit)")
    compare_tokenizer: str | None = Field(None, description="general tokenizer (tokenizer.json or folder) for the "
                                                            "report; default: one trained on bundled general text")


class TrainConfig(_Model):
    """Pretraining (and, with `base`, fine-tuning). Batch sizes are sequences per device per step."""
    arch: Literal["decoder", "encoder", "encoder-decoder"] = "decoder"
    preset: Literal["tiny", "small", "25m", "125m", "350m", "1b"] = "tiny"
    seq_len: int = Field(256, ge=8, le=1 << 17, description="tokens per sequence (encoder-decoder: encoder input)")
    batch_size: int = Field(8, ge=1, description="sequences per device per micro-step")
    accumulate: int = Field(1, ge=1, description="gradient accumulation micro-steps per optimizer step")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; default: one pass over the train tokens")
    max_tokens: int | None = Field(None, ge=1, description="stop after this many tokens (overrides max_steps)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_steps: int | None = Field(None, ge=0, description="default: 5% of the steps, at most 1000")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    compile: bool = Field(False, description="torch.compile the model")
    activation_checkpointing: bool = False
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int = Field(1, ge=1, description="processes per node (GPUs, or CPU processes with gloo)")
    nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    num_workers: int = Field(0, ge=0, description="dataloader worker processes per device")
    val_every: int = Field(200, ge=1, description="validate every N optimizer steps (and at the end)")
    val_batches: int = Field(50, ge=1, description="validation batches per check")
    checkpoint_every: int = Field(200, ge=1, description="save a checkpoint every N optimizer steps")
    log_every: int = Field(1, ge=1)
    progress_every_s: float = Field(30.0, gt=0, description="without a terminal, a progress line (step, loss, "
                                                             "tokens/s, ETA) every N seconds")
    seed: int = 0
    nan_policy: Literal["stop", "skip"] = Field("stop", description="a NaN/inf loss stops the run, or its batch is skipped")
    gpu: str | None = Field(None, description="GPU name for MFU (planner's peak table); default: detected")
    peak_flops: float | None = Field(None, gt=0, description="peak FLOP/s per device, overrides the table")
    gpu_memory_gb: float | None = Field(None, gt=0, description="device memory for the planner; default: detected")
    skip_plan_check: bool = Field(False, description="start even when the planner says it does not fit")
    export: bool = Field(True, description="write a Hugging Face folder at the end")


class FinetuneConfig(_Model):
    """Fine-tuning an existing model: `base` set switches `refinery train` from building to loading."""
    base: str | None = Field(None, description="our export, a Hugging Face model folder, or a .gguf file")
    method: Literal["full", "lora", "prompt", "qlora"] = Field(
        "lora", description="full: every weight; lora: low-rank adapters, base frozen; prompt: trainable "
                            "virtual tokens, model frozen; qlora: LoRA on a 4-bit base (CUDA only)")
    lora_r: int = Field(8, ge=1, le=1024, description="LoRA rank: adapter size grows linearly with it")
    lora_alpha: int = Field(16, ge=1, description="LoRA scale: the update is multiplied by alpha / r")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    lora_target: list[str] | None = Field(None, description="module names LoRA adapts; default: every attention "
                                                            "and MLP projection of the family")
    prompt_tokens: int = Field(20, ge=1, le=1000, description="virtual tokens of prompt tuning")
    prompt_init_text: str | None = Field(None, description="prompt tuning starts from this text's token embeddings "
                                                           "(a task description); default: random")


class EvalConfig(_Model):
    """The eval stage after every training run, and `refinery eval`'s scoring (models/evaluate.py)."""
    enabled: bool = Field(True, description="score the trained model (and a fine-tune's base) in bits per byte")
    data: list[str] = Field(default_factory=list, description="held-out sets scored besides the val shard: .txt, "
                                                              ".jsonl, Parquet files or folders, shard folders")
    context: int = Field(1024, ge=8, description="tokens per scoring window (non-overlapping)")
    batch_size: int = Field(4, ge=1, description="windows per forward pass")
    max_documents: int | None = Field(500, ge=1, description="score at most the first N documents of each set "
                                                             "(null: all); keeps the stage minutes on a CPU")
    device: str = Field("auto", description="auto (cuda if present), cpu, cuda, cuda:N")


class ServeConfig(_Model):
    """`refinery serve`: the deployments one process serves (deployments/serve.py)."""
    crawl_cron: str | None = Field("0 3 * * *", description="cron (UTC) of the scheduled crawl; null: no schedule")
    crawl_seeds: str = Field("data/seeds.txt", description="seed file of the scheduled crawl")
    crawl_out: str = Field("data/crawl", description="output folder of the scheduled crawl")
    chain_train: bool = Field(False, description="a completed `shard` run triggers `train` on its output")
    limit: int = Field(4, ge=1, description="flow runs the serve process runs at once")
    data_roots: list[str] = Field(default_factory=lambda: ["data", "runs"], min_length=1,
                                  description="the only folders API-triggered runs may read and write (the "
                                              "bundled sample is readable too); relative to the serve process")
    heartbeat_s: int = Field(30, ge=30, description="a served run's process sends a heartbeat every N seconds "
                                                    "(Prefect's minimum: 30)")
    crash_after_s: int | None = Field(None, ge=60, description="a served run silent this long (its process died: "
                                                               "SIGKILL, OOM, a lost host) is marked Crashed; "
                                                               "default: 3 heartbeats, at least 2")

    @model_validator(mode="after")
    def _window_spans_heartbeats(self) -> "ServeConfig":
        if self.crash_after_s is not None and self.crash_after_s < 2 * self.heartbeat_s:
            raise ValueError(f"crash_after_s={self.crash_after_s} must be at least twice heartbeat_s="
                             f"{self.heartbeat_s}: one late heartbeat would crash a live run")
        return self


class RunnerConfig(_Model):
    """Where the data stages' shard tasks run: threads of this process, or a Dask cluster."""
    task_retries: int = Field(2, ge=0, le=20, description="retries of a failed shard task")
    retry_delay_s: float = Field(2.0, ge=0, description="seconds between a task's retries")
    shard_concurrency: int = Field(1, ge=1, le=1024, description="shard tasks run at once (kind: threads)")
    refresh_cache: bool = Field(False, description="recompute every task instead of taking results from cache "
                                                   "(a cold run: benchmarks, or a cache you distrust)")
    kind: Literal["threads", "dask"] = Field(
        "threads", description="threads: a thread pool in this process; dask: a Dask cluster (prefect-dask)")
    dask_address: str | None = Field(
        None, min_length=1, description="scheduler of a running Dask cluster, e.g. tcp://host:8786; default: "
                                        "$REFINERY_DASK_ADDRESS, else a LocalCluster started for the run")
    dask_workers: int = Field(2, ge=1, le=1024, description="worker processes of a LocalCluster (kind: dask)")
    dask_threads_per_worker: int = Field(1, ge=1, le=256, description="threads per LocalCluster worker process")


class RefineryConfig(_Model):
    crawl: CrawlConfig = Field(default_factory=CrawlConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @field_validator("*", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any) -> Any:
        return {} if v is None else v  # an empty `crawl:` section in YAML means defaults


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`extract.timeout_s=5` -> ("extract.timeout_s", 5). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. extract.timeout_s=5")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> RefineryConfig:
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections (crawl:, extract:, ...)")
        tree = loaded
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    try:
        return RefineryConfig.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {field}: {err['msg']} (got {json.dumps(err.get('input'), default=str)[:80]})")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def config_fingerprint(model: BaseModel) -> str:
    """Canonical JSON of a stage config: part of every cache key."""
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


# config fields that name files or folders a run reads (wherever they occur in the config; `paths`:
# curate.decontaminate.paths and `data`: eval.data, the evaluation sets). core/guard.py confines them
# on a server; absolute_paths() anchors them to the working directory the user gave them in.
PATH_FIELDS = {"model_path", "reference", "training_data", "wordlist", "groups_file", "tokenizer_path",
               "compare_tokenizer", "base", "background", "clean_data", "paths", "data"}


def absolute_paths(cfg: RefineryConfig, cwd: str | Path | None = None) -> RefineryConfig:
    """Every path field made absolute (relative to `cwd`, default the current directory; `~` expanded).
    Where a CLI or a served deployment receives a config: the trainer, a worker or a later rerun may
    run in another working directory, where a relative path means another file or none."""
    import os

    root = Path(cwd) if cwd is not None else Path.cwd()

    def fix(v):
        return os.path.abspath(root / Path(v).expanduser()) if isinstance(v, str) and v else v

    def walk(node):
        if isinstance(node, dict):
            return {k: ([fix(x) for x in v] if isinstance(v, list) else fix(v)) if k in PATH_FIELDS else walk(v)
                    for k, v in node.items()}
        return node

    return RefineryConfig.model_validate(walk(cfg.model_dump()))
