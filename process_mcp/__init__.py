"""process-mcp: let AI agents run and drive processes safely, on the host or in a Docker container.

The public names are resolved on first use: ``import process_mcp`` (and so ``process-mcp --version`` or
``--help``) loads neither the MCP SDK, the Docker client nor the sandbox until something asks for them.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backends import create_executor
    from .config import (
        Defaults,
        DockerConfig,
        Limits,
        PolicyConfig,
        ProcessMcpConfig,
        SandboxConfig,
        ServiceConfig,
        load_config,
    )
    from .core.executor import ProcessExecutor
    from .core.handle import ProcessHandle
    from .core.models import (
        DEFAULT_TIMEOUT_MS,
        MAX_TIMEOUT_MS,
        OUTPUT_TRUNCATE,
        TERMINAL_COLS,
        TERMINAL_ROWS,
        KillResult,
        ProcessInfo,
        ProcessLimits,
        ProcessList,
        ProcessOutput,
        ProcessStats,
        SpawnOptions,
        SpawnResult,
        StdinResult,
    )
    from .docker import DockerExecutor
    from .errors import (
        BackendUnavailable,
        InvalidConfig,
        InvalidInput,
        InvalidSignal,
        KillFailed,
        PolicyDenied,
        ProcessMcpError,
        ProcessNotFound,
        ProcessTerminated,
        RateLimited,
        SpawnFailed,
        StdinFailed,
        TooManyProcesses,
        TooManyRequests,
    )
    from .host.executor import HostExecutor
    from .service.server import ProcessMcpServer, create_process_mcp

    __version__: str

_WHERE = {
    **dict.fromkeys(
        ("Defaults", "DockerConfig", "Limits", "PolicyConfig", "ProcessMcpConfig", "SandboxConfig", "ServiceConfig",
         "load_config"),
        ".config",
    ),
    **dict.fromkeys(
        ("BackendUnavailable", "InvalidConfig", "InvalidInput", "InvalidSignal", "KillFailed", "PolicyDenied",
         "ProcessMcpError", "ProcessNotFound", "ProcessTerminated", "RateLimited", "SpawnFailed", "StdinFailed",
         "TooManyProcesses", "TooManyRequests"),
        ".errors",
    ),
    **dict.fromkeys(
        ("DEFAULT_TIMEOUT_MS", "MAX_TIMEOUT_MS", "OUTPUT_TRUNCATE", "TERMINAL_COLS", "TERMINAL_ROWS", "KillResult",
         "ProcessInfo", "ProcessLimits", "ProcessList", "ProcessOutput", "ProcessStats", "SpawnOptions", "SpawnResult",
         "StdinResult"),
        ".core.models",
    ),
    "ProcessExecutor": ".core.executor",
    "ProcessHandle": ".core.handle",
    "HostExecutor": ".host.executor",
    "DockerExecutor": ".docker",
    **dict.fromkeys(("ProcessMcpServer", "create_process_mcp"), ".service.server"),
    "create_executor": ".backends",
}  # fmt: skip
"""Where each public name lives, imported when it is first asked for."""


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from .version import version_string

        value: Any = version_string()
    elif name in _WHERE:
        value = getattr(import_module(_WHERE[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "DEFAULT_TIMEOUT_MS",
    "MAX_TIMEOUT_MS",
    "OUTPUT_TRUNCATE",
    "TERMINAL_COLS",
    "TERMINAL_ROWS",
    "BackendUnavailable",
    "Defaults",
    "DockerConfig",
    "DockerExecutor",
    "HostExecutor",
    "InvalidConfig",
    "InvalidInput",
    "InvalidSignal",
    "KillFailed",
    "KillResult",
    "Limits",
    "PolicyConfig",
    "PolicyDenied",
    "ProcessExecutor",
    "ProcessHandle",
    "ProcessInfo",
    "ProcessLimits",
    "ProcessList",
    "ProcessMcpConfig",
    "ProcessMcpError",
    "ProcessMcpServer",
    "ProcessNotFound",
    "ProcessOutput",
    "ProcessStats",
    "ProcessTerminated",
    "RateLimited",
    "SandboxConfig",
    "ServiceConfig",
    "SpawnFailed",
    "SpawnOptions",
    "SpawnResult",
    "StdinFailed",
    "StdinResult",
    "TooManyProcesses",
    "TooManyRequests",
    "__version__",
    "create_executor",
    "create_process_mcp",
    "load_config",
]
