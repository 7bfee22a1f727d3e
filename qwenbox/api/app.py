"""The aiohttp application: routes and middleware over typed keys to the daemon's owners.

Contract: ``make_app(...)`` returns a ``web.Application`` whose handlers reach the daemon
only through the typed keys of ``api/keys.py``, each naming one owner; handlers never see
the daemon itself.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..admission import Admission
from ..config import Config
from ..gate import Gate
from ..metrics import Metrics
from . import middleware, routes
from .keys import ADMISSION, CONFIG, GATE, HEALTH, METRICS, STARTED_WALL


def make_app(config: Callable[[], Config], gate: Gate, admission: Admission, metrics: Metrics,
             health: Callable[[], dict[str, Any]]) -> web.Application:
    app = web.Application(middlewares=[middleware.request_context, middleware.readiness_gate],
                          client_max_size=config().server.max_body_bytes)
    app[CONFIG], app[GATE], app[ADMISSION], app[METRICS], app[HEALTH] = config, gate, admission, metrics, health
    app[STARTED_WALL] = time.time()
    routes.add_routes(app)
    return app
