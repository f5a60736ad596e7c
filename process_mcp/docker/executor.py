"""Docker mode: processes run in one long-lived container, started through the agent in it.

The container's lifecycle (find or create it, harden it, hold the lease, bring it back when it is lost,
remove it) is the ``session``'s. The executor holds one stream to the agent (``stream``), through which
every process is started and driven (``box.client``); an image without Python gets one exec per process
instead (``per_exec``). Both take the session. Every docker-py call is blocking, so it runs in a worker
thread; ``docker`` is imported only when a DockerExecutor starts, so host mode never pays for it.

Every process carries ``PROCESS_MCP_ID=<executor token>:<docker-N>`` in its environment. A server
that dies without cleaning up ends its agent with it (the agent's input is the server's connection),
and the agent ends every process it started. For the exec-per-process path each server also holds a
lease while it runs (see ``session``). At start, a server ends every marked process whose token has no
lease left.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal as signal_module
import socket
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.to_thread

from ..box.client import AGENT_NAME, BOOTSTRAP, AgentConnection, AgentUnavailable, bootstrap_payload
from ..config import ProcessMcpConfig
from ..core.contract import Backend, LaunchSpec, ProcessSink
from ..core.executor import ProcessExecutor
from ..core.handle import ProcessHandle
from ..core.models import TTY_TERM
from ..errors import BackendUnavailable, InvalidInput, KillFailed, SpawnFailed
from ..policy.egress import PROXY_PORT, proxy_environment
from . import engine
from .engine import MARKER_VAR
from .per_exec import ExecLauncher
from .session import ClientFactory, ContainerSession
from .stream import AGENT_SCRIPT, ExecStream

if TYPE_CHECKING:
    from docker import APIClient
    from docker.models.containers import Container

    from ..policy.egress import DomainProxy

logger = logging.getLogger(__name__)

AGENT_EXIT_S = 2.0
"""How long a lost agent, whose stream the server closed, has to end its processes and exit before the
server kills it through the engine."""
AGENT_EXIT_POLL_S = 0.05
"""Interval of asking the engine whether a lost agent's exec still runs."""
AGENT_GROUP_WAIT = 20
"""Tenths of a second the supervisors of a killed agent have to end their trees and exit, before what is
left of its process group is killed."""
# $1 the agent's pid, $2 its start time (clock ticks, field 22 of /proc/PID/stat, as its HELLO said): if
# that pid is still that process, SIGKILL it, SIGCONT its process group (its zygote and supervisors, which
# a process of its user may have stopped) so each supervisor sees its lifeline end and kills its tree, and
# SIGKILL what is left of the group after AGENT_GROUP_WAIT (tenths of a second, $3).
_END_AGENT_SCRIPT = (
    'p=$1 t=$2 w=$3; s=$(cat "/proc/$p/stat" 2>/dev/null) || exit 0; set -- ${s##*)}; [ "${20}" = "$t" ] || exit 0; '
    'kill -9 "$p"; kill -CONT -"$p" 2>/dev/null; i=0; '
    'while kill -0 -"$p" 2>/dev/null && [ $i -lt "$w" ]; do sleep 0.1; i=$((i+1)); done; '
    'kill -9 -"$p" 2>/dev/null; exit 0'
)
# $1 the start of a marker line (PROCESS_MCP_ID=<token>:docker-), $2 a process number: SIGKILL every
# process whose marker has that start and a number up to $2 (those of a lost agent; a newer agent's
# processes have higher numbers). What a process that killed its supervisor left still carries it.
_SWEEP_LOST_SCRIPT = (
    'v=; for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" = $$ ] && continue; '
    "m=$(tr '\\0' '\\n' < \"$d/environ\" 2>/dev/null | grep -e \"^$1[0-9][0-9]*$\") || continue; "
    'n=${m#"$1"}; [ "$n" -le "$2" ] 2>/dev/null && v="$v $p"; done; '
    '[ -z "$v" ] || kill -9 $v 2>/dev/null; exit 0'
)


