"""process-mcp: let AI agents run and drive processes safely, on the host or in a Docker container."""

from typing import TYPE_CHECKING, Any

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
from .executor import ProcessExecutor
from .handle import ProcessHandle
from .host import HostExecutor
from .models import (
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
from .service.server import ProcessMcpServer, create_executor, create_process_mcp, version_string

__version__ = version_string()

if TYPE_CHECKING:
    from .docker import DockerExecutor


def __getattr__(name: str) -> Any:
    # DockerExecutor is loaded on first use, so `import process_mcp` stays light in host mode.
    if name == "DockerExecutor":
        from .docker import DockerExecutor

        return DockerExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
