"""The container processes run in, and the engine connection to it, for one executor.

The session finds or creates the container, hardens it (its home to DOCKER_USER), holds the lease that
tells later servers this one is alive, sweeps what servers that died left, brings the container back when
it is lost behind the server's back, and removes it at the end if it made it. The two ways of starting
processes in it (the agent's stream, ``executor``; one exec each, ``per_exec``) take the session, not
the executor. Every docker-py call is blocking, so it runs in a worker thread.
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ..config import DOCKER_WORKDIR, ProcessMcpConfig
from ..core.environment import defaults_missing_from
from ..errors import BackendUnavailable
from . import engine, network
from .engine import LAUNCH_TIMEOUT_S, MANAGED_LABEL, MARKER_VAR

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

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

READY_TIMEOUT_S = 5.0
"""Bound on asking the engine whether it answers, for a readiness probe."""
LOST_SWEEP_TIMEOUT_S = 10.0
"""Bound on each exec that ends what a lost agent left (a busy engine may be slow to start one)."""

ClientFactory = Callable[[], "DockerClient"]


class ContainerSession:
    """The container one executor's processes run in (see ``config.docker``), and its engine client.

    ``client_factory`` builds the docker-py client (default: ``engine_client`` for ``config.docker.engine``);
    ``labels`` are added to the container and volume it creates. ``on_recreate`` is called when a lost
    container is made anew, before anything runs in the new one.
    """

    def __init__(
        self,
        config: ProcessMcpConfig,
        *,
        client_factory: ClientFactory | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self._client_factory = client_factory or (lambda: engine.engine_client(config.docker.engine))
        self.labels = {MANAGED_LABEL: "true", **(labels or {})}
        self.token = secrets.token_hex(8)
        """Marks this server's processes and its lease in the container."""
        self.client: DockerClient | None = None
        self.container: Container | None = None
        self.created = False
        """Whether this session made the container (and so removes it at the end)."""
        self._lease: Any = None  # the lease exec's socket; closing it ends the lease
        self.recovery_lock = anyio.Lock()
        """Held while the container is brought back, or what runs in it restarted, so it happens once."""
        self.on_recreate: Callable[[], None] | None = None

    async def open(self) -> None:
        """Connect to the engine and make sure the container runs, with this server's lease in it, and
        end what servers that died left. Raises BackendUnavailable."""
        errors = engine.docker_errors()
        try:
            self.client = await anyio.to_thread.run_sync(self._client_factory)
            await anyio.to_thread.run_sync(self.client.ping)
            logger.info("Docker engine at %s", self.client.api.base_url)
        except errors as exc:
            self._release_client()
            raise BackendUnavailable(
                f"cannot reach the Docker engine ({engine.reason(exc)}); start Docker, check DOCKER_HOST, "
                "or set PROCESS_MODE=host"
            ) from None
        self.container = await self._ensure_container(self.client)
        await self._take_lease()
        await self._sweep_dead_servers()

    def working_dir(self) -> str:
        """The container's own working directory (its image's, or whoever made it), or /."""
        config: dict[str, Any] = {} if self.container is None else self.container.attrs.get("Config") or {}
        return str(config.get("WorkingDir") or "/")

    async def close(self) -> None:
        """Remove the container if this session made it (the volume stays), end the lease, and release
        the client."""
        try:
            if self.container is not None and self.created:
                await self._remove_container(self.container)
                await self._remove_own_network()
        finally:
            if self._lease is not None:
                self._lease.close()  # the lease exec sees its input end and exits
                self._lease = None
            self.container = None
            self._release_client()

    @property
    def container_id(self) -> str | None:
        """The id of the container processes run in, once started."""
        return None if self.container is None else self.container.id

    def marker(self, pid: str = "") -> str:
        """The environment line that tags process ``pid`` and its descendants in the container; with
        no ``pid``, the start shared by every process of this executor."""
        return f"{MARKER_VAR}={self.token}:{pid}"

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

    async def run_bounded(self, container: Container, script: list[str], user: str | None = None) -> None:
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
        assert self.client is not None
        assert self.container is not None
        api, container_id = self.client.api, self.container.id

        def start_lease() -> Any:
            command = ["/bin/sh", "-c", _LEASE_SCRIPT]
            exec_id = api.exec_create(
                container_id, command, stdin=True, environment={LEASE_VAR: self.token}, user=self.exec_user
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
        container = self.container
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
                await anyio.to_thread.run_sync(lambda: client.volumes.create(cfg.volume_name, labels=self.labels))
            await self._ensure_own_network(client)
            options = engine.container_options(cfg, self.labels, self.config.docker_network)
            container = await anyio.to_thread.run_sync(lambda: client.containers.create(**options))
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # another server created it first: use theirs
                return await anyio.to_thread.run_sync(client.containers.get, cfg.container_name)
            raise BackendUnavailable(f"cannot create container {cfg.container_name!r}: {engine.reason(exc)}") from None
        except engine.docker_errors() as exc:
            raise BackendUnavailable(f"cannot create container {cfg.container_name!r}: {engine.reason(exc)}") from None
        self.created = True
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

    def env_defaults(self, tty: bool) -> dict[str, str]:
        """What processes get over the container's environment unless their request sets it:
        ``environment.defaults`` that the container (its image, or whoever made it) does not set."""
        config: dict[str, Any] = {} if self.container is None else self.container.attrs.get("Config") or {}
        return defaults_missing_from((line.partition("=")[0] for line in config.get("Env") or []), tty)

    async def recover(self) -> bool:
        """After a failed exec: whether to try again. A container stopped or removed behind our back is
        brought back (this server owns it); DOCKER_USE_EXISTING's container is an error instead."""
        async with self.recovery_lock:  # spawns failing together bring it back once
            return await self._recover_locked()

    async def _recover_locked(self) -> bool:
        import docker.errors

        assert self.client is not None
        container, name = self.container, self.config.docker.container_name
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
        if self.on_recreate is not None:
            self.on_recreate()  # what ran in the lost container (the agent) is gone with it
        if self._lease is not None:
            self._lease.close()
            self._lease = None
        self.container = await self._ensure_container(self.client)
        await self._take_lease()
        return True

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
            await anyio.to_thread.run_sync(lambda: network.ensure_network(client, name, self.labels))

    async def _remove_own_network(self) -> None:
        """Remove the container's own network, once the container is gone."""
        client = self.client
        if client is not None and self.config.docker_network == self.config.docker.container_name:
            name = self.config.docker_network
            try:
                await anyio.to_thread.run_sync(lambda: network.remove_network(client, name), abandon_on_cancel=True)
            except engine.docker_errors() as exc:
                logger.warning("could not remove network %s: %s", name, engine.reason(exc))

    def _release_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
