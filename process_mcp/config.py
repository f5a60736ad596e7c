"""Configuration: typed objects for the library, read from the environment in one place.

Each setting is declared once, as a field of the typed objects below, with its environment variable,
type, default, constraints and one-line description (``setting``). The environment model that reads
the variables, ``--help`` and the README's table (checked by a test) all come from these declarations.
Library code receives a ``ProcessMcpConfig``; only ``load_config`` looks at environment variables,
whose names and defaults are those of the original TypeScript server.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import tempfile
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from .core.models import DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS
from .errors import InvalidConfig

DOMAIN_PATTERN = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", re.IGNORECASE
)
"""An allowed domain: a host name, or ``*.`` and one (its subdomains); IP addresses match as names."""

DOCKER_WORKDIR = "/home/agent"
"""Working directory inside the container; the named volume is mounted there."""

ENGINE_VARIABLES = {
    "DOCKER_HOST": "the Docker engine, as for the docker CLI",
    "DOCKER_TLS_VERIFY": "verify the engine's TLS certificate",
    "DOCKER_CERT_PATH": "the engine's TLS certificates",
}
"""The Docker CLI's own variables, passed to the engine client as they are (``DockerConfig.engine``)."""


def setting(env: str, default: Any = None, *, description: str, **constraints: Any) -> Any:
    """A setting's one declaration: its environment variable, default, constraints and description.
    A ``default_factory`` may stand for ``default``."""
    extra: Any = {"env": env}  # pydantic's JsonDict, which it does not export
    if "default_factory" in constraints:
        return Field(description=description, json_schema_extra=extra, **constraints)
    return Field(default, description=description, json_schema_extra=extra, **constraints)


