"""The environment a process starts with: a few basic variables, never the server's secrets.

A server's environment holds whatever its MCP client put there (API keys, cloud credentials, tokens).
Host children get only the variables programs need to behave (``BASIC_VARIABLES`` and ``LC_*``), the
ones an operator names in ``PROCESS_ENV_PASSTHROUGH``, ``DEFAULTS`` where neither set them, and then the
request's own ``env`` on top. A container's processes get its own environment (the operator's image or
container), ``DEFAULTS`` where it does not set them, and the request's ``env`` on top.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

BASIC_VARIABLES = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TERM", "TZ", "COLORTERM")
"""What every child gets from the server's environment when set, besides ``LC_*``."""
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
"""PATH for children when the server has none."""
DEFAULTS = {"PYTHONUNBUFFERED": "1"}
"""Set for children unless the operator passes them through or the request sets them: Python block-buffers
a pipe, so a server's "ready" line would reach neither waitFor nor stdout until a buffer filled."""


def child_environment(
    server: Mapping[str, str], passthrough: Sequence[str], request: Mapping[str, str], **overrides: str
) -> dict[str, str]:
    """The variables a child starts with: the basic ones and ``passthrough`` from ``server``, then
    ``overrides`` (what the backend sets, e.g. HOME in the sandbox), then the request's ``env``."""
    names = set(BASIC_VARIABLES) | set(passthrough)
    env = {name: value for name, value in server.items() if name in names or name.startswith("LC_")}
    env.setdefault("PATH", DEFAULT_PATH)
    for name, value in DEFAULTS.items():
        env.setdefault(name, value)
    return {**env, **overrides, **request}


def defaults_missing_from(names: Iterable[str]) -> dict[str, str]:
    """``DEFAULTS`` that an environment setting ``names`` (e.g. a container's) does not set."""
    present = set(names)
    return {name: value for name, value in DEFAULTS.items() if name not in present}
