"""A caller's box ports over the HTTP transport: URLs under the server's own address that proxy into its box.

``ps`` lists each port a process's tree listens on with a URL ``/ports/<tag>/<id>/<port>/`` under the
address the caller reached the server at, where ``<tag>`` stands for the caller's space without naming the
principal. The URL carries a credential in its query (``pmcp_token``): the tag and an expiry, signed with
a key the server makes at start (so credentials end with the server), valid for PROCESS_PORT_URL_TTL_S.
A browser gets it back as a cookie for the tag's paths, so the page's own relative links and requests
work too. The proxy answers:

- 401 to a request without a credential, or with one that is forged or expired;
- 404 to a credential for another tag (another principal's), to a process that is not the tag's, that
  has ended, or whose tree does not listen on the port now (checked for each connection);
- otherwise the box's own answer, carried as it is (a WebSocket upgrade too, ``upgrade``): through the
  agent's tunnel into the box, or straight to the port where the box shares this machine's loopback.

Nothing but the caller's own processes' listening ports is reached this way; ``ps`` writes each URL it
first gives out to the audit log (``event: "forward"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import parse_qsl, quote, unquote, urlencode

import h11
from starlette.types import Message, Receive, Scope, Send

from ..errors import ProcessNotFound

if TYPE_CHECKING:
    from ..core.executor import ProcessExecutor

logger = logging.getLogger(__name__)

PATH_PREFIX = "/ports/"
TOKEN_PARAMETER = "pmcp_token"
"""The query parameter (and cookie) that carries a port URL's credential; never passed on to the box."""
CONNECT_TIMEOUT_S = 5.0
"""How long a connection into the box may take to open (the agent connects on loopback in the box)."""
HEAD_TIMEOUT_S = 60.0
"""How long the box's server may take to start its answer: a dev server may build a page first."""
CHUNK_BYTES = 64 * 1024
"""Most bytes read from either side at once: what the proxy holds per connection and direction."""
MAX_HEAD_BYTES = 64 * 1024
"""Largest response head the box's server may send."""
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
}
"""Headers of one connection, not of the message: neither side's is passed on (RFC 9110, 7.6.1)."""
_TARGET = re.compile(r"^/ports/([0-9a-f]{16})/([^/?#]+)/([0-9]{1,5})(/[^?#]*)?$")
_SIGNATURE_HEX = 32
_REASONS = {401: "Unauthorized", 404: "Not Found", 502: "Bad Gateway"}


