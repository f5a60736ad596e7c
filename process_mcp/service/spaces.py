"""Each principal in its own space: an executor of its own, so no caller sees another's processes.

Over stdio (and HTTP without authentication) there is one caller, the local one, whose space is the
configured one, as it always was. Each authenticated principal gets a space of its own, made on its
first call: on the host a workspace directory under the configured one (the sandbox's writable root),
in Docker mode a container and a volume named after the configured ones and the principal. Limits
(live processes, buffers, kept finished processes) hold per space, since each space is an executor.
A principal's space with no calls and nothing running for the idle timeout is reclaimed: its
processes' records go and its container is removed; its workspace and volume stay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio

from ..config import ProcessMcpConfig
from ..core.executor import ProcessExecutor
from ..core.registry import ManagedProcess
from ..errors import RateLimited, TooManyRequests
from ..policy.audit import AuditLog
from .auth import PRINCIPAL_NAME, principal_for_subject
from .metrics import Metrics
from .ports import PortLinks, PortProxy

logger = logging.getLogger(__name__)

ExecutorFactory = Callable[[ProcessMcpConfig], ProcessExecutor]

RATE_WINDOW_S = 60.0
"""The window PROCESS_RATE_SPAWNS_PER_MIN counts spawns in: any minute, not the calendar's."""

RECLAIM_CHECKS_PER_TIMEOUT = 4
"""How often, per idle timeout, spaces are checked: one is reclaimed at most a quarter late."""

MAX_RECLAIM_INTERVAL_S = 30.0
"""Longest time between checks, so a long idle timeout still reclaims close to when it is due."""


class Space:
    """One caller's executor and what is known about its use."""

    def __init__(self, principal: str | None, executor: ProcessExecutor) -> None:
        self.principal = principal
        self.executor = executor
        self.calls = 0
        self.last_call = time.monotonic()
        self.started = False
        self.start_lock = anyio.Lock()
        self.spawns: deque[float] = deque()  # when its spawns of the last minute were admitted

    @property
    def name(self) -> str:
        return self.principal or "the local caller"


