"""Configuration: typed objects for the library, read from the environment in one place.

Library code receives a ``ProcessMcpConfig``; only ``load_config`` looks at environment variables,
whose names and defaults are those of the original TypeScript server.
"""

from __future__ import annotations

import os
import pwd
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import InvalidConfig
from .models import DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS

DOCKER_WORKDIR = "/home/agent"
"""Working directory inside the container; the named volume is mounted there."""


class Defaults(BaseModel):
    workdir: str | None = Field(
        None, description="Default cwd and the sandbox's workspace; see default_host_workspace. /home/agent in Docker."
    )
    timeout_ms: int = Field(DEFAULT_TIMEOUT_MS, ge=0)
    max_timeout_ms: int = Field(MAX_TIMEOUT_MS, ge=0)


class Limits(BaseModel):
    keep_terminated: int = Field(20, ge=0, description="Finished processes kept for ps and stdout.")
    output_buffer_bytes: int = Field(1024 * 1024, ge=4096, description="Bytes kept per output stream.")
    max_live: int = Field(128, ge=1, description="Processes that may run at once.")


class DockerConfig(BaseModel):
    image: str = "ubuntu:22.04"
    container_name: str = "process-mcp-main"
    volume_name: str = "process-mcp-volume"
    use_existing: bool = False
    memory: str = "512m"
    cpus: float = Field(1.0, gt=0)
    pids_limit: int = Field(4096, gt=0)
    cap_add: list[str] = Field(
        default_factory=list, description="Capabilities added to the created container beyond the few it keeps."
    )
    network: str | None = Field(
        None,
        min_length=1,
        description="bridge, none, or the name of a Docker network; unset: bridge, or none when "
        "SANDBOX_ALLOWED_DOMAINS restricts the network (processes then reach only the domain proxy).",
    )
    read_only: bool = Field(False, description="A read-only root filesystem; the volume and the tmpfs stay writable.")
    engine: dict[str, str] = Field(
        default_factory=dict,
        description="DOCKER_HOST, DOCKER_TLS_VERIFY and DOCKER_CERT_PATH, as set: how to reach the engine.",
    )
    agent: bool = Field(
        True,
        description="Drive processes through the agent in the container (needs python3 >= 3.8 there); "
        "false: one exec per process.",
    )
    user: str = Field(
        "1000:1000",
        pattern=r"^([0-9]+(:[0-9]+)?|[a-z_][a-z0-9_-]*(:[a-z_][a-z0-9_-]*)?)$",
        description="Who processes in the created container run as (uid:gid or a name; root for root).",
    )


class SandboxConfig(BaseModel):
    enabled: bool = True
    required: bool = False
    allowed_domains: list[str] = Field(default_factory=lambda: ["*"])
    allow_write: list[str] = Field(default_factory=list, description="Writable roots besides the workspace.")
    allow_read: list[str] = Field(default_factory=list, description="Paths shown read-only besides the system's.")
    deny_read: list[str] = Field(default_factory=list)
    deny_write: list[str] = Field(default_factory=list)
    allow_protected: list[str] = Field(
        default_factory=list, description="Names from PROTECTED_PATHS that stay writable (e.g. .vscode)."
    )
    allow_private_addresses: bool = Field(
        False, description="Whether the proxy may connect to loopback, private and link-local addresses."
    )
    max_processes: int = Field(1024, ge=8, description="Processes and threads one sandbox may have at once.")
    max_memory_mb: int = Field(
        4096, ge=16, description="Memory a sandbox may use (a cgroup where possible, else per process)."
    )
    tmp_size_mb: int = Field(512, ge=1, description="Size of each sandbox's private /tmp and /dev/shm.")
    scan_limit: int = Field(
        20000, ge=1, description="Directories searched in the writable roots for protected paths per spawn."
    )

    @property
    def network_restricted(self) -> bool:
        """Whether processes lose direct network access: any domain list but the single pattern ``*``."""
        return "*" not in self.allowed_domains


