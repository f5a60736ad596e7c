"""The environment a process starts with: a few basic variables, never the server's secrets.

A server's environment holds whatever its MCP client put there (API keys, cloud credentials, tokens).
Host children get only the variables programs need to behave (``BASIC_VARIABLES`` and ``LC_*``), the
ones an operator names in ``PROCESS_ENV_PASSTHROUGH``, ``defaults`` where neither set them, and then the
request's own ``env`` on top. A container's processes get its own environment (the operator's image or
container), ``defaults`` where it does not set them, and the request's ``env`` on top.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

BASIC_VARIABLES = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TERM", "TZ", "COLORTERM")
"""What every child gets from the server's environment when set, besides ``LC_*``."""
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
"""PATH for children when the server has none."""
DEFAULTS = {
    "PAGER": "cat",
    "GIT_PAGER": "cat",
    "MANPAGER": "cat",
    "SYSTEMD_PAGER": "",
    "GIT_TERMINAL_PROMPT": "0",
    "DEBIAN_FRONTEND": "noninteractive",
    "PYTHONUNBUFFERED": "1",
}
"""Set for every child unless the operator passes them through (or a container sets them) or the request
sets them, so nothing waits for a human who is not there: no pager holds ``git log`` or ``man``, git and
apt ask nothing, and Python does not block-buffer a pipe (a server's "ready" line would reach neither
waitFor nor stdout until a buffer filled)."""
PIPE_DEFAULTS = {"TERM": "dumb", "NO_COLOR": "1"}
"""Also set for a child without a terminal: its output goes to a model, not a screen, so no colours or
cursor movement (the server's own TERM and COLORTERM are left out unless passed through by name)."""
_SCREEN_VARIABLES = ("TERM", "COLORTERM")


def defaults(tty: bool) -> dict[str, str]:
    """What a child gets unless something else sets it: ``DEFAULTS``, and ``PIPE_DEFAULTS`` without a tty."""
    return dict(DEFAULTS) if tty else {**DEFAULTS, **PIPE_DEFAULTS}


def child_environment(
    server: Mapping[str, str],
    passthrough: Sequence[str],
    request: Mapping[str, str],
    *,
    tty: bool = False,
    **overrides: str,
) -> dict[str, str]:
    """The variables a child starts with: the basic ones and ``passthrough`` from ``server``, then the
    ``defaults`` they do not set, then ``overrides`` (what the backend sets, e.g. HOME in the sandbox),
    then the request's ``env``."""
    names = set(BASIC_VARIABLES) | set(passthrough)
    if not tty:
        names -= {name for name in _SCREEN_VARIABLES if name not in passthrough}
    env = {name: value for name, value in server.items() if name in names or name.startswith("LC_")}
    env.setdefault("PATH", DEFAULT_PATH)
    for name, value in defaults(tty).items():
        env.setdefault(name, value)
    return {**env, **overrides, **request}


def defaults_missing_from(names: Iterable[str], tty: bool = False) -> dict[str, str]:
    """``defaults`` that an environment setting ``names`` (e.g. a container's) does not set."""
    present = set(names)
    return {name: value for name, value in defaults(tty).items() if name not in present}
