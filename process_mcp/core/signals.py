"""Signal names as callers spell them: ``SIGTERM``, ``TERM``, ``term`` or ``15``."""

from __future__ import annotations

import signal

from ..errors import InvalidSignal, excerpt

COMMON = ("TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT")

# Signals after which the process is expected to keep running, so kill does not wait for an exit.
NON_TERMINATING = frozenset(
    {
        signal.SIGSTOP,
        signal.SIGCONT,
        signal.SIGTSTP,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGWINCH,
        signal.SIGCHLD,
        signal.SIGURG,
    }
)


def parse_signal(name: str) -> signal.Signals:
    """The signal ``name`` stands for; raise InvalidSignal if there is none."""
    text = name.strip().upper()
    if text.isdigit():
        try:
            return signal.Signals(int(text))
        except ValueError:
            pass
    else:
        wanted = text if text.startswith("SIG") else f"SIG{text}"
        found = signal.Signals.__members__.get(wanted)
        if found is not None and not wanted.startswith("SIG_"):
            return found
    raise InvalidSignal(f"unknown signal {excerpt(name)}; use a name such as {', '.join(COMMON)} (SIG prefix optional)")


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; ``SIG<n>`` for a number this platform does not name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def signal_from_exit_code(code: int | None) -> int | None:
    """The signal an exit code 128+N stands for, where only an exit code is reported (the Docker
    engine, the bwrap sandbox): a process that called ``exit(128+N)`` reads as signal N."""
    if code is None or code <= 128:
        return None
    try:
        return signal.Signals(code - 128).value
    except ValueError:
        return None
