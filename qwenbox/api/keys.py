"""Typed keys to the owners the handlers serve from (aiohttp's ``web.AppKey``), and to
each request's record (``web.RequestKey``, aiohttp 3.14 and later).

- ``CONFIG``: the current config, as a callable (a SIGHUP reload is seen at once).
- ``GATE``: phase refusal, the engine, in-flight tracking, drain-abort (``gate.py``).
- ``ADMISSION``: slots, the queue, sessions, 429s (``admission.py``).
- ``METRICS``: the Prometheus registry (``metrics.py``).
- ``HEALTH``: the daemon's /health body, assembled from each owner's own part.
- ``STARTED_WALL``: when the app was made (the model card's ``created``).
- ``RECORD`` (on a request): its ``RequestRecord``, what its access-log line says.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..admission import Admission
from ..config import Config
from ..gate import Gate
from ..metrics import Metrics
from .record import RequestRecord

CONFIG: web.AppKey[Callable[[], Config]] = web.AppKey("config")
GATE = web.AppKey("gate", Gate)
ADMISSION = web.AppKey("admission", Admission)
METRICS = web.AppKey("metrics", Metrics)
HEALTH: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("health")
STARTED_WALL = web.AppKey("started_wall", float)

RECORD = web.RequestKey("record", RequestRecord)
