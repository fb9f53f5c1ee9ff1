"""Keep secrets out of logs, artifacts and reports.

What can reach a refinery process, and so a log line or an artifact:
  - Prefect credentials: PREFECT_API_KEY, PREFECT_API_AUTH_STRING / PREFECT_SERVER_API_AUTH_STRING
    (the compose stack's PREFECT_AUTH_STRING), from the environment or a Prefect profile;
  - database URLs with a password: PREFECT_API_DATABASE_CONNECTION_URL /
    PREFECT_SERVER_DATABASE_CONNECTION_URL (docker-compose.yml builds one from POSTGRES_PASSWORD),
    PREFECT_SERVER_DATABASE_PASSWORD;
  - hub tokens (HF_TOKEN, HUGGING_FACE_HUB_TOKEN), proxy URLs with credentials (HTTPS_PROXY, ...);
  - credentials inside URLs a user hands us: https://user:pass@host/ and ?token=... seeds.

Two layers, because neither alone is enough: the values of secret environment variables and
settings are known and replaced wherever they occur (a token printed on its own looks like any
other string), and URL userinfo and credential query parameters are replaced by shape (a seed's
password is in no environment variable).

`install()` (run when the `flows` package is imported) applies `SecretFilter` to every log record
this process creates. It hooks the record factory rather than a handler or logger: Prefect's
`setup_logging` may rebuild its handlers after we are imported, and a filter on a logger never sees
records propagated from its children (prefect.flow_runs.*), so either would leave gaps. Records
are scrubbed before any handler sees them: the console, Prefect's API log handler (the UI's
logs), `log_prints` output and exception tracebacks alike. Operators who keep their own Prefect
logging.yml can also name `core.redact.SecretFilter` under `filters:` there.

Artifacts and JSON reports do not go through logging: build them with `redact()` /
`redact_data()` wherever they may hold URLs, messages or config.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
from typing import Any
from urllib.parse import quote, unquote, urlsplit

MASK = "[REDACTED]"
MIN_SECRET_LEN = 6          # shorter values ("true", "admin") would blank out ordinary words

# environment variables that hold a secret outright
SECRET_ENV = ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_AUTH_STRING",
              "PREFECT_API_DATABASE_PASSWORD", "PREFECT_SERVER_DATABASE_PASSWORD", "POSTGRES_PASSWORD",
              "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_API_TOKEN")
# environment variables that hold a URL which may carry a password
URL_ENV = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL", "DATABASE_URL",
           "PREFECT_API_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
           "REFINERY_DASK_ADDRESS")
# any other variable named like a secret: NAME parts such as TOKEN, SECRET, PASSWORD (TOKENIZERS_PARALLELISM
# is split on "_" and so does not match TOKEN; PWD is the working directory)
_SECRET_NAME_PARTS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "APIKEY", "CREDENTIAL", "CREDENTIALS"}
_SECRET_NAME_PAIRS = ("API_KEY", "ACCESS_KEY", "PRIVATE_KEY", "AUTH_STRING", "SECRET_KEY")

# query parameters that carry a credential (case-insensitive, exact names). The crawler drops them
# from URLs it fetches (tasks/urls.py); logs and reports mask their values.
SECRET_PARAMS = frozenset({
    "token", "access_token", "refresh_token", "id_token", "auth", "auth_token", "authtoken", "private_token",
    "session_token", "api_key", "apikey", "api-key", "x-api-key", "key_secret", "password", "passwd", "pwd",
    "secret", "client_secret", "jwt", "sig", "signature", "x-amz-signature", "x-amz-credential",
    "x-amz-security-token", "x-goog-signature", "x-goog-credential",
})

# scheme://userinfo@  (userinfo: anything up to "@" that is not a path, space or quote)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#@\"'<>]+)@")
_PARAM = re.compile(r"(?P<pre>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&#;\s\"'<>]+)")
_AUTH_HEADER = re.compile(r"(?i)(?P<pre>\b(?:proxy-)?authorization\b[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)"
                          r"(?P<value>[^\s\"',;]+)")


def _is_secret_name(name: str) -> bool:
    upper = name.upper()
    if upper in ("PWD", "OLDPWD"):
        return False
    return bool(set(upper.split("_")) & _SECRET_NAME_PARTS) or any(p in upper for p in _SECRET_NAME_PAIRS)


def _url_password(value: str) -> list[str]:
    try:
        parts = urlsplit(value)
        pw = parts.password
    except ValueError:
        return []
    return [pw, unquote(pw)] if pw else []


def _with_variants(value: str) -> list[str]:
    """The value as written, URL-encoded, and (for user:password) the password alone."""
    out = [value, quote(value, safe="")]
    if ":" in value and "://" not in value:            # an auth string "user:password"
        out.append(value.split(":", 1)[1])
    out += _url_password(value)
    return out


def _current_settings():
    """The active Prefect settings, or None. Never imports Prefect or builds a Settings object (a log
    record may come from inside Prefect's own import, and a fresh Settings costs milliseconds)."""
    context = sys.modules.get("prefect.context")
    try:
        ctx = context.SettingsContext.get() if context is not None else None
    except Exception:
        return None
    return ctx.settings if ctx is not None else None


def _settings_secrets(s) -> list[str]:
    """Secrets Prefect took from a profile or .env file rather than the environment."""
    try:
        plain = [s.api.key, s.api.auth_string, s.server.api.auth_string, s.server.database.password]
        url = s.server.database.connection_url
    except Exception:
        return []
    value = lambda v: v.get_secret_value() if hasattr(v, "get_secret_value") else str(v)  # noqa: E731
    found = [x for v in plain if v for x in _with_variants(value(v))]
    return found + (_url_password(value(url)) if url else [])     # the URL itself is just a path on SQLite


def _env_secrets(env) -> list[str]:
    found: list[str] = []
    for name, value in env.items():
        if not value:
            continue
        if name in SECRET_ENV or _is_secret_name(name):
            found += _with_variants(value)
        elif name in URL_ENV or "://" in value:
            found += _url_password(value)
    return found


_cache: dict = {}


def known_secrets(environ: dict | None = None) -> frozenset[str]:
    """Every secret value this process could leak, at least MIN_SECRET_LEN characters long.

    Read afresh on every call (a variable set after import counts), but cached on the environment's
    contents and the settings object, so a log record costs microseconds rather than a scan."""
    if environ is not None:
        return frozenset(v for v in _env_secrets(environ) if v and len(v) >= MIN_SECRET_LEN)
    settings = _current_settings()
    # the raw mapping hashes ten times faster than decoded items(); any change to the environment changes it
    key = hash(tuple(getattr(os.environ, "_data", os.environ).items()))
    hit = _cache.get("entry")
    if hit is not None and hit[0] == key and hit[1] is settings:
        return hit[2]
    found = _env_secrets(os.environ) + (_settings_secrets(settings) if settings is not None else [])
    secrets = frozenset(v for v in found if v and len(v) >= MIN_SECRET_LEN)
    _cache["entry"] = (key, settings, secrets)
    return secrets


@functools.lru_cache(maxsize=16)
def _pattern(secrets: frozenset[str]) -> re.Pattern | None:
    if not secrets:
        return None
    # longest first, so a URL is replaced whole before its password alone
    return re.compile("|".join(re.escape(s) for s in sorted(secrets, key=len, reverse=True)))


def redact(text: str, secrets: frozenset[str] | None = None) -> str:
    """`text` with known secret values, URL userinfo, credential query parameters and
    Authorization header values replaced by [REDACTED]."""
    if not isinstance(text, str) or not text:
        return text
    pat = _pattern(known_secrets() if secrets is None else secrets)
    if pat is not None:
        text = pat.sub(MASK, text)
    if "://" in text:
        text = _USERINFO.sub(lambda m: m["scheme"] + MASK + "@", text)
    if "=" in text:
        text = _PARAM.sub(lambda m: m["pre"] + MASK if m["name"].lower() in SECRET_PARAMS else m[0], text)
    if "uthorization" in text or "UTHORIZATION" in text:
        text = _AUTH_HEADER.sub(lambda m: m["pre"] + MASK, text)
    return text


def redact_url(url: str) -> str:
    """A URL fit for a log or a report: userinfo and credential query values masked."""
    return redact(url)


def redact_data(obj: Any, secrets: frozenset[str] | None = None) -> Any:
    """`redact` applied to every string in a JSON-like structure (dict keys too): for artifact
    tables, JSON reports and config dumps."""
    secrets = known_secrets() if secrets is None else secrets
    if isinstance(obj, str):
        return redact(obj, secrets)
    if isinstance(obj, dict):
        return {redact_data(k, secrets): redact_data(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_data(v, secrets) for v in obj)
    return obj


class SecretFilter(logging.Filter):
    """Scrubs a record in place (never drops it): message and arguments, exception text, stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_refinery_redacted", False):
            return True
        try:
            secrets = known_secrets()
            message = record.getMessage()
        except Exception:   # a bad format string: the handler reports it as usual, unscrubbed args never formatted
            return True
        clean = redact(message, secrets)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # formatters reuse exc_text when set: the traceback goes out scrubbed
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, secrets)
        record._refinery_redacted = True
        return True


_installed: SecretFilter | None = None


def install() -> SecretFilter:
    """Scrub every log record created in this process from now on (idempotent)."""
    global _installed
    if _installed is not None:
        return _installed
    flt = SecretFilter()
    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        flt.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = flt
    return flt
