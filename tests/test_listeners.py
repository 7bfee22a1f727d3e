"""The listeners without an engine: a small aiohttp app behind ``Listeners`` on a unix
socket, driven over real connections. The cap (a canned 503 past it, counted from
accept, a slot freed by a close), the JSON answer to a request aiohttp cannot parse, the
runner's cleanup stopping the sites, and the open-files limit.
(tests/test_hostile.py runs the same against the daemon under a real descriptor limit.)"""
from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from qwenbox import listeners
from qwenbox.config import ServerConfig

DEADLINE_S = 30.0          # guards against a hang only
RETRY_AFTER_S = 7
GET = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def sock_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.delenv("LISTEN_FDS", raising=False)     # bind our own socket, not systemd's
    d = tempfile.mkdtemp(prefix="qbl-")                  # unix socket paths are short
    try:
        yield str(Path(d) / "s.sock")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def serving(path: str, max_connections: int, idle_timeout_s: float = 75.0
                  ) -> AsyncIterator[tuple[listeners.Listeners, web.AppRunner]]:
    """An app answering GET /ok behind ``Listeners``, accepting; cleaned up as the daemon does."""
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/ok", ok)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=idle_timeout_s)
    await runner.setup()
    lst = listeners.Listeners(ServerConfig(socket=path, max_connections=max_connections), 0o600, RETRY_AFTER_S)
    lst.bind()
    lst.sites(runner, fd_limit=1 << 20)
    await lst.start()
    try:
        yield lst, runner
    finally:
        await runner.cleanup()
        lst.remove_own_socket()


def connect_now(path: str) -> socket.socket:
    """A blocking connect: the kernel queues it without the event loop running."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    s.setblocking(False)
    return s


class Client:
    """One connection from the test; its streams are kept (asyncio closes a connection
    whose writer is garbage-collected)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def of(cls, s: socket.socket) -> Client:
        return cls(*await asyncio.open_unix_connection(sock=s))

    async def status_line(self, request: bytes = GET) -> bytes:
        """Send ``request``, read the whole answer and return its status line; the
        connection stays open."""
        self.writer.write(request)
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await asyncio.wait_for(self.reader.readexactly(length), DEADLINE_S)
        return head.split(b"\r\n", 1)[0]

    async def until_closed(self, request: bytes = b"") -> bytes:
        """Send ``request`` and return everything the server sends until it closes (a
        refusal that closes on an unread request resets the connection: what came
        before the reset)."""
        if request:
            self.writer.write(request)
        out = b""
        try:
            while chunk := await asyncio.wait_for(self.reader.read(65536), DEADLINE_S):
                out += chunk
        except ConnectionResetError:
            pass
        finally:
            self.writer.close()
        return out


async def status_line(s: socket.socket, request: bytes = GET) -> bytes:
    client = await Client.of(s)
    try:
        return await client.status_line(request)
    finally:
        client.writer.close()


async def until_closed(s: socket.socket, request: bytes = b"") -> bytes:
    return await (await Client.of(s)).until_closed(request)


