"""The streamable HTTP transport: the MCP SDK's app at ``/mcp``, behind authentication, under uvicorn.

Both protocol generations are served on the one endpoint: clients of the 2025 handshake with an
``Mcp-Session-Id`` (bound by the SDK to the principal that opened it) and stateless 2026-07-28 clients.
Host and Origin headers are checked against DNS rebinding, bodies and connections are bounded.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Generator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Protocol

import anyio
import uvicorn
from mcp.server import MCPServer
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.auth.middleware.bearer_auth import BearerAuthBackend, RequireAuthMiddleware
from mcp.server.auth.provider import TokenVerifier
from mcp.server.auth.routes import build_resource_metadata_url, create_protected_resource_routes
from mcp.server.transport_security import TransportSecuritySettings
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.authentication import BaseUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ProcessMcpConfig
from ..errors import BackendUnavailable, InvalidConfig
from ..policy.addresses import is_loopback
from .auth import JwtVerifier, RefusalLog, TokenFileVerifier, make_verifier
from .calls import DISCONNECTED, Disconnect
from .connections import ConnectionGuard
from .metrics import Metrics
from .ports import PATH_PREFIX, under_root
from .sessions import SessionQuota
from .spaces import Spaces

logger = logging.getLogger(__name__)


class Served(Protocol):
    """What HTTP serves, as far as it needs to know: a ``ProcessMcpServer`` (``service.server``)."""

    @property
    def server(self) -> MCPServer: ...

    @property
    def spaces(self) -> Spaces: ...

    @property
    def config(self) -> ProcessMcpConfig: ...

    @property
    def metrics(self) -> Metrics: ...

    def serving(self) -> AbstractAsyncContextManager[None]: ...


MCP_PATH = "/mcp"
"""Where the MCP endpoint is served."""

METRICS_PATH = "/metrics"
"""Where the Prometheus metrics are served."""

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
PROBES = (HEALTH_PATH, READY_PATH)

GRACEFUL_SHUTDOWN_S = 3
"""How long open connections (event streams, waits) get to finish once the server stops accepting."""


def transport_security(host: str, allowed_hosts: list[str], allowed_origins: list[str]) -> TransportSecuritySettings:
    """Host and Origin checks: loopback names on loopback; off it, the configured hosts (``*``: any).

    Raises InvalidConfig when listening off loopback with no hosts configured: a browser page could
    otherwise reach the server through a name the attacker controls (DNS rebinding).
    """
    hosts = list(allowed_hosts)
    origins = list(allowed_origins)
    if is_loopback(host):
        hosts += ["127.0.0.1:*", "localhost:*", "[::1]:*"]
        origins += ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
    elif not hosts:
        raise InvalidConfig(
            f"listening on {host} needs PROCESS_HTTP_ALLOWED_HOSTS: the host names clients use "
            "(e.g. box.example.com:8765, or box.example.com:* for any port), or * to accept any Host header"
        )
    if "*" in hosts:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    return TransportSecuritySettings(allowed_hosts=hosts, allowed_origins=origins)


def several_principals(verifier: TokenVerifier | None, *, authenticate: bool) -> bool:
    """Whether the app serves more than one principal: a tokens file that names several, OAuth (any
    subject of the issuer), or an application's own authentication (any of its users)."""
    if not authenticate or isinstance(verifier, JwtVerifier):
        return True
    return isinstance(verifier, TokenFileVerifier) and len(verifier.principals) > 1


def check_isolation(config: ProcessMcpConfig, principals: bool) -> None:
    """Refuse a setup where one principal's processes could reach another's through the network.

    Raises InvalidConfig for several principals on the host with SANDBOX_ALLOWED_DOMAINS=*: every
    sandbox then shares this machine's network namespace, loopback included, so a server one
    principal's process listens on answers every other principal's processes (a domain list gives
    each sandbox a network namespace of its own); and in Docker mode for a DOCKER_NETWORK that every
    principal's container would share (host, or a named network), where each principal's container
    otherwise gets a network of its own.
    """
    sandbox = config.sandbox
    shared = config.docker.network
    if principals and config.mode == "docker" and shared not in (None, "bridge", "none"):
        raise InvalidConfig(
            f"several principals with DOCKER_NETWORK={shared} would put every principal's container on one "
            "network, where each reaches the servers the others' processes listen on. Unset DOCKER_NETWORK "
            "(each principal's container then gets a network of its own), or set it to none"
        )
    if principals and config.mode == "host" and sandbox.enabled and not sandbox.network_restricted:
        raise InvalidConfig(
            "several principals with SANDBOX_ALLOWED_DOMAINS=* would share this machine's network, loopback "
            "included: a server one principal's process listens on (127.0.0.1) would answer the others' "
            "processes. Set SANDBOX_ALLOWED_DOMAINS to the domains processes need (e.g. "
            "pypi.org,files.pythonhosted.org,github.com): each sandbox then gets a network namespace of its own "
            "and reaches only those, through the proxy. Or serve one principal per server, or use "
            "PROCESS_MODE=docker (a network per principal)"
        )


