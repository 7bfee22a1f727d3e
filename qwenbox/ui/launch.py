"""``qwenbox ui``: start the chat page (Chainlit) in its own Python environment.

Runs in the daemon's environment (no chainlit import): the config is loaded and checked by
the daemon's own ``config.load``, then this process *becomes* Chainlit (``os.execve``),
so systemd supervises the real server and its exit status.

Contract:
- ``prepare(cfg)`` -> (argv, env): ``ui.state_dir`` gets Chainlit's files, written
  atomically on every start (``.chainlit/config.toml`` with file uploads off, telemetry
  off and ``allow_origins`` from ``ui.allow_origins``; an empty ``chainlit.md``); the app
  gets its ``Settings`` in ``QWENBOX_UI_SETTINGS``, and this qwenbox on PYTHONPATH (the UI
  environment does not install qwenbox: it needs only ``qwenbox.ui``, which imports the
  standard library, chainlit, openai and httpx).
- Chainlit listens on ``ui.listen`` (loopback by default; Nginx is the way in) under the
  root path ``/chat``, headless.
- A missing UI interpreter or an unwritable state directory is a ``UiSetupError`` with one
  sentence saying what to do (exit 78: configuration).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NoReturn

import qwenbox

from ..config import Config
from ..fileio import write_atomic
from .settings import ENV, Settings

ROOT_PATH = "/chat"
APP = Path(__file__).resolve().parent / "app.py"
CHAINLIT_VERSION = "2.12.0"        # packaging/ui-requirements.txt pins it; root-path handling changes between releases


class UiSetupError(Exception):
    pass


def settings_of(cfg: Config) -> Settings:
    return Settings(socket=cfg.server.socket, model=cfg.model.name, system_prompt=cfg.warmup.system_prompt,
                    stream_below_chars=cfg.ui.stream_below_chars, flush_interval_s=cfg.ui.flush_interval_ms / 1000,
                    max_message_chars=cfg.ui.max_message_chars, max_body_bytes=cfg.server.max_body_bytes,
                    start_wait_s=cfg.ui.start_wait_s, title=cfg.ui.title)


def chainlit_config(cfg: Config) -> str:
    """Chainlit's .chainlit/config.toml: only what differs from its defaults, plus [meta]."""
    q = json.dumps           # a JSON string is a valid TOML basic string
    return "\n".join([
        "# Written by `qwenbox ui` at every start from [ui] in qwenbox.toml: edit that, not this.",
        "[project]",
        f"allow_origins = [{', '.join(q(o) for o in cfg.ui.allow_origins)}]",
        "session_timeout = 3600",
        "cache = false",
        "",
        "[features]",
        "unsafe_allow_html = false",
        "latex = false",
        "edit_message = false",
        "[features.spontaneous_file_upload]",
        "enabled = false",
        "[features.audio]",
        "enabled = false",
        "[features.mcp]",
        "enabled = false",
        "",
        "[UI]",
        f"name = {q(cfg.ui.title)}",
        "confirm_new_chat = false",
        "cot = \"hidden\"",
        "",
        "[meta]",
        f"generated_by = {q(CHAINLIT_VERSION)}",
        "",
    ])


def prepare(cfg: Config, environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    ui = cfg.ui
    if not cfg.server.socket:
        raise UiSetupError("server.socket is empty: the chat page reaches the daemon through its unix socket")
    python = Path(ui.python)
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise UiSetupError(f"ui.python: {ui.python} is not an executable Python; build the UI environment "
                           f"(`make ui-venv` in a checkout, or install the UI package) or point ui.python at it")
    state = Path(ui.state_dir)
    try:
        write_atomic(state / ".chainlit" / "config.toml", chainlit_config(cfg))
        write_atomic(state / "chainlit.md", "")
    except OSError as e:
        raise UiSetupError(f"ui.state_dir: cannot write {e.filename or state}: {e.strerror}") from None
    host, _, port = ui.listen.rpartition(":")
    pkg_parent = str(Path(qwenbox.__file__).resolve().parents[1])
    env = dict(os.environ if environ is None else environ)
    env.update({
        ENV: settings_of(cfg).to_env(),
        "CHAINLIT_APP_ROOT": str(state),
        "PYTHONPATH": pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        "PYTHONUNBUFFERED": "1",
        # No telemetry and no third-party tracing from a box that serves a private model.
        "LITERAL_API_KEY": "", "TRACELOOP_TELEMETRY": "false", "DO_NOT_TRACK": "1",
    })
    argv = [str(python), "-m", "chainlit", "run", str(APP), "--headless",
            "--host", host.strip("[]"), "--port", port, "--root-path", ROOT_PATH]
    return argv, env


def main(cfg: Config) -> NoReturn:
    argv, env = prepare(cfg)
    os.chdir(cfg.ui.state_dir)
    os.execve(argv[0], argv, env)
