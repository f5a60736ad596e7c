"""The Docker engine as Docker mode uses it: a client, the created container's options, error
translation, and the framing of an exec's attached stream."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..config import DOCKER_WORKDIR, DockerConfig

if TYPE_CHECKING:
    from docker import DockerClient

UNIX_URL_POOLS = 1024
"""Connection pools (one per URL) docker-py may keep over a Unix socket; see engine_client."""
UNIX_POOL_CONNECTIONS = 64
"""Idle connections kept per pool: more than the worker threads that can call the engine at once."""
DOCKER_API_TIMEOUT_S = 30
"""HTTP timeout of each engine call made by the default client; a healthy engine answers in ms."""
LAUNCH_TIMEOUT_S = 10.0
"""How long an exec may take to report that it runs: a spawn's (it changed directory and is about to run),
the lease's."""
MANAGED_LABEL = "process-mcp.managed"
MARKER_VAR = "PROCESS_MCP_ID"
"""Environment variable tagging each process of a server: ``<server token>:<docker-N>``; children inherit it."""
TMPFS_OPTIONS = "rw,size=100m,noexec,nosuid"
KEPT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "SETUID", "SETGID", "KILL")
"""What the created container keeps of Docker's default set: what a root package install needs (dpkg
sets owners and modes, apt drops to its _apt user) and KILL, so kill and shutdown reach processes of
other users in it. Dropped: MKNOD, NET_RAW, NET_BIND_SERVICE, SETPCAP, SETFCAP, SYS_CHROOT, AUDIT_WRITE."""


def docker_errors() -> tuple[type[BaseException], ...]:
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


def container_options(cfg: DockerConfig, labels: Mapping[str, str], network: str | None = None) -> dict[str, Any]:
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
        "network_mode": network or cfg.network or "bridge",
        "read_only": cfg.read_only,
        "environment": {"HOME": DOCKER_WORKDIR},
        "init": True,  # reaps the orphans that exec'd processes leave behind
        "tmpfs": {"/tmp": TMPFS_OPTIONS, "/var/tmp": TMPFS_OPTIONS},
        "volumes": {cfg.volume_name: {"bind": DOCKER_WORKDIR, "mode": "rw"}},
        "working_dir": DOCKER_WORKDIR,
    }


class Demuxer:
    """Splits the non-TTY exec stream into (stream, payload piece) pairs, across reads.

    Each frame is an 8-byte header (stream: 1 stdout, 2 stderr; 3 zero bytes; big-endian size) and
    its payload. Payloads are handed over as they arrive, as views of the data read (which nothing
    changes afterwards), so a flood is never joined or copied here.
    """

    HEADER_SIZE = 8

    def __init__(self) -> None:
        self._head = bytearray()  # a header split across reads
        self._stream = 0
        self._left = 0  # payload bytes of the current frame still to come

    def feed(self, data: bytes) -> list[tuple[int, memoryview]]:
        view = memoryview(data)
        pieces = []
        pos, end = 0, len(view)
        while pos < end:
            if not self._left:
                take = min(self.HEADER_SIZE - len(self._head), end - pos)
                self._head += view[pos : pos + take]
                pos += take
                if len(self._head) < self.HEADER_SIZE:
                    break
                self._stream, self._left = self._head[0], int.from_bytes(self._head[4:8], "big")
                self._head.clear()
                continue
            take = min(self._left, end - pos)
            pieces.append((self._stream, view[pos : pos + take]))
            pos += take
            self._left -= take
        return pieces


def reason(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip() or type(exc).__name__
