"""Shared fixtures, a deadline wait, and what the ``engine`` marker means.

``@pytest.mark.engine`` is on exactly the tests that start the real vLLM engine: a
``qwenbox serve`` on the demo model, directly, through the shared ``daemon`` fixture or
as a systemd unit. ``pytest -m "not engine"`` then runs everything else in seconds. The
marker is enforced, not trusted:

- at collection, a test that uses an engine-starting fixture without the marker (or the
  systemd manager without ``systemd``) stops the run with a usage error naming it;
- while a test without the marker runs (set-up and tear-down included), ``Daemon.start``
  fails it, and ``vllm`` cannot be imported, neither in this process nor in a child
  process that inherits our environment: a stand-in ``vllm`` package that raises comes
  first on PYTHONPATH. A test that would start the engine some other way (the CLI, the
  benchmark) therefore fails at once, saying why, instead of quietly taking minutes.
"""
from __future__ import annotations

import importlib.abc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from helpers import DEMO_MODEL, Daemon

# A fixture that starts the engine (or needs the systemd manager) -> the marker its users must carry.
FIXTURE_MARKERS = {"daemon": "engine", "sd": "systemd", "pkg": "package"}
# Set (to the test's node id) while a test without the engine marker runs; read by the guards.
NO_ENGINE_ENV = "QWENBOX_TEST_NO_ENGINE"

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    The deadline only guards against a hang, so make it generous: on expiry this fails
    the test with ``what`` (a string, or a callable that describes the state then)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            desc = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout}s waiting for {desc}", pytrace=False)
        time.sleep(interval)


def require_engine_marker(what: str) -> None:
    """Fail the running test if it lacks ``@pytest.mark.engine``: it is about to start ``what``."""
    test = os.environ.get(NO_ENGINE_ENV)
    if test:
        pytest.fail(f"{test} starts {what} (the real vLLM engine) but is not marked "
                    "@pytest.mark.engine", pytrace=False)


# ---------------------------------------------------------------- the marker, enforced
@pytest.hookimpl(tryfirst=True)     # before `-m` deselects anything: every collected test is checked
def pytest_collection_modifyitems(session, config, items):
    wrong = []
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(marker) is None:
                wrong.append(f"  {item.nodeid}: uses the `{fixture}` fixture but is not marked "
                             f"@pytest.mark.{marker}")
    if wrong:
        raise pytest.UsageError("tests lack the marker that says what they start "
                                "(see tests/conftest.py):\n" + "\n".join(wrong))


_POISON = f'''"""Stand-in put first on PYTHONPATH by tests/conftest.py while a test without
@pytest.mark.engine runs: importing vLLM there is starting the engine."""
import os
raise RuntimeError("vllm imported while " + os.environ.get("{NO_ENGINE_ENV}", "a test") +
                   " runs, which is not marked @pytest.mark.engine")
'''


class _NoVllmFinder(importlib.abc.MetaPathFinder):
    """The same rule for imports in this process."""

    def find_spec(self, name, path=None, target=None):
        if (name == "vllm" or name.startswith("vllm.")) and os.environ.get(NO_ENGINE_ENV):
            raise RuntimeError(f"vllm imported while {os.environ[NO_ENGINE_ENV]} runs, "
                               "which is not marked @pytest.mark.engine")
        return None


def pytest_configure(config):
    poison = Path(tempfile.mkdtemp(prefix="qwenbox-no-engine-"))
    (poison / "vllm").mkdir()
    (poison / "vllm" / "__init__.py").write_text(_POISON)
    config._qwenbox_no_engine_path = str(poison)
    sys.meta_path.insert(0, _NoVllmFinder())


def pytest_unconfigure(config):
    path = getattr(config, "_qwenbox_no_engine_path", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("engine") is not None:
        return (yield)
    saved = {k: os.environ.get(k) for k in (NO_ENGINE_ENV, "PYTHONPATH")}
    os.environ[NO_ENGINE_ENV] = item.nodeid
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (item.config._qwenbox_no_engine_path, saved["PYTHONPATH"]) if p)
    try:
        return (yield)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_daemon_start = Daemon.start


def _guarded_start(self, *args, **kwargs):
    require_engine_marker(f"a qwenbox daemon ({self.workdir})")
    return _daemon_start(self, *args, **kwargs)


Daemon.start = _guarded_start


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def demo_model():
    """The embedded demo model (`make test` builds it; built here if missing)."""
    from qwenbox.demo_model import build, is_demo_model
    if not is_demo_model(DEMO_MODEL):
        build(DEMO_MODEL)
    return DEMO_MODEL


@pytest.fixture(scope="session")
def daemon(tmp_path_factory, demo_model):
    """One shared daemon for the API tests (a cold start costs ~30 s on 2 cores)."""
    d = Daemon(tmp_path_factory.mktemp("shared-daemon")).start()
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()