def assert_refusal(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert f"Retry-After: {RETRY_AFTER_S}".encode() in head
    assert json.loads(body)["error"]["code"] == "too_many_connections"


def test_connections_past_the_cap_get_the_canned_503_and_a_close_frees_a_slot(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path, max_connections=3):
            held = [await Client.of(connect_now(sock_path)) for _ in range(3)]
            assert [await c.status_line() for c in held] == [b"HTTP/1.1 200 OK"] * 3
            assert_refusal(await until_closed(connect_now(sock_path)))
            held.pop().writer.close()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE_S
            while True:       # the slot frees once the server has seen the close
                answer = await until_closed(connect_now(sock_path), b"GET /ok HTTP/1.1\r\nHost: x\r\n"
                                                                    b"Connection: close\r\n\r\n")
                if answer.startswith(b"HTTP/1.1 200 "):
                    break
                assert loop.time() < deadline, "the closed connection's slot never freed"
                await asyncio.sleep(0.05)
            for c in held:
                c.writer.close()

    asyncio.run(main())


def test_a_burst_is_capped_as_it_is_accepted(sock_path: str) -> None:
    """Connections queued all at once are accepted in one batch, before any of them is
    registered with aiohttp's server: the cap still holds exactly. Nothing is sent: the
    refused get the 503 at once, the held are closed as idle."""
    cap, extra = 5, 10

    async def main() -> list[bytes]:
        async with serving(sock_path, max_connections=cap, idle_timeout_s=0.5):
            queued = [connect_now(sock_path) for _ in range(cap + extra)]    # all queued before one is accepted
            burst = [await Client.of(s) for s in queued]
            return await asyncio.gather(*(c.until_closed() for c in burst))

    answers = asyncio.run(main())
    refused = [a for a in answers if a]
    assert len(refused) == extra and answers.count(b"") == cap, answers
    for a in refused:
        assert_refusal(a)


@pytest.mark.parametrize("wire", [
    b"GARBAGE\r\n\r\n",
    b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
])
def test_a_request_aiohttp_cannot_parse_gets_a_json_400(sock_path: str, wire: bytes) -> None:
    async def main() -> bytes:
        async with serving(sock_path, max_connections=8):
            answer = await until_closed(connect_now(sock_path), wire)
            assert await status_line(connect_now(sock_path)) == b"HTTP/1.1 200 OK"   # and it serves on
            return answer

    head, _, body = asyncio.run(main()).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and head.split()[1].startswith(b"4"), head
    assert b"Content-Type: application/json" in head
    error = json.loads(body)["error"]
    assert error["code"] == "bad_http_request" and error["type"] == "invalid_request_error" and error["message"]


def test_the_runners_cleanup_stops_the_sites(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path, max_connections=8) as (_, runner):
            assert len(runner.sites) == 1 and next(iter(runner.sites)).name == f"http://unix:{sock_path}:"
            open_one = await Client.of(connect_now(sock_path))
            assert await open_one.status_line() == b"HTTP/1.1 200 OK"
            await runner.cleanup()          # what the daemon's shutdown calls
            assert not runner.sites
            with pytest.raises(ConnectionRefusedError):
                connect_now(sock_path)
            assert await open_one.until_closed() == b""     # open connections are closed too

    asyncio.run(main())


def test_counted_forwards_every_protocol_callback() -> None:
    """A transport calls these on its protocol; one ``_Counted`` did not pass on would be
    lost (pause_writing: no back-pressure on a stream)."""
    callbacks = {n for n in dir(asyncio.Protocol) if not n.startswith("_")}
    assert set(listeners._Counted.FORWARDED) == callbacks
    assert all(n in vars(listeners._Counted) for n in callbacks)


def test_the_cap_keeps_descriptors_for_the_rest() -> None:
    assert listeners.connection_cap(4096, 512) == 256
    assert listeners.connection_cap(100, 1 << 20) == 100
    assert listeners.connection_cap(4096, 100) == 1


def test_raise_fd_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 64:
        pytest.skip(f"needs a finite hard open-files limit, have {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard // 2, hard))
    try:
        assert listeners.raise_fd_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_raise_fd_limit_with_no_hard_limit_asks_for_a_finite_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unlimited hard limit cannot be the soft one (the kernel caps descriptors at
    fs.nr_open): it asks for ``_UNLIMITED_FD_TARGET`` and returns what it got."""
    limits = {"now": (1024, resource.RLIM_INFINITY)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda which, lim: limits.update(now=lim))
    assert listeners.raise_fd_limit() == listeners._UNLIMITED_FD_TARGET
    assert limits["now"] == (listeners._UNLIMITED_FD_TARGET, resource.RLIM_INFINITY)


def test_setup_cfg_claims_the_aiohttp_the_suite_runs_on() -> None:
    """The cap leans on how aiohttp builds sites and handlers: setup.cfg's range starts at
    the version the packages pin and this suite runs on, not at one nobody tests."""
    import configparser
    from importlib.metadata import version

    from packaging.requirements import Requirement

    root = Path(__file__).parent.parent
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    requires = [Requirement(line) for line in cfg["options"]["install_requires"].splitlines() if line]
    wanted = next(r for r in requires if r.name == "aiohttp")
    pins = {f.name: line.split("==", 1)[1].strip() for f in (root / "packaging").glob("*.txt")
            for line in f.read_text().splitlines() if line.startswith("aiohttp==")}
    assert set(pins.values()) == {version("aiohttp")}, pins
    floor = next(s.version for s in wanted.specifier if s.operator == ">=")
    assert floor == version("aiohttp") and wanted.specifier.contains(floor), wanted
