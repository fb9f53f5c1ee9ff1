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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


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
    worker_max_pages: int = Field(2000, ge=1, description="recycle a worker after this many pages (bounds memory)")


class RunnerConfig(_Model):
    task_retries: int = Field(2, ge=0, le=20)
    retry_delay_s: float = Field(2.0, ge=0)
    shard_concurrency: int = Field(1, ge=1, le=1024, description="shard tasks run at once")


class RefineryConfig(_Model):
    crawl: CrawlConfig = Field(default_factory=CrawlConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

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
