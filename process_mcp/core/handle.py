"""The contract between the executor and a backend, for each process the backend starts.

A backend's ``Backend.launch`` (``contract``) starts one process for a ``LaunchSpec`` and returns a
``ProcessHandle`` to drive it. From then on the backend keeps the process's record (a ``ProcessSink``)
current, always on the event loop, in this order:

1. Before it returns the handle: ``record.sandboxed`` (whether the process is confined) and
   ``record.via`` (how it was started), and ``record.stream_opened()`` once for each output stream it
   will read: stdout and stderr, or the one terminal of a TTY process.
2. As output arrives: ``record.stdout.append(data)`` or ``record.stderr.append(data)``, the raw bytes
   in the order they were read. Nothing is rendered here: a TTY's screen is rendered from the buffer
   only when someone asks for it.
3. When a stream ends (every holder of its write end is gone): ``record.stream_closed()``.
4. When the process itself exits, exactly once, with what the kernel reported:
   ``record.finish(exit_code)``, or ``record.finish(None, signum)`` when a signal ended it; what the
   process wrote before exiting and is still waiting to be read is appended first.

A process has exited when ``finish`` is called; it is done once it has exited and every stream it
opened is closed (a background child may hold output open after its parent exits). Then the
executor's ``on_done`` runs and, once the record is dropped, ``close`` releases the handle.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Generic, Literal, NamedTuple, TypeVar

from .stats import TreeSample

STOPPED_FRESH_S = 0.01
"""How long an answer to which processes are stopped, asked where they run, serves later askers: the
rows of one ps ask one after another, and one question answers them all."""


_T = TypeVar("_T")


class SharedAnswer(Generic[_T]):
    """A question about all of a box's processes (``ask``): asked once for every caller meanwhile, and its
    answer serves later callers for STOPPED_FRESH_S (the rows of one ps ask one after another)."""

    def __init__(self, ask: Callable[[], Awaitable[_T]]) -> None:
        self._ask = ask
        self._query: asyncio.Future[_T] | None = None  # shared by callers meanwhile
        self._answer: tuple[float, _T] | None = None  # the last, and when it came

    async def get(self) -> _T:
        if self._answer is not None and time.monotonic() - self._answer[0] < STOPPED_FRESH_S:
            return self._answer[1]
        if self._query is None:
            query = asyncio.ensure_future(self._asked())
            self._query = query
            query.add_done_callback(lambda _: setattr(self, "_query", None))
        return await asyncio.shield(self._query)

    async def _asked(self) -> _T:
        answer = await self._ask()
        self._answer = (time.monotonic(), answer)
        return answer


class TreeRoot(NamedTuple):
    """Where a process's tree can be measured on this machine (``ProcessHandle.tree_root``)."""

    pid: int
    """A pid whose descendants are the process's tree."""
    included: bool
    """Whether that pid is itself part of the tree (else only its descendants are)."""


InputWanted = Literal["input", "secret"]
"""What a process waiting for input waits for: any input, or a secret typed without echo."""


class ProcessHandle(ABC):
    """One live process as a backend drives it. Methods are called on the event loop."""

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """Deliver ``data`` to the process's input (its terminal or stdin). Raises StdinFailed."""

    @abstractmethod
    async def end_input(self) -> None:
        """End the process's input after what was written: close its stdin pipe, or type its terminal's
        end-of-file character (twice after a partial line, whose end the first makes). Raises StdinFailed."""

    @abstractmethod
    async def signal(self, signum: int) -> None:
        """Send ``signum`` to the process and everything in its process group. Raises KillFailed.

        A group that is already gone is not an error.
        """

    @abstractmethod
    def close(self) -> None:
        """Release what the handle holds (descriptors, sockets); the process must be gone already."""

    def hand_over(self) -> None:
        """Release the handle of a process that is started again under the same id: what the backend's
        next launch for that id takes over (the output files) is kept for it. The process must be gone."""
        self.close()

    def tree_root(self) -> TreeRoot | None:
        """Where the process's tree (the process and its descendants) can be measured on this machine;
        None where /proc here cannot see them (a container's agent)."""
        return None

    def read_sample(self) -> TreeSample | None:
        """What the process's tree uses, read from /proc on this machine (at its ``tree_root``); called in
        a worker thread. None where /proc here cannot tell (then ``sample`` asks)."""
        return None

    async def sample(self) -> TreeSample | None:
        """What the process's tree uses, measured where it runs, for a handle whose ``read_sample`` cannot
        tell; None where it cannot be measured."""
        return None

    async def wants_input(self) -> InputWanted | None:
        """Whether the process waits for input now: "input" when a process of its tree (on a terminal, of
        its foreground group) sleeps reading its terminal or stdin pipe, "secret" when that terminal reads
        a line without echo (a password prompt); None when it does not, or where it cannot be told."""
        return None

    def read_stopped(self) -> bool | None:
        """Whether the process itself (the root of its tree) is stopped by a signal, read from /proc on this
        machine; called in a worker thread. None where /proc here cannot tell (then ``stopped`` asks)."""
        return None

    async def stopped(self) -> bool | None:
        """Whether the process itself is stopped by a signal, asked where it runs, for a handle whose
        ``read_stopped`` cannot tell; None where it cannot be told (the record keeps what was last seen)."""
        return None

    def output_file(self, stream: int) -> str | None:
        """Where in the box stream ``stream`` (1 stdout or the terminal, 2 stderr) is kept whole, up to the
        spec's ``file_room`` (the agent's output files); None where it is not."""
        return None

    async def probe(self, port: int, path: str | None, timeout_s: float) -> tuple[bool, str] | None:
        """Whether something where the process runs accepts connections on loopback ``port`` (and with
        ``path``, answers an HTTP GET of it with 2xx or 3xx), within ``timeout_s``: (yes or no, what was
        seen); None where it cannot be told."""
        return None

    async def ports(self) -> list[int] | None:
        """The TCP ports the process's tree listens on where it runs; None where that cannot be told."""
        return None

    async def port_url(self, port: int) -> str | None:
        """A URL that reaches ``port`` (one the tree listens on) from this machine: the port itself where the
        box's loopback is this machine's, else a forward here, opened now and closed with the process."""
        return None

    async def connect_port(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to loopback ``port`` where the process runs (the caller checks that its tree
        listens there); None where that cannot be reached from here. Raises OSError when the connection
        cannot be made."""
        return None

    async def read_file(self, stream: int, offset: int, size: int) -> bytes | None:
        """Up to ``size`` bytes of stream ``stream``'s output file from ``offset`` (fewer where the file
        ends); None where there is no file or it cannot be read."""
        return None
