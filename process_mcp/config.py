"""Configuration: typed objects for the library, read from the environment in one place.

Library code receives a ``ProcessMcpConfig``; only ``load_config`` looks at environment variables,
whose names and defaults are those of the original TypeScript server.
"""

from __future__ import annotations

import os
import pwd
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import InvalidConfig
from .models import DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS

DOMAIN_PATTERN = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", re.IGNORECASE
)
"""An allowed domain: a host name, or ``*.`` and one (its subdomains); IP addresses match as names."""

DOCKER_WORKDIR = "/home/agent"
"""Working directory inside the container; the named volume is mounted there."""


class Defaults(BaseModel):
    workdir: str | None = Field(
        None, description="Default cwd and the sandbox's workspace; see default_host_workspace. /home/agent in Docker."
    )
    timeout_ms: int = Field(DEFAULT_TIMEOUT_MS, ge=0)
    max_timeout_ms: int = Field(MAX_TIMEOUT_MS, ge=1)

    @model_validator(mode="after")
    def _timeout_within_maximum(self) -> Defaults:
        if self.timeout_ms > self.max_timeout_ms:
            raise ValueError(
                f"DEFAULT_TIMEOUT_MS {self.timeout_ms} is above MAX_TIMEOUT_MS {self.max_timeout_ms}; lower one or "
                "raise the other"
            )
        return self


class Limits(BaseModel):
    keep_terminated: int = Field(20, ge=0, description="Finished processes kept for ps and stdout.")
    output_buffer_bytes: int = Field(1024 * 1024, ge=4096, description="Bytes kept per output stream.")
    max_live: int = Field(128, ge=1, description="Processes that may run at once.")
    max_cpu_seconds: int = Field(3600, ge=1, description="Most CPU seconds a spawn's limits may ask for.")
    max_output_mb: int = Field(1024, ge=1, description="Most output MiB a spawn's limits may ask for.")
    max_lifetime_s: float | None = Field(
        None, gt=0, description="A process still running after this long gets SIGTERM, a grace, SIGKILL; None: off."
    )


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

    @field_validator("allowed_domains")
    @classmethod
    def _domains(cls, domains: list[str]) -> list[str]:
        for domain in domains:
            if domain != "*" and not DOMAIN_PATTERN.match(domain):
                raise ValueError(
                    f"SANDBOX_ALLOWED_DOMAINS entry {domain!r} is not a domain: write names such as example.com or "
                    "*.example.com (subdomains), or * alone for any"
                )
        return domains

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


class PolicyConfig(BaseModel):
    """What the operator lets agents run."""

    command_allow: list[str] = Field(
        default_factory=list, description="Programs (names or globs) commands may run; empty: any."
    )
    command_deny: list[str] = Field(default_factory=list, description="Programs (names or globs) commands may not run.")


class AuditConfig(BaseModel):
    """Where tool calls and process ends are recorded."""

    path: str | None = Field(None, description="A JSON Lines file; None: no audit log.")
    max_bytes: int = Field(100 * 1024 * 1024, ge=4096, description="Size at which the file is rotated.")
    keep: int = Field(5, ge=0, description="Rotated files kept (path.1 is the newest).")
    required: bool = Field(False, description="Refuse tool calls while the log cannot be written.")
    redact: bool = Field(True, description="Record env values and stdin input as their sizes only.")