def shared_loopback(config: ProcessMcpConfig, principals: bool) -> str | None:
    """Why a client on loopback is not necessarily the operator (so /metrics needs its token), or None."""
    if principals:
        return "the server has several principals, and a client on this machine may be one of them"
    if config.mode == "host" and not config.sandbox.enabled:
        return "processes run unsandboxed, on this machine's network"
    if config.mode == "host" and not config.sandbox.network_restricted:
        return "with SANDBOX_ALLOWED_DOMAINS=* every sandbox shares this machine's network, loopback included"
    if config.mode == "docker" and config.docker_network == "host":
        return "with DOCKER_NETWORK=host the containers share this machine's network, loopback included"
    return None


def build_app(mcp: Served, *, authenticate: bool = True, host: str | None = None) -> ASGIApp:
    """The HTTP application of ``mcp`` (see ``ProcessMcpServer.http_app``): with ``authenticate``, behind the
    configured authentication (none only if PROCESS_AUTH=none); without, behind the application's own.
    ``host`` (default: the configured one) is where it listens, which decides the Host names it accepts.
    Raises InvalidConfig for an unsafe setup (``check_isolation``)."""
    service = mcp.config.service
    security = transport_security(host or service.host, service.allowed_hosts, service.allowed_origins)
    verifier = make_verifier(service) if authenticate else None
    principals = several_principals(verifier, authenticate=authenticate)
    check_isolation(mcp.config, principals)
    untrusted = shared_loopback(mcp.config, principals)
    if untrusted is not None and service.metrics_token is None:
        logger.info(
            "%s is off: %s. Set PROCESS_METRICS_TOKEN to serve it to requests with Authorization: Bearer <token>",
            METRICS_PATH,
            untrusted,
        )
    inner = mcp.server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        max_request_body_size=service.max_body_bytes,
        session_idle_timeout=service.session_idle_timeout_s,
        transport_security=security,
    )
    inner.router.lifespan_context = lambda _: mcp.serving()
    watched = SessionQuota(_WatchDisconnect(inner), service.max_sessions_per_principal, service.session_idle_timeout_s)
    metrics = _MetricsEndpoint(mcp.metrics.registry, service.metrics_token, trust_loopback=untrusted is None)
    ports = mcp.spaces.ports
    ports.own_credential = _own_credential(verifier, metrics)
    if not authenticate:
        return _Front(inner, _RequireUser(watched), metrics, ports, mcp.spaces.ready)
    if verifier is None:
        return _Front(inner, watched, metrics, ports, mcp.spaces.ready)
    extra: Starlette | None = None
    metadata_url = None
    if isinstance(verifier, JwtVerifier):
        resource = AnyHttpUrl(verifier.audience)
        metadata_url = build_resource_metadata_url(resource)
        extra = Starlette(
            routes=create_protected_resource_routes(
                resource_url=resource,
                authorization_servers=[AnyHttpUrl(verifier.issuer)],
                scopes_supported=verifier.scopes or None,
            )
        )
    guarded = _LogRefusals(
        RequireAuthMiddleware(watched, verifier.scopes if isinstance(verifier, JwtVerifier) else [], metadata_url)
    )
    front = _Front(inner, guarded, metrics, ports, mcp.spaces.ready, extra)
    return AuthenticationMiddleware(AuthContextMiddleware(front), backend=BearerAuthBackend(verifier))


