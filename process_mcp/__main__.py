"""The stdio MCP server: ``process-mcp`` or ``python -m process_mcp``.

stdout carries the protocol, so every log line goes to stderr. On client disconnect (stdin closes),
SIGTERM, SIGINT or SIGHUP, every process the server started is ended before it exits.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import anyio

from .errors import ProcessMcpError
from .service.server import ProcessMcpServer, create_process_mcp

logger = logging.getLogger("process_mcp")

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def serve() -> None:
    """Run the configured server on stdio until the client leaves or a stop signal arrives."""
    mcp = await create_process_mcp()
    logger.info("process-mcp serving on stdio (mode %s)", mcp.executor.config.mode)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_stop_on_signal, mcp)
        await mcp.server.run_stdio_async()
        tasks.cancel_scope.cancel()
    await _shutdown(mcp, "the client closed the connection")


async def _stop_on_signal(mcp: ProcessMcpServer) -> None:
    with anyio.open_signal_receiver(*_STOP_SIGNALS) as received:
        async for signum in received:
            # The transport's stdin reader sits in a blocking read that cancellation cannot
            # interrupt, so end the processes here and leave without unwinding the transport.
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


def main() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        anyio.run(serve)
    except ProcessMcpError as exc:
        logger.error("%s", exc)
        sys.exit(2)
    except KeyboardInterrupt:  # before the server was up, so nothing was started
        sys.exit(130)
    # Worker threads may still sit in blocking reads; every process is already ended.
    _exit()


if __name__ == "__main__":
    main()
