import pytest

from helpers import DEMO_MODEL, Daemon


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