class _WatchDisconnect:
    """Puts an event in each HTTP request's scope that is set if the client disconnects before the
    response is complete, so a tool can stop waiting for a reader that is gone."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        gone = Disconnect()
        body_read = anyio.Event()
        scope[DISCONNECTED] = gone

        async def receive_watched() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def watch() -> None:
            # Once the body is in, the server's next message can only be the disconnect (uvicorn repeats
            # it to every receiver), so listening here takes nothing from the application.
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        failure: Exception | None = None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            try:
                await self._app(scope, receive_watched, send)
            except Exception as exc:  # re-raised below as itself, not wrapped in the task group's group
                failure = exc
            finally:
                tasks.cancel_scope.cancel()
        if failure is not None:
            raise failure


SAME_ORIGIN = {
    "error": "same_origin",
    "error_description": "a page served by this server (a box's port under /ports/) may not call it; "
    "call it from your MCP client",
}


def _same_origin(scope: Scope) -> bool:
    """Whether a browser sent the request from a page of this server's own origin (Fetch Metadata)."""
    return any(name == b"sec-fetch-site" and value == b"same-origin" for name, value in scope["headers"])


class _Front:
    """Sends requests for the MCP endpoint through the authentication check; ``/metrics``, the box ports
    (which carry credentials of their own) and the protected resource metadata to their own handlers; the
    lifespan straight on."""

    def __init__(
        self,
        inner: ASGIApp,
        guarded: ASGIApp,
        metrics: ASGIApp,
        ports: ASGIApp,
        ready: Callable[[], Awaitable[bool]],
        extra: Starlette | None = None,
    ) -> None:
        self._ready = ready
        self._inner = inner
        self._guarded = guarded
        self._metrics = metrics
        self._ports = ports
        self._extra = extra
        self._extra_paths = {getattr(route, "path", None) for route in extra.routes} if extra else set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = under_root(scope.get("path", ""), scope.get("root_path", ""))
        if scope["type"] in ("http", "websocket") and path.startswith(PATH_PREFIX):
            await self._ports(scope, receive, send)
            return
        if scope["type"] == "http" and _same_origin(scope):
            # A page under /ports/ is served from this origin, by a box: it may not call the server itself.
            await JSONResponse(SAME_ORIGIN, status_code=403)(scope, receive, send)
            return
        if scope["type"] == "http" and scope["path"] in PROBES:
            await self._probe(scope, receive, send)
        elif scope["type"] == "http" and scope["path"] == METRICS_PATH:
            await self._metrics(scope, receive, send)
        elif scope["type"] == "http" and scope["path"] in self._extra_paths:
            assert self._extra is not None
            await self._extra(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._inner(scope, receive, send)
        else:
            await self._guarded(scope, receive, send)

    async def _probe(self, scope: Scope, receive: Receive, send: Send) -> None:
        """/healthz: the server answers; /readyz: a spawn could start now. Neither needs a token, and
        neither says more than yes or no."""
        ok = True if scope["path"] == HEALTH_PATH else await self._ready()
        response = PlainTextResponse("ok\n" if ok else "not ready\n", status_code=200 if ok else 503)
        await response(scope, receive, send)


class _MetricsEndpoint:
    """``/metrics`` in Prometheus text format (it names principals): with its own bearer token if one is
    configured; else, with ``trust_loopback``, for clients on this machine only, and otherwise for nobody."""

    def __init__(self, registry: CollectorRegistry, token: str | None, *, trust_loopback: bool) -> None:
        self._registry = registry
        self._token = hashlib.sha256(token.encode()).digest() if token else None
        self._trust_loopback = trust_loopback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        if self._token is None and not self._trust_loopback:
            response: Response = JSONResponse(
                {
                    "error": "forbidden",
                    "error_description": "metrics are off until the operator sets PROCESS_METRICS_TOKEN",
                },
                status_code=403,
            )
        elif not self._allowed(request):
            response = JSONResponse({"error": "forbidden"}, status_code=401 if self._token else 403)
        else:
            body = await anyio.to_thread.run_sync(generate_latest, self._registry)
            response = Response(body, media_type=CONTENT_TYPE_LATEST)
        await response(scope, receive, send)

    def _allowed(self, request: Request) -> bool:
        if self._token is not None:
            offered = request.headers.get("authorization", "")
            return self.is_token(offered[7:] if offered.lower().startswith("bearer ") else "")
        return request.client is not None and is_loopback(request.client.host)

    def is_token(self, given: str) -> bool:
        """Whether ``given`` is the configured metrics token (compared in constant time)."""
        return self._token is not None and hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self._token)


def _own_credential(verifier: TokenVerifier | None, metrics: _MetricsEndpoint) -> Callable[[bytes], bool]:
    """Whether an ``Authorization`` header's value holds a credential of this server's: a token of its
    tokens file, a JWT of its issuer or for its audience (valid or not), or its metrics token, under any
    scheme or none (``Bearer``, a bare token, ``token <t>``, the user or password of ``Basic``)."""

    def ours(word: str) -> bool:
        if metrics.is_token(word):
            return True
        return isinstance(verifier, TokenFileVerifier | JwtVerifier) and verifier.issued(word)

    def own(value: bytes) -> bool:
        words = value.decode("latin-1").split()
        if len(words) == 2 and words[0].lower() == "basic":
            with contextlib.suppress(ValueError):
                words += base64.b64decode(words[1], validate=True).decode("latin-1").split(":", 1)
        return any(ours(word) for word in words[:8])

    return own


class _LogRefusals:
    """Logs each request the authentication check is about to refuse (see ``RefusalLog``)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._log = RefusalLog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = scope.get("user")
        if scope["type"] == "http" and not (isinstance(user, BaseUser) and user.is_authenticated):
            request = Request(scope)
            client = f"{request.client.host}:{request.client.port}" if request.client else "an unknown client"
            self._log.refused(client, scope["path"], request.headers.get("authorization"))
        await self._app(scope, receive, send)


class _RequireUser:
    """For an application's own authentication: a request its middleware did not authenticate gets 401."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = scope.get("user")
        if scope["type"] == "http" and not (isinstance(user, BaseUser) and user.is_authenticated):
            response = JSONResponse(
                {"error": "invalid_token", "error_description": "Authentication required"}, status_code=401
            )
            await response(scope, receive, send)
            return
        await self._app(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the command line decides what a signal does (end every
    process first), and uvicorn would re-raise the signal once it stopped, killing the server mid-cleanup."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def prepare(mcp: Served, host: str | None = None, port: int | None = None) -> uvicorn.Config:
    """Check the setup and build the application: what ``serve`` runs. Raises InvalidConfig for an unsafe
    setup (no authentication off loopback, a tokens file others can read, ...), before anything runs."""
    service = mcp.config.service
    host = host or service.host
    port = service.port if port is None else port
    if service.auth_mode == "none" and not is_loopback(host):
        raise InvalidConfig(
            f"PROCESS_AUTH=none lets anyone who reaches {host} run commands; it is allowed on a loopback "
            "host only (127.0.0.1, ::1). Configure PROCESS_AUTH_TOKENS_FILE or OAuth instead"
        )
    if mcp.config.mode == "docker" and mcp.config.docker.use_existing and service.auth_mode != "none":
        raise InvalidConfig(
            "DOCKER_USE_EXISTING cannot give each principal a container of its own; unset it to serve "
            "principals over HTTP (each gets a container created from DOCKER_IMAGE)"
        )
    app = build_app(mcp, host=host)
    guard = ConnectionGuard(service.max_connections, service.connections_per_address)
    guard.upgrade, guard.upgrade_prefix = mcp.spaces.ports.upgrade, PATH_PREFIX
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        # The guard limits connections (see connections.py); uvicorn's own limit would count idle ones.
        http=guard.protocol(),
        limit_concurrency=None,
        ws="none",  # an upgrade would hand the connection to a protocol the guard does not follow
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="on",
    )


async def serve(mcp: Served, config: uvicorn.Config, *, stop: anyio.Event | None) -> None:
    """Serve ``config`` (from ``prepare``) until ``stop`` is set or the task is cancelled."""
    host, port = config.host, config.port
    server = _Server(config)
    async with anyio.create_task_group() as tasks:

        async def run() -> None:
            try:
                await server.serve()
            except SystemExit:  # uvicorn's answer to a port it cannot bind, after logging why
                raise BackendUnavailable(f"cannot listen on {host}:{port} (see the error above)") from None
            tasks.cancel_scope.cancel()

        tasks.start_soon(run)
        try:
            while not server.started:
                if server.should_exit:
                    return
                await anyio.sleep(0.01)
            bound = server.servers[0].sockets[0].getsockname() if server.servers else (host, port)
            shown = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
            logger.info(
                "process-mcp serving on http://%s:%s%s (mode %s, auth %s)",
                shown,
                bound[1],
                MCP_PATH,
                mcp.config.mode,
                mcp.config.service.auth_mode,
            )
            if stop is None:
                await anyio.sleep_forever()
            else:
                await stop.wait()
        finally:
            server.should_exit = True
