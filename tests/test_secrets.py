"""No secret appears in logs, artifacts or output files (core/redact.py, tasks/urls.py).

Secret environment variables (Prefect credentials, a database URL, a hub token, a proxy URL) are set
and real flows run against the session's Prefect API: the crawl flow on seeds that carry
user:password and ?token= credentials, and a flow that deliberately logs, prints and raises with
the secrets. Everything the API then holds for those runs (every log line, every artifact) and
every file under the output folder (WARC decompressed, Parquet decoded) is searched for them.
"""
from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from crawl_servers import CrawlServer, page
from core.redact import MASK, known_secrets, redact, redact_data
from tasks.urls import extract_links, normalize_url

ENV_SECRETS = {
    "HF_TOKEN": "hf_EnvHubToken0001",
    "HUGGING_FACE_HUB_TOKEN": "hf_EnvHubToken0002",
    "PREFECT_API_KEY": "pnu_EnvApiKey0003",
    "PREFECT_API_AUTH_STRING": "admin:EnvAuthPass0004",
    "PREFECT_SERVER_API_AUTH_STRING": "admin:EnvAuthPass0004",
    "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://prefect:EnvDbPass0005@postgres:5432/prefect",
    "HTTPS_PROXY": "http://proxyuser:EnvProxyPass0006@proxy.invalid:3128",
    "MY_SERVICE_SECRET": "EnvOtherSecret0007",
}
# what must never show up: each secret value, and for the composite ones the password alone
NEEDLES = ["hf_EnvHubToken0001", "hf_EnvHubToken0002", "pnu_EnvApiKey0003", "EnvAuthPass0004",
           "EnvDbPass0005", "EnvProxyPass0006", "EnvOtherSecret0007",
           # credentials in seed URLs and in links found on crawled pages
           "SeedPass0008", "SeedToken0009", "SeedApiKey0010", "LinkToken0011", "LinkPass0012"]
# A crawled page that prints a credential in its own HTML keeps it in the archived body: the WARC holds
# what the server sent. Those two may appear in response payloads only, never in a URL we kept.
IN_PAGE_BODIES = {"LinkToken0011", "LinkPass0012"}


@pytest.fixture
def secret_env(prefect_api, monkeypatch):
    """Secrets in the environment, set after the session's API server started (so it never sees them:
    its own auth string would lock the tests out), plus INFO logging so the run logs are really sent."""
    for k, v in ENV_SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")    # the test API is on loopback
    import prefect.main  # noqa: F401 - its import configures Prefect's logging; our level must come after
    prefect_logger = logging.getLogger("prefect")
    level = prefect_logger.level
    prefect_logger.setLevel(logging.INFO)
    yield
    prefect_logger.setLevel(level)


