"""Assembling a server: the executor for the configured mode, wrapped in the five MCP tools."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from types import TracebackType

from mcp.server import MCPServer

from ..config import ProcessMcpConfig, load_config
from ..errors import BackendUnavailable
from ..executor import ProcessExecutor
from ..host import HostExecutor
from .tools import INSTRUCTIONS, register_tools


class ProcessMcpServer:
    """An MCP server and the executor behind it. ``cleanup`` ends every process it started."""

    def __init__(self, server: MCPServer, executor: ProcessExecutor) -> None:
        self.server = server
        self.executor = executor

    async def cleanup(self) -> None:
        await self.executor.cleanup()

    async def __aenter__(self) -> ProcessMcpServer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.cleanup()


def create_executor(config: ProcessMcpConfig) -> ProcessExecutor:
    """The executor for ``config.mode``, not yet started."""
    if config.mode == "host":
        return HostExecutor(config)
    if config.mode == "docker":
        # Imported here so that host mode never loads the Docker backend (and docker-py with it).
        from ..docker import DockerExecutor

        return DockerExecutor(config)
    raise BackendUnavailable(f"unknown PROCESS_MODE {config.mode!r}; use host or docker")


async def create_process_mcp(config: ProcessMcpConfig | None = None) -> ProcessMcpServer:
    """Build a server for ``config`` (by default, read from the environment) with its backend ready.

    Raises BackendUnavailable if the backend cannot be prepared, InvalidConfig for a bad environment.
    """
    config = config or load_config()
    executor = create_executor(config)
    await executor.start()
    server = MCPServer("process-mcp", version=_version(), instructions=INSTRUCTIONS)
    register_tools(server, executor)
    return ProcessMcpServer(server, executor)


def _version() -> str:
    try:
        return version("process-mcp")
    except PackageNotFoundError:
        return "0+unknown"
