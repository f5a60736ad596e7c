"""The backend map: each mode (PROCESS_MODE) and the executor that runs it, imported only when used.

A new backend adds its entry here (and in the tests' ``helpers.BACKENDS``); the service and the library
make executors only through ``create_executor``, so host mode never loads the Docker backend.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import BackendUnavailable

if TYPE_CHECKING:
    from .config import ProcessMcpConfig
    from .core.executor import ProcessExecutor

EXECUTORS = {
    "host": ("process_mcp.host.executor", "HostExecutor"),
    "docker": ("process_mcp.docker.executor", "DockerExecutor"),
}
"""Each mode's executor class, as (module, name)."""


def create_executor(config: ProcessMcpConfig) -> ProcessExecutor:
    """The executor for ``config.mode``, not yet started."""
    try:
        module, name = EXECUTORS[config.mode]
    except KeyError:
        raise BackendUnavailable(f"unknown PROCESS_MODE {config.mode!r}; use {' or '.join(EXECUTORS)}") from None
    executor: ProcessExecutor = getattr(import_module(module), name)(config)
    return executor
