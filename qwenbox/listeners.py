"""The listeners: which sockets the daemon serves on, how many connections it holds, when it
accepts, and what is left on disk when it stops.

Contract:
- ``Listeners(server_cfg, socket_mode, retry_after_s)``; ``bind()`` takes the sockets systemd passed
  (socket activation, ``handover`` is then True) or binds ``server.socket`` (mode
  ``server.socket_mode``, replacing only a STALE socket) and ``server.tcp``. Raises
  ``ListenerError`` when a path is taken by a live server or by a non-socket file.
- ``sites(runner, fd_limit)`` makes one aiohttp site per socket. Together they hold at
  most ``max_connections`` open connections (and never more than ``fd_limit`` allows):
  past that a new connection gets a canned ``503`` with ``Retry-After`` and is closed, so
  the process never runs out of descriptors and keeps answering once connections close.
  Built on aiohttp's public names only (``web.BaseSite``, the runner's ``web.Server`` as
  the protocol factory, ``web.RequestHandler.handle_error``); tests/test_listeners.py
  fails when one of them stops doing what the cap relies on.
- ``start(after)`` begins accepting (after ``after`` seconds, or at once); ``stop_accepting``
  closes our copies of systemd's sockets so the next instance accepts what arrives.
  ``remove_own_socket()`` unlinks the socket file we bound (never one systemd owns).
- A request aiohttp cannot parse is answered with the API's JSON error shape.
- ``raise_fd_limit()`` lifts the soft RLIMIT_NOFILE to the hard one (the daemon's and the
  benchmarks' one way to do it); ``limit_accept_errors``
  and ``limit_server_errors`` turn asyncio's per-failure accept reports and aiohttp's
  per-request parse-error tracebacks into at most one line per kind per
  ``_ERROR_LOG_EVERY_S``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import stat
import time
import weakref
from pathlib import Path
from typing import Any

from aiohttp import web

from .config import ServerConfig
from .systemd import take_listen_fds

log = logging.getLogger("qwenbox.listeners")

_FD_RESERVE = 256          # descriptors kept for the engine, the model files, logs, pipes
_ERROR_LOG_EVERY_S = 10.0
_ACCEPT_BATCH = 64         # connections asyncio accepts per wake-up (it uses the listen backlog)
# The soft open-files limit asked for when the hard one is unlimited: an unlimited soft one
# is refused (the kernel caps descriptors at fs.nr_open, 1048576 by default).
_UNLIMITED_FD_TARGET = 1 << 20


class ListenerError(RuntimeError):
    pass


def bind_unix(path: str, mode: int, backlog: int = 1024) -> socket.socket:
    """Bind a unix stream socket at ``path`` with ``mode``, replacing only a STALE socket.

    A live socket (another server answers) or a non-socket file at the path is an error:
    we never unlink something we do not own.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(p))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale socket %s", path)
            p.unlink(missing_ok=True)
        except OSError as e:
            raise ListenerError(f"cannot probe existing socket {path}: {e}") from e
        else:
            raise ListenerError(f"another server is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # the socket is never, even briefly, more open than `mode`
    try:
        sock.bind(str(p))
    finally:
        os.umask(old)
    os.chmod(p, mode)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def bind_tcp(hostport: str, backlog: int = 1024) -> socket.socket:
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as e:
        sock.close()
        raise ListenerError(f"cannot listen on {hostport}: {e.strerror}") from e
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (to ``_UNLIMITED_FD_TARGET`` where the
    hard one is unlimited); returns the soft limit in force afterwards. A refusal is logged
    and leaves the limit as it was.

    The one place the limit is raised: the daemon (its connection cap follows the limit)
    and the benchmarks (a burst holds one socket per request) both call it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _UNLIMITED_FD_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, want, e)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(configured: int, fd_limit: int) -> int:
    """At most ``configured`` connections, and always some descriptors left for the rest."""
    return max(1, min(configured, fd_limit - _FD_RESERVE))


class _EveryFewSeconds:
    """Lets one report of each kind through per interval and counts the ones it held back."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def allow(self, kind: str) -> int | None:
        """None to drop this report, else how many of its kind were dropped before it."""
        now = time.monotonic()
        if now - self.last.get(kind, -_ERROR_LOG_EVERY_S) < _ERROR_LOG_EVERY_S:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return None
        self.last[kind] = now
        return self.suppressed.pop(kind, 0)


def limit_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio reports every failed accept (EMFILE...) with a traceback: at the descriptor
    limit that is a flood. Report each kind at most once per interval, with a count."""
    gate = _EveryFewSeconds()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", "unhandled exception in event loop"))
        held_back = gate.allow(message)
        if held_back is not None:
            exc = context.get("exception")
            log.error("%s%s (%d more like it held back)", message, f": {exc!r}" if exc else "", held_back)

    loop.set_exception_handler(handler)


