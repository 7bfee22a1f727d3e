"""The daemon's phase: one owner, legal transitions only, observers told of every change.

Contract: ``Lifecycle.to(phase, detail)`` moves to ``phase`` or raises ``IllegalTransition``;
every observer is called synchronously with ``(old, new, detail)`` after the move. Observers
must not raise (an observer that does is logged and kept; the transition stands).
"""
from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

log = logging.getLogger("qwenbox.lifecycle")


# Not enum.StrEnum (UP042): its str() is the value where this one's is "Phase.READY", a change
# for every %s and f-string that formats a phase.
class Phase(str, enum.Enum):  # noqa: UP042
    STARTING = "starting"
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    SLEEPING = "sleeping"
    RECOVERING = "recovering"      # the engine died; a new one is being built in-process
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def serves_requests(self) -> bool:
        """Requests are accepted in READY, and in SLEEPING (they wake the engine)."""
        return self in (Phase.READY, Phase.SLEEPING)


_ALLOWED: dict[Phase, set[Phase]] = {
    Phase.STARTING: {Phase.LOADING, Phase.DRAINING, Phase.FAILED, Phase.STOPPED},
    Phase.LOADING: {Phase.WARMING, Phase.DRAINING, Phase.FAILED},
    Phase.WARMING: {Phase.READY, Phase.DRAINING, Phase.FAILED},
    Phase.READY: {Phase.SLEEPING, Phase.RECOVERING, Phase.DRAINING, Phase.FAILED, Phase.READY},
    Phase.SLEEPING: {Phase.READY, Phase.RECOVERING, Phase.DRAINING, Phase.FAILED},
    Phase.RECOVERING: {Phase.READY, Phase.DRAINING, Phase.FAILED},
    Phase.DRAINING: {Phase.STOPPED, Phase.FAILED},
    Phase.STOPPED: set(),
    Phase.FAILED: {Phase.STOPPED},
}

Observer = Callable[[Phase, Phase, str], None]


class IllegalTransition(RuntimeError):
    pass


class Lifecycle:
    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.since = time.monotonic()
        self.detail = ""
        self._observers: list[Observer] = []

    def observe(self, fn: Observer) -> None:
        self._observers.append(fn)

    def can(self, new: Phase) -> bool:
        return new in _ALLOWED[self.phase]

    def to(self, new: Phase, detail: str = "") -> None:
        old = self.phase
        if new not in _ALLOWED[old]:
            raise IllegalTransition(f"illegal phase transition {old.value} -> {new.value}")
        self.phase, self.detail, self.since = new, detail, time.monotonic()
        for fn in self._observers:
            try:
                fn(old, new, detail)
            except Exception:  # an observer must never change the daemon's fate
                log.exception("lifecycle observer %r failed", fn)

    def note(self, detail: str) -> None:
        """Progress within a phase (e.g. 'warming 3/5'): observers see old == new.
        A note that repeats the current detail tells nothing new: observers are not called."""
        if detail == self.detail:
            return
        self.detail = detail
        for fn in self._observers:
            try:
                fn(self.phase, self.phase, detail)
            except Exception:
                log.exception("lifecycle observer %r failed", fn)
