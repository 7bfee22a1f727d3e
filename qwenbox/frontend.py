"""The HTTP front: the aiohttp application, its runner, and the listeners it serves on.

Contract:
- ``Frontend(settings, app)``; ``await start()`` binds the sockets (``Listeners.bind``: an
  inherited systemd socket, or our own), sets up aiohttp's ``AppRunner`` with one capped
  site per socket, and begins accepting: at once with our own socket; with systemd's
  socket only after ``server.queue_while_loading_s`` (until then connections wait in
  systemd's queue, so a restart costs latency, not errors) or at ``accept_now()``,
  whichever comes first. Raises ``ListenerError`` when a path is taken.
- ``await stop_accepting()`` begins the stop: no keep-alive reuse from here on, and with
  systemd's socket our copy is closed so the next instance accepts what arrives.
- ``await stop()``: aiohttp's own shutdown steps (stop the sites, close idle connections,
  wait for handlers up to ``drain_timeout_s`` + a grace), then our socket file unlinked.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from aiohttp import web

from . import eventlog
from .config import Config
from .eventlog import Event
from .listeners import Listeners, raise_fd_limit

_ABORTED_GRACE_S = 5.0    # after drain-abort: time for the aborted requests to answer their clients


class Frontend:
    def __init__(self, settings: Callable[[], Config], app: web.Application) -> None:
        cfg = settings()
        self.settings = settings
        self.app = app
        self.listeners = Listeners(cfg.server, cfg.socket_mode_int, cfg.server.retry_after_s)
        self.closing = False          # stopping: no keep-alive reuse, nothing new accepted
        self._runner: web.AppRunner | None = None
        self._opener: asyncio.Task[None] | None = None
        app.on_response_prepare.append(self._close_after_response)

    @property
    def handover(self) -> bool:
        """Serving on sockets systemd passed (socket activation)."""
        return self.listeners.handover

    async def start(self) -> None:
        server = self.settings().server
        fd_limit = raise_fd_limit()
        self.listeners.bind()
        self._runner = web.AppRunner(self.app, handle_signals=False, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=server.drain_timeout_s + _ABORTED_GRACE_S,
                                     keepalive_timeout=server.idle_timeout_s)
        await self._runner.setup()
        self.listeners.sites(self._runner, fd_limit)
        hold = server.queue_while_loading_s if self.handover else 0.0
        if hold:
            self._opener = asyncio.create_task(self.listeners.start(after=hold), name="qwenbox-opener")
        else:
            await self.listeners.start()
        eventlog.event(Event.LISTENING, sockets=self.listeners.describe(), pid=os.getpid(),
                       socket_activation=self.handover, queue_while_loading_s=hold,
                       max_connections=self.listeners.cap, open_files_limit=fd_limit)

    async def accept_now(self) -> None:
        """Accept from now on (the engine is ready): queued connections are served."""
        if not self.closing:
            await self.listeners.start()

    async def stop_accepting(self) -> None:
        self.closing = True
        if self._opener is not None:
            self._opener.cancel()
        if self.handover:
            await self.listeners.stop_accepting()

    async def stop(self) -> None:
        self.closing = True
        if self._runner is not None:
            await self._runner.cleanup()
        self.listeners.remove_own_socket()

    def remove_own_socket(self) -> None:
        """The immediate way out: leave nothing of ours on disk."""
        self.listeners.remove_own_socket()

    async def _close_after_response(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.closing:      # no keep-alive reuse of a connection to a draining instance
            response.force_close()
