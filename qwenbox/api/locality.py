"""Who is asking: a request from this machine, straight to the daemon, or one from anywhere
else (through a proxy such as the shipped Nginx site, or over TCP from another address).

Contract: ``local(request)`` is True only when the request came to the daemon directly from
this machine - on the unix socket, or over TCP from a loopback address - and names no proxy:
no ``Forwarded``, ``X-Forwarded-For`` or ``X-Real-IP`` header. The shipped Nginx site sets
``X-Forwarded-For`` on everything it passes on (``$proxy_add_x_forwarded_for`` always holds
the client's address), so no request through it passes as local, whatever the client sends;
a local client that sends such a header itself is only taken for a remote one. Nothing here
trusts a header to grant more, only to grant less.
"""
from __future__ import annotations

import ipaddress
import socket

from aiohttp import web

PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def local(request: web.Request) -> bool:
    if any(h in request.headers for h in PROXY_HEADERS):
        return False
    transport = request.transport
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    family = getattr(sock, "family", None)
    if family == socket.AF_UNIX:
        return True
    if family in (socket.AF_INET, socket.AF_INET6):
        peer = transport.get_extra_info("peername")
        try:
            return bool(peer) and ipaddress.ip_address(peer[0]).is_loopback
        except ValueError:
            return False
    return False
