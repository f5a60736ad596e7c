"""Docker mode: every process is an exec in one long-lived container, driven with docker-py.

Each spawn is an exec attached over a hijacked socket, read and written without blocking on the
event loop like host mode's descriptors; every other docker-py call is blocking, so it runs in a
worker thread. ``docker`` is imported only when a DockerExecutor starts, so host mode never pays for it.

Every exec carries ``PROCESS_MCP_ID=<executor token>:<docker-N>`` in its environment, which its
children inherit. Signals go to every process in the container whose environment holds that exact
line (a small /bin/sh script walking /proc, run as its own exec): the whole tree, grandchildren
included, with no host pids involved, so it works with a remote engine too.

A server that dies without cleaning up (SIGKILL, a crash) leaves its processes running in the
container. Each server therefore holds a lease while it runs: an exec (``cat`` with
``PROCESS_MCP_LEASE=<token>``) whose input is the server's connection, so it ends when the
server's process does, however it dies. At start, a server ends every marked process whose token
has no lease left.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal as signal_module
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.to_thread

from ..box.client import BOOTSTRAP, AgentConnection, AgentUnavailable, Channel, SpawnRefused, bootstrap_payload
from ..config import DOCKER_WORKDIR, DockerConfig, ProcessMcpConfig
from ..errors import BackendUnavailable, InvalidInput, KillFailed, SpawnFailed, StdinFailed
from ..executor import ProcessExecutor, ProcessHandle
from ..models import TERMINAL_COLS, TERMINAL_ROWS, TTY_TERM
from ..registry import ManagedProcess
from ..signals import NON_TERMINATING, signal_from_exit_code
from ..streams import READ_CHUNK, write_all

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

logger = logging.getLogger(__name__)

UNIX_URL_POOLS = 1024
"""Connection pools (one per URL) docker-py may keep over a Unix socket; see engine_client."""
UNIX_POOL_CONNECTIONS = 64
"""Idle connections kept per pool: more than the worker threads that can call the engine at once."""
DOCKER_API_TIMEOUT_S = 30
"""HTTP timeout of each engine call made by the default client; a healthy engine answers in ms."""
IMAGE_PULL_TIMEOUT_S = 600.0
"""How long start waits for an image pull; large images over slow links take minutes."""
LAUNCH_TIMEOUT_S = 10.0
"""How long a spawn waits for the exec to report that it changed directory and is about to run."""
EXIT_POLL_S = 0.02
"""Interval for asking the engine for an exit code it has not recorded yet (it lags the stream's EOF)."""
EXIT_SETTLE_S = 5.0
"""Bound on that polling; past it the exit code is reported as unknown."""
SIGNAL_TIMEOUT_S = 10.0
"""Bound on one signal delivery (an exec walking /proc); a busy engine may be slow to start it."""
CONTAINER_REMOVE_TIMEOUT_S = 20.0
"""Bound on removing the container at shutdown, so a stuck engine cannot hang the server's exit."""

MARKER_VAR = "PROCESS_MCP_ID"
LEASE_VAR = "PROCESS_MCP_LEASE"
MANAGED_LABEL = "process-mcp.managed"
TMPFS_OPTIONS = "rw,size=100m,noexec,nosuid"
_OWN_HOME = f'd={DOCKER_WORKDIR}; if [ "$(stat -c %u "$d")" = 0 ]; then chown -R "$1" "$d"; else chown "$1" "$d"; fi'
KEPT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "SETUID", "SETGID", "KILL")
"""What the created container keeps of Docker's default set: what a root package install needs (dpkg
sets owners and modes, apt drops to its _apt user) and KILL, so kill and shutdown reach processes of
other users in it. Dropped: MKNOD, NET_RAW, NET_BIND_SERVICE, SETPCAP, SETFCAP, SYS_CHROOT, AUDIT_WRITE."""