def api_text(flow_run_id) -> tuple[str, int, int]:
    """Every log message and artifact of a flow run (and its task runs) as the API holds them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, LogFilter,
                                                LogFilterFlowRunId)
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=20)
    with get_client(sync_client=True) as client:
        logs, offset = [], 0
        while batch := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                        limit=200, offset=offset):
            logs += batch
            offset += len(batch)
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        run = client.read_flow_run(flow_run_id)
    text = "\n".join([f"{x.name}: {x.message}" for x in logs] +
                     [f"{a.key} {a.type} {a.description} {a.data}" for a in arts] + [str(run.parameters)])
    return text, len(logs), len(arts)


def file_texts(root: Path) -> dict[str, str]:
    """Every file under root, readable: Parquet decoded row by row, WARC files twice: inflated whole
    (key "<path>"), and everything but the response payloads (key "<path> headers")."""
    from warcio.archiveiterator import ArchiveIterator

    out = {}
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        if p.name.endswith(".parquet"):
            out[str(p)] = str(pq.read_table(p).to_pylist())
        elif p.name.endswith(".gz"):
            out[str(p)] = gzip.decompress(p.read_bytes()).decode("utf-8", "replace")
            with open(p, "rb") as f:
                out[f"{p} headers"] = "\n".join(
                    str(r.rec_headers) + str(r.http_headers) +
                    (r.content_stream().read().decode("utf-8", "replace") if r.rec_type != "response" else "")
                    for r in ArchiveIterator(f))
        else:
            out[str(p)] = p.read_bytes().decode("utf-8", "replace")
    return out


def leaks(text: str, allowed: set[str] = frozenset()) -> list[str]:
    return [n for n in NEEDLES if n in text and n not in allowed]


def test_redact_masks_known_values_userinfo_and_credential_parameters(monkeypatch):
    for k, v in ENV_SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-ish-value")     # named like TOKEN, is not one
    secrets = known_secrets()
    assert {"hf_EnvHubToken0001", "EnvAuthPass0004", "EnvDbPass0005", "EnvProxyPass0006",
            "EnvOtherSecret0007"} <= secrets
    assert "false-ish-value" not in secrets and not any(len(s) < 6 for s in secrets)
    line = ("db postgresql+asyncpg://prefect:EnvDbPass0005@postgres:5432/prefect, hub hf_EnvHubToken0001, "
            "seed https://bob:SeedPass0008@ex.com/a?x=1&token=SeedToken0009&API_KEY=SeedApiKey0010#f, "
            "header Authorization: Bearer LinkToken0011, auth admin:EnvAuthPass0004")
    clean = redact(line)
    assert leaks(clean) == [] and clean.count(MASK) >= 6, clean
    assert "https://[REDACTED]@ex.com/a?x=1&token=[REDACTED]" in clean     # the shape stays readable
    assert redact("http://[::1]:8080/a@b?page=2") == "http://[::1]:8080/a@b?page=2"   # nothing secret here
    nested = redact_data({"seeds": ["https://u:SeedPass0008@h/"], "n": 3, "cfg": {"k": "hf_EnvHubToken0001"}})
    assert leaks(str(nested)) == [] and nested["n"] == 3


def test_normalize_url_never_keeps_a_credential():
    assert normalize_url("https://bob:SeedPass0008@Ex.com/a?z=1&token=SeedToken0009&Api%5FKey=x&a=2") == \
        "https://ex.com/a?a=2&z=1"
    links = extract_links('<a href="/p?access_token=LinkToken0011&id=7">x</a>'
                          '<a href="http://eve:LinkPass0012@ex.com/q">y</a>', "http://ex.com/")
    assert links == ["http://ex.com/p?id=7", "http://ex.com/q"]
    with pytest.raises(ValueError) as e:                      # the error text lands in the crawl log
        normalize_url("ftp://bob:SeedPass0008@ex.com/?token=SeedToken0009")
    assert leaks(str(e.value)) == []


def test_crawl_flow_keeps_credentials_out_of_logs_artifacts_and_files(secret_env, tmp_path):
    from core.config import RefineryConfig
    from flows.crawl import crawl_flow

    links = ('<a href="/linked?access_token=LinkToken0011">a</a>'
             '<a href="http://eve:LinkPass0012@127.0.0.1:{port}/other">b</a>')
    with CrawlServer() as srv:
        body = "<html><body><p>" + "A page about refining text. " * 20 + "</p>" + \
            links.format(port=srv.port) + "</body></html>"
        for path in ("/", "/private", "/linked", "/other"):
            srv.routes[path] = page(body)
        seeds = tmp_path / "seeds.txt"
        seeds.write_text(f"http://alice:SeedPass0008@127.0.0.1:{srv.port}/?token=SeedToken0009&page=1\n"
                         f"http://127.0.0.1:{srv.port}/private?api_key=SeedApiKey0010\n")
        cfg = RefineryConfig.model_validate({"crawl": {"allow_private_hosts": True, "per_host_delay_s": 0.0,
                                                       "follow_links": True, "max_depth": 1, "timeout_s": 5.0}})
        out = tmp_path / "crawl"
        state = crawl_flow(str(seeds), str(out), cfg, return_state=True)
        sent = srv.paths()
    assert state.is_completed(), state
    summary = state.result()
    assert summary["fetched"] == 4, summary                  # both seeds and both links, credentials dropped

    # the crawler sent no credential: the server saw bare paths
    assert leaks(" ".join(sent)) == [] and "/linked" in sent and "/?page=1" in sent, sent

    text, n_logs, n_arts = api_text(state.state_details.flow_run_id)
    assert n_logs >= 3 and n_arts >= 1, (n_logs, n_arts, text)   # the run's logs were really sent and read back
    assert "crawl: {" in text
    assert leaks(text) == [], text

    files = file_texts(out)
    assert any(p.endswith("crawl_log.parquet") for p in files) and any(".warc.gz" in p for p in files)
    assert any(f"127.0.0.1:{srv.port}/linked" in t for t in files.values())     # URLs are there, bare
    found = {p: leaks(t, IN_PAGE_BODIES if p.endswith(".warc.gz") else set()) for p, t in files.items()}
    assert not any(found.values()), found
    assert "/linked?access_token=LinkToken0011" in files[str(out / "warc" / "crawl-00000.warc.gz")]  # the body, as sent


def test_secrets_logged_printed_or_raised_by_a_flow_are_masked_in_the_api(secret_env):
    """What our code might do by mistake (log a config, print an env var, raise with a URL in the
    message) reaches the UI scrubbed: run logger, task logger, log_prints and tracebacks alike."""
    from prefect import flow, get_run_logger, task

    @task
    def careless_task() -> None:
        get_run_logger().warning("task sees hub token %s", os.environ["HF_TOKEN"])

    @flow(log_prints=True)
    def careless() -> None:
        log = get_run_logger()
        log.info("database %s", os.environ["PREFECT_API_DATABASE_CONNECTION_URL"])
        log.info("environment: %s", {k: os.environ[k] for k in ENV_SECRETS})
        print("auth string", os.environ["PREFECT_API_AUTH_STRING"], "key", os.environ["PREFECT_API_KEY"])
        print("seed https://alice:SeedPass0008@example.org/?token=SeedToken0009")
        careless_task()
        raise RuntimeError(f"cannot reach proxy {os.environ['HTTPS_PROXY']} with {os.environ['MY_SERVICE_SECRET']}")

    state = careless(return_state=True)
    assert state.is_failed()
    text, n_logs, _ = api_text(state.state_details.flow_run_id)
    assert n_logs >= 5 and text.count(MASK) >= 8, text
    assert "RuntimeError: cannot reach proxy" in text          # the traceback itself arrived, scrubbed
    assert leaks(text) == [], text