class Defaults(BaseModel):
    workdir: str | None = setting(
        "DEFAULT_WORKDIR", description="working directory when spawn gives no cwd, and the sandbox's workspace"
    )
    timeout_ms: int = setting("DEFAULT_TIMEOUT_MS", DEFAULT_TIMEOUT_MS, ge=0, description="how long spawn waits "
                              "without timeoutMs")  # fmt: skip
    max_timeout_ms: int = setting("MAX_TIMEOUT_MS", MAX_TIMEOUT_MS, ge=1, description="cap on timeoutMs and on "
                                  "every wait")  # fmt: skip

    @field_validator("workdir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not os.path.isabs(value):
            raise ValueError(f"DEFAULT_WORKDIR {value!r} is relative; give an absolute path")
        return value

    @model_validator(mode="after")
    def _timeout_within_maximum(self) -> Defaults:
        if self.timeout_ms > self.max_timeout_ms:
            raise ValueError(
                f"DEFAULT_TIMEOUT_MS {self.timeout_ms} is above MAX_TIMEOUT_MS {self.max_timeout_ms}; lower one or "
                "raise the other"
            )
        return self


class Limits(BaseModel):
    keep_terminated: int = setting(
        "PROCESS_KEEP_TERMINATED", 20, ge=0, description="finished processes kept for ps and stdout"
    )
    output_buffer_bytes: int = setting(
        "PROCESS_OUTPUT_BUFFER_BYTES", 1024 * 1024, ge=4096, description="bytes kept per output stream"
    )
    max_live: int = setting("PROCESS_MAX_LIVE", 128, ge=1, description="processes that may run at once (per principal)")
    max_cpu_seconds: int = setting(
        "PROCESS_MAX_CPU_SECONDS", 3600, ge=1, description="most CPU seconds a spawn's limits may ask for"
    )
    max_output_mb: int = setting(
        "PROCESS_MAX_OUTPUT_MB", 1024, ge=1, description="most output MiB a spawn's limits may ask for"
    )
    output_file_mb: int = setting(
        "PROCESS_OUTPUT_FILE_MB",
        64,
        ge=0,
        description="MiB of each output stream also kept in a file in the box (0: none)",
    )
    max_lifetime_s: float | None = setting(
        "PROCESS_MAX_LIFETIME_S",
        gt=0,
        description="seconds a process may run before SIGTERM, a grace, SIGKILL (unset: no limit)",
    )


class DockerConfig(BaseModel):
    image: str = setting("DOCKER_IMAGE", "ubuntu:22.04", description="image of the created container")
    container_name: str = setting(
        "DOCKER_CONTAINER", "process-mcp-main", description="container name (per principal: name-principal)"
    )
    volume_name: str = setting("DOCKER_VOLUME", "process-mcp-volume", description="volume mounted at /home/agent")
    use_existing: bool = setting("DOCKER_USE_EXISTING", False, description="use an existing container as it is")
    memory: str = setting("DOCKER_MEMORY", "512m", description="memory limit of the created container")
    cpus: float = setting("DOCKER_CPUS", 1.0, gt=0, description="CPU limit of the created container")
    pids_limit: int = setting("DOCKER_PIDS_LIMIT", 4096, gt=0, description="process limit of the created container")
    cap_add: list[str] = setting(
        "DOCKER_CAP_ADD", default_factory=list, description="capabilities added to the created container"
    )
    network: str | None = setting(
        "DOCKER_NETWORK", min_length=1, description="bridge, none or a network; unset: bridge, none with a domain list"
    )
    read_only: bool = setting("DOCKER_READ_ONLY", False, description="a read-only root for the created container")
    engine: dict[str, str] = Field(
        default_factory=dict,
        description="DOCKER_HOST, DOCKER_TLS_VERIFY and DOCKER_CERT_PATH, as set: how to reach the engine.",
    )
    own_network: bool = Field(
        False,
        description="Put the created container on a bridge network of its own, named after it, instead of "
        "Docker's shared bridge: a principal's container, which must not reach the others'.",
    )
    agent: bool = setting("DOCKER_AGENT", True, description="drive processes through the agent in the container")
    user: str = setting(
        "DOCKER_USER",
        "1000:1000",
        pattern=r"^([0-9]+(:[0-9]+)?|[a-z_][a-z0-9_-]*(:[a-z_][a-z0-9_-]*)?)$",
        description="who processes in the created container run as (uid:gid, a name, root)",
    )


class SandboxConfig(BaseModel):
    enabled: bool = setting("SANDBOX_ENABLED", True, description="run host processes in the sandbox")
    required: bool = setting(
        "SANDBOX_REQUIRED", False, description="fail spawns rather than run without a sandbox layer"
    )
    allowed_domains: list[str] = setting(
        "SANDBOX_ALLOWED_DOMAINS",
        default_factory=lambda: ["*"],
        description="domains processes may reach (* any, empty none)",
    )
    allow_write: list[str] = setting(
        "SANDBOX_ALLOW_WRITE", default_factory=list, description="writable paths besides the workspace"
    )
    allow_read: list[str] = setting("SANDBOX_ALLOW_READ", default_factory=list, description="paths shown read-only")
    deny_read: list[str] = setting("SANDBOX_DENY_READ", default_factory=list, description="paths hidden from processes")
    deny_write: list[str] = setting("SANDBOX_DENY_WRITE", default_factory=list, description="paths kept read-only")
    allow_protected: list[str] = setting(
        "SANDBOX_ALLOW_PROTECTED",
        default_factory=list,
        description="protected names that stay writable (.vscode, .git, ...)",
    )
    allow_private_addresses: bool = setting(
        "SANDBOX_ALLOW_PRIVATE_ADDRESSES",
        False,
        description="let the proxy reach loopback, private, link-local and other non-public addresses",
    )
    max_processes: int = setting("SANDBOX_MAX_PROCESSES", 1024, ge=8, description="processes and threads per sandbox")
    max_memory_mb: int = setting("SANDBOX_MAX_MEMORY_MB", 4096, ge=16, description="memory per sandbox")
    tmp_size_mb: int = setting("SANDBOX_TMP_SIZE_MB", 512, ge=1, description="size of each sandbox's private /tmp")
    scan_limit: int = setting(
        "SANDBOX_SCAN_LIMIT", 20000, ge=1, description="directories searched per spawn for protected paths"
    )
    homes_dir: str | None = setting(
        "SANDBOX_HOMES_DIR",
        description="where each workspace's box keeps its HOME (default ~/.local/state/process-mcp/homes)",
    )

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

    @property
    def network_restricted(self) -> bool:
        """Whether processes lose direct network access: any domain list but the single pattern ``*``."""
        return "*" not in self.allowed_domains


class PolicyConfig(BaseModel):
    """What the operator lets agents run."""

    command_allow: list[str] = setting(
        "PROCESS_COMMAND_ALLOW", default_factory=list, description="programs (names or globs) commands may run; "
        "empty: any"
    )  # fmt: skip
    command_deny: list[str] = setting(
        "PROCESS_COMMAND_DENY", default_factory=list, description="programs (names or globs) commands may not run"
    )


class AuditConfig(BaseModel):
    """Where tool calls and process ends are recorded."""

    path: str | None = setting("PROCESS_AUDIT_LOG", description="JSON Lines file recording every call and process end")
    max_bytes: int = setting(
        "PROCESS_AUDIT_MAX_BYTES", 100 * 1024 * 1024, ge=4096, description="audit log size that rotates it"
    )
    keep: int = setting("PROCESS_AUDIT_KEEP", 5, ge=0, description="rotated audit logs kept")
    required: bool = setting(
        "PROCESS_AUDIT_REQUIRED", False, description="refuse tool calls while the audit log cannot be written"
    )
    redact: bool = setting("PROCESS_AUDIT_REDACT", True, description="record env values and stdin input as sizes only")


class ServiceConfig(BaseModel):
    """How the server is reached (stdio or HTTP), who may call it, and what one caller may hold."""

    transport: Literal["stdio", "http"] = setting(
        "PROCESS_TRANSPORT", "stdio", description="stdio, or http (streamable HTTP)"
    )
    host: str = setting("PROCESS_HTTP_HOST", "127.0.0.1", min_length=1, description="address the HTTP transport "
                        "listens on")  # fmt: skip
    port: int = setting(
        "PROCESS_HTTP_PORT", 8765, ge=0, le=65535, description="port the HTTP transport listens on (0: any)"
    )
    allowed_hosts: list[str] = setting(
        "PROCESS_HTTP_ALLOWED_HOSTS",
        default_factory=list,
        description="Host headers accepted off loopback (host:port, host:* for any port; * for any host)",
    )
    allowed_origins: list[str] = setting(
        "PROCESS_HTTP_ALLOWED_ORIGINS",
        default_factory=list,
        description="browser Origins accepted besides none (e.g. https://app.example:*)",
    )
    max_connections: int = setting(
        "PROCESS_HTTP_MAX_CONNECTIONS", 256, ge=1, description="HTTP connections served at once (then 503)"
    )
    max_connections_per_address: int | None = setting(
        "PROCESS_HTTP_MAX_CONNECTIONS_PER_ADDRESS",
        ge=1,
        description="HTTP connections one client address may hold (unset: half of PROCESS_HTTP_MAX_CONNECTIONS)",
    )
    max_body_bytes: int = setting(
        "PROCESS_HTTP_MAX_BODY_BYTES", 4 * 1024 * 1024, ge=1024, description="largest HTTP request body"
    )
    auth: Literal["tokens", "oauth", "none"] | None = setting(
        "PROCESS_AUTH", description="tokens, oauth or none (loopback only); unset: from the settings below"
    )
    tokens_file: str | None = setting(
        "PROCESS_AUTH_TOKENS_FILE", description="file of 'principal token' lines (owner-only permissions)"
    )
    issuer: str | None = setting("PROCESS_AUTH_ISSUER", description="OAuth: the issuer JWTs must name")
    audience: str | None = setting(
        "PROCESS_AUTH_AUDIENCE", description="OAuth: this server's URL, the audience JWTs must name"
    )
    jwks: str | None = setting("PROCESS_AUTH_JWKS", description="OAuth: the issuer's keys, a JWKS file or https URL")
    scopes: list[str] = setting(
        "PROCESS_AUTH_SCOPES", default_factory=list, description="OAuth: scopes every token must carry"
    )
    log_format: Literal["text", "json"] = setting(
        "PROCESS_LOG_FORMAT", "text", description="log lines on stderr as text or json"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = setting(
        "PROCESS_LOG_LEVEL", "INFO", description="least severe level logged"
    )
    metrics_token: str | None = setting(
        "PROCESS_METRICS_TOKEN", description="token for /metrics (unset: loopback clients only)"
    )
    idle_timeout_s: float = setting(
        "PROCESS_IDLE_TIMEOUT_S",
        900,
        gt=0,
        description="seconds without calls or running processes before a principal's space is reclaimed",
    )
    max_requests: int = setting(
        "PROCESS_MAX_REQUESTS", 32, ge=1, description="tool calls one principal may have in progress at once"
    )
    max_sessions_per_principal: int = setting(
        "PROCESS_MAX_SESSIONS_PER_PRINCIPAL", 32, ge=1, description="MCP sessions one principal may have open at once"
    )
    session_idle_timeout_s: float = setting(
        "PROCESS_SESSION_IDLE_TIMEOUT_S",
        1800,
        gt=0,
        description="seconds an MCP session may go without a request before it ends",
    )
    port_url_ttl_s: float = setting(
        "PROCESS_PORT_URL_TTL_S",
        3600,
        gt=0,
        description="seconds a port URL that ps gives over HTTP (its credential) stays valid",
    )
    spawns_per_min: int = setting(
        "PROCESS_RATE_SPAWNS_PER_MIN", 0, ge=0, description="spawns one caller may make in any minute (0: no limit)"
    )

    @property
    def connections_per_address(self) -> int:
        """How many connections one client address may hold: as configured, else half of all, so one
        address never holds every connection."""
        if self.max_connections_per_address is not None:
            return self.max_connections_per_address
        return max(1, (self.max_connections + 1) // 2)

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

    mode: Literal["host", "docker"] = setting("PROCESS_MODE", "host", description="where processes run: host or docker")
    defaults: Defaults = Field(default_factory=Defaults)
    limits: Limits = Field(default_factory=Limits)
    docker: DockerConfig = Field(default_factory=DockerConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    env_passthrough: list[str] = setting(
        "PROCESS_ENV_PASSTHROUGH", default_factory=list, description="server variables processes get besides the "
        "basic ones"
    )  # fmt: skip
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
        network (processes reach the domain proxy through the agent), else bridge; a bridge network of
        its own (named after the container) instead of bridge with ``docker.own_network``."""
        network = self.docker.network
        if network is None:
            network = "none" if self.sandbox.network_restricted else "bridge"
        if network == "bridge" and self.docker.own_network:
            return self.docker.container_name
        return network

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


def default_box_home(workspace: str, homes_dir: str | None = None) -> str:
    """The HOME of the sandbox's boxes over ``workspace``, kept across its boxes and the server's runs (a
    shell's history, caches, ``pip --user``, ``git config --global``), neither in the workspace nor the
    user's home itself: ``<homes_dir>/<name>-<hash>``, by default in ``~/.local/state/process-mcp/homes``
    (under the temp dir for a user without a home)."""
    real = os.path.realpath(workspace)
    name = f"{os.path.basename(real) or 'root'}-{hashlib.sha256(real.encode()).hexdigest()[:12]}"
    if homes_dir:
        return os.path.join(os.path.realpath(homes_dir), name)
    home = Path(user_home())
    if home.is_dir() and str(home) != "/":
        return str(home / ".local" / "state" / "process-mcp" / "homes" / name)
    return str(Path(tempfile.gettempdir()) / f"process-mcp-homes-{os.getuid()}" / name)


def user_home() -> str:
    """The server user's home directory from the password database (not $HOME, which a client sets)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return "/"


# Reading the environment.


def _settings(model: type[BaseModel], path: tuple[str, ...] = ()) -> Iterator[tuple[str, tuple[str, ...], FieldInfo]]:
    """Every declared setting under ``model``: its variable, its path in the config, its field."""
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and "env" in extra:
            yield str(extra["env"]), (*path, name), field
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _settings(field.annotation, (*path, name))


SETTINGS = {env: (path, field) for env, path, field in _settings(ProcessMcpConfig)}
"""Variable name -> (its path in ProcessMcpConfig, its declaration), in declaration order."""


def _variable(field: FieldInfo) -> tuple[Any, Any]:
    """The environment model's field for a setting: the same type and constraints, and a comma-separated
    list where the setting is a list."""
    annotation: Any = field.annotation
    if _is_list(annotation):
        annotation = Annotated[list[str], NoDecode]
    if field.metadata:
        annotation = Annotated[(annotation, *field.metadata)]
    if field.default_factory is not None:
        return annotation, Field(default_factory=field.default_factory, description=field.description)
    return annotation, Field(field.default, description=field.description)


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _is_optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )


def _literal_case(annotation: Any) -> str | None:
    """``lower`` or ``upper`` when every value of a Literal setting is written so, for case-free reading."""
    for part in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(part) is Literal:
            values = [str(value) for value in typing.get_args(part)]
            if all(value == value.lower() for value in values):
                return "lower"
            if all(value == value.upper() for value in values):
                return "upper"
    return None


class _EnvironmentBase(BaseSettings):
    """Validates the variables ``_raw`` read; it reads no environment of its own, so a mapping given to
    ``load_config`` is all there is, and blank or comma-separated values are read one way."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


_Environment = create_model(  # type: ignore[call-overload]
    "_Environment",
    __base__=_EnvironmentBase,
    __doc__="The environment variables, flat, as users set them (made from the settings' declarations).",
    **{env: _variable(field) for env, (_, field) in SETTINGS.items()},
    **{env: (str | None, Field(None, description=description)) for env, description in ENGINE_VARIABLES.items()},
)


def _raw(environ: Mapping[str, str]) -> dict[str, Any]:
    """The variables of ``environ`` that are settings, as the environment model takes them: blank optional
    ones left out, lists split at commas, Literal values in their case."""
    values: dict[str, Any] = {}
    for env, (_, field) in SETTINGS.items():
        if env not in environ:
            continue
        value: Any = environ[env]
        if _is_optional(field.annotation) and not value.strip():
            continue
        if _is_list(field.annotation):
            value = [item.strip() for item in value.split(",") if item.strip()]
        elif (case := _literal_case(field.annotation)) is not None:
            value = value.strip().lower() if case == "lower" else value.strip().upper()
        values[env] = value
    for env in ENGINE_VARIABLES:
        if environ.get(env, "").strip():
            values[env] = environ[env]
    return values


def load_config(environ: Mapping[str, str] | None = None) -> ProcessMcpConfig:
    """Read the configuration from ``environ`` (the process environment by default).

    Raises InvalidConfig naming each malformed variable.
    """
    environ = os.environ if environ is None else environ
    try:
        values = _Environment.model_validate(_raw(environ)).model_dump()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidConfig(f"bad environment: {problems}") from None
    workdir = values["DEFAULT_WORKDIR"]
    if (
        values["PROCESS_MODE"] == "host"
        and workdir is not None
        and os.path.isabs(workdir)
        and not os.path.isdir(workdir)
    ):
        raise InvalidConfig(
            f"bad environment: DEFAULT_WORKDIR {workdir} is not a directory; create it, or unset "
            "DEFAULT_WORKDIR to use the default workspace"
        )
    nested: dict[str, Any] = {}
    for env_name, (path, _) in SETTINGS.items():
        target = nested
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = values[env_name]
    engine = {name: values[name] for name in ENGINE_VARIABLES if values[name] is not None}
    nested.setdefault("docker", {})["engine"] = engine
    try:
        return ProcessMcpConfig.model_validate(nested)
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise InvalidConfig(f"bad environment: {problems}") from None


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