# $1 cwd, $2 handshake, $3 the command. Printing the handshake only once `cd` succeeded lets
# spawn tell "no such directory" from "started" before it returns, without a second exec.
_LAUNCH_SCRIPT = 'cd -- "$1" 2>/dev/null || { printf %s "$2:no"; exit 1; }; printf %s "$2:ok"; exec /bin/sh -c "$3"'
# A TTY exec starts at 0x0 on engines before API 1.42, and exec_resize races the program: size the
# terminal before the program starts.
_TTY_LAUNCH_SCRIPT = f"stty rows {TERMINAL_ROWS} cols {TERMINAL_COLS} 2>/dev/null; {_LAUNCH_SCRIPT}"
# $1 a regular expression for the marker line, $2 a signal number. Needs only /proc, tr, grep and
# kill (busybox has them). Processes that vanish mid-walk are skipped.
_SIGNAL_SCRIPT = (
    'm=; for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" = $$ ] && continue; '
    'tr \'\\0\' \'\\n\' < "$d/environ" 2>/dev/null | grep -q -e "$1" && m="$p $m"; '
    'done; [ -z "$m" ] || kill -"$2" $m 2>/dev/null; exit 0'
)

# Starts the agent with the first python3 on PATH; $1 is the bootstrap. Without one, it says so and the
# backend falls back to one exec per process.
_AGENT_SCRIPT = (
    'command -v python3 >/dev/null 2>&1 || { echo "no python3 in the image" >&2; exit 127; }; '
    'exec python3 -I -S -c "$1"'
)

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


def _docker_errors() -> tuple[type[BaseException], ...]:
    """What docker-py raises when the engine refuses or cannot be reached."""
    import docker.errors
    import requests.exceptions

    return docker.errors.DockerException, requests.exceptions.RequestException


def engine_client(engine: Mapping[str, str]) -> DockerClient:
    """A docker-py client for the engine ``engine`` names (DOCKER_HOST, DOCKER_TLS_VERIFY,
    DOCKER_CERT_PATH as the configuration read them; none: the local socket)."""
    import docker
    from docker.transport import UnixHTTPAdapter

    client = docker.from_env(timeout=DOCKER_API_TIMEOUT_S, environment=dict(engine))
    # Over a Unix socket docker-py keeps one connection pool per URL, and each exec has its own URLs,
    # in an LRU of 25 that closes the pools it evicts, even while another thread is using one (seen
    # with 100 spawns at once). An LRU far larger than the calls that can be in flight avoids that.
    api = client.api
    adapter = api.get_adapter(api.base_url)
    if isinstance(adapter, UnixHTTPAdapter):
        roomy = UnixHTTPAdapter(
            f"http+unix://{adapter.socket_path}",
            adapter.timeout,
            pool_connections=UNIX_URL_POOLS,
            max_pool_size=UNIX_POOL_CONNECTIONS,
        )
        api.mount("http+docker://", roomy)
        adapter.close()
    return client