class ProcessMcpConfig(BaseModel):
    """Everything a server or executor needs to know, as typed values."""

    mode: Literal["host", "docker"] = "host"
    defaults: Defaults = Field(default_factory=Defaults)
    limits: Limits = Field(default_factory=Limits)
    docker: DockerConfig = Field(default_factory=DockerConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    env_passthrough: list[str] = Field(
        default_factory=list, description="Server environment variables children get besides the basic ones."
    )

    @model_validator(mode="after")
    def _default_workdir(self) -> ProcessMcpConfig:
        # A container the user brings keeps its own working directory, which is known once it is found.
        if self.defaults.workdir is None and not (self.mode == "docker" and self.docker.use_existing):
            self.defaults.workdir = DOCKER_WORKDIR if self.mode == "docker" else default_host_workspace()
        return self

    @property
    def docker_network(self) -> str:
        """The created container's network: DOCKER_NETWORK, else none when the domain list restricts the
        network (processes reach the domain proxy through the agent), else bridge."""
        if self.docker.network is not None:
            return self.docker.network
        return "none" if self.sandbox.network_restricted else "bridge"

    @property
    def workdir(self) -> str:
        """The configured default working directory; for an existing container without one, ``/`` until
        the executor has read the container's own (``ProcessExecutor.workdir``)."""
        return self.defaults.workdir or "/"


def default_host_workspace() -> str:
    """Where host processes work by default, and what the sandbox makes writable: a directory of its own,
    never the home directory itself. ``~/.local/share/process-mcp/workspace`` for a user with a home,
    else ``<temp dir>/process-mcp-workspace-<uid>``. The executor creates it (mode 0700) at start."""
    home = Path(user_home())
    if home.is_dir() and str(home) != "/":
        return str(home / ".local" / "share" / "process-mcp" / "workspace")
    return str(Path(tempfile.gettempdir()) / f"process-mcp-workspace-{os.getuid()}")


def user_home() -> str:
    """The server user's home directory from the password database (not $HOME, which a client sets)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return "/"


CommaList = Annotated[list[str], NoDecode]


class _Environment(BaseSettings):
    """The environment variables, flat, as users set them."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore")

    PROCESS_MODE: Literal["host", "docker"] = "host"
    DEFAULT_WORKDIR: str | None = None
    DEFAULT_TIMEOUT_MS: int = Field(DEFAULT_TIMEOUT_MS, ge=0)
    MAX_TIMEOUT_MS: int = Field(MAX_TIMEOUT_MS, ge=0)
    PROCESS_KEEP_TERMINATED: int = Field(20, ge=0)
    PROCESS_OUTPUT_BUFFER_BYTES: int = Field(1024 * 1024, ge=4096)
    PROCESS_MAX_LIVE: int = Field(128, ge=1)
    DOCKER_IMAGE: str = "ubuntu:22.04"
    DOCKER_CONTAINER: str = "process-mcp-main"
    DOCKER_VOLUME: str = "process-mcp-volume"
    DOCKER_USE_EXISTING: bool = False
    DOCKER_MEMORY: str = "512m"
    DOCKER_CPUS: float = Field(1.0, gt=0)
    DOCKER_PIDS_LIMIT: int = Field(4096, gt=0)
    DOCKER_CAP_ADD: CommaList = Field(default_factory=list)
    DOCKER_NETWORK: str | None = Field(None, min_length=1)
    DOCKER_READ_ONLY: bool = False
    DOCKER_AGENT: bool = True
    DOCKER_HOST: str | None = None
    DOCKER_TLS_VERIFY: str | None = None
    DOCKER_CERT_PATH: str | None = None
    DOCKER_USER: str = Field("1000:1000", pattern=r"^([0-9]+(:[0-9]+)?|[a-z_][a-z0-9_-]*(:[a-z_][a-z0-9_-]*)?)$")
    SANDBOX_ENABLED: bool = True
    SANDBOX_REQUIRED: bool = False
    SANDBOX_ALLOWED_DOMAINS: CommaList = Field(default_factory=lambda: ["*"])
    SANDBOX_ALLOW_WRITE: CommaList = Field(default_factory=list)
    SANDBOX_ALLOW_READ: CommaList = Field(default_factory=list)
    SANDBOX_DENY_READ: CommaList = Field(default_factory=list)
    SANDBOX_DENY_WRITE: CommaList = Field(default_factory=list)
    SANDBOX_ALLOW_PROTECTED: CommaList = Field(default_factory=list)
    SANDBOX_ALLOW_PRIVATE_ADDRESSES: bool = False
    SANDBOX_MAX_PROCESSES: int = Field(1024, ge=8)
    SANDBOX_MAX_MEMORY_MB: int = Field(4096, ge=16)
    SANDBOX_TMP_SIZE_MB: int = Field(512, ge=1)
    SANDBOX_SCAN_LIMIT: int = Field(20000, ge=1)
    PROCESS_ENV_PASSTHROUGH: CommaList = Field(default_factory=list)

    @field_validator(
        "SANDBOX_ALLOWED_DOMAINS",
        "SANDBOX_ALLOW_WRITE",
        "SANDBOX_ALLOW_READ",
        "SANDBOX_DENY_READ",
        "SANDBOX_DENY_WRITE",
        "SANDBOX_ALLOW_PROTECTED",
        "PROCESS_ENV_PASSTHROUGH",
        "DOCKER_CAP_ADD",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("DEFAULT_WORKDIR", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


def load_config(environ: dict[str, str] | None = None) -> ProcessMcpConfig:
    """Read the configuration from ``environ`` (the process environment by default).

    Raises InvalidConfig naming each malformed variable.
    """
    try:
        env = _Environment() if environ is None else _Environment.model_validate(_pick(environ))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidConfig(f"bad environment: {problems}") from None
    return ProcessMcpConfig(
        mode=env.PROCESS_MODE,
        defaults=Defaults(
            workdir=env.DEFAULT_WORKDIR, timeout_ms=env.DEFAULT_TIMEOUT_MS, max_timeout_ms=env.MAX_TIMEOUT_MS
        ),
        limits=Limits(
            keep_terminated=env.PROCESS_KEEP_TERMINATED,
            output_buffer_bytes=env.PROCESS_OUTPUT_BUFFER_BYTES,
            max_live=env.PROCESS_MAX_LIVE,
        ),
        docker=DockerConfig(
            image=env.DOCKER_IMAGE,
            container_name=env.DOCKER_CONTAINER,
            volume_name=env.DOCKER_VOLUME,
            use_existing=env.DOCKER_USE_EXISTING,
            memory=env.DOCKER_MEMORY,
            cpus=env.DOCKER_CPUS,
            pids_limit=env.DOCKER_PIDS_LIMIT,
            cap_add=env.DOCKER_CAP_ADD,
            network=env.DOCKER_NETWORK,
            read_only=env.DOCKER_READ_ONLY,
            agent=env.DOCKER_AGENT,
            user=env.DOCKER_USER,
            engine={
                name: value
                for name, value in (
                    ("DOCKER_HOST", env.DOCKER_HOST),
                    ("DOCKER_TLS_VERIFY", env.DOCKER_TLS_VERIFY),
                    ("DOCKER_CERT_PATH", env.DOCKER_CERT_PATH),
                )
                if value is not None
            },
        ),
        sandbox=SandboxConfig(
            enabled=env.SANDBOX_ENABLED,
            required=env.SANDBOX_REQUIRED,
            allowed_domains=env.SANDBOX_ALLOWED_DOMAINS,
            allow_write=env.SANDBOX_ALLOW_WRITE,
            allow_read=env.SANDBOX_ALLOW_READ,
            deny_read=env.SANDBOX_DENY_READ,
            deny_write=env.SANDBOX_DENY_WRITE,
            allow_protected=env.SANDBOX_ALLOW_PROTECTED,
            allow_private_addresses=env.SANDBOX_ALLOW_PRIVATE_ADDRESSES,
            max_processes=env.SANDBOX_MAX_PROCESSES,
            max_memory_mb=env.SANDBOX_MAX_MEMORY_MB,
            tmp_size_mb=env.SANDBOX_TMP_SIZE_MB,
            scan_limit=env.SANDBOX_SCAN_LIMIT,
        ),
        env_passthrough=env.PROCESS_ENV_PASSTHROUGH,
    )


def _pick(environ: dict[str, str]) -> dict[str, Any]:
    return {name: environ[name] for name in _Environment.model_fields if name in environ}
