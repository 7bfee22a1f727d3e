"""qwenbox/api/locality.py on real sockets: the unix socket and loopback TCP are local, a
proxy header makes any request remote, and so does TCP from another address of this machine
(where it has one). The daemon's use of it (/health's public view, /metrics refused) is in
tests/test_api.py; through the real Nginx site in tests/test_ui.py."""
import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web

from qwenbox.api import locality


def _non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (the one a default route would use)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))         # TEST-NET-1: nothing is sent for a UDP connect
        addr = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


async def _ask(tmp_path, headers=None):
    async def handler(request):
        return web.json_response({"local": locality.local(request)})

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "l.sock")
    sites = [web.UnixSite(runner, sock), web.TCPSite(runner, "127.0.0.1", 0)]
    other = _non_loopback_address()
    if other:
        sites.append(web.TCPSite(runner, other, 0))
    for s in sites:
        await s.start()
    got = {}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as c, \
                c.get("http://localhost/", headers=headers or {}) as r:
            got["unix"] = (await r.json())["local"]
        async with aiohttp.ClientSession() as c:
            port = sites[1]._server.sockets[0].getsockname()[1]
            async with c.get(f"http://127.0.0.1:{port}/", headers=headers or {}) as r:
                got["loopback"] = (await r.json())["local"]
            if other:
                port = sites[2]._server.sockets[0].getsockname()[1]
                async with c.get(f"http://{other}:{port}/", headers=headers or {}) as r:
                    got["other"] = (await r.json())["local"]
    finally:
        await runner.cleanup()
    return got


def test_the_socket_and_loopback_are_local_another_address_is_not(tmp_path):
    got = asyncio.run(_ask(tmp_path))
    assert got["unix"] is True and got["loopback"] is True
    assert got.get("other", False) is False


@pytest.mark.parametrize("header", locality.PROXY_HEADERS)
def test_a_request_that_names_a_proxy_is_never_local(tmp_path, header):
    got = asyncio.run(_ask(tmp_path, {header: "127.0.0.1"}))
    assert set(got.values()) == {False}
