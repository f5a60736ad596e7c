"""Errors raised by the library: one root, one class per thing the caller can do about it.

Every error carries the stable ``code`` of the original server (``process_not_found``, ...), and a
message that tells the caller (usually a model) what to do next.
"""

from __future__ import annotations

EXCERPT_CHARS = 80
"""Most characters of a caller's value an error message quotes; a 200 KB command is not sent back."""


def excerpt(value: str) -> str:
    """``value`` quoted for an error message: whole when short, else its start, marked, with its length."""
    if len(value) <= EXCERPT_CHARS:
        return repr(value)
    return f"{value[:EXCERPT_CHARS]!r}... ({len(value)} characters)"


class ProcessMcpError(Exception):
    """Root of every error this library raises on purpose."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidInput(ProcessMcpError):
    """An argument is malformed (empty command, NUL byte, bad escape, missing cwd, ...)."""

    code = "invalid_input"


class InvalidSignal(InvalidInput):
    """The signal name is not one this platform knows."""

    code = "invalid_signal"


class ProcessNotFound(ProcessMcpError):
    """No process has that id (never existed, or it was dropped from the registry)."""

    code = "process_not_found"


class ProcessTerminated(ProcessMcpError):
    """The process has already exited, so it cannot take input or signals."""

    code = "process_terminated"


class SpawnFailed(ProcessMcpError):
    """The process could not be started."""

    code = "spawn_failed"


class StdinFailed(ProcessMcpError):
    """Input could not be delivered (the process closed its input or stopped reading)."""

    code = "stdin_failed"


class KillFailed(ProcessMcpError):
    """The signal could not be delivered."""

    code = "kill_failed"


class TooManyProcesses(ProcessMcpError):
    """The limit on live processes is reached; the message says how many and how to free some."""

    code = "too_many_processes"


class BackendUnavailable(ProcessMcpError):
    """The execution backend (Docker engine, sandbox) cannot be used; the message says how to fix it."""

    code = "backend_unavailable"


class InvalidConfig(ProcessMcpError):
    """The configuration (usually the environment) is malformed; the message names the variable."""

    code = "invalid_config"


class TooManyRequests(ProcessMcpError):
    """The caller has as many tool calls in progress as it may; the message says the limit."""

    code = "too_many_requests"


class TooManySessions(ProcessMcpError):
    """The caller has as many MCP sessions open as it may; the message says how to free one."""

    code = "too_many_sessions"


class PolicyDenied(ProcessMcpError):
    """The operator's command policy does not let this command run; the message names what and which setting."""

    code = "policy_denied"


class RateLimited(ProcessMcpError):
    """The caller started as many processes this minute as it may; the message says when it may again."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
