"""Docker mode: processes run in one long-lived container, started through the agent in it.

The executor owns the container's lifecycle (find or create it, harden it, bring it back when it is
lost) and one stream to the agent (``stream``), through which every process is started and driven
(``box.client``). An image without Python gets one exec per process instead (``per_exec``). Every
docker-py call is blocking, so it runs in a worker thread; ``docker`` is imported only when a
DockerExecutor starts, so host mode never pays for it.

Every process carries ``PROCESS_MCP_ID=<executor token>:<docker-N>`` in its environment. A server
that dies without cleaning up ends its agent with it (the agent's input is the server's connection),
and the agent ends every process it started. For the exec-per-process path each server also holds a
lease while it runs: an exec (``cat`` with ``PROCESS_MCP_LEASE=<token>``) whose input is the server's
connection, so it ends when the server's process does, however it dies. At start, a server ends every
marked process whose token has no lease left.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal as signal_module
import socket
import tempfile
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.to_thread

from ..box.client import AGENT_NAME, BOOTSTRAP, AgentConnection, AgentUnavailable, bootstrap_payload
from ..config import DOCKER_WORKDIR, ProcessMcpConfig
from ..core.environment import defaults_missing_from
from ..core.executor import ProcessExecutor
from ..core.handle import ProcessHandle
from ..core.models import TTY_TERM
from ..core.registry import ManagedProcess
from ..errors import BackendUnavailable, InvalidInput, KillFailed, SpawnFailed
from ..policy.egress import PROXY_PORT, proxy_environment
from . import engine, network
from .engine import MANAGED_LABEL, MARKER_VAR
from .per_exec import LAUNCH_TIMEOUT_S, ExecLauncher
from .stream import AGENT_SCRIPT, ExecStream

if TYPE_CHECKING:
    from docker import APIClient, DockerClient
    from docker.models.containers import Container

    from ..policy.egress import DomainProxy

logger = logging.getLogger(__name__)

IMAGE_PULL_TIMEOUT_S = 600.0
"""How long start waits for an image pull; large images over slow links take minutes."""
CONTAINER_REMOVE_TIMEOUT_S = 20.0
"""Bound on removing the container at shutdown, so a stuck engine cannot hang the server's exit."""

LEASE_VAR = "PROCESS_MCP_LEASE"
_OWN_HOME = f'd={DOCKER_WORKDIR}; if [ "$(stat -c %u "$d")" = 0 ]; then chown -R "$1" "$d"; else chown "$1" "$d"; fi'

# Prints "ok" once running, then holds the lease until its input (the server's connection) closes.
_LEASE_SCRIPT = "printf ok; exec cat >/dev/null"
# Ends (SIGKILL) every process marked with a token that no lease holds, and prints how many.
_SWEEP_SCRIPT = (
    "env_of() { tr '\\0' '\\n' < \"$1/environ\" 2>/dev/null; }; leases=' '; "
    f'for d in /proc/[0-9]*; do l=$(env_of "$d" | grep "^{LEASE_VAR}="); '
    f'[ -n "$l" ] && leases="$leases${{l#{LEASE_VAR}=}} "; done; v=; '
    'for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" = $$ ] && continue; '
    f'm=$(env_of "$d" | grep "^{MARKER_VAR}="); [ -z "$m" ] && continue; '
    f"t=${{m#{MARKER_VAR}=}}; t=${{t%%:*}}; "
    'case "$leases" in *" $t "*) ;; *) v="$v $p";; esac; done; '
    '[ -z "$v" ] || kill -9 $v 2>/dev/null; set -- $v; printf "swept:%s" "$#"'
)

ClientFactory = Callable[[], "DockerClient"]