class ServiceConfig(BaseModel):
    """How the server is reached (stdio or HTTP), who may call it, and what one caller may hold."""

    transport: Literal["stdio", "http"] = "stdio"
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8765, ge=0, le=65535, description="0: any free port (the log says which).")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Host headers accepted when listening off loopback; ['*']: any."
    )
    allowed_origins: list[str] = Field(default_factory=list, description="Origin headers accepted besides none.")
    max_connections: int = Field(256, ge=1)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    auth: Literal["tokens", "oauth", "none"] | None = Field(
        None, description="None: tokens with a tokens file, oauth with an issuer, else refused over HTTP."
    )
    tokens_file: str | None = None
    issuer: str | None = None
    audience: str | None = None
    jwks: str | None = Field(None, description="A JWKS file, or an http(s) URL to fetch it from.")
    scopes: list[str] = Field(default_factory=list)
    idle_timeout_s: float = Field(900, gt=0)
    max_requests: int = Field(32, ge=1, description="Tool calls one principal may have in progress at once.")
    spawns_per_min: int = Field(0, ge=0, description="Spawns one caller may make in any minute; 0: no limit.")
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text, or as JSON objects.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_token: str | None = Field(
        None, description="Bearer token for /metrics; None: /metrics answers loopback clients only."
    )

    @property
    def auth_mode(self) -> Literal["tokens", "oauth", "none"] | None:
        """The authentication in force: the one asked for, else the one configured, else None."""
        if self.auth is not None:
            return self.auth
        if self.tokens_file is not None:
            return "tokens"
        if self.issuer is not None or self.jwks is not None or self.audience is not None:
            return "oauth"
        return None


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
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)

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

    PROCESS_MODE: Literal["host", "docker"] = Field("host", description="where processes run: host or docker")
    DEFAULT_WORKDIR: str | None = Field(
        None, description="working directory when spawn gives no cwd, and the sandbox's workspace"
    )
    DEFAULT_TIMEOUT_MS: int = Field(DEFAULT_TIMEOUT_MS, ge=0, description="how long spawn waits without timeoutMs")
    MAX_TIMEOUT_MS: int = Field(MAX_TIMEOUT_MS, ge=1, description="cap on timeoutMs and on every wait")
    PROCESS_KEEP_TERMINATED: int = Field(20, ge=0, description="finished processes kept for ps and stdout")
    PROCESS_OUTPUT_BUFFER_BYTES: int = Field(1024 * 1024, ge=4096, description="bytes kept per output stream")
    PROCESS_MAX_LIVE: int = Field(128, ge=1, description="processes that may run at once (per principal)")
    PROCESS_MAX_CPU_SECONDS: int = Field(3600, ge=1, description="most CPU seconds a spawn's limits may ask for")
    PROCESS_MAX_OUTPUT_MB: int = Field(1024, ge=1, description="most output MiB a spawn's limits may ask for")
    PROCESS_MAX_LIFETIME_S: float | None = Field(
        None, gt=0, description="seconds a process may run before SIGTERM, a grace, SIGKILL (unset: no limit)"
    )
    PROCESS_TRANSPORT: Literal["stdio", "http"] = Field("stdio", description="stdio, or http (streamable HTTP)")
    PROCESS_HTTP_HOST: str = Field("127.0.0.1", min_length=1, description="address the HTTP transport listens on")
    PROCESS_HTTP_PORT: int = Field(8765, ge=0, le=65535, description="port the HTTP transport listens on (0: any)")
    PROCESS_HTTP_ALLOWED_HOSTS: CommaList = Field(
        default_factory=list,
        description="Host headers accepted off loopback (host:port, host:* for any port; * for any host)",
    )
    PROCESS_HTTP_ALLOWED_ORIGINS: CommaList = Field(
        default_factory=list, description="browser Origins accepted besides none (e.g. https://app.example:*)"
    )
    PROCESS_HTTP_MAX_CONNECTIONS: int = Field(256, ge=1, description="HTTP connections served at once (then 503)")
    PROCESS_HTTP_MAX_BODY_BYTES: int = Field(4 * 1024 * 1024, ge=1024, description="largest HTTP request body")
    PROCESS_AUTH: Literal["tokens", "oauth", "none"] | None = Field(
        None, description="tokens, oauth or none (loopback only); unset: from the settings below"
    )
    PROCESS_AUTH_TOKENS_FILE: str | None = Field(
        None, description="file of 'principal token' lines (owner-only permissions)"
    )
    PROCESS_AUTH_ISSUER: str | None = Field(None, description="OAuth: the issuer JWTs must name")
    PROCESS_AUTH_AUDIENCE: str | None = Field(None, description="OAuth: this server's URL, the audience JWTs must name")
    PROCESS_AUTH_JWKS: str | None = Field(None, description="OAuth: the issuer's keys, a JWKS file or https URL")
    PROCESS_AUTH_SCOPES: CommaList = Field(default_factory=list, description="OAuth: scopes every token must carry")
    PROCESS_LOG_FORMAT: Literal["text", "json"] = Field("text", description="log lines on stderr as text or json")
    PROCESS_LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="least severe level logged"
    )
    PROCESS_METRICS_TOKEN: str | None = Field(None, description="token for /metrics (unset: loopback clients only)")
    PROCESS_IDLE_TIMEOUT_S: float = Field(
        900, gt=0, description="seconds without calls or running processes before a principal's space is reclaimed"
    )
    PROCESS_MAX_REQUESTS: int = Field(32, ge=1, description="tool calls one principal may have in progress at once")
    PROCESS_RATE_SPAWNS_PER_MIN: int = Field(
        0, ge=0, description="spawns one caller may make in any minute (0: no limit)"
    )
    DOCKER_IMAGE: str = Field("ubuntu:22.04", description="image of the created container")
    DOCKER_CONTAINER: str = Field("process-mcp-main", description="container name (per principal: name-principal)")
    DOCKER_VOLUME: str = Field("process-mcp-volume", description="volume mounted at /home/agent")
    DOCKER_USE_EXISTING: bool = Field(False, description="use an existing container as it is")
    DOCKER_MEMORY: str = Field("512m", description="memory limit of the created container")
    DOCKER_CPUS: float = Field(1.0, gt=0, description="CPU limit of the created container")
    DOCKER_PIDS_LIMIT: int = Field(4096, gt=0, description="process limit of the created container")
    DOCKER_CAP_ADD: CommaList = Field(default_factory=list, description="capabilities added to the created container")
    DOCKER_NETWORK: str | None = Field(
        None, min_length=1, description="bridge, none or a network; unset: bridge, none with a domain list"
    )
    DOCKER_READ_ONLY: bool = Field(False, description="a read-only root for the created container")
    DOCKER_AGENT: bool = Field(True, description="drive processes through the agent in the container")
    DOCKER_HOST: str | None = Field(None, description="the Docker engine, as for the docker CLI")
    DOCKER_TLS_VERIFY: str | None = Field(None, description="verify the engine's TLS certificate")
    DOCKER_CERT_PATH: str | None = Field(None, description="the engine's TLS certificates")
    DOCKER_USER: str = Field(
        "1000:1000",
        pattern=r"^([0-9]+(:[0-9]+)?|[a-z_][a-z0-9_-]*(:[a-z_][a-z0-9_-]*)?)$",
        description="who processes in the created container run as (uid:gid, a name, root)",
    )
    SANDBOX_ENABLED: bool = Field(True, description="run host processes in the sandbox")
    SANDBOX_REQUIRED: bool = Field(False, description="fail spawns rather than run without a sandbox layer")
    SANDBOX_ALLOWED_DOMAINS: CommaList = Field(
        default_factory=lambda: ["*"], description="domains processes may reach (* any, empty none)"
    )
    SANDBOX_ALLOW_WRITE: CommaList = Field(default_factory=list, description="writable paths besides the workspace")
    SANDBOX_ALLOW_READ: CommaList = Field(default_factory=list, description="paths shown read-only")
    SANDBOX_DENY_READ: CommaList = Field(default_factory=list, description="paths hidden from processes")
    SANDBOX_DENY_WRITE: CommaList = Field(default_factory=list, description="paths kept read-only")
    SANDBOX_ALLOW_PROTECTED: CommaList = Field(
        default_factory=list, description="protected names that stay writable (.vscode, .git/config, ...)"
    )
    SANDBOX_ALLOW_PRIVATE_ADDRESSES: bool = Field(
        False, description="let the proxy reach loopback and private addresses"
    )
    SANDBOX_MAX_PROCESSES: int = Field(1024, ge=8, description="processes and threads per sandbox")
    SANDBOX_MAX_MEMORY_MB: int = Field(4096, ge=16, description="memory per sandbox")
    SANDBOX_TMP_SIZE_MB: int = Field(512, ge=1, description="size of each sandbox's private /tmp")
    SANDBOX_SCAN_LIMIT: int = Field(20000, ge=1, description="directories searched per spawn for protected paths")
    PROCESS_ENV_PASSTHROUGH: CommaList = Field(
        default_factory=list, description="server variables processes get besides the basic ones"
    )
    PROCESS_COMMAND_ALLOW: CommaList = Field(
        default_factory=list, description="programs (names or globs) commands may run; empty: any"
    )
    PROCESS_COMMAND_DENY: CommaList = Field(
        default_factory=list, description="programs (names or globs) commands may not run"
    )
    PROCESS_AUDIT_LOG: str | None = Field(None, description="JSON Lines file recording every call and process end")
    PROCESS_AUDIT_MAX_BYTES: int = Field(100 * 1024 * 1024, ge=4096, description="audit log size that rotates it")
    PROCESS_AUDIT_KEEP: int = Field(5, ge=0, description="rotated audit logs kept")
    PROCESS_AUDIT_REQUIRED: bool = Field(False, description="refuse tool calls while the audit log cannot be written")
    PROCESS_AUDIT_REDACT: bool = Field(True, description="record env values and stdin input as sizes only")

    @field_validator(
        "SANDBOX_ALLOWED_DOMAINS",
        "SANDBOX_ALLOW_WRITE",
        "SANDBOX_ALLOW_READ",
        "SANDBOX_DENY_READ",
        "SANDBOX_DENY_WRITE",
        "SANDBOX_ALLOW_PROTECTED",
        "PROCESS_ENV_PASSTHROUGH",
        "DOCKER_CAP_ADD",
        "PROCESS_HTTP_ALLOWED_HOSTS",
        "PROCESS_HTTP_ALLOWED_ORIGINS",
        "PROCESS_AUTH_SCOPES",
        "PROCESS_COMMAND_ALLOW",
        "PROCESS_COMMAND_DENY",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("PROCESS_MODE", "PROCESS_TRANSPORT", "PROCESS_LOG_FORMAT", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("PROCESS_LOG_LEVEL", mode="before")
    @classmethod
    def _upper_case(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("DEFAULT_WORKDIR")
    @classmethod
    def _absolute_workdir(cls, value: str | None) -> str | None:
        if value is not None and not os.path.isabs(value):
            raise ValueError(f"DEFAULT_WORKDIR {value!r} is relative; give an absolute path")
        return value

    @field_validator(
        "DEFAULT_WORKDIR",
        "PROCESS_MAX_LIFETIME_S",
        "PROCESS_AUDIT_LOG",
        "PROCESS_METRICS_TOKEN",
        "PROCESS_AUTH_TOKENS_FILE",
        "PROCESS_AUTH_ISSUER",
        "PROCESS_AUTH_AUDIENCE",
        "PROCESS_AUTH_JWKS",
        "PROCESS_AUTH",
        mode="before",
    )
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
    if env.PROCESS_MODE == "host" and env.DEFAULT_WORKDIR is not None and not os.path.isdir(env.DEFAULT_WORKDIR):
        raise InvalidConfig(
            f"bad environment: DEFAULT_WORKDIR {env.DEFAULT_WORKDIR} is not a directory; create it, or unset "
            "DEFAULT_WORKDIR to use the default workspace"
        )
    try:
        return _config(env)
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise InvalidConfig(f"bad environment: {problems}") from None


def _config(env: _Environment) -> ProcessMcpConfig:
    return ProcessMcpConfig(
        mode=env.PROCESS_MODE,
        defaults=Defaults(
            workdir=env.DEFAULT_WORKDIR, timeout_ms=env.DEFAULT_TIMEOUT_MS, max_timeout_ms=env.MAX_TIMEOUT_MS
        ),
        limits=Limits(
            keep_terminated=env.PROCESS_KEEP_TERMINATED,
            output_buffer_bytes=env.PROCESS_OUTPUT_BUFFER_BYTES,
            max_live=env.PROCESS_MAX_LIVE,
            max_lifetime_s=env.PROCESS_MAX_LIFETIME_S,
            max_cpu_seconds=env.PROCESS_MAX_CPU_SECONDS,
            max_output_mb=env.PROCESS_MAX_OUTPUT_MB,
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
        policy=PolicyConfig(command_allow=env.PROCESS_COMMAND_ALLOW, command_deny=env.PROCESS_COMMAND_DENY),
        audit=AuditConfig(
            path=env.PROCESS_AUDIT_LOG,
            max_bytes=env.PROCESS_AUDIT_MAX_BYTES,
            keep=env.PROCESS_AUDIT_KEEP,
            required=env.PROCESS_AUDIT_REQUIRED,
            redact=env.PROCESS_AUDIT_REDACT,
        ),
        service=ServiceConfig(
            transport=env.PROCESS_TRANSPORT,
            host=env.PROCESS_HTTP_HOST,
            port=env.PROCESS_HTTP_PORT,
            allowed_hosts=env.PROCESS_HTTP_ALLOWED_HOSTS,
            allowed_origins=env.PROCESS_HTTP_ALLOWED_ORIGINS,
            max_connections=env.PROCESS_HTTP_MAX_CONNECTIONS,
            max_body_bytes=env.PROCESS_HTTP_MAX_BODY_BYTES,
            auth=env.PROCESS_AUTH,
            tokens_file=env.PROCESS_AUTH_TOKENS_FILE,
            issuer=env.PROCESS_AUTH_ISSUER,
            audience=env.PROCESS_AUTH_AUDIENCE,
            jwks=env.PROCESS_AUTH_JWKS,
            scopes=env.PROCESS_AUTH_SCOPES,
            idle_timeout_s=env.PROCESS_IDLE_TIMEOUT_S,
            max_requests=env.PROCESS_MAX_REQUESTS,
            spawns_per_min=env.PROCESS_RATE_SPAWNS_PER_MIN,
            metrics_token=env.PROCESS_METRICS_TOKEN,
            log_format=env.PROCESS_LOG_FORMAT,
            log_level=env.PROCESS_LOG_LEVEL,
        ),
    )


def environment_variables() -> list[tuple[str, str, str]]:
    """Every environment variable the server reads: (name, default, description), for --help."""
    rows = []
    for name, field in _Environment.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(default)
        elif isinstance(default, bool):
            default = str(default).lower()
        rows.append((name, "" if default is None else str(default), field.description or ""))
    return rows


def _pick(environ: dict[str, str]) -> dict[str, Any]:
    return {name: environ[name] for name in _Environment.model_fields if name in environ}