class _ServerErrorFilter(logging.Filter):
    """aiohttp.server logs every unparseable request with a traceback: one line per kind
    per interval, without the traceback, so a hostile client cannot fill the disk."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = _EveryFewSeconds()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = f"{record.msg}:{type(record.exc_info[1]).__name__ if record.exc_info else ''}"
        held_back = self.gate.allow(kind)
        if held_back is None:
            return False
        if record.exc_info:
            record.msg = f"{record.msg}: {record.exc_info[1]!r}"[:500] + f" ({held_back} more like it held back)"
            record.exc_info, record.exc_text = None, None
        return True


def limit_server_errors() -> None:
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ServerErrorFilter) for f in logger.filters):
        logger.addFilter(_ServerErrorFilter())


class _Refuse(asyncio.Protocol):
    """A connection past the cap: one canned 503 with Retry-After, then close. Costs one
    descriptor for as long as it takes to write ~200 bytes."""

    def __init__(self, response: bytes) -> None:
        self.response = response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.response)       # type: ignore[attr-defined]
        transport.close()


def _refusal_bytes(retry_after_s: int) -> bytes:
    body = json.dumps({"error": {"message": "the server has too many open connections; retry later",
                                 "type": "service_unavailable", "param": None,
                                 "code": "too_many_connections"}}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {retry_after_s}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class _JsonErrors(web.RequestHandler):
    """aiohttp's connection handler, but a request it cannot even parse (a bad request line
    or header, an unsupported Content-Encoding) is answered in the API's JSON error shape,
    not text/plain. aiohttp logs each one with a traceback: ``limit_server_errors`` keeps
    that log bounded.

    Never built directly: ``_answering_in_json`` re-classes a handler ``web.Server`` built,
    so this class may add behaviour but no state (no slots of its own)."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)   # logs, and raises if too late
        why = (message or (str(exc) if exc else "") or "the request could not be parsed").replace("\n", " ")
        body = {"error": {"message": why[:300], "type": "invalid_request_error" if status < 500 else "server_error",
                          "param": None, "code": "bad_http_request" if status < 500 else "internal_error"}}
        resp = web.json_response(body, status=plain.status)
        resp.force_close()
        return resp


def _answering_in_json(handler: web.RequestHandler) -> web.RequestHandler:
    """``handler``, now answering the requests it cannot parse with ``_JsonErrors``.

    aiohttp builds a connection's handler only in ``web.Server.__call__``, from settings it
    keeps private (keep-alive timeout, access log, ...): re-classing the handler it built
    keeps every one of them, where building a ``_JsonErrors`` here would have to read them.
    A handler of any other class than aiohttp's own is left as it is."""
    if type(handler) is web.RequestHandler:
        handler.__class__ = _JsonErrors
    return handler