def container_options(cfg: DockerConfig, labels: Mapping[str, str]) -> dict[str, Any]:
    """What ``containers.create`` gets for the container this server makes: limits, and the hardening
    the README's table lists (capabilities, no new privileges, network, read-only root)."""
    return {
        "image": cfg.image,
        "command": ["tail", "-f", "/dev/null"],
        "name": cfg.container_name,
        "labels": dict(labels),
        "mem_limit": cfg.memory,
        "memswap_limit": cfg.memory,  # equal: no swap beyond the memory limit
        "nano_cpus": int(cfg.cpus * 1e9),
        "pids_limit": cfg.pids_limit,
        "privileged": False,
        "cap_drop": ["ALL"],
        "cap_add": sorted({*KEPT_CAPABILITIES, *(c.upper().removeprefix("CAP_") for c in cfg.cap_add)}),
        "security_opt": ["no-new-privileges"],
        "network_mode": cfg.network,
        "read_only": cfg.read_only,
        "environment": {"HOME": DOCKER_WORKDIR},
        "init": True,  # reaps the orphans that exec'd processes leave behind
        "tmpfs": {"/tmp": TMPFS_OPTIONS, "/var/tmp": TMPFS_OPTIONS},
        "volumes": {cfg.volume_name: {"bind": DOCKER_WORKDIR, "mode": "rw"}},
        "working_dir": DOCKER_WORKDIR,
    }


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
        self._client_factory = client_factory or (lambda: engine_client(config.docker.engine))
        self._labels = {MANAGED_LABEL: "true", **(labels or {})}
        self._token = secrets.token_hex(8)
        self._client: DockerClient | None = None
        self._container: Container | None = None
        self._created = False
        self._lease: Any = None  # the lease exec's socket; closing it ends the lease
        self._recovery_lock = anyio.Lock()
        self._agent: AgentConnection | None = None
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
        errors = _docker_errors()
        try:
            self._client = await anyio.to_thread.run_sync(self._client_factory)
            await anyio.to_thread.run_sync(self._client.ping)
            logger.info("Docker engine at %s", self._client.api.base_url)
        except errors as exc:
            self._release_client()
            raise BackendUnavailable(
                f"cannot reach the Docker engine ({_reason(exc)}); start Docker, check DOCKER_HOST, "
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
            if self.via == "agent":
                await self._start_agent()
        except BaseException:
            await self._close_backend()
            raise

    async def _start_agent(self) -> None:
        """Start the agent in the container as one exec and wait for its hello; in an image without
        Python 3.8, fall back to one exec per process (logged; ``via`` says which)."""
        assert self._client is not None
        assert self._container is not None
        api, container_id = self._client.api, self._container.id

        def start_exec() -> tuple[Any, socket.socket]:
            command = ["/bin/sh", "-c", _AGENT_SCRIPT, "sh", BOOTSTRAP]
            exec_id = api.exec_create(
                container_id, command, stdin=True, environment={MARKER_VAR: f"{self._token}:agent"}, user=self.exec_user
            )["Id"]
            wrapper: Any = api.exec_start(exec_id, socket=True)
            return wrapper, getattr(wrapper, "_sock", wrapper)

        try:
            wrapper, sock = await anyio.to_thread.run_sync(start_exec)
        except _docker_errors() as exc:
            raise BackendUnavailable(f"cannot start the agent in the container: {_reason(exc)}") from None
        channel = _ExecChannel(wrapper, sock)
        agent = AgentConnection(channel, self.config.docker.container_name, on_lost=self._agent_lost)
        try:
            hello = await agent.connect(bootstrap_payload())
        except AgentUnavailable as exc:
            agent.close()
            reason = channel.agent_stderr.strip() or exc.reason
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
        self._agent = agent
        logger.info("agent started in container %s (Python %s)", self.config.docker.container_name, hello["python"])

    def _agent_lost(self, agent: AgentConnection) -> None:
        if self._agent is agent:
            self._agent = None

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

        failures: tuple[type[BaseException], ...] = (*_docker_errors(), OSError)
        try:
            self._lease = await anyio.to_thread.run_sync(start_lease)
        except failures as exc:
            raise BackendUnavailable(
                f"cannot start the lease process in the container ({_reason(exc)}); the image needs /bin/sh and cat"
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
        except _docker_errors() as exc:
            logger.warning("could not look for processes left by servers that died: %s", _reason(exc))
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
            container = await self._create_container(client)
        except _docker_errors() as exc:
            raise BackendUnavailable(f"cannot look up container {name!r}: {_reason(exc)}") from None
        try:
            if container.status != "running":
                logger.info("starting stopped container %s", name)
                await anyio.to_thread.run_sync(container.start)
                await anyio.to_thread.run_sync(container.reload)
        except _docker_errors() as exc:
            raise BackendUnavailable(f"cannot start container {name!r}: {_reason(exc)}") from None
        if container.status != "running":
            raise BackendUnavailable(
                f"container {name!r} stopped right after starting (status {container.status}); its main "
                "command must keep running, e.g. `tail -f /dev/null`"
            )
        if not cfg.use_existing:
            await self._own_home(container)
        return container

    @property
    def exec_user(self) -> str:
        """Who every exec runs as: DOCKER_USER in the container this server made (its processes, and the
        lease, sweep and kill scripts, which read their environments and so must be the same user), the
        container's own user ("") in an existing one."""
        return "" if self.config.docker.use_existing else self.config.docker.user

    async def _own_home(self, container: Container) -> None:
        """Give /home/agent (the volume) to DOCKER_USER, so its processes can write their home. A volume
        that root owns (new, or from a root-run version) is handed over whole; otherwise only its top."""
        user = self.config.docker.user
        if user.partition(":")[0] in ("root", "0"):
            return
        try:
            result = await anyio.to_thread.run_sync(
                lambda: container.exec_run(["/bin/sh", "-c", _OWN_HOME, "sh", user], user="root", stdin=False)
            )
        except _docker_errors() as exc:
            raise BackendUnavailable(f"cannot give {DOCKER_WORKDIR} to {user}: {_reason(exc)}") from None
        if result.exit_code != 0:
            output = result.output if isinstance(result.output, bytes) else b""
            raise BackendUnavailable(
                f"cannot give {DOCKER_WORKDIR} to DOCKER_USER={user}: {output.decode(errors='replace').strip()}"
            )

    async def _create_container(self, client: DockerClient) -> Container:
        import docker.errors

        cfg = self.config.docker
        await self._ensure_image(client)
        try:
            try:
                await anyio.to_thread.run_sync(client.volumes.get, cfg.volume_name)
            except docker.errors.NotFound:
                await anyio.to_thread.run_sync(lambda: client.volumes.create(cfg.volume_name, labels=self._labels))
            options = container_options(cfg, self._labels)
            container = await anyio.to_thread.run_sync(lambda: client.containers.create(**options))
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # another server created it first: use theirs
                return await anyio.to_thread.run_sync(client.containers.get, cfg.container_name)
            raise BackendUnavailable(f"cannot create container {cfg.container_name!r}: {_reason(exc)}") from None
        except _docker_errors() as exc:
            raise BackendUnavailable(f"cannot create container {cfg.container_name!r}: {_reason(exc)}") from None
        self._created = True
        logger.info(
            "created container %s from %s: memory %s, cpus %g, pids %d, network %s, %s root, capabilities %s, "
            "no-new-privileges",
            cfg.container_name,
            cfg.image,
            cfg.memory,
            cfg.cpus,
            cfg.pids_limit,
            cfg.network,
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
        except _docker_errors() as exc:
            raise BackendUnavailable(f"cannot look up image {image!r}: {_reason(exc)}") from None
        logger.info("pulling image %s", image)
        reason = f"no answer within {IMAGE_PULL_TIMEOUT_S:g} s"
        with anyio.move_on_after(IMAGE_PULL_TIMEOUT_S):
            try:
                await anyio.to_thread.run_sync(client.images.pull, image, abandon_on_cancel=True)
                return
            except _docker_errors() as exc:
                reason = _reason(exc)
        raise BackendUnavailable(
            f"image {image!r} is not available locally and could not be pulled ({reason}); build one with "
            "`docker build -t process-mcp:custom -f Dockerfile.custom .` and set DOCKER_IMAGE=process-mcp:custom, "
            "or set DOCKER_IMAGE to an image you have"
        )

    async def _launch(self, record: ManagedProcess, env: dict[str, str]) -> ProcessHandle:
        if self._client is None or self._container is None:
            raise SpawnFailed("the Docker backend is not started; call start() first")
        record.via = self.via
        if self.via == "agent":
            return await self._launch_with_agent(record, env)
        return await self._launch_exec(record, env)

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
        environment = {**env, MARKER_VAR: self.marker(record.pid).partition("=")[2]}
        if record.tty and "TERM" not in env:
            environment["TERM"] = TTY_TERM
        number = int(record.pid.rpartition("-")[2])
        try:
            handle = await agent.spawn(number, record, record.command, record.cwd, environment, inherit=True)
        except SpawnRefused as exc:
            if exc.kind == "nocwd":
                raise InvalidInput(
                    f"cwd {record.cwd!r} does not exist or is not a directory in the container; pass an existing "
                    f"directory or omit cwd to use {self.workdir}"
                ) from None
            raise SpawnFailed(f"could not start {record.command!r} in the container: {exc.message}") from None
        except AgentUnavailable as exc:
            raise SpawnFailed(f"could not start {record.command!r} in the container: {exc.reason}") from None
        record.sandboxed = True  # confined by the container
        return handle

    async def _launch_exec(self, record: ManagedProcess, env: dict[str, str]) -> ProcessHandle:
        assert self._client is not None
        api = self._client.api
        handshake = f"process-mcp-{secrets.token_hex(6)}"
        environment = {**env, MARKER_VAR: self.marker(record.pid).partition("=")[2]}
        if record.tty and "TERM" not in env:
            environment["TERM"] = TTY_TERM
        script = _TTY_LAUNCH_SCRIPT if record.tty else _LAUNCH_SCRIPT
        command = ["/bin/sh", "-c", script, "sh", record.cwd, handshake, record.command]

        def create_and_start() -> tuple[str, Any]:
            assert self._container is not None
            exec_id: str = api.exec_create(
                self._container.id, command, stdin=True, tty=record.tty, environment=environment, user=self.exec_user
            )["Id"]
            # docker-py's stubs type this as bytes; with socket=True it is the hijacked socket's wrapper.
            sock: Any = api.exec_start(exec_id, socket=True, tty=record.tty)
            return exec_id, sock

        try:
            exec_id, sock = await anyio.to_thread.run_sync(create_and_start)
        except _docker_errors() as exc:
            reason = _reason(exc)
            if not await self._recover_container():
                raise SpawnFailed(f"could not start {record.command!r} in the container: {reason}") from None
            try:
                exec_id, sock = await anyio.to_thread.run_sync(create_and_start)
            except _docker_errors() as retry:
                raise SpawnFailed(f"could not start {record.command!r} in the container: {_reason(retry)}") from None
        # The SocketIO wrapper owns the raw socket (`_sock`); unix and plain TCP engines give one.
        raw: socket.socket = getattr(sock, "_sock", sock)
        handle = _ExecHandle(self, record, exec_id, sock, raw, handshake)
        record.sandboxed = True  # confined by the container
        outcome = await handle.launched()
        if outcome == "ok":
            if record.tty:
                await self._resize(exec_id)
            return handle
        await handle.wait_exited()
        handle.close()
        if outcome == "nocwd":
            raise InvalidInput(
                f"cwd {record.cwd!r} does not exist or is not a directory in the container; pass an existing "
                f"directory or omit cwd to use {self.workdir}"
            )
        detail = handle.launch_output.strip() or f"exit code {handle.exit_code}"
        raise SpawnFailed(f"could not start {record.command!r} in the container (it needs /bin/sh): {detail}")

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
        except _docker_errors():
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
            self._agent = None
        if self._lease is not None:
            self._lease.close()
            self._lease = None
        self._container = await self._ensure_container(self._client)
        await self._take_lease()
        return True

    async def _resize(self, exec_id: str) -> None:
        # stty already sized the terminal; this tells the engine too, so later attaches agree.
        assert self._client is not None
        api = self._client.api
        try:
            await anyio.to_thread.run_sync(lambda: api.exec_resize(exec_id, height=TERMINAL_ROWS, width=TERMINAL_COLS))
        except _docker_errors() as exc:
            logger.debug("exec_resize of %s failed (it may have exited): %s", exec_id, exc)

    async def _inspect_exec(self, exec_id: str) -> dict[str, Any]:
        assert self._client is not None
        return await anyio.to_thread.run_sync(self._client.api.exec_inspect, exec_id)

    async def _signal_matching(self, pattern: str, signum: int) -> None:
        """Send ``signum`` to every process in the container whose environment matches ``pattern``."""
        container = self._container
        if container is None:
            return
        command = ["/bin/sh", "-c", _SIGNAL_SCRIPT, "sh", pattern, str(int(signum))]
        reason = f"no answer within {SIGNAL_TIMEOUT_S:g} s"
        with anyio.move_on_after(SIGNAL_TIMEOUT_S):
            try:
                result = await anyio.to_thread.run_sync(
                    lambda: container.exec_run(command, stdin=False, tty=False, user=self.exec_user),
                    abandon_on_cancel=True,
                )
            except _docker_errors() as exc:
                reason = _reason(exc)
            else:
                if result.exit_code == 0:
                    return
                output = result.output if isinstance(result.output, bytes) else b""  # bytes unless streaming
                reason = f"exit code {result.exit_code}: {output.decode(errors='replace').strip()}"
        raise KillFailed(f"could not deliver signal {signum} in the container ({reason})")

    def _marker_pattern(self, pid: str | None) -> str:
        # Token and ids are [0-9a-z:-]: no regular-expression metacharacters to escape.
        return f"^{self.marker()}" + ("" if pid is None else f"{pid}$")

    async def _close_backend(self) -> None:
        """End this executor's stray processes (a child that outlived its parent's record), then
        remove the container if this executor created it; the volume stays."""
        if self._client is None:
            return
        try:
            if self._agent is not None:
                await self._agent.shutdown()  # ends every process it started, wherever they went
                self._agent = None
            if self._container is not None:
                try:
                    await self._signal_matching(self._marker_pattern(None), signal_module.SIGKILL)
                except KillFailed as exc:
                    logger.warning("could not sweep leftover processes: %s", exc)
                if self._created:
                    await self._remove_container(self._container)
        finally:
            if self._lease is not None:
                self._lease.close()  # the lease exec sees its input end and exits
                self._lease = None
            self._container = None
            self._release_client()

    async def _remove_container(self, container: Container) -> None:
        with anyio.move_on_after(CONTAINER_REMOVE_TIMEOUT_S):
            try:
                # force: stops (SIGKILL) and removes in one call; nothing in it needs a graceful stop now.
                await anyio.to_thread.run_sync(lambda: container.remove(force=True), abandon_on_cancel=True)
                logger.info("removed container %s", self.config.docker.container_name)
            except _docker_errors() as exc:
                logger.warning("could not remove container %s: %s", self.config.docker.container_name, exc)
            return
        logger.warning("container %s was not removed within %g s", container.name, CONTAINER_REMOVE_TIMEOUT_S)

    def _release_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class _Demuxer:
    """Splits the non-TTY exec stream into (stream, payload) frames, across reads.

    Each frame is an 8-byte header (stream: 1 stdout, 2 stderr; 3 zero bytes; big-endian size) and
    its payload; the engine keeps frames small, so at most one frame is held here.
    """

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._pending += data
        frames = []
        while len(self._pending) >= 8:
            size = int.from_bytes(self._pending[4:8], "big")
            if len(self._pending) < 8 + size:
                break
            frames.append((self._pending[0], bytes(self._pending[8 : 8 + size])))
            del self._pending[: 8 + size]
        return frames


class _ExecChannel(Channel):
    """The agent's exec stream: its stdin raw, its stdout and stderr in the engine's frames (no TTY)."""

    STDERR_KEPT = 4096
    """Characters of the agent's stderr kept to explain a failure (its tracebacks, a missing python3)."""

    def __init__(self, wrapper: Any, sock: socket.socket) -> None:
        self._wrapper = wrapper  # keeps the HTTP response (and so the socket) alive
        self._sock = sock
        self._fd = sock.fileno()
        self._demux = _Demuxer()
        self.agent_stderr = ""
        sock.setblocking(False)

    @property
    def read_fd(self) -> int:
        return self._fd

    @property
    def write_fd(self) -> int:
        return self._fd

    def receive(self) -> bytes | None:
        try:
            data = self._sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return None
        if not data:
            return b""
        stdout = []
        for stream, payload in self._demux.feed(data):
            if stream == 1:
                stdout.append(payload)
            else:
                text = payload.decode(errors="replace")
                logger.warning("agent: %s", text.rstrip())
                self.agent_stderr = (self.agent_stderr + text)[-self.STDERR_KEPT :]
        return b"".join(stdout) if stdout else None

    def send(self, data: memoryview) -> int:
        return self._sock.send(data)

    def close(self) -> None:
        self._wrapper.close()
        self._sock.close()


class _ExecHandle(ProcessHandle):
    """One exec: its socket read on the event loop, its exit code fetched from the engine at EOF."""

    def __init__(
        self,
        executor: DockerExecutor,
        record: ManagedProcess,
        exec_id: str,
        wrapper: Any,
        sock: socket.socket,
        handshake: str,
    ) -> None:
        self._executor = executor
        self._record = record
        self._exec_id = exec_id
        self._wrapper = wrapper  # keeps the HTTP response (and so the socket) alive
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._demux = None if record.tty else _Demuxer()
        self._handshake = handshake.encode()
        self._before: bytearray | None = bytearray()  # stdout until the handshake is settled
        self._outcome: Literal["ok", "nocwd", "failed"] | None = None
        self._launched = anyio.Event()
        self._exited = anyio.Event()
        self._exit_task: asyncio.Task[None] | None = None
        self._reading = True
        self._closed = False
        self.exit_code: int | None = None
        self.launch_output = ""
        self._delivered: int | None = None  # the last terminating signal we sent
        sock.setblocking(False)
        record.stream_opened()
        self._loop.add_reader(self._fd, self._on_readable)

    async def launched(self) -> Literal["ok", "nocwd", "failed"]:
        """Wait (bounded) for the launch script to say whether the command is starting."""
        with anyio.move_on_after(LAUNCH_TIMEOUT_S):
            await self._launched.wait()
        if self._outcome is None:
            self._outcome = "failed"
            self.launch_output = f"no sign of life within {LAUNCH_TIMEOUT_S:g} s"
        return self._outcome

    async def wait_exited(self) -> None:
        with anyio.move_on_after(EXIT_SETTLE_S + LAUNCH_TIMEOUT_S):
            await self._exited.wait()

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.warning("reading output of %s failed: %s", self._record.pid, exc)
            data = b""
        if not data:
            self._on_eof()
            return
        if self._demux is None:
            self._deliver(1, data)
        else:
            for stream, payload in self._demux.feed(data):
                self._deliver(stream, payload)

    def _deliver(self, stream: int, data: bytes) -> None:
        if stream == 2:
            self._record.stderr.append(data)
            return
        if self._before is not None:
            self._before += data
            need = len(self._handshake) + 3  # ":ok" or ":no"
            if len(self._before) < need:
                return
            head, data = bytes(self._before[:need]), bytes(self._before[need:])
            if head == self._handshake + b":ok":
                self._settle("ok")
            else:
                self._settle("nocwd" if head == self._handshake + b":no" else "failed")
                return
            if not data:
                return
        self._record.stdout.append(data)

    def _settle(self, outcome: Literal["ok", "nocwd", "failed"]) -> None:
        if outcome == "failed" and self._before is not None:
            self.launch_output = self._before.decode(errors="replace")
        self._before = None
        self._outcome = outcome
        self._launched.set()

    def _on_eof(self) -> None:
        self._stop_reading()
        if self._before is not None:
            self._settle("failed")
        self._record.stream_closed()
        self._exit_task = self._loop.create_task(self._collect_exit())

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    async def _collect_exit(self) -> None:
        code: int | None = None
        try:
            with anyio.move_on_after(EXIT_SETTLE_S):
                while True:
                    info = await self._executor._inspect_exec(self._exec_id)
                    if not info.get("Running"):
                        code = info.get("ExitCode")
                        break
                    await anyio.sleep(EXIT_POLL_S)  # the engine records the exit a moment after EOF
        except _docker_errors() as exc:
            logger.warning("could not read the exit code of %s: %s", self._record.pid, exc)
        self.exit_code = code
        self._exited.set()
        signum = signal_from_exit_code(code)
        if code == 0 and self._delivered is not None:
            # The engine occasionally loses the status of an exec whose whole tree dies at once and
            # reports 0 (measured: about 1 in 30 tree kills on API 1.41). After our own terminating
            # signal, that 0 is almost surely the signal; a process that traps it and exits 0 is
            # misreported, the lesser error.
            signum = self._delivered
        if signum is not None:
            self._record.finish(None, signum)
        else:
            self._record.finish(code)

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise StdinFailed(f"{self._record.pid}'s input is closed")
        await write_all(self._fd, self._sock.send, data, self._record.pid)

    async def signal(self, signum: int) -> None:
        if signum not in NON_TERMINATING:
            self._delivered = signum
        await self._executor._signal_matching(self._executor._marker_pattern(self._record.pid), signum)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        if self._exit_task is not None and not self._exit_task.done():
            self._exit_task.cancel()
        self._wrapper.close()
        self._sock.close()


def _reason(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip() or type(exc).__name__
