"""Test session set-up: a fresh PREFECT_HOME (so no cache leaks in from earlier runs),
no telemetry, and one real temporary Prefect API server for the whole session."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample"
_home = tempfile.mkdtemp(prefix="refinery-prefect-home-")
os.environ["PREFECT_HOME"] = _home
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("PREFECT_API_URL", None)
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from core import redact  # noqa: E402

redact.install()   # the test process is an entry point too: flows defined in tests log scrubbed


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (SQLite) for the session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


# ----------------------------------------------------------------------------------------------
# test tiers: `make test-fast` runs what needs neither a Prefect API nor a subprocess nor minutes

_SUBPROCESS_SIGNS = ("subprocess", "Popen", "launch(", "_run(", "REFINERY", "torch.distributed", "mp.spawn",
                     "multiprocessing")


def pytest_collection_modifyitems(config, items):
    """Markers from what a test uses, so none can be forgotten: `prefect` for a test that needs the
    API (the prefect_api fixture, directly or through another fixture), `subprocess` for one whose
    body starts processes; `slow` is set by hand (@pytest.mark.slow) on pure tests over ~5 s."""
    import inspect

    seen: dict = {}

    def starts_processes(func) -> bool:
        if func not in seen:
            try:
                src = inspect.getsource(func)
            except (OSError, TypeError):
                src = ""
            seen[func] = any(s in src for s in _SUBPROCESS_SIGNS)
        return seen[func]

    for item in items:
        if "prefect_api" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.prefect)
        info = getattr(item, "_fixtureinfo", None)
        fixtures = [d.func for defs in (info.name2fixturedefs.values() if info else ()) for d in defs]
        if any(starts_processes(f) for f in [getattr(item, "function", None), *fixtures] if f is not None):
            item.add_marker(pytest.mark.subprocess)
