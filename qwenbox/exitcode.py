"""The process exit codes, in one place (systemd's unit and the CLI both rely on them)."""
from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ENGINE_FAILED = 1     # the engine failed to start or died: systemd restarts us
    USAGE = 2             # bad command line (argparse's own code)
    UNAVAILABLE = 69      # EX_UNAVAILABLE: the listener cannot be bound
    CONFIG = 78           # EX_CONFIG: RestartPreventExitStatus=78 stops a restart loop
    INTERRUPTED = 130     # a second stop signal: exit at once, without draining
