"""The backend contract: what the executor asks of a backend, and what a backend reports back.

A backend is a way to make a box (a bwrap sandbox, a container) and to start processes in it. The
executor (``executor.ProcessExecutor``) is the one implementation of the five operations over any
backend: it validates requests, keeps the records, waits, renders output and ends processes. For each
process it hands the backend a ``LaunchSpec`` (what to start) and a ``ProcessSink`` (the record to
report into), and gets back a ``ProcessHandle`` (``handle``) to drive the process. What a backend must
report, and in which order, is in ``handle``'s docstring.

A new backend writes a ``Backend`` subclass (``launch`` and what its box needs at ``start`` and
``close``), a ``ProcessHandle`` per process (or reuses the agent's: ``box.client``), and an executor
class that passes its backend to ``ProcessExecutor``; the service finds it through its mode.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..config import ProcessMcpConfig
from .buffer import OutputBuffer
from .handle import ProcessHandle, TreeRoot
from .models import EndedBy, LimitName, ProcessLimits, ProcessVia

__all__ = ["Backend", "LaunchSpec", "ProcessHandle", "ProcessSink", "TreeRoot"]


@dataclass(frozen=True)
class LaunchSpec:
    """One process to start, as the executor checked it."""

    pid: str
    """Its id, e.g. ``host-3``; its number is what the backend's agent and markers use."""
    command: str
    """A shell command line, run with ``/bin/sh -c``."""
    cwd: str
    """Its working directory, absolute (where it runs: on the host, or in the box)."""
    env: Mapping[str, str]
    """The request's variables, set over what the backend gives every process."""
    tty: bool
    """Whether it runs on a terminal (one output stream) or with pipes (stdout and stderr)."""
    limits: ProcessLimits | None
    """What it may use, or None for the backend's defaults."""
    file_room: int = 0
    """Bytes each output stream's file in the box (``outfiles``) may hold; 0 for no files."""


class ProcessSink(Protocol):
    """The record of one process, as a backend sees it: what it reads, and what it reports into it.

    ``registry.ManagedProcess`` implements it. Calls are made on the event loop, in the order
    ``handle`` describes.
    """

    @property
    def pid(self) -> str: ...

    @property
    def tty(self) -> bool: ...

    @property
    def limits(self) -> ProcessLimits | None: ...

    @property
    def started(self) -> float:
        """When the executor started launching it (monotonic clock)."""
        ...

    @property
    def stdout(self) -> OutputBuffer:
        """Where output is appended as it is read (a terminal's too)."""
        ...

    @property
    def stderr(self) -> OutputBuffer: ...

    sandboxed: bool
    """Set before ``launch`` returns: whether the process is confined."""
    via: ProcessVia
    """Set before ``launch`` returns: how it was started."""
    peak_rss: int | None
    """Most memory its tree used, where the backend measures it better than samples (a cgroup's peak)."""

    def stream_opened(self) -> None:
        """Once for each output stream the backend will read, before ``launch`` returns."""

    def stream_closed(self) -> None:
        """When a stream ends (every holder of its write end is gone)."""

    def finish(self, exit_code: int | None, signum: int | None = None, *, cause: EndedBy | None = None) -> None:
        """Once, when the process exits, with what the kernel reported (``cause`` if the backend knows better)."""

    def ending(self, cause: EndedBy) -> None:
        """Who is ending it, when the backend is (e.g. its agent was lost)."""

    def ended_for(self, limit: LimitName) -> None:
        """It ended because it passed ``limit``, which the backend's kernel enforced."""


class Backend(ABC):
    """How one executor's processes are started: a box, and a way to start processes in it.

    ``start`` and ``close`` are called once each, around every ``launch``; every method is called on
    the event loop and raises only ``ProcessMcpError`` subclasses.
    """

    prefix: ClassVar[str]
    """Start of every process id its executor hands out, e.g. ``host`` for ``host-1``."""

    def __init__(self, config: ProcessMcpConfig) -> None:
        self.config = config
        self.workdir = config.workdir
        """Where processes run when a spawn gives no cwd, and what a relative cwd is taken from; a backend
        may settle it at ``start`` (a container's own working directory)."""
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Prepare the box (e.g. the container); called once before the first launch. Raises
        BackendUnavailable."""
        return None

    async def ready(self) -> bool:
        """Whether a launch could start now (for a readiness probe); never raises."""
        return True

    @abstractmethod
    async def launch(self, spec: LaunchSpec, sink: ProcessSink) -> ProcessHandle:
        """Start ``spec``'s process, report into ``sink`` as ``handle`` describes, and return its handle.

        Raises InvalidInput (e.g. a missing cwd) or SpawnFailed.
        """

    @property
    def probes_ports(self) -> bool:
        """Whether its handles can check a port in the box (``ProcessHandle.probe``): where an agent runs there."""
        return True

    def limit_reached(self, sink: ProcessSink, limits: ProcessLimits) -> LimitName | None:
        """A limit the box's kernel says the process hit (a cgroup's OOM kill or refused fork), or None;
        the executor also measures its tree against ``limits``."""
        return None

    def finished(self, sink: ProcessSink) -> None:
        """The process has exited and its output is closed: release what the box held for it."""
        return None

    async def close(self) -> None:
        """Release the box after every process is gone. Safe to call more than once."""
        return None

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task of its own (from a callback), held until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