class PortLinks:
    """The credentials and URLs of box ports: signed with a key of this server's, for ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._key = secrets.token_bytes(32)
        self._spaces: dict[str, str | None] = {}  # tag -> the space's name (None: the local caller's)

    def tag(self, space: str | None) -> str:
        """The tag that stands for ``space`` (a space's name; None for the local caller) in URLs."""
        tag = self._sign(b"space\0" + (space or "").encode())[:16]
        self._spaces.setdefault(tag, space)
        return tag

    def space_of(self, tag: str) -> tuple[bool, str | None]:
        """(whether ``tag`` is one this server gave out, the name of its space)."""
        return (tag in self._spaces, self._spaces.get(tag))

    def credential(self, space: str | None) -> str:
        """A credential for every port of ``space``'s processes, valid for ``ttl_s`` from now."""
        body = f"{self.tag(space)}.{int(time.time() + self.ttl_s)}"
        return f"{body}.{self._sign(body.encode())[:_SIGNATURE_HEX]}"

    def holder(self, credential: str) -> tuple[str | None, str]:
        """The tag ``credential`` was made for, or None and why it is not valid."""
        tag, _, rest = credential.partition(".")
        expiry, _, signature = rest.partition(".")
        if not expiry.isdigit() or not hmac.compare_digest(
            self._sign(f"{tag}.{expiry}".encode())[:_SIGNATURE_HEX], signature
        ):
            return None, "the credential is not one this server made"
        if int(expiry) <= time.time():
            return None, "the credential has expired"
        return tag, ""

    def link(self, scope: Scope, space: str | None) -> Callable[[str, int], str]:
        """The URL of each port (by process id and port) for a caller of ``space`` whose request is
        ``scope``: under the address it reached this server at."""
        base = f"{scope.get('scheme', 'http')}://{_host(scope)}{scope.get('root_path', '')}"
        prefix = f"{base}{PATH_PREFIX}{self.tag(space)}/"
        query = urlencode({TOKEN_PARAMETER: self.credential(space)})
        return lambda pid, port: f"{prefix}{quote(pid, safe='')}/{port}/?{query}"

    def _sign(self, data: bytes) -> str:
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()


class PortProxy:
    """The ASGI application at PATH_PREFIX: each request carried to a port in its caller's box."""

    def __init__(self, links: PortLinks, executor_of: Callable[[str | None], ProcessExecutor | None]) -> None:
        self._links = links
        self._executor_of = executor_of  # of a space, by its name, if it is started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        found = await self._open(scope)
        if isinstance(found, Refusal):
            await found.send(send)
            return
        reader, writer, target, cookie = found
        try:
            await _exchange(scope, receive, send, reader, writer, target, cookie)
        finally:
            writer.close()

    async def upgrade(self, scope: Scope, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Carry a connection whose request (``scope``) asked for an upgrade (a WebSocket), whole: the box's
        answer and everything after it pass through as they are."""
        found = await self._open(scope)
        if isinstance(found, Refusal):
            writer.write(found.raw())
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
            return
        box_reader, box_writer, target, _ = found
        try:
            box_writer.write(_request_head(scope, target, upgrade=True))
            await asyncio.gather(_pump(reader, box_writer), _pump(box_reader, writer))
        finally:
            box_writer.close()
            writer.close()

    async def _open(
        self, scope: Scope
    ) -> Refusal | tuple[asyncio.StreamReader, asyncio.StreamWriter, Target, str | None]:
        """The connection into the box that ``scope`` asks for, with where in the box it goes and the
        credential to give back as a cookie; or why not."""
        target = Target.of(scope)
        if target is None:
            return Refusal(404, "no such port: a port URL is /ports/<tag>/<id>/<port>/; ps lists them")
        given = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))).get(TOKEN_PARAMETER)
        credential = given or _cookie(scope)
        if credential is None:
            return Refusal(401, f"this URL needs its credential ({TOKEN_PARAMETER}): take the whole URL from ps")
        holder, why = self._links.holder(credential)
        if holder is None:
            return Refusal(401, f"{why}; list the process with ps for a new URL")
        known, space = self._links.space_of(target.tag)
        executor = self._executor_of(space) if known and holder == target.tag else None
        if executor is None:
            return Refusal(404, "no such port")
        pid, port = target.pid, target.port
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                connection = await executor.open_port(pid, port)
        except ProcessNotFound:
            return Refusal(404, "no such port")
        except (OSError, TimeoutError) as exc:
            return Refusal(502, f"port {port} of {pid} did not accept the connection: {exc}")
        if connection is None:
            return Refusal(404, f"no such port: {pid} does not listen on {port} now; ps lists its ports")
        return connection[0], connection[1], target, given


class Target(NamedTuple):
    """Where a request under PATH_PREFIX goes, from its path as the client sent it (still percent-encoded,
    so nothing it decodes to can change the request the box gets)."""

    tag: str
    pid: str
    port: int
    prefix: str
    """The path up to the port: what the box's server is told it is served under."""
    path: str
    """The rest of the path, and the query without the credential: the request's target in the box."""

    @classmethod
    def of(cls, scope: Scope) -> Target | None:
        raw = scope.get("raw_path") or quote(scope["path"]).encode()
        path = raw.decode("latin-1")
        root = scope.get("root_path", "")
        if root and path.startswith(root + "/"):
            path = path[len(root) :]
        matched = _TARGET.match(path)
        if matched is None or not 0 < int(matched.group(3)) < 65536:
            return None
        rest = matched.group(4) or "/"
        prefix = root + path[: len(path) - len(matched.group(4) or "")]
        return cls(matched.group(1), unquote(matched.group(2)), int(matched.group(3)), prefix, rest + _query(scope))


class Refusal:
    """A request the proxy answers itself."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message

    def _headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")]

    async def send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self._headers()})
        await send({"type": "http.response.body", "body": f"{self.message}\n".encode()})

    def raw(self) -> bytes:
        """The answer as bytes on a connection of its own, which closes after it."""
        body = f"{self.message}\n".encode()
        head = [f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}".encode()]
        head += [name + b": " + value for name, value in self._headers()]
        head += [f"content-length: {len(body)}".encode(), b"connection: close"]
        return b"\r\n".join(head) + b"\r\n\r\n" + body


async def _exchange(
    scope: Scope,
    receive: Receive,
    send: Send,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: Target,
    cookie: str | None,
) -> None:
    """One request to the box's server and its answer, each streamed as it comes."""
    chunked = _body_framing(scope)
    writer.write(_request_head(scope, target, upgrade=False))
    sending = asyncio.ensure_future(_send_body(receive, writer, chunked))
    try:
        # h11 reads the answer as the answer to this request (a HEAD's has no body, whatever it says).
        box = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        box.send(h11.Request(method=scope["method"], target="/", headers=[("host", "box")]))
        box.send(h11.EndOfMessage())
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                response = await _next_event(box, reader)
                while isinstance(response, h11.InformationalResponse):  # 100 Continue: the body is on its way
                    response = await _next_event(box, reader)
        except (TimeoutError, h11.RemoteProtocolError, ConnectionError) as exc:
            await Refusal(502, f"the box's server gave no answer: {exc or 'timed out'}").send(send)
            return
        if not isinstance(response, h11.Response):
            await Refusal(502, "the box's server closed the connection without an answer").send(send)
            return
        headers = [(name, value) for name, value in response.headers if _passed_back(name, value)]
        if cookie is not None:
            headers.append((b"set-cookie", _set_cookie(scope, cookie)))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        while True:
            try:
                event = await _next_event(box, reader)
            except (h11.RemoteProtocolError, ConnectionError):
                break  # the client sees a cut answer, as the box's server cut it
            if isinstance(event, h11.Data):
                await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        await send({"type": "http.response.body", "body": b""})
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending


async def _next_event(box: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = box.next_event()
        if event is not h11.NEED_DATA:
            return event
        box.receive_data(await reader.read(CHUNK_BYTES))


def _passed_back(name: bytes, value: bytes) -> bool:
    """Whether a header of the box's answer reaches the client: not one of its connection, nor a cookie
    that would stand in for the credential (a process could otherwise set one for another tag's paths)."""
    if name == b"set-cookie":
        return value.partition(b"=")[0].strip().lower() != TOKEN_PARAMETER.encode()
    return name not in HOP_BY_HOP


def _body_framing(scope: Scope) -> bool | None:
    """How the client framed its request's body: chunked (True), by its length (False), or no body (None)."""
    names = {name for name, _ in scope["headers"]}
    return True if b"transfer-encoding" in names else False if b"content-length" in names else None


async def _send_body(receive: Receive, writer: asyncio.StreamWriter, chunked: bool | None) -> None:
    """The request's body to the box's server, framed as the client framed it."""
    while chunked is not None:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
        body = message.get("body", b"")
        if body:
            writer.write(b"%x\r\n%s\r\n" % (len(body), body) if chunked else body)
            await writer.drain()
        if not message.get("more_body", False):
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            return


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bytes from ``reader`` to ``writer`` until either end goes; then the other direction ends as well."""
    try:
        while data := await reader.read(CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        writer.close()


def _request_head(scope: Scope, target: Target, *, upgrade: bool) -> bytes:
    """The request head the box's server gets: the path in the box, the client's headers but those of its
    connection and the credential, and where the request came from (``X-Forwarded-*``, only ours)."""
    lines = [f"{scope['method']} {target.path} HTTP/1.1".encode()]
    host = b""
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
        elif name == b"cookie":
            kept = _cookies_without_credential(value)
            if kept:
                lines.append(b"cookie: " + kept)
        elif name.startswith(b"x-forwarded-") or name == b"forwarded":
            continue
        elif name not in HOP_BY_HOP or (upgrade and name in (b"connection", b"upgrade")):
            lines.append(name + b": " + value)
    lines.append(f"host: 127.0.0.1:{target.port}".encode())
    lines.append(b"x-forwarded-host: " + host)
    lines.append(f"x-forwarded-proto: {scope.get('scheme', 'http')}".encode())
    lines.append(f"x-forwarded-prefix: {target.prefix}".encode())
    if not upgrade:
        if _body_framing(scope):
            lines.append(b"transfer-encoding: chunked")  # content-length, where the client sent it, is kept
        lines.append(b"connection: close")  # one request per connection into the box
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _query(scope: Scope) -> str:
    """The request's query, as the client sent it, without the credential."""
    query = scope.get("query_string", b"").decode("latin-1")
    kept = "&".join(part for part in query.split("&") if part and part.partition("=")[0] != TOKEN_PARAMETER)
    return f"?{kept}" if kept else ""


def _cookie(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            with contextlib.suppress(Exception):
                jar.load(value.decode("latin-1"))
            if TOKEN_PARAMETER in jar:
                return jar[TOKEN_PARAMETER].value
    return None


def _cookies_without_credential(value: bytes) -> bytes:
    parts = [part.strip() for part in value.split(b";")]
    return b"; ".join(part for part in parts if part and part.partition(b"=")[0].strip() != TOKEN_PARAMETER.encode())


def _set_cookie(scope: Scope, credential: str) -> bytes:
    """The credential as a cookie for every port URL of its tag, for as long as it is valid."""
    tag = credential.partition(".")[0]
    expiry = int(credential.split(".")[1])
    path = f"{scope.get('root_path', '')}{PATH_PREFIX}{tag}/"
    cookie = f"{TOKEN_PARAMETER}={credential}; Path={path}; Max-Age={max(0, expiry - int(time.time()))}; HttpOnly"
    cookie += "; SameSite=Lax" + ("; Secure" if scope.get("scheme") == "https" else "")
    return cookie.encode()


def _host(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"host":
            return str(value.decode("latin-1"))
    server = scope.get("server") or ("127.0.0.1", 80)
    return f"[{server[0]}]:{server[1]}" if ":" in server[0] else f"{server[0]}:{server[1]}"