class _Counted(asyncio.Protocol):
    """A connection within the cap: aiohttp's handler behind it, in ``open`` from the
    moment it is built until its connection is lost.

    Counted from construction, not from ``connection_made``: asyncio accepts a whole batch
    of connections and builds their protocols before any of them is made, so a count
    taken later lags behind a burst. ``open`` holds it weakly: one whose connection never
    got made (asyncio dropped it) simply leaves the count. Every callback a transport makes
    on its protocol (``FORWARDED``) goes to the handler unchanged."""

    __slots__ = ("__weakref__", "_handler", "_open")

    FORWARDED = ("connection_made", "connection_lost", "data_received", "eof_received",
                 "pause_writing", "resume_writing")

    def __init__(self, handler: asyncio.Protocol, open_set: weakref.WeakSet[_Counted]) -> None:
        self._handler = handler
        self._open = open_set
        open_set.add(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._handler.connection_lost(exc)
        finally:
            self._open.discard(self)


class _ConnectionCap:
    """The protocol factory every site accepts with: one cap over all the sockets.

    Below ``cap`` open connections, a new one gets the handler the runner's ``web.Server``
    (aiohttp's public protocol factory) builds, answering unparseable requests in JSON and
    counted (``_Counted``); past it, the canned 503 (``_Refuse``), logged at most once per
    ``_ERROR_LOG_EVERY_S``."""

    def __init__(self, server: web.Server, cap: int, retry_after_s: int) -> None:
        self.server = server
        self.cap = cap
        self.open: weakref.WeakSet[_Counted] = weakref.WeakSet()
        self.refused = 0
        self._refusal = _refusal_bytes(retry_after_s)
        self._reports = _EveryFewSeconds()

    def __len__(self) -> int:
        return len(self.open)

    def protocol(self) -> asyncio.BaseProtocol:
        if len(self.open) < self.cap:
            return _Counted(_answering_in_json(self.server()), self.open)
        self.refused += 1
        if self._reports.allow("refused") is not None:
            log.warning("refusing connections: %d open (max_connections %d); %d refused so far",
                        len(self.open), self.cap, self.refused)
        return _Refuse(self._refusal)


def _site_name(sock: socket.socket) -> str:
    """How aiohttp's own ``SockSite`` names a socket: ``http://unix:PATH:`` or ``http://HOST:PORT``."""
    if sock.family == socket.AF_UNIX:
        return f"http://unix:{sock.getsockname()}:"
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class CappedSite(web.BaseSite):
    """A site on one listening socket that accepts through a ``_ConnectionCap``.

    Built on ``web.BaseSite``, aiohttp's public base for sites: its ``start`` and ``stop``
    register the site with the runner, so ``runner.cleanup()`` stops this one with the
    rest. (``web.SockSite.start`` accepts with the runner's server itself, leaving no place
    for the cap.) asyncio's accept loop takes up to its backlog of connections per
    wake-up, so the loop is given a small batch (``_ACCEPT_BATCH``) while the kernel's
    queue keeps ``queue_length``: the descriptors in use never run ahead of the cap by more
    than one batch (and the cap keeps ``_FD_RESERVE`` descriptors free for that)."""

    # no name of BaseSite's own slots: ours must not shadow them
    __slots__ = ("_accepting", "_cap", "_listening", "_queue_length")

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, cap: _ConnectionCap,
                 queue_length: int = socket.SOMAXCONN) -> None:
        super().__init__(runner)
        self._listening = sock
        self._cap = cap
        self._queue_length = queue_length
        self._accepting: asyncio.Server | None = None

    @property
    def name(self) -> str:
        return _site_name(self._listening)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._accepting = await loop.create_server(self._cap.protocol, sock=self._listening, backlog=_ACCEPT_BATCH)
        self._listening.listen(self._queue_length)   # the kernel's queue stays long; only the batch is small

    async def stop(self) -> None:
        """Stop accepting; connections already open are the runner's to close."""
        if self._accepting is not None:
            self._accepting.close()
            self._accepting = None
        await super().stop()


class Listeners:
    def __init__(self, server: ServerConfig, socket_mode: int, retry_after_s: int) -> None:
        self.cfg = server
        self.socket_mode = socket_mode
        self.retry_after_s = retry_after_s
        self.handover = False           # serving on sockets systemd passed (LISTEN_FDS)
        self.accepting = False
        self.closing = False            # stopping: accept nothing new from now on
        self.cap = server.max_connections
        self._socks: list[socket.socket] = []
        self._sites: list[CappedSite] = []
        self._started: list[CappedSite] = []
        self._own_socket: str | None = None

    def bind(self) -> list[socket.socket]:
        inherited = take_listen_fds()
        if inherited:
            self.handover = True
            for s in inherited:
                s.setblocking(False)
            self._socks = inherited
            return inherited
        socks = []
        if self.cfg.socket:
            socks.append(bind_unix(self.cfg.socket, self.socket_mode))
            self._own_socket = self.cfg.socket
        if self.cfg.tcp:
            try:
                socks.append(bind_tcp(self.cfg.tcp))
            except ListenerError:
                for s in socks:
                    s.close()
                self.remove_own_socket()
                raise
        self._socks = socks
        return socks

    def describe(self) -> list[str]:
        return [str(s.getsockname()) for s in self._socks]

    def sites(self, runner: web.BaseRunner, fd_limit: int) -> None:
        self.cap = connection_cap(self.cfg.max_connections, fd_limit)
        if self.cap < self.cfg.max_connections:
            log.warning("server.max_connections %d lowered to %d: the open-files limit is %d",
                        self.cfg.max_connections, self.cap, fd_limit)
        if runner.server is None:
            raise RuntimeError("Listeners.sites: call runner.setup() first")
        cap = _ConnectionCap(runner.server, self.cap, self.retry_after_s)     # one cap over all the sockets
        self._sites = [CappedSite(runner, s, cap) for s in self._socks]

    async def start(self, after: float = 0.0) -> None:
        """Start accepting (at once, or ``after`` seconds of queueing in systemd's socket)."""
        if after:
            await asyncio.sleep(after)
            if not self.accepting and not self.closing:
                log.info("still starting after %.0fs: accepting connections, 503 until ready", after)
        if self.accepting or self.closing:
            return
        self.accepting = True
        for site in self._sites:
            await site.start()
            self._started.append(site)

    async def stop_accepting(self) -> None:
        """Socket activation: close our copy of the listener; systemd keeps the socket and its
        queue, and the next instance accepts what arrives from now on."""
        self.closing = True
        while self._started:
            await self._started.pop().stop()

    def remove_own_socket(self) -> None:
        if self._own_socket:
            with contextlib.suppress(OSError):
                os.unlink(self._own_socket)
            self._own_socket = None
