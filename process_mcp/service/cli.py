"""The command line: ``process-mcp`` (or ``python -m process_mcp``) serving on stdio or HTTP.

On stdio, stdout carries the protocol, so every log line goes to stderr. On client disconnect (stdio),
SIGTERM, SIGINT or SIGHUP, every process the server started, in every principal's space, is ended
before it exits; over HTTP the server first stops accepting connections.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import anyio

from ..errors import ProcessMcpError
from ..version import version_string

if TYPE_CHECKING:
    from ..config import ProcessMcpConfig
    from .server import ProcessMcpServer

logger = logging.getLogger("process_mcp")

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_DESCRIPTION = "Let AI agents run and drive processes safely: an MCP server for host (sandboxed) or Docker execution."


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options; ``--help`` lists them and every environment variable, one line each."""
    parser = argparse.ArgumentParser(
        prog="process-mcp",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument("-h", "--help", action=_HelpWithEnvironment, help="show this help message and exit")
    parser.add_argument(
        "--transport", choices=["stdio", "http"], help="stdio (default) or http; also PROCESS_TRANSPORT"
    )
    parser.add_argument("--host", help="address to listen on over HTTP (default 127.0.0.1); also PROCESS_HTTP_HOST")
    parser.add_argument("--port", type=int, help="port to listen on over HTTP (default 8765); also PROCESS_HTTP_PORT")
    parser.add_argument("--version", action="version", version=f"process-mcp {version_string()}")
    return parser.parse_args(argv)


class _HelpWithEnvironment(argparse.Action):
    """--help, which lists the environment variables too, from the rows derived from the settings'
    declaration (``environment_help``), so the help answers without loading the settings."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=str(kwargs.get("help")))

    def __call__(self, parser: argparse.ArgumentParser, *_: object, **__: object) -> None:
        parser.epilog = _environment_help()
        parser.print_help()
        parser.exit()


def _environment_help() -> str:
    from .environment_help import ROWS

    width = max(len(name) for name, _, _ in ROWS)
    lines = ["environment variables (default in brackets):"]
    for name, default, description in ROWS:
        shown = f" [{default}]" if default else ""
        lines.append(f"  {name:<{width}}  {description}{shown}")
    return "\n".join(lines)


def configure(arguments: argparse.Namespace) -> ProcessMcpConfig:
    """The configuration from the environment, with the command line's options over it."""
    from ..config import load_config

    config = load_config()
    service = config.service
    if arguments.transport is not None:
        service.transport = arguments.transport
    if arguments.host is not None:
        service.host = arguments.host
    if arguments.port is not None:
        if not 0 <= arguments.port <= 65535:
            raise SystemExit(f"process-mcp: --port {arguments.port} is not a port (0-65535)")
        service.port = arguments.port
    return config


async def serve(config: ProcessMcpConfig) -> None:
    """Run the server on its transport until the client leaves (stdio) or a stop signal arrives."""
    with anyio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        from .server import create_process_mcp  # the MCP stack, loaded only to serve

        mcp = await create_process_mcp(config)
        if config.service.transport == "http":
            await _serve_http(mcp, signals)
            return
        logger.info("process-mcp serving on stdio (mode %s)", config.mode)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_stop_stdio_on_signal, mcp, signals)
            await mcp.server.run_stdio_async()
            tasks.cancel_scope.cancel()
        await _shutdown(mcp, "the client closed the connection")


async def _serve_http(mcp: ProcessMcpServer, signals: AsyncIterator[signal.Signals]) -> None:
    from .http import prepare, serve

    ready = prepare(mcp)  # refuses an unsafe setup before anything listens
    stop = anyio.Event()
    async with anyio.create_task_group() as tasks:

        async def on_signal() -> None:
            async for signum in signals:
                stop.set()  # stop accepting; open requests end as their processes do
                await _shutdown(mcp, f"received {signal.Signals(signum).name}")
                return

        tasks.start_soon(on_signal)
        try:
            await serve(mcp, ready, stop=stop)
        finally:
            # After a signal, on_signal ends every process and returns; without one (the server could
            # not listen, or failed), end them here and stop waiting for a signal.
            if not stop.is_set():
                with anyio.CancelScope(shield=True):
                    await mcp.cleanup()
                tasks.cancel_scope.cancel()


async def _stop_stdio_on_signal(mcp: ProcessMcpServer, signals: AsyncIterator[signal.Signals]) -> None:
    async for signum in signals:
        # The SDK's own stdin reader (for a terminal or a file) sits in a blocking read that
        # cancellation cannot interrupt, so end the processes here and leave without unwinding
        # the transport.
        await _shutdown(mcp, f"received {signal.Signals(signum).name}")
        _exit()


async def _shutdown(mcp: ProcessMcpServer, why: str) -> None:
    logger.info("%s; ending every process started", why)
    # A second stop signal (clients escalate after 2 s) must not cut the cleanup short.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    with anyio.CancelScope(shield=True):
        await mcp.cleanup()
    logger.info("all processes ended; bye")


def _exit() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(form: str = "text", level: str = "INFO") -> None:
    """Logs go to stderr (stdout may be the protocol), as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if form == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    try:
        config = configure(arguments)
    except ProcessMcpError as exc:
        setup_logging()
        logger.error("%s", exc)
        sys.exit(2)
    setup_logging(config.service.log_format, config.service.log_level)
    try:
        anyio.run(serve, config)
    except ProcessMcpError as exc:
        logger.error("%s", exc)
        sys.exit(2)
    except BaseExceptionGroup as group:  # raised from one of the server's tasks
        failed, _ = group.split(ProcessMcpError)
        if failed is None:
            raise
        for problem in _leaves(failed):
            logger.error("%s", problem)
        sys.exit(2)
    except KeyboardInterrupt:  # before the server was up, so nothing was started
        sys.exit(130)
    # Worker threads may still sit in blocking reads; every process is already ended.
    _exit()
