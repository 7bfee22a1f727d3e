"""The process exit codes, in one place (systemd's unit and the CLI both rely on them)."""
from __future__ import annotations

import dataclasses
import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ENGINE_FAILED = 1     # the engine failed to start or died: systemd restarts us
    USAGE = 2             # bad command line (argparse's own code)
    BAD_DOWNLOAD = 65     # EX_DATAERR: qwenbox pull got a file that does not match the hub's checksum
    NO_MODEL = 66         # EX_NOINPUT: qwenbox pull: no such model or revision on the hub (or gated)
    UNAVAILABLE = 69      # EX_UNAVAILABLE: the listener cannot be bound
    DOWNLOAD_FAILED = 75  # EX_TEMPFAIL: qwenbox pull did not finish (network, hub, disk): run it again to resume
    CONFIG = 78           # EX_CONFIG: RestartPreventExitStatus=78 stops a restart loop
    INTERRUPTED = 130     # a second stop signal: exit at once, without draining


@dataclasses.dataclass(frozen=True)
class Halt:
    """The one way out of ``qwenbox serve``: why the process stops and with which code.

    ``drain``: finish the requests in flight first (a stop request); a failed engine has
    nothing to drain. ``now``: leave at once, killing the engine's processes, without any
    orderly step (a hung engine or build thread, a second stop signal): the one case where
    waiting would never end.
    """
    reason: str
    exit_code: ExitCode
    drain: bool = False
    now: bool = False

    @property
    def failed(self) -> bool:
        return self.exit_code not in (ExitCode.OK, ExitCode.INTERRUPTED)
