"""What the chat page needs to know, handed from ``qwenbox ui`` to the app.

``launch`` builds ``Settings`` from the validated qwenbox config (the daemon's own
``load``, so the file is checked the same strict way) and passes it to the Chainlit
process as JSON in one environment variable (``ENV``); ``from_env`` reads it back there.
Only the standard library: this module is imported in both Python environments.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

ENV = "QWENBOX_UI_SETTINGS"


@dataclass(frozen=True)
class Settings:
    socket: str                       # the daemon's API socket (server.socket)
    model: str                        # model.served_name or model.path: what requests name
    system_prompt: str = ""           # warmup.system_prompt: already in the prefix cache
    stream_below_chars: int = 200     # shorter messages stream; longer ones wait for the whole answer
    flush_interval_s: float = 0.04    # at most one page update per interval while streaming
    max_message_chars: int = 16000
    max_body_bytes: int = 4 * 1024 * 1024
    start_wait_s: float = 300.0       # how long one message waits for a starting model
    read_timeout_s: float = 900.0
    title: str = "qwenbox"

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        raw = environ.get(ENV)
        if not raw:
            raise RuntimeError(f"{ENV} is not set: start the chat page with `qwenbox ui`")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(raw).items() if k in known})