class Spaces:
    """The spaces of every caller of one server. ``use`` is how a tool call reaches its executor."""

    def __init__(self, config: ProcessMcpConfig, factory: ExecutorFactory, audit: AuditLog | None = None) -> None:
        self.config = config
        self.audit = audit
        """Where calls and process ends are recorded, if anywhere."""
        self._factory = factory
        self.metrics = Metrics(audit)
        """What is counted (served at /metrics over HTTP), fed by each space's executor."""
        self.links = PortLinks(config.service.port_url_ttl_s)
        """The credentials and URLs of the callers' box ports over HTTP."""
        self.local = Space(None, self._make(None, config))
        self.ports = PortProxy(self.links, self.executor_of)
        """The proxy to the callers' box ports (one, so its bounds hold across HTTP requests and upgrades)."""
        self._spaces: dict[str, Space] = {}
        self._closing: dict[str, anyio.Event] = {}
        self._lock = anyio.Lock()
        self._cleanup_lock = anyio.Lock()

    @property
    def prefix(self) -> str:
        """Start of every process id any space hands out (``host``, ``docker``)."""
        return self.local.executor.prefix

    def principals(self) -> list[str]:
        """The principals that have a space now."""
        return sorted(self._spaces)

    def config_for(self, principal: str) -> ProcessMcpConfig:
        """The configuration of ``principal``'s space: its own workspace; or container, volume and network."""
        config = self.config.model_copy(deep=True)
        if config.mode == "host":
            config.defaults.workdir = os.path.join(self.config.workdir, principal)
        else:
            config.docker.container_name = f"{self.config.docker.container_name}-{principal}"
            config.docker.volume_name = f"{self.config.docker.volume_name}-{principal}"
            config.docker.own_network = True  # on Docker's shared bridge, principals' containers reach each other
        return config

    async def start_local(self) -> None:
        """Start the local caller's backend now (e.g. its container), so a broken setup stops the server."""
        await self._start(self.local)

    @asynccontextmanager
    async def use(
        self, principal: str | None, *, create: bool = True, spawning: bool = False
    ) -> AsyncIterator[ProcessExecutor | None]:
        """The executor of ``principal``'s space (None: the local caller), made and started on first use;
        None if it has no space and ``create`` is false. Counts the call in progress while inside, and
        with ``spawning`` the spawn against the caller's rate.

        Raises TooManyRequests when the caller already has as many calls in progress as it may,
        RateLimited when it has started as many processes this minute as it may, and
        BackendUnavailable when its backend cannot be started.
        """
        space = await self._find(principal, create)
        if space is None:
            yield None
            return
        limit = self.config.service.max_requests
        # The local caller (stdio, or HTTP without authentication) is the one user there is: not capped.
        if space.principal is not None and space.calls >= limit:
            raise TooManyRequests(
                f"{space.name} has {space.calls} calls in progress, the most allowed (PROCESS_MAX_REQUESTS="
                f"{limit}); wait for one to return, and use waitFor or untilExit instead of polling"
            )
        slot = self._admit_spawn(space) if spawning else None
        space.calls += 1
        try:
            await self._start(space)
            yield space.executor
        except BaseException:
            # Only what started counts against the rate: a refused or failed spawn gives its slot back.
            if slot is not None:
                with contextlib.suppress(ValueError):
                    space.spawns.remove(slot)
            raise
        finally:
            space.calls -= 1
            space.last_call = time.monotonic()

    def _admit_spawn(self, space: Space) -> float | None:
        """Hold a slot of the space's PROCESS_RATE_SPAWNS_PER_MIN for a spawn (its time, given back if the
        spawn fails); raise RateLimited beyond it."""
        limit = self.config.service.spawns_per_min
        if not limit:
            return None
        now = time.monotonic()
        while space.spawns and now - space.spawns[0] >= RATE_WINDOW_S:
            space.spawns.popleft()
        if len(space.spawns) >= limit:
            wait = RATE_WINDOW_S - (now - space.spawns[0])
            raise RateLimited(
                f"{space.name} started {limit} processes in the last minute, the most allowed "
                f"(PROCESS_RATE_SPAWNS_PER_MIN={limit}); try again in {wait:.1f} s",
                retry_after_s=wait,
            )
        space.spawns.append(now)
        return now

    async def _find(self, principal: str | None, create: bool) -> Space | None:
        if principal is None:
            return self.local
        name = space_name(principal)
        while True:
            async with self._lock:
                space = self._spaces.get(name)
                closing = self._closing.get(name)
                if space is not None or (closing is None and not create):
                    return space
                if closing is None:
                    space = Space(name, self._make(name, self.config_for(name)))
                    self._spaces[name] = space
                    logger.info("principal %s: new space", name)
                    return space
            # Its previous space is still being reclaimed (its container removed): wait, then make a new one.
            await closing.wait()

    def executor_of(self, space: str | None) -> ProcessExecutor | None:
        """The executor of the space named ``space`` (None: the local caller's) if it is started now."""
        found = self.local if space is None else self._spaces.get(space)
        return found.executor if found is not None and found.started else None

    async def ready(self) -> bool:
        """Whether the backend could start a process now (the local caller's, which every space shares)."""
        return await self.local.executor.ready()

    def all(self) -> list[Space]:
        """Every space there is now, the local caller's first."""
        return [self.local, *self._spaces.values()]

    def _make(self, principal: str | None, config: ProcessMcpConfig) -> ProcessExecutor:
        executor = self._factory(config)
        live = self.metrics.live.labels(principal or "")  # shown (as 0) from the space's start
        executor.on_live = live.inc

        def launched(seconds: float) -> None:
            self.metrics.spawn_seconds.observe(seconds)

        def ended(record: ManagedProcess) -> None:
            output = record.stdout.total + record.stderr.total
            self.metrics.output_bytes.inc(output)
            if self.audit is not None:
                self.audit.write(
                    {
                        "event": "end",
                        "principal": principal,
                        "pid": record.pid,
                        "command": record.command,
                        "exitCode": record.exit_code,
                        "signal": record.signal,
                        "endedBy": record.ended_by,
                        "outputBytes": output,
                        "peakRssBytes": record.peak_rss,
                    }
                )

        def reached(record: ManagedProcess, port: int, url: str) -> None:
            if self.audit is not None:
                self.audit.write(
                    {"event": "forward", "principal": principal, "pid": record.pid, "port": port, "url": url}
                )

        executor.on_launch = launched
        executor.on_end = ended
        executor.on_reach = reached
        return executor

    async def _start(self, space: Space) -> None:
        if space.started:
            return
        async with space.start_lock:
            if space.started:
                return
            if space.principal is not None and self.config.mode == "host":
                workdir = space.executor.workdir
                await anyio.to_thread.run_sync(lambda: os.makedirs(workdir, mode=0o700, exist_ok=True))
            await space.executor.start()
            space.started = True

    async def reclaim_idle(self) -> list[str]:
        """Reclaim every principal's space idle for the timeout with nothing running; return their names."""
        timeout = self.config.service.idle_timeout_s
        now = time.monotonic()
        idle: list[Space] = []
        async with self._lock:
            for name, space in list(self._spaces.items()):
                if space.calls or now - space.last_call < timeout:
                    continue
                if space.executor.live_count():
                    continue
                del self._spaces[name]
                self._closing[name] = anyio.Event()
                idle.append(space)
        for space in idle:
            assert space.principal is not None
            try:
                with anyio.CancelScope(shield=True):
                    await space.executor.cleanup()
                logger.info("principal %s: space reclaimed after %g s idle", space.principal, timeout)
            finally:
                with contextlib.suppress(KeyError):  # a reclaimed space has no processes to count
                    self.metrics.live.remove(space.principal)
                async with self._lock:
                    self._closing.pop(space.principal).set()
        return [space.name for space in idle]

    async def reclaim_forever(self) -> None:
        """Reclaim idle spaces until cancelled."""
        timeout = self.config.service.idle_timeout_s
        interval = min(timeout / RECLAIM_CHECKS_PER_TIMEOUT, MAX_RECLAIM_INTERVAL_S)
        while True:
            await anyio.sleep(interval)
            await self.reclaim_idle()

    async def cleanup(self) -> None:
        """End every process of every space and release their backends (containers). Safe to repeat."""
        async with self._cleanup_lock:
            async with self._lock:
                spaces = [self.local, *self._spaces.values()]
                self._spaces.clear()
            async with anyio.create_task_group() as tasks:
                for space in spaces:
                    tasks.start_soon(space.executor.cleanup)


def space_name(principal: str) -> str:
    """A name fit for a directory and a container for ``principal``: itself when it already is one."""
    if PRINCIPAL_NAME.match(principal):
        return principal
    return principal_for_subject("", principal)