READY_TIMEOUT_S = 5.0
"""Bound on asking the engine whether it answers, for a readiness probe."""
AGENT_EXIT_S = 2.0
"""How long a lost agent, whose stream the server closed, has to end its processes and exit before the
server kills it through the engine."""
AGENT_EXIT_POLL_S = 0.05
"""Interval of asking the engine whether a lost agent's exec still runs."""
AGENT_GROUP_WAIT = 20
"""Tenths of a second the supervisors of a killed agent have to end their trees and exit, before what is
left of its process group is killed."""
LOST_SWEEP_TIMEOUT_S = 10.0
"""Bound on each exec that ends what a lost agent left (a busy engine may be slow to start one)."""

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
    """Runs processes as execs in one long-lived container (see ``config.docker``).

    ``client_factory`` builds the docker-py client (default: ``engine_client`` for ``config.docker.engine``);
    ``labels`` are added to the container and volume it creates.
    """

    prefix = "docker"

    def __init__(
        self,
        config: ProcessMcpConfig,
        *,
        client_factory: ClientFactory | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(config)
        self._client_factory = client_factory or (lambda: engine.engine_client(config.docker.engine))
        self._labels = {MANAGED_LABEL: "true", **(labels or {})}
        self._token = secrets.token_hex(8)
        self._client: DockerClient | None = None
        self._container: Container | None = None
        self._created = False
        self._lease: Any = None  # the lease exec's socket; closing it ends the lease
        self._recovery_lock = anyio.Lock()
        self._agent: AgentConnection | None = None
        self._agent_execs: dict[AgentConnection, str] = {}  # the exec that runs each agent not shut down
        self._per_exec = ExecLauncher(self)
        self._proxy: DomainProxy | None = None  # the domain filter processes reach through the agent
        self._proxy_dir: str | None = None
        self.via: Literal["agent", "exec"] = "agent" if config.docker.agent else "exec"
        """How processes start: through the agent in the container, or one exec each (no Python in it)."""

    @property
    def container_id(self) -> str | None:
        """The id of the container processes run in, once started."""
        return None if self._container is None else self._container.id

    def marker(self, pid: str = "") -> str:
        """The environment line that tags process ``pid`` and its descendants in the container; with
        no ``pid``, the start shared by every process of this executor."""
        return f"{MARKER_VAR}={self._token}:{pid}"

    async def start(self) -> None:
        """Connect to the engine and make sure the container runs. Raises BackendUnavailable."""
        if self._container is not None:
            return
        errors = engine.docker_errors()
        try:
            self._client = await anyio.to_thread.run_sync(self._client_factory)
            await anyio.to_thread.run_sync(self._client.ping)
            logger.info("Docker engine at %s", self._client.api.base_url)
        except errors as exc:
            self._release_client()
            raise BackendUnavailable(
                f"cannot reach the Docker engine ({engine.reason(exc)}); start Docker, check DOCKER_HOST, "
                "or set PROCESS_MODE=host"
            ) from None
        try:
            self._container = await self._ensure_container(self._client)
            if self.config.docker.use_existing and self.config.defaults.workdir is None:
                self.workdir = self._container.attrs.get("Config", {}).get("WorkingDir") or "/"
                logger.info(
                    "using the container's working directory %s (set DEFAULT_WORKDIR to change it)", self.workdir
                )
            await self._take_lease()
            await self._sweep_dead_servers()
            sandbox = self.config.sandbox
            if self.via == "agent" and sandbox.network_restricted and sandbox.allowed_domains:
                await self._start_proxy()
            if self.via == "agent":
                await self._start_agent()
            self._report_network()
        except BaseException:
            await self._close_backend()
            raise

    async def ready(self) -> bool:
        """Whether the engine answers (a principal's container is made on its first spawn)."""

        def ping() -> bool:
            client = self._client_factory()
            try:
                return bool(client.ping())
            finally:
                client.close()

        with anyio.move_on_after(READY_TIMEOUT_S):
            try:
                return await anyio.to_thread.run_sync(ping, abandon_on_cancel=True)
            except engine.docker_errors():
                return False
        return False

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
        assert self._client is not None
        assert self._container is not None
        api, container_id = self._client.api, self._container.id

        command = ["/bin/sh", "-c", AGENT_SCRIPT, "sh", BOOTSTRAP, AGENT_NAME]
        if self.agent_user == "0":
            command.append(self.config.docker.user)  # the agent drops to it for each command

        def start_exec() -> tuple[str, Any, socket.socket]:
            exec_id: str = api.exec_create(
                container_id,
                command,
                stdin=True,
                environment={MARKER_VAR: f"{self._token}:agent"},
                user=self.agent_user,
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
        if exec_id is not None and self._client is not None and self._container is not None:
            # The engine's client and the container as they are now: a shutdown may release them meanwhile.
            self._in_background(self._end_lost_agent(agent, exec_id, self._client.api, self._container))

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
                await self._run_bounded(container, script, self.agent_user)
            marker = f"{self.marker()}{self.prefix}-"
            await self._run_bounded(container, [_SWEEP_LOST_SCRIPT, "sh", marker, str(agent.last_channel)])
        except failures as exc:
            import docker.errors

            gone = isinstance(exc, docker.errors.NotFound) or getattr(exc, "status_code", None) == 409
            # A container that was removed or stopped took the agent and its processes with it.
            logger.log(
                logging.DEBUG if gone else logging.WARNING,
                "could not make sure the lost agent's processes are gone: %s",
                engine.reason(exc),
            )

    async def _run_bounded(self, container: Container, script: list[str], user: str | None = None) -> None:
        """Run ``/bin/sh -c`` ``script`` in the container as ``user`` (default: exec_user), for at most
        LOST_SWEEP_TIMEOUT_S."""
        as_user = self.exec_user if user is None else user
        with anyio.move_on_after(LOST_SWEEP_TIMEOUT_S):
            await anyio.to_thread.run_sync(
                lambda: container.exec_run(["/bin/sh", "-c", *script], stdin=False, tty=False, user=as_user),
                abandon_on_cancel=True,
            )
            return
        logger.warning("an exec ending what a lost agent left did not finish within %g s", LOST_SWEEP_TIMEOUT_S)

    async def _take_lease(self) -> None:
        """Start the lease exec and wait (bounded) until it runs; raise BackendUnavailable if it cannot."""
        assert self._client is not None
        assert self._container is not None
        api, container_id = self._client.api, self._container.id

        def start_lease() -> Any:
            command = ["/bin/sh", "-c", _LEASE_SCRIPT]
            exec_id = api.exec_create(
                container_id, command, stdin=True, environment={LEASE_VAR: self._token}, user=self.exec_user
            )["Id"]
            sock: Any = api.exec_start(exec_id, socket=True)
            raw: socket.socket = getattr(sock, "_sock", sock)
            raw.settimeout(LAUNCH_TIMEOUT_S)
            seen = b""
            try:
                while b"ok" not in seen:
                    chunk = raw.recv(64)
                    if not chunk:
                        raise OSError("the lease exec ended at once")
                    seen += chunk
            except OSError:
                sock.close()
                raise
            return sock

        failures: tuple[type[BaseException], ...] = (*engine.docker_errors(), OSError)
        try:
            self._lease = await anyio.to_thread.run_sync(start_lease)
        except failures as exc:
            raise BackendUnavailable(
                f"cannot start the lease process in the container ({engine.reason(exc)}); "
                "the image needs /bin/sh and cat"
            ) from None

    async def _sweep_dead_servers(self) -> None:
        """End what servers that died without cleaning up left running in the container."""
        container = self._container
        assert container is not None
        try:
            result = await anyio.to_thread.run_sync(
                lambda: container.exec_run(
                    ["/bin/sh", "-c", _SWEEP_SCRIPT], stdin=False, tty=False, user=self.exec_user
                )
            )
        except engine.docker_errors() as exc:
            logger.warning("could not look for processes left by servers that died: %s", engine.reason(exc))
            return
        output = result.output if isinstance(result.output, bytes) else b""
        swept = output.decode(errors="replace").rpartition("swept:")[2].strip()
        if swept and swept != "0":
            logger.warning("ended %s processes left in the container by servers that died", swept)

    async def _ensure_container(self, client: DockerClient) -> Container:
        import docker.errors

        cfg = self.config.docker
        name = cfg.container_name
        try:
            container = await anyio.to_thread.run_sync(client.containers.get, name)
        except docker.errors.NotFound:
            if cfg.use_existing:
                raise BackendUnavailable(
                    f"container {name!r} does not exist and DOCKER_USE_EXISTING=true forbids creating it; "
                    "create it (see example-custom-container.sh), fix DOCKER_CONTAINER, or unset DOCKER_USE_EXISTING"
                ) from None
            return await self._start_created(await self._create_container(client))
        except engine.docker_errors() as exc:
            raise BackendUnavailable(f"cannot look up container {name!r}: {engine.reason(exc)}") from None
        if not cfg.use_existing and (difference := self._differs(container)):
            if container.labels.get(MANAGED_LABEL) != "true" or container.status == "running":
                whose = "is running" if container.status == "running" else "was not made by process-mcp"
                raise BackendUnavailable(
                    f"container {name!r} {whose} and {difference}; remove it (docker rm -f {name}) to have it made "
                    "anew, set DOCKER_CONTAINER to another name, or DOCKER_USE_EXISTING=true to use it as it is"
                )
            logger.warning("container %s %s; making it anew as configured", name, difference)
            await self._remove(container)
            return await self._start_created(await self._create_container(client))
        await self._start(container)
        return container

    async def _start_created(self, container: Container) -> Container:
        """Start a container this call created; one that cannot start is removed, never left to be reused."""
        try:
            await self._start(container)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._remove(container)
            raise
        return container

    async def _start(self, container: Container) -> None:
        name = self.config.docker.container_name
        try:
            if container.status != "running":
                logger.info("starting stopped container %s", name)
                await anyio.to_thread.run_sync(container.start)
                await anyio.to_thread.run_sync(container.reload)
        except engine.docker_errors() as exc:
            raise BackendUnavailable(f"cannot start container {name!r}: {engine.reason(exc)}") from None
        if container.status != "running":
            raise BackendUnavailable(
                f"container {name!r} stopped right after starting (status {container.status}); its main "
                "command must keep running, e.g. `tail -f /dev/null`"
            )
        if not self.config.docker.use_existing:
            await self._own_home(container)

    def _differs(self, container: Container) -> str | None:
        """How an existing container differs from what this configuration would make (image, network)."""
        attrs: dict[str, Any] = container.attrs
        image = attrs.get("Config", {}).get("Image")
        if image != self.config.docker.image:
            return f"runs image {image!r}, not DOCKER_IMAGE={self.config.docker.image!r}"
        network = attrs.get("HostConfig", {}).get("NetworkMode")
        wanted = self.config.docker_network or "bridge"
        if network not in (wanted, "default" if wanted == "bridge" else wanted):
            return f"is on network {network!r}, not {wanted!r} (DOCKER_NETWORK)"
        return None

    async def _remove(self, container: Container) -> None:
        try:
            await anyio.to_thread.run_sync(lambda: container.remove(force=True))
        except engine.docker_errors() as exc:
            logger.warning("could not remove container %s: %s", container.name, engine.reason(exc))

    @property
    def agent_user(self) -> str:
        """Who the agent's exec runs as: root in the container this server made, so that it can run each
        command as DOCKER_USER while no process of that user can signal, trace or write to it (nor to
        its supervisors); the container's own user in an existing one."""
        return "" if self.config.docker.use_existing else "0"

    @property
    def exec_user(self) -> str:
        """Who the execs other than the agent's run as: DOCKER_USER in the container this server made (the
        processes of the exec-per-process path, and the lease, sweep and kill scripts, which read the
        processes' environments and so must be their user), the container's own user ("") in an existing one."""
        return "" if self.config.docker.use_existing else self.config.docker.user

    async def _own_home(self, container: Container) -> None:
        """Give /home/agent (the volume) to DOCKER_USER, so its processes can write their home. A volume
        that root owns (new, or from a root-run version) is handed over whole; otherwise only its top."""
        user = self.config.docker.user
        if user.partition(":")[0] in ("root", "0"):
            return
        try:
            result = await anyio.to_thread.run_sync(
                # By number: an image without /etc/passwd has no user named root.
                lambda: container.exec_run(["/bin/sh", "-c", _OWN_HOME, "sh", user], user="0", stdin=False)
            )
        except engine.docker_errors() as exc:
            raise BackendUnavailable(f"cannot give {DOCKER_WORKDIR} to {user}: {engine.reason(exc)}") from None
        if result.exit_code != 0:
            output = result.output if isinstance(result.output, bytes) else b""
            said = output.decode(errors="replace").strip() or f"chown exited with code {result.exit_code}"
            named = not user.replace(":", "").isdigit()
            hint = "; a user given by name must exist in the image's /etc/passwd (or give uid:gid)" if named else ""
            raise BackendUnavailable(f"cannot give {DOCKER_WORKDIR} to DOCKER_USER={user}: {said}{hint}")

    async def _create_container(self, client: DockerClient) -> Container:
        import docker.errors

        cfg = self.config.docker
        await self._ensure_image(client)
        try:
            try:
                await anyio.to_thread.run_sync(client.volumes.get, cfg.volume_name)
            except docker.errors.NotFound:
                await anyio.to_thread.run_sync(lambda: client.volumes.create(cfg.volume_name, labels=self._labels))
            await self._ensure_own_network(client)
            options = engine.container_options(cfg, self._labels, self.config.docker_network)
            container = await anyio.to_thread.run_sync(lambda: client.containers.create(**options))
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # another server created it first: use theirs
                return await anyio.to_thread.run_sync(client.containers.get, cfg.container_name)
            raise BackendUnavailable(f"cannot create container {cfg.container_name!r}: {engine.reason(exc)}") from None
        except engine.docker_errors() as exc:
            raise BackendUnavailable(f"cannot create container {cfg.container_name!r}: {engine.reason(exc)}") from None
        self._created = True
        logger.info(
            "created container %s from %s: memory %s, cpus %g, pids %d, network %s, %s root, capabilities %s, "
            "no-new-privileges",
            cfg.container_name,
            cfg.image,
            cfg.memory,
            cfg.cpus,
            cfg.pids_limit,
            options["network_mode"],
            "read-only" if cfg.read_only else "writable",
            ",".join(options["cap_add"]),
        )
        return container

    async def _ensure_image(self, client: DockerClient) -> None:
        import docker.errors

        image = self.config.docker.image
        try:
            await anyio.to_thread.run_sync(client.images.get, image)
            return
        except docker.errors.ImageNotFound:
            pass
        except engine.docker_errors() as exc:
            raise BackendUnavailable(f"cannot look up image {image!r}: {engine.reason(exc)}") from None
        logger.info("pulling image %s", image)
        reason = f"no answer within {IMAGE_PULL_TIMEOUT_S:g} s"
        with anyio.move_on_after(IMAGE_PULL_TIMEOUT_S):
            try:
                await anyio.to_thread.run_sync(client.images.pull, image, abandon_on_cancel=True)
                return
            except engine.docker_errors() as exc:
                reason = engine.reason(exc)
        raise BackendUnavailable(
            f"image {image!r} is not available locally and could not be pulled ({reason}); build one without a "
            "registry with `scripts/build-box-image.sh process-mcp:custom git` (Debian with python3, as root), or "
            "with a registry `docker build -t process-mcp:custom -f Dockerfile.custom .`, and set "
            "DOCKER_IMAGE=process-mcp:custom; or set DOCKER_IMAGE to an image you have"
        )

    async def _launch(self, record: ManagedProcess, env: dict[str, str]) -> ProcessHandle:
        if self._client is None or self._container is None:
            raise SpawnFailed("the Docker backend is not started; call start() first")
        record.via = self.via
        if self.via == "agent":
            return await self._launch_with_agent(record, env)
        if record.limits is not None:
            raise InvalidInput(
                "limits need the agent in the container (python3 >= 3.8 in the image); this container starts "
                "each process with an exec of its own, which cannot bound it: spawn without limits"
            )
        return await self._per_exec.launch(record, env)

    async def _launch_with_agent(self, record: ManagedProcess, env: dict[str, str]) -> ProcessHandle:
        if self._agent is None:  # lost with its exec or the container: bring both back
            if not await self._recover_container():
                raise SpawnFailed(f"could not start {record.command!r}: the Docker engine does not answer")
            async with self._recovery_lock:
                if self._agent is None:
                    await self._start_agent()
        agent = self._agent
        if agent is None:
            raise SpawnFailed(f"could not start {record.command!r}: the agent cannot run in the container")
        proxied = proxy_environment() if self._proxy is not None else {}
        environment = {**self.env_defaults(), **proxied, **env, MARKER_VAR: self.marker(record.pid).partition("=")[2]}
        if record.tty and "TERM" not in env:
            environment["TERM"] = TTY_TERM
        handle = await agent.spawn(record, environment, inherit=True, workdir=self.workdir, where=" in the container")
        record.sandboxed = True  # confined by the container
        return handle

    def env_defaults(self) -> dict[str, str]:
        """What processes get over the container's environment unless their request sets it:
        ``environment.DEFAULTS`` that the container (its image, or whoever made it) does not set."""
        config: dict[str, Any] = {} if self._container is None else self._container.attrs.get("Config") or {}
        return defaults_missing_from(line.partition("=")[0] for line in config.get("Env") or [])

    async def _recover_container(self) -> bool:
        """After a failed exec: whether to try again. A container stopped or removed behind our back is
        brought back (this server owns it); DOCKER_USE_EXISTING's container is an error instead."""
        async with self._recovery_lock:  # spawns failing together bring it back once
            return await self._recover_locked()

    async def _recover_locked(self) -> bool:
        import docker.errors

        assert self._client is not None
        container, name = self._container, self.config.docker.container_name
        try:
            if container is None:
                raise docker.errors.NotFound("no container")
            await anyio.to_thread.run_sync(container.reload)
            lost = None if container.status == "running" else f"is {container.status}"
        except docker.errors.NotFound:
            lost = "was removed"
        except engine.docker_errors():
            return False  # the engine itself is in trouble; the spawn error says so
        if lost is None:
            return True  # running (perhaps brought back by a concurrent spawn): one more try
        if self.config.docker.use_existing:
            raise BackendUnavailable(
                f"container {name!r} {lost}; with DOCKER_USE_EXISTING=true this server does not start or recreate "
                "it: start it (docker start) and spawn again"
            )
        logger.warning("container %s %s behind this server's back; bringing it back", name, lost)
        if self._agent is not None:
            self._agent.close()
            self._agent_execs.pop(self._agent, None)
            self._agent = None
        if self._lease is not None:
            self._lease.close()
            self._lease = None
        self._container = await self._ensure_container(self._client)
        await self._take_lease()
        return True

    async def _close_backend(self) -> None:
        """End this executor's stray processes (a child that outlived its parent's record), then
        remove the container if this executor created it; the volume stays."""
        if self._client is None:
            return
        try:
            if self._agent is not None:
                await self._agent.shutdown()  # ends every process it started, wherever they went
                self._agent_execs.pop(self._agent, None)
                self._agent = None
            if self._container is not None:
                try:
                    await self._per_exec.signal_matching(self._per_exec.marker_pattern(None), signal_module.SIGKILL)
                except KillFailed as exc:
                    logger.warning("could not sweep leftover processes: %s", exc)
                if self._created:
                    await self._remove_container(self._container)
                    await self._remove_own_network()
        finally:
            if self._lease is not None:
                self._lease.close()  # the lease exec sees its input end and exits
                self._lease = None
            self._container = None
            if self._proxy is not None:
                await self._proxy.close()
                self._proxy = None
            if self._proxy_dir is not None:
                shutil.rmtree(self._proxy_dir, ignore_errors=True)
                self._proxy_dir = None
            self._release_client()

    async def _remove_container(self, container: Container) -> None:
        with anyio.move_on_after(CONTAINER_REMOVE_TIMEOUT_S):
            try:
                # force: stops (SIGKILL) and removes in one call; nothing in it needs a graceful stop now.
                await anyio.to_thread.run_sync(lambda: container.remove(force=True), abandon_on_cancel=True)
                logger.info("removed container %s", self.config.docker.container_name)
            except engine.docker_errors() as exc:
                logger.warning("could not remove container %s: %s", self.config.docker.container_name, exc)
            return
        logger.warning("container %s was not removed within %g s", container.name, CONTAINER_REMOVE_TIMEOUT_S)

    async def _ensure_own_network(self, client: DockerClient) -> None:
        """Create the container's own network, if it is to have one (``DockerConfig.own_network``)."""
        if self.config.docker_network == self.config.docker.container_name:
            name = self.config.docker_network
            await anyio.to_thread.run_sync(lambda: network.ensure_network(client, name, self._labels))

    async def _remove_own_network(self) -> None:
        """Remove the container's own network, once the container is gone."""
        client = self._client
        if client is not None and self.config.docker_network == self.config.docker.container_name:
            name = self.config.docker_network
            try:
                await anyio.to_thread.run_sync(lambda: network.remove_network(client, name), abandon_on_cancel=True)
            except engine.docker_errors() as exc:
                logger.warning("could not remove network %s: %s", name, engine.reason(exc))

    def _release_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