class DockerExecutor(ProcessExecutor):
    """Runs processes in one long-lived container (see ``config.docker``).

    ``client_factory`` builds the docker-py client (default: ``engine_client`` for ``config.docker.engine``);
    ``labels`` are added to the container and volume it creates.
    """

    backend: DockerBackend

    def __init__(
        self,
        config: ProcessMcpConfig,
        *,
        client_factory: ClientFactory | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(config, DockerBackend(config, client_factory=client_factory, labels=labels))

    @property
    def session(self) -> ContainerSession:
        """The container processes run in, and the engine client."""
        return self.backend.session

    @property
    def via(self) -> Literal["agent", "exec"]:
        """How processes start: through the agent in the container, or one exec each (no Python in it)."""
        return self.backend.via

    @property
    def container_id(self) -> str | None:
        """The id of the container processes run in, once started."""
        return None if self.session.container is None else self.session.container.id

    def marker(self, pid: str = "") -> str:
        """The environment line that tags process ``pid`` and its descendants in the container; with
        no ``pid``, the start shared by every process of this executor."""
        return self.session.marker(pid)

    @property
    def agent_user(self) -> str:
        """Who the agent's exec runs as (see ``ContainerSession.agent_user``)."""
        return self.session.agent_user

    @property
    def exec_user(self) -> str:
        """Who the execs other than the agent's run as (see ``ContainerSession.exec_user``)."""
        return self.session.exec_user


class DockerBackend(Backend):
    """The container's box: processes started through the agent in it, or one exec each."""

    prefix = "docker"

    @property
    def probes_ports(self) -> bool:
        return self.via == "agent"

    def __init__(
        self,
        config: ProcessMcpConfig,
        *,
        client_factory: ClientFactory | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(config)
        self.session = ContainerSession(config, client_factory=client_factory, labels=labels)
        """The container processes run in, and the engine client."""
        self.session.on_recreate = self._forget_agent
        self._agent: AgentConnection | None = None
        self._agent_execs: dict[AgentConnection, str] = {}  # the exec that runs each agent not shut down
        self._per_exec = ExecLauncher(self.session)
        self._proxy: DomainProxy | None = None  # the domain filter processes reach through the agent
        self._proxy_dir: str | None = None
        self.via: Literal["agent", "exec"] = "agent" if config.docker.agent else "exec"
        """How processes start: through the agent in the container, or one exec each (no Python in it)."""

    async def start(self) -> None:
        """Connect to the engine and make sure the container runs. Raises BackendUnavailable."""
        if self.session.container is not None:
            return
        try:
            await self.session.open()
            if self.config.docker.use_existing and self.config.defaults.workdir is None:
                self.workdir = self.session.working_dir()
                logger.info(
                    "using the container's working directory %s (set DEFAULT_WORKDIR to change it)", self.workdir
                )
            sandbox = self.config.sandbox
            if self.via == "agent" and sandbox.network_restricted and sandbox.allowed_domains:
                await self._start_proxy()
            if self.via == "agent":
                await self._start_agent()
            self._report_network()
        except BaseException:
            await self.close()
            raise

    async def _start_proxy(self) -> None:
        """Start the domain proxy on a private Unix socket; the agent carries processes' connections to it."""
        from ..policy.egress import DomainProxy  # only a server with a domain list needs it

        self._proxy_dir = tempfile.mkdtemp(prefix="process-mcp-docker-proxy-")
        sandbox = self.config.sandbox
        self._proxy = DomainProxy(sandbox.allowed_domains, allow_private=sandbox.allow_private_addresses)
        try:
            await self._proxy.start(os.path.join(self._proxy_dir, "proxy.sock"))
        except OSError as exc:
            raise BackendUnavailable(f"the domain proxy cannot listen in {self._proxy_dir}: {exc}") from None

    def _report_network(self) -> None:
        sandbox = self.config.sandbox
        if not sandbox.network_restricted:
            return
        if self._proxy is not None and self.via == "agent":
            caveat = ""
            if self.config.docker.use_existing:
                caveat = "; the existing container keeps its own network, so a process that ignores HTTP_PROXY "
                caveat += "may go around the filter"
            domains = ",".join(sandbox.allowed_domains)
            logger.info("processes reach only %s, through 127.0.0.1:%d in the container%s", domains, PROXY_PORT, caveat)
        elif sandbox.allowed_domains:
            logger.warning(
                "SANDBOX_ALLOWED_DOMAINS needs the agent (python3 in the image) to reach the domain proxy; "
                "processes in the created container have no network at all"
            )

    async def _start_agent(self) -> None:
        """Start the agent in the container as one exec and wait for its hello; in an image without
        Python 3.8, fall back to one exec per process (logged; ``via`` says which)."""
        client, container = self.session.client, self.session.container
        assert client is not None
        assert container is not None
        api, container_id = client.api, container.id

        command = ["/bin/sh", "-c", AGENT_SCRIPT, "sh", BOOTSTRAP, AGENT_NAME]
        if self.session.agent_user == "0":
            command.append(self.config.docker.user)  # the agent drops to it for each command

        def start_exec() -> tuple[str, Any, socket.socket]:
            exec_id: str = api.exec_create(
                container_id,
                command,
                stdin=True,
                environment={MARKER_VAR: f"{self.session.token}:agent"},
                user=self.session.agent_user,
            )["Id"]
            wrapper: Any = api.exec_start(exec_id, socket=True)
            return exec_id, wrapper, getattr(wrapper, "_sock", wrapper)

        try:
            exec_id, wrapper, sock = await anyio.to_thread.run_sync(start_exec)
        except engine.docker_errors() as exc:
            raise BackendUnavailable(f"cannot start the agent in the container: {engine.reason(exc)}") from None
        channel = ExecStream(wrapper, sock, self.config.docker.container_name)
        agent = AgentConnection(channel, self.config.docker.container_name, on_lost=self._agent_lost)
        self._agent_execs[agent] = exec_id
        try:
            hello = await agent.connect(bootstrap_payload())
        except AgentUnavailable as exc:
            agent.close()
            self._agent_execs.pop(agent, None)
            reason = channel.stderr_tail().strip() or exc.reason
            logger.warning(
                "cannot run the agent in container %s (%s); each process runs as its own exec: slower, and exit "
                "codes as the engine reports them",
                self.config.docker.container_name,
                reason,
            )
            self.via = "exec"
            return
        if not hello.get("subreaper"):
            logger.warning("the agent could not become a subreaper: orphaned processes may escape kill")
        if not hello.get("undumpable"):
            logger.warning(
                "the agent could not make itself undumpable (PR_SET_DUMPABLE): processes of its user may trace it "
                "or write into its stream"
            )
        if self._proxy_dir is not None:
            socket_path = os.path.join(self._proxy_dir, "proxy.sock")
            try:
                await agent.serve_proxy(PROXY_PORT, lambda: asyncio.open_unix_connection(socket_path))
            except AgentUnavailable as exc:
                agent.close()
                self._agent_execs.pop(agent, None)
                raise BackendUnavailable(f"the agent cannot carry the domain proxy: {exc.reason}") from None
        self._agent = agent
        logger.info("agent started in container %s (Python %s)", self.config.docker.container_name, hello["python"])

    def _agent_lost(self, agent: AgentConnection) -> None:
        """The agent was lost (its stream ended or broke the protocol; the client has closed the stream
        and reported its processes ended): make sure they are, and let the next spawn start a new one."""
        if self._agent is agent:
            self._agent = None
        exec_id = self._agent_execs.pop(agent, None)
        client, container = self.session.client, self.session.container
        if exec_id is not None and client is not None and container is not None:
            # The engine's client and the container as they are now: a shutdown may release them meanwhile.
            self.in_background(self._end_lost_agent(agent, exec_id, client.api, container))

    async def _end_lost_agent(self, agent: AgentConnection, exec_id: str, api: APIClient, container: Container) -> None:
        """Give a lost agent AGENT_EXIT_S to end its processes and exit as its closed stream tells it to,
        then kill it through the engine (its supervisors then kill their trees, and what is left of them
        after AGENT_GROUP_WAIT is killed), then kill what is left of its processes that carries their
        markers (what escaped supervisors that a process of the agent's own user killed)."""
        failures: tuple[type[BaseException], ...] = (*engine.docker_errors(), OSError)
        try:
            with anyio.move_on_after(AGENT_EXIT_S):
                while True:
                    if not (await anyio.to_thread.run_sync(api.exec_inspect, exec_id)).get("Running"):
                        break
                    await anyio.sleep(AGENT_EXIT_POLL_S)  # the engine has no event for an exec's end
            pid, started = agent.hello.get("pid"), agent.hello.get("started")
            if pid is not None and started is not None:
                script = [_END_AGENT_SCRIPT, "sh", str(pid), str(started), str(AGENT_GROUP_WAIT)]
                await self.session.run_bounded(container, script, self.session.agent_user)
            marker = f"{self.session.marker()}{self.prefix}-"
            await self.session.run_bounded(container, [_SWEEP_LOST_SCRIPT, "sh", marker, str(agent.last_channel)])
        except failures as exc:
            import docker.errors

            gone = isinstance(exc, docker.errors.NotFound) or getattr(exc, "status_code", None) == 409
            # A container that was removed or stopped took the agent and its processes with it.
            logger.log(
                logging.DEBUG if gone else logging.WARNING,
                "could not make sure the lost agent's processes are gone: %s",
                engine.reason(exc),
            )

    async def launch(self, spec: LaunchSpec, sink: ProcessSink) -> ProcessHandle:
        if self.session.client is None or self.session.container is None:
            raise SpawnFailed("the Docker backend is not started; call start() first")
        sink.via = self.via
        if self.via == "agent":
            return await self._launch_with_agent(spec, sink)
        if spec.limits is not None:
            raise InvalidInput(
                "limits need the agent in the container (python3 >= 3.8 in the image); this container starts "
                "each process with an exec of its own, which cannot bound it: spawn without limits"
            )
        return await self._per_exec.launch(spec, sink, self.workdir)

    async def _launch_with_agent(self, spec: LaunchSpec, sink: ProcessSink) -> ProcessHandle:
        if self._agent is None:  # lost with its exec or the container: bring both back
            if not await self.session.recover():
                raise SpawnFailed(f"could not start {spec.command!r}: the Docker engine does not answer")
            async with self.session.recovery_lock:
                if self._agent is None:
                    await self._start_agent()
        agent = self._agent
        if agent is None:
            raise SpawnFailed(f"could not start {spec.command!r}: the agent cannot run in the container")
        proxied = proxy_environment() if self._proxy is not None else {}
        environment = {
            **self.session.env_defaults(spec.tty),
            **proxied,
            **spec.env,
            MARKER_VAR: self.session.marker(spec.pid).partition("=")[2],
        }
        if spec.tty and "TERM" not in spec.env:
            environment["TERM"] = TTY_TERM
        handle = await agent.spawn(
            spec, sink, environment, inherit=True, workdir=self.workdir, where=" in the container"
        )
        sink.sandboxed = True  # confined by the container
        return handle

    async def close(self) -> None:
        """End this executor's stray processes (a child that outlived its parent's record), then
        remove the container if this executor created it; the volume stays."""
        if self.session.client is None:
            return
        try:
            if self._agent is not None:
                await self._agent.shutdown()  # ends every process it started, wherever they went
                self._agent_execs.pop(self._agent, None)
                self._agent = None
            if self.session.container is not None:
                try:
                    await self._per_exec.signal_matching(self._per_exec.marker_pattern(None), signal_module.SIGKILL)
                except KillFailed as exc:
                    logger.warning("could not sweep leftover processes: %s", exc)
        finally:
            try:
                await self.session.close()
            finally:
                if self._proxy is not None:
                    await self._proxy.close()
                    self._proxy = None
                if self._proxy_dir is not None:
                    shutil.rmtree(self._proxy_dir, ignore_errors=True)
                    self._proxy_dir = None

    async def ready(self) -> bool:
        """Whether the engine answers (a principal's container is made on its first spawn)."""
        return await self.session.ready()

    def _forget_agent(self) -> None:
        """The container was made anew: the agent went with the old one."""
        if self._agent is not None:
            self._agent.close()
            self._agent_execs.pop(self._agent, None)
            self._agent = None
