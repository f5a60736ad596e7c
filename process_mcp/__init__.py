"""process-mcp: let AI agents run and drive processes safely, on the host or in a Docker container."""

from .config import Defaults, DockerConfig, Limits, ProcessMcpConfig, SandboxConfig, load_config
from .errors import (
    BackendUnavailable,
    InvalidConfig,
    InvalidInput,
    InvalidSignal,
    KillFailed,
    ProcessMcpError,
    ProcessNotFound,
    ProcessTerminated,
    SpawnFailed,
    StdinFailed,
)
from .executor import ProcessExecutor, ProcessHandle
from .host import HostExecutor
from .models import (
    DEFAULT_TIMEOUT_MS,
    MAX_TIMEOUT_MS,
    OUTPUT_TRUNCATE,
    TERMINAL_COLS,
    TERMINAL_ROWS,
    KillResult,
    ProcessInfo,
    ProcessList,
    ProcessOutput,
    SpawnOptions,
    SpawnResult,
    StdinResult,
)
from .server import ProcessMcpServer, create_executor, create_process_mcp

__all__ = [
    "DEFAULT_TIMEOUT_MS",
    "MAX_TIMEOUT_MS",
    "OUTPUT_TRUNCATE",
    "TERMINAL_COLS",
    "TERMINAL_ROWS",
    "BackendUnavailable",
    "Defaults",
    "DockerConfig",
    "HostExecutor",
    "InvalidConfig",
    "InvalidInput",
    "InvalidSignal",
    "KillFailed",
    "KillResult",
    "Limits",
    "ProcessExecutor",
    "ProcessHandle",
    "ProcessInfo",
    "ProcessList",
    "ProcessMcpConfig",
    "ProcessMcpError",
    "ProcessMcpServer",
    "ProcessNotFound",
    "ProcessOutput",
    "ProcessTerminated",
    "SandboxConfig",
    "SpawnFailed",
    "SpawnOptions",
    "SpawnResult",
    "StdinFailed",
    "StdinResult",
    "create_executor",
    "create_process_mcp",
    "load_config",
]
