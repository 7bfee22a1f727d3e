"""systemd's notify and socket-activation protocols; silent when not under systemd.

Contract:
- ``Notifier.from_environ()`` reads ``NOTIFY_SOCKET`` / ``WATCHDOG_USEC`` / ``WATCHDOG_PID``
  and REMOVES them (and the ``LISTEN_*`` variables, see ``take_listen_fds``) from
  ``os.environ``, so vLLM's engine-core children can never speak for the service.
- ``send(**fields)`` sends one datagram ``KEY=VALUE\\n...`` encoded as UTF-8 (the sdnotify
  package encodes Latin-1 and silently drops anything else, e.g. a CJK model name).
  Without a notify socket every call is a no-op. Send errors are logged, never raised:
  a broken notify socket must not take serving down.
- ``take_listen_fds()`` returns the sockets systemd passed (SD_LISTEN_FDS_START = 3)
  when ``LISTEN_PID`` is this process, else ``[]``.
"""
from __future__ import annotations

import logging
import os
import socket
import warnings

import sdnotify

log = logging.getLogger("qwenbox.systemd")

SD_LISTEN_FDS_START = 3
_NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_LISTEN_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class Notifier:
    def __init__(self, notify_socket: str | None, watchdog_usec: int | None) -> None:
        self.address = notify_socket
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        if notify_socket:
            # sdnotify owns finding and connecting the socket (abstract '@' names included);
            # it reads the variable itself, so hand it over for the call only.
            os.environ["NOTIFY_SOCKET"] = notify_socket
            try:
                # When connect fails, sdnotify drops its socket without closing it; CPython
                # frees it on the spot with a ResourceWarning that is sdnotify's, not ours.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ResourceWarning)
                    self._sock = sdnotify.SystemdNotifier(debug=True).socket
            except OSError as e:
                log.warning("cannot connect to NOTIFY_SOCKET %s: %s", notify_socket, e)
            finally:
                os.environ.pop("NOTIFY_SOCKET", None)

    @classmethod
    def from_environ(cls) -> Notifier:
        env = os.environ
        addr = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC")
        wd_pid = env.get("WATCHDOG_PID")
        watchdog = int(usec) if usec and usec.isdigit() and (not wd_pid or wd_pid == str(os.getpid())) else None
        for var in _NOTIFY_VARS:
            env.pop(var, None)
        return cls(addr, watchdog)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half of WatchdogSec, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, **fields: object) -> bool:
        if self._sock is None:
            return False
        msg = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items())
        try:
            self._sock.sendall(msg.encode("utf-8"))
            return True
        except OSError as e:
            log.warning("sd_notify %s failed: %s", ",".join(fields), e)
            return False

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str = "draining") -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def reloading(self, status: str = "reloading") -> bool:
        return self.send(RELOADING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(v: object) -> str:
    return str(v).replace("\n", " ")


def take_listen_fds() -> list[socket.socket]:
    """Sockets handed over by systemd socket activation; consumes the LISTEN_* variables."""
    env = os.environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for var in _LISTEN_VARS:
        env.pop(var, None)
    if not count or not count.isdigit() or pid != str(os.getpid()):
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks
