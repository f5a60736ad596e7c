"""Each principal's open MCP sessions, bounded, so one principal cannot fill the server with them.

The SDK opens a session (a task, its streams and buffers: about 40 KiB) for every request that comes
without an ``Mcp-Session-Id`` on the 2025 handshake path and is answered, and bounds them only for the
whole server (10,000, then ``503 Too many open sessions`` to everyone). ``SessionQuota`` sits in front
of it and counts the sessions each principal opened: one more than ``per_principal`` is refused with
429 and ``too_many_sessions``, before the SDK sees it; other principals are not affected.

A session counts from the answer that opens it until its principal ends it (DELETE), the SDK no longer
knows it (404), or it has gone ``idle_timeout_s`` without a request in progress: the idle timeout the
SDK is given, after which it has ended the session itself. The local caller (no authentication) is not
counted: it is the one user there is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp_types import INVALID_REQUEST, ErrorData, JSONRPCError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import TooManySessions
from .auth import principal_of


@dataclass
class _Session:
    in_flight: int = 0
    last_request: float = field(default_factory=time.monotonic)


class SessionQuota:
    """ASGI middleware in front of the SDK's app: counts each principal's open sessions and refuses a
    request that would open one beyond ``per_principal``."""

    def __init__(self, app: ASGIApp, per_principal: int, idle_timeout_s: float) -> None:
        self._app = app
        self.per_principal = per_principal
        self.idle_timeout_s = idle_timeout_s
        self._sessions: dict[str, dict[str, _Session]] = {}
        self._opening: dict[str, int] = {}  # requests that may open a session, in progress

    def open_sessions(self, principal: str) -> int:
        """How many sessions ``principal`` holds now (those being opened included)."""
        self._forget_idle(principal)
        return len(self._sessions.get(principal, {})) + self._opening.get(principal, 0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = principal_of(scope) if scope["type"] == "http" else None
        if principal is None:
            await self._app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        session_id = headers.get(MCP_SESSION_ID_HEADER)
        if session_id is not None:
            await self._use(principal, session_id, scope, receive, send)
        elif headers.get(MCP_PROTOCOL_VERSION_HEADER, HANDSHAKE_PROTOCOL_VERSIONS[0]) in HANDSHAKE_PROTOCOL_VERSIONS:
            await self._open(principal, scope, receive, send)
        else:  # a stateless (2026-07-28) request: it opens no session
            await self._app(scope, receive, send)

    async def _open(self, principal: str, scope: Scope, receive: Receive, send: Send) -> None:
        """A request that opens a session if it is answered with an ``Mcp-Session-Id``."""
        held = self.open_sessions(principal)
        if held >= self.per_principal:
            await self._refuse(principal, held, scope, receive, send)
            return
        self._opening[principal] = self._opening.get(principal, 0) + 1
        opened: _Session | None = None

        async def watch(message: Message) -> None:
            nonlocal opened
            if message["type"] == "http.response.start" and message["status"] < 400 and opened is None:
                session_id = Headers(raw=message.get("headers", [])).get(MCP_SESSION_ID_HEADER)
                if session_id is not None:
                    opened = _Session(in_flight=1)
                    self._sessions.setdefault(principal, {})[session_id] = opened
                    self._opened(principal)
            await send(message)

        try:
            await self._app(scope, receive, watch)
        finally:
            if opened is None:
                self._opened(principal)
            else:
                self._done(opened)

    def _opened(self, principal: str) -> None:
        """A request that could open a session has opened one, or will not."""
        left = self._opening[principal] - 1
        if left:
            self._opening[principal] = left
        else:
            del self._opening[principal]

    async def _use(self, principal: str, session_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        """A request on a session: while it is in progress the session is not idle; its answer may say
        the session is over."""
        session = self._sessions.get(principal, {}).get(session_id)
        if session is None:  # not one of this principal's: the SDK answers it (404)
            await self._app(scope, receive, send)
            return
        session.in_flight += 1

        async def watch(message: Message) -> None:
            # Forgotten before the client hears it is over, so that it may open another at once.
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 404 or (scope["method"] == "DELETE" and 200 <= status < 300):
                    self._forget(principal, session_id)
            await send(message)

        try:
            await self._app(scope, receive, watch)
        finally:
            self._done(session)

    def _done(self, session: _Session) -> None:
        session.in_flight -= 1
        session.last_request = time.monotonic()

    def _forget(self, principal: str, session_id: str) -> None:
        sessions = self._sessions.get(principal, {})
        sessions.pop(session_id, None)
        if not sessions:
            self._sessions.pop(principal, None)

    def _forget_idle(self, principal: str) -> None:
        """Forget ``principal``'s sessions the SDK has ended for idleness."""
        now = time.monotonic()
        for session_id, session in list(self._sessions.get(principal, {}).items()):
            if not session.in_flight and now - session.last_request >= self.idle_timeout_s:
                self._forget(principal, session_id)

    async def _refuse(self, principal: str, held: int, scope: Scope, receive: Receive, send: Send) -> None:
        error = TooManySessions(
            f"{principal} has {held} MCP sessions open, the most one principal may "
            f"(PROCESS_MAX_SESSIONS_PER_PRINCIPAL={self.per_principal}); reuse one (send its Mcp-Session-Id), "
            "end one it no longer needs (DELETE with its Mcp-Session-Id), or wait: a session without requests "
            f"for {self.idle_timeout_s:g} s ends by itself (PROCESS_SESSION_IDLE_TIMEOUT_S)"
        )
        body = JSONRPCError(jsonrpc="2.0", id=None, error=ErrorData(code=INVALID_REQUEST, message=str(error)))
        response = Response(
            body.model_dump_json(by_alias=True, exclude_unset=True), status_code=429, media_type="application/json"
        )
        await response(scope, receive, send)
