"""Reading and writing a process's non-blocking descriptors on the event loop (both backends)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio

from ..errors import StdinFailed

READ_CHUNK = 256 * 1024
"""Bytes read per wake-up: large enough to keep up with a flood, small enough to stay fair."""
STDIN_WRITE_TIMEOUT_S = 5.0
"""How long stdin waits for a process that is not reading before it reports failure."""


async def write_all(fd: int, send: Callable[[memoryview], int], data: bytes, pid: str) -> None:
    """Write ``data`` with ``send`` (a non-blocking write to ``fd``), waiting for room up to
    STDIN_WRITE_TIMEOUT_S. Raises StdinFailed if the process stops reading or closed its input."""
    view = memoryview(data)
    with anyio.move_on_after(STDIN_WRITE_TIMEOUT_S):
        while view:
            try:
                view = view[send(view) :]
            except BlockingIOError:
                await wait_writable(fd)
            except OSError as exc:
                raise StdinFailed(
                    f"{pid} no longer accepts input ({exc.strerror or exc}); call stdout to see what it printed"
                ) from None
        return
    raise StdinFailed(
        f"{pid} is not reading its input ({len(view)} of {len(data)} bytes unsent "
        f"after {STDIN_WRITE_TIMEOUT_S:g} s); call stdout to see what it is doing"
    )


async def wait_writable(fd: int) -> None:
    """Wait until the non-blocking descriptor ``fd`` has room for a write."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)
