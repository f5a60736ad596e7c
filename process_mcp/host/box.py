"""The host's box: one long-lived bwrap sandbox over a workspace, with the agent inside, through which
every process of that workspace starts (the same shape as a container with its agent).

The box is started with the first spawn (``Sandbox.box``: the sandbox's view and namespaces, a HOME of
its own, its bounds), from the server's Landlock-scoped thread where there is one, so neither the box
nor anything in it can signal the server or reach the host's abstract sockets. Its processes share its
/tmp, loopback and IPC; another workspace (another principal's) has a box of its own. Each spawn
carries a plan (``Sandbox.confine_plan``: what is protected in the workspace now, the seccomp filter,
the Landlock scopes) that the agent applies for the whole box before the process starts, and each
process gives up everything before its command runs (``box.confine``). The box ends with the server,
when the agent is lost (the next spawn starts another), and once no process of it has run for
BOX_IDLE_S.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

from ..box.client import AgentUnavailable
from ..box.local import LocalAgent, Starter
from ..core.contract import LaunchSpec, ProcessSink
from ..core.handle import ProcessHandle
from ..errors import SpawnFailed, excerpt
from ..policy.egress import PROXY_PORT
from .sandbox import Sandbox

logger = logging.getLogger(__name__)

BOX_IDLE_S = 300.0
"""How long a box lives on with no process; the next spawn starts a new one (its HOME stays)."""


class HostBox:
    """One workspace's box and the agent in it, started when first needed.

    ``plan`` gives the confinement plan for the next spawn (it searches the workspace: run in a worker
    thread); ``start_in`` runs the box's start where it must run; ``proxy_socket`` is the domain proxy's
    socket, which the agent serves on the box's loopback at PROXY_PORT.
    """

    def __init__(
        self,
        sandbox: Sandbox,
        home: str,
        plan: Callable[[], dict[str, Any]],
        *,
        start_in: Starter | None = None,
        proxy_socket: str | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.home = home
        self.home_inside = sandbox.home_in_box(home)
        """Where the box shows ``home``: every process's HOME."""
        self._plan = plan
        self._start_in = start_in
        self._proxy_socket = proxy_socket
        self._agent: LocalAgent | None = None
        self._cgroup: str | None = None
        self._lock = anyio.Lock(fast_acquire=True)  # taken at each spawn: no yield when free
        self._planning = anyio.Lock(fast_acquire=True)
        self._running: set[str] = set()  # ids of the processes of this box that have not finished
        self._group_of: dict[str, str] = {}  # process id -> its cgroup, below the box's
        self._bounds = (0, 0)  # the box's processes and memory bytes, set as it starts
        self._idle: asyncio.TimerHandle | None = None
        self._stopping: asyncio.Task[None] | None = None

    async def spawn(
        self,
        spec: LaunchSpec,
        sink: ProcessSink,
        env: dict[str, str],
        workdir: str,
        check: Callable[[], None] = lambda: None,
    ) -> ProcessHandle:
        """Start ``spec``'s process in the box (started first if none runs), confined by the plan for the
        workspace as it is now. ``check`` runs first, in the worker thread that makes the plan (it may
        raise InvalidInput). Raises SpawnFailed, or InvalidInput for a missing cwd."""
        self._cancel_idle()
        agent = await self._ready(spec.command)
        # A plan makes the box's protections what the workspace needs when it was made: plans reach the
        # agent in the order they were made, so an older one never undoes what a newer one added.
        async with self._planning:
            box_group, cgroups = self._cgroup, self.sandbox.cgroups
            processes, memory = self.sandbox.process_bounds(self._bounds, spec.limits)

            def prepare() -> tuple[dict[str, Any], str | None]:  # the search and the cgroup: off the loop
                check()
                plan = self._plan()
                if os.geteuid() != 0:  # the kernel counts no processes for root (cgroups bound those)
                    # Past this many processes of the box a fork in this tree fails: the rest is for others.
                    plan["nproc"] = self.sandbox.process_bounds(self._bounds, None)[0]
                if cgroups is None or box_group is None:
                    return plan, None
                try:
                    # Its supervisor joins first, and counts beside the caller's processes.
                    inner = cgroups.acquire_inside(box_group, max_processes=processes + 1, max_memory_bytes=memory)
                except OSError as exc:
                    raise SpawnFailed(f"the sandbox's cgroups could not be set up: {exc}") from None
                plan["cgroup"] = inner
                return plan, f"{box_group}/{inner}"

            plan, group = await anyio.to_thread.run_sync(prepare)
            # Noted before it starts: its end may be told (``finished``) before the start is answered.
            self._running.add(spec.pid)
            if group is not None:
                self._group_of[spec.pid] = group
            try:
                return await agent.connection.spawn(
                    spec, sink, env, inherit=False, workdir=workdir, where=" in the sandbox", confine=plan
                )
            except BaseException:
                self.finished(spec.pid)
                raise

    def limits_hit(self, pid: str) -> tuple[int, int]:
        """How often process ``pid``'s tree hit its bounds where it has a cgroup of its own (processes the
        kernel killed for memory, forks it refused), else (0, 0)."""
        group = self._group_of.get(pid)
        if group is None or self.sandbox.cgroups is None:
            return 0, 0
        return self.sandbox.cgroups.limits_hit(group)

    def peak_memory(self, pid: str) -> int | None:
        """The most memory process ``pid``'s tree used at once, where it has a cgroup of its own."""
        group = self._group_of.get(pid)
        return None if group is None or self.sandbox.cgroups is None else self.sandbox.cgroups.peak_memory(group)

    def finished(self, pid: str) -> None:
        """Process ``pid`` has finished (its group is given back); with none left, the box ends after
        BOX_IDLE_S."""
        group = self._group_of.pop(pid, None)
        if group is not None and self.sandbox.cgroups is not None:
            self.sandbox.cgroups.release(group)
        self._running.discard(pid)
        if not self._running and self._agent is not None and self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(BOX_IDLE_S, self._stop_if_idle)

    async def close(self) -> None:
        """End every process of the box, and the box."""
        self._cancel_idle()
        async with self._lock:
            await self._stop()

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _stop_if_idle(self) -> None:
        self._idle = None
        if not self._running and self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_idle())

    async def _stop_idle(self) -> None:
        try:
            async with self._lock:
                if not self._running:
                    logger.info("sandbox: the box over %s ran nothing for %g s", self.sandbox.workspace, BOX_IDLE_S)
                    await self._stop()
        finally:
            self._stopping = None

    async def _ready(self, command: str) -> LocalAgent:
        async with self._lock:
            if self._agent is not None and self._agent.connection.alive:
                return self._agent
            if self._agent is not None:
                logger.warning("sandbox: the box over %s was lost; a new one starts", self.sandbox.workspace)
                await self._stop()
            cgroups: list[str | None] = []

            def boxing(argv: list[str]) -> tuple[list[str], list[int]]:  # in a thread: it reads the bounds
                self._bounds = self.sandbox.box_bounds()
                launch = self.sandbox.box(self.home, argv, self._bounds)
                cgroups.append(launch.cgroup)
                return launch.argv, list(launch.pass_fds)

            try:
                agent = await LocalAgent.start("box", boxing, self._start_in or _in_worker)
                # Without a network of its own the box's loopback is the host's: its ports are reached there.
                agent.connection.same_network = not self.sandbox.config.network_restricted
            except AgentUnavailable as exc:
                self._release_cgroup(cgroups)
                reason = f"the sandbox did not start: {exc.reason}"
                raise SpawnFailed(f"could not start {excerpt(command)}: {reason}") from None
            except BaseException:
                self._release_cgroup(cgroups)
                raise
            self._agent, self._cgroup = agent, cgroups[0] if cgroups else None
            box_group, sandbox_cgroups = self._cgroup, self.sandbox.cgroups
            if box_group is not None and sandbox_cgroups is not None:
                agent.connection.on_kept = lambda name: sandbox_cgroups.hold(f"{box_group}/{name}")
            if self._proxy_socket is not None:
                socket_path = self._proxy_socket
                try:
                    await agent.connection.serve_proxy(PROXY_PORT, lambda: asyncio.open_unix_connection(socket_path))
                except AgentUnavailable as exc:
                    await self._stop()
                    raise SpawnFailed(f"the sandbox cannot carry the domain proxy: {exc.reason}") from None
            return agent

    async def _stop(self) -> None:
        agent, self._agent = self._agent, None
        if agent is not None:
            await agent.stop()
        self._release_cgroup([*self._group_of.values(), self._cgroup])
        self._group_of.clear()
        self._cgroup = None
        self._running.clear()

    def _release_cgroup(self, names: list[str | None]) -> None:
        for name in names:
            if name is not None and self.sandbox.cgroups is not None:
                self.sandbox.cgroups.release(name)


async def _in_worker(start: Callable[[], Any]) -> Any:
    return await anyio.to_thread.run_sync(start)
