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
- 405 to CONNECT and TRACE, 503 past MAX_CARRIED_PER_SPACE connections to one space's ports at once;
- a browser's navigation with the credential in its query: 303 to the same URL without it, with the
  cookie, so the page (its address, its Referer) never shows it;
- otherwise the box's own answer (a WebSocket upgrade too, ``upgrade``): through the agent's tunnel into
  the box, or straight to the port where the box shares this machine's loopback. The box's cookies are
  kept to the port's own path, and headers that would act on the whole origin are dropped.

Nothing but the caller's own processes' listening ports is reached this way; ``ps`` writes each URL it
first gives out to the audit log (``event: "forward"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import quote, unquote, unquote_plus, urlencode

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
IDLE_S = 300.0
"""A carried connection (or an answer) with no byte either way for this long is closed."""
HALF_CLOSED_S = 30.0
"""After one side of a carried connection has ended, how long the other has to end as well."""
MAX_CARRIED_PER_SPACE = 64
"""Connections carried to one space's ports at once (also bounded by the connection guard's limits)."""
REFUSED_METHODS = {"CONNECT", "TRACE"}
DROPPED_FROM_BOX = {b"service-worker-allowed", b"clear-site-data"}
"""Headers of the box's answers that would act on the whole origin, every principal's pages and the
server's own endpoints, not only on the port's."""
_SIGNATURE_HEX = 32
_CREDENTIAL = re.compile(r"^[0-9a-f]{16}\.[0-9]{1,12}\.[0-9a-f]{32}$")
_REASONS = {
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


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
        if not _CREDENTIAL.match(credential):
            return None, "the credential is not one this server made"
        tag, expiry, signature = credential.split(".")
        if not hmac.compare_digest(self._sign(f"{tag}.{expiry}".encode())[:_SIGNATURE_HEX], signature):
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
        self._carried: dict[str, int] = {}  # tag -> connections carried to its ports now
        self.bounds = Bounds(IDLE_S, HALF_CLOSED_S)
        """How long a carried connection may stay quiet, or half closed."""
        self.own_credential: Callable[[bytes], bool] = lambda value: False
        """Whether an ``Authorization`` header's value is a credential of this server's (set by the HTTP
        application that knows them): such a header is never passed on to a box."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # mounted in an application: its server's WebSockets are not ours
            reason = "WebSockets to box ports are carried by process-mcp's own HTTP server only"
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        if scope["type"] != "http":
            return
        allowed = self._authorize(scope)
        if isinstance(allowed, Refusal):
            await allowed.send(send)
            return
        target, given = allowed.target, allowed.given
        if given is not None and _navigation(scope):
            # The credential goes into a cookie and out of the address bar (and so out of every Referer).
            headers = [
                (b"location", (target.prefix + target.path).encode()),
                (b"set-cookie", _set_cookie(scope, given)),
            ]
            await send(
                {"type": "http.response.start", "status": 303, "headers": [*headers, (b"cache-control", b"no-store")]}
            )
            await send({"type": "http.response.body", "body": b""})
            return
        async with self._into_box(allowed) as found:
            if isinstance(found, Refusal):
                await found.send(send)
                return
            await _exchange(scope, receive, send, *found, target, given, self.bounds, self.own_credential)

    async def upgrade(self, scope: Scope, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Carry a connection whose request (``scope``) asked for an upgrade (a WebSocket): once the box's
        server has answered 101 (its headers held to what any answer may carry), every byte either way."""
        try:
            allowed = self._authorize(scope)
            if isinstance(allowed, Refusal):
                await _answer_raw(writer, allowed)
                return
            async with self._into_box(allowed) as found:
                if isinstance(found, Refusal):
                    await _answer_raw(writer, found)
                    return
                await _upgrade(scope, reader, writer, *found, allowed, self.bounds, self.own_credential)
        finally:
            writer.close()

    def _authorize(self, scope: Scope) -> Refusal | Allowed:
        """Where ``scope`` goes and with which credential; or why it may not."""
        if scope["method"] in REFUSED_METHODS:
            return Refusal(405, f"{scope['method']} is not carried to a box's port")
        target = Target.of(scope)
        if target is None:
            return Refusal(404, "no such port: a port URL is /ports/<tag>/<id>/<port>/; ps lists them")
        credential = target.credential or _cookie(scope)
        if credential is None:
            return Refusal(401, f"this URL needs its credential ({TOKEN_PARAMETER}): take the whole URL from ps")
        holder, why = self._links.holder(credential)
        if holder is None:
            return Refusal(401, f"{why}; list the process with ps for a new URL")
        known, space = self._links.space_of(target.tag)
        executor = self._executor_of(space) if known and holder == target.tag else None
        if executor is None:
            return Refusal(404, "no such port")
        return Allowed(target, executor, credential, target.credential)

    @contextlib.asynccontextmanager
    async def _into_box(
        self, allowed: Allowed
    ) -> AsyncIterator[Refusal | tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """A connection to the allowed port while inside (closed after), counted against its space's
        MAX_CARRIED_PER_SPACE; or why there is none."""
        tag = allowed.target.tag
        if self._carried.get(tag, 0) >= MAX_CARRIED_PER_SPACE:
            yield _busy()
            return
        self._carried[tag] = self._carried.get(tag, 0) + 1
        try:
            found = await _connect(allowed.executor, allowed.target)
            if isinstance(found, Refusal):
                yield found
                return
            try:
                yield found
            finally:
                found[1].close()
        finally:
            self._carried[tag] -= 1
            if not self._carried[tag]:
                del self._carried[tag]


class Allowed(NamedTuple):
    """A request the proxy carries: where, into which space, with which (checked) credential, and the one
    its query gave (to give back as a cookie)."""

    target: Target
    executor: ProcessExecutor
    credential: str
    given: str | None


def under_root(path: str, root: str) -> str:
    """``path`` as seen by an application mounted at ``root`` (Starlette keeps the whole path)."""
    return path[len(root) :] if root and path.startswith(root + "/") else path


def _busy() -> Refusal:
    return Refusal(
        503,
        f"this principal's ports carry {MAX_CARRIED_PER_SPACE} connections now, the most they may at once; "
        "close some and try again",
    )


async def _connect(
    executor: ProcessExecutor, target: Target
) -> Refusal | tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the target's port, while its process's tree listens there."""
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
    return connection


class Bounds(NamedTuple):
    """How long a carried connection may go without a byte either way, and stay open after one side ended."""

    idle_s: float
    half_closed_s: float


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
    credential: str | None
    """The credential the query gave."""

    @classmethod
    def of(cls, scope: Scope) -> Target | None:
        raw = scope.get("raw_path") or quote(scope["path"]).encode()
        root = scope.get("root_path", "")
        path = under_root(raw.decode("latin-1"), root)
        matched = _TARGET.match(path)
        if matched is None or not 0 < int(matched.group(3)) < 65536:
            return None
        rest = matched.group(4) or "/"
        prefix = root + path[: len(path) - len(matched.group(4) or "")]
        query, credential = _without_credential(scope.get("query_string", b"").decode("latin-1"))
        pid, port = unquote(matched.group(2)), int(matched.group(3))
        return cls(matched.group(1), pid, port, prefix, rest + (f"?{query}" if query else ""), credential)


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


async def _answer_raw(writer: asyncio.StreamWriter, refusal: Refusal) -> None:
    writer.write(refusal.raw())
    with contextlib.suppress(OSError):
        await writer.drain()


async def _exchange(
    scope: Scope,
    receive: Receive,
    send: Send,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: Target,
    cookie: str | None,
    bounds: Bounds,
    own_credential: Callable[[bytes], bool],
) -> None:
    """One request to the box's server and its answer, each streamed as it comes; given up when the
    client goes away, or when the box's server sends nothing for ``bounds.idle_s``."""
    chunked = _body_framing(scope)
    writer.write(_request_head(scope, target, own_credential, upgrade=False))
    sending = asyncio.ensure_future(_send_body(receive, writer, chunked))
    answering = asyncio.ensure_future(_answer(scope, send, reader, target, cookie, bounds.idle_s))
    try:
        await asyncio.wait({sending, answering}, return_when=asyncio.FIRST_COMPLETED)
        if not answering.done() and sending.done() and sending.exception() is None and sending.result():
            answering.cancel()  # the client is gone: nobody reads the rest
        else:
            await answering
    finally:
        for task in (sending, answering):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await task


async def _answer(
    scope: Scope, send: Send, reader: asyncio.StreamReader, target: Target, cookie: str | None, idle_s: float
) -> None:
    # h11 reads the answer as the answer to this request (a HEAD's has no body, whatever it says).
    box = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    box.send(h11.Request(method=scope["method"], target="/", headers=[("host", "box")]))
    box.send(h11.EndOfMessage())
    try:
        response = await _next_event(box, reader, HEAD_TIMEOUT_S)
        while isinstance(response, h11.InformationalResponse):  # 100 Continue: the body is on its way
            response = await _next_event(box, reader, HEAD_TIMEOUT_S)
    except (TimeoutError, h11.RemoteProtocolError, ConnectionError) as exc:
        await Refusal(502, f"the box's server gave no answer: {exc or 'timed out'}").send(send)
        return
    if not isinstance(response, h11.Response):
        await Refusal(502, "the box's server closed the connection without an answer").send(send)
        return
    headers = _headers_back(response.headers, target)
    if cookie is not None:
        headers.append((b"set-cookie", _set_cookie(scope, cookie)))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    while True:
        try:
            event = await _next_event(box, reader, idle_s)
        except (TimeoutError, h11.RemoteProtocolError, ConnectionError):
            break  # the client sees a cut answer, as the box's server cut it (or went quiet)
        if not isinstance(event, h11.Data):
            break  # its end, or anything h11 cannot read on from
        await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _upgrade(
    scope: Scope,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    box_reader: asyncio.StreamReader,
    box_writer: asyncio.StreamWriter,
    allowed: Allowed,
    bounds: Bounds,
    own_credential: Callable[[bytes], bool],
) -> None:
    target, cookie = allowed.target, allowed.given
    box_writer.write(_request_head(scope, target, own_credential, upgrade=True))
    box = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    box.send(
        h11.Request(
            method="GET", target="/", headers=[("host", "box"), ("connection", "upgrade"), ("upgrade", "websocket")]
        )
    )
    box.send(h11.EndOfMessage())
    try:
        answer = await _next_event(box, box_reader, HEAD_TIMEOUT_S)
    except (TimeoutError, h11.RemoteProtocolError, ConnectionError) as exc:
        await _answer_raw(writer, Refusal(502, f"the box's server gave no answer: {exc or 'timed out'}"))
        return
    if not isinstance(answer, h11.InformationalResponse) or answer.status_code != 101:
        status = getattr(answer, "status_code", "nothing")
        await _answer_raw(writer, Refusal(502, f"the box's server did not take the WebSocket: it answered {status}"))
        return
    kept = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    kept += _headers_back(answer.headers, target)
    if cookie is not None:
        kept.append((b"set-cookie", _set_cookie(scope, cookie)))
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in kept) + b"\r\n")
    writer.write(box.trailing_data[0])
    expiry = int(allowed.credential.split(".")[1])
    await _carry(reader, writer, box_reader, box_writer, bounds, until_s=expiry - time.time())


async def _carry(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    bounds: Bounds,
    *,
    until_s: float,
) -> None:
    """Bytes both ways until both sides end, one side ended ``bounds.half_closed_s`` ago, nothing moved for
    ``bounds.idle_s``, or ``until_s`` (the credential's expiry) passed."""
    loop = asyncio.get_running_loop()
    last = [loop.time()]
    ends = loop.time() + until_s

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK_BYTES):
            last[0] = loop.time()
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    pending = {asyncio.ensure_future(pump(a_reader, b_writer)), asyncio.ensure_future(pump(b_reader, a_writer))}
    half_closed: float | None = None
    try:
        while pending:
            quiet = last[0] + bounds.idle_s
            deadline = min(quiet, ends, math.inf if half_closed is None else half_closed + bounds.half_closed_s)
            if loop.time() >= deadline:
                return
            done, pending = await asyncio.wait(
                pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            if any(task.exception() is not None for task in done):
                return  # a side broke off: nothing more to carry
            if done and half_closed is None:
                half_closed = loop.time()
    finally:
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await task


async def _next_event(box: h11.Connection, reader: asyncio.StreamReader, timeout_s: float) -> object:
    while True:
        event = box.next_event()
        if event is not h11.NEED_DATA:
            return event  # PAUSED too: the caller reads nothing on from it
        async with asyncio.timeout(timeout_s):
            box.receive_data(await reader.read(CHUNK_BYTES))


def _headers_back(headers: Iterable[tuple[bytes, bytes]], target: Target) -> list[tuple[bytes, bytes]]:
    """The headers of the box's answer that reach the client: none of its connection, none that acts on
    the whole origin, and its cookies kept to the port's path (never one named as the credential)."""
    kept = []
    for name, value in headers:
        if name == b"set-cookie":
            cookie = _cookie_from_box(value, target.prefix)
            if cookie is not None:
                kept.append((name, cookie))
        elif name not in HOP_BY_HOP and name not in DROPPED_FROM_BOX:
            kept.append((name, value))
    return kept


def _cookie_from_box(value: bytes, prefix: str) -> bytes | None:
    """A cookie the box sets, for the port's paths only (its Path under the port's prefix, no Domain);
    None for one without a name or named as the credential."""
    pair, *attributes = value.split(b";")
    name = pair.partition(b"=")[0].strip()
    if not name or name == TOKEN_PARAMETER.encode():
        return None
    kept = [pair.strip()]
    path = b"/"
    for attribute in attributes:
        key, _, setting = attribute.strip().partition(b"=")
        if key.lower() == b"path":
            path = setting.strip() if setting.strip().startswith(b"/") else b"/"
        elif key.lower() != b"domain" and key.strip():
            kept.append(attribute.strip())
    kept.append(b"Path=" + prefix.encode() + path)
    return b"; ".join(kept)


def _navigation(scope: Scope) -> bool:
    """Whether the request is a browser's navigation to a page (which may carry a cookie back)."""
    fields = dict(scope["headers"])
    return fields.get(b"sec-fetch-mode") == b"navigate" and scope["method"] in ("GET", "HEAD")


def _body_framing(scope: Scope) -> bool | None:
    """How the client framed its request's body: chunked (True), by its length (False), or no body (None)."""
    names = {name for name, _ in scope["headers"]}
    return True if b"transfer-encoding" in names else False if b"content-length" in names else None


async def _send_body(receive: Receive, writer: asyncio.StreamWriter, chunked: bool | None) -> bool:
    """The request's body to the box's server, framed as the client framed it; then wait for the client to
    go. True once it has gone (before its answer was complete, or after)."""
    while chunked is not None:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return True
        body = message.get("body", b"")
        if body:
            writer.write(b"%x\r\n%s\r\n" % (len(body), body) if chunked else body)
            await writer.drain()
        if not message.get("more_body", False):
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            break
    while (await receive())["type"] != "http.disconnect":
        pass
    return True


def _request_head(scope: Scope, target: Target, own_credential: Callable[[bytes], bool], *, upgrade: bool) -> bytes:
    """The request head the box's server gets: the path in the box, the client's headers but those of its
    connection, the port's credential and an ``Authorization`` that is a credential of this server's
    (``own_credential``), and where the request came from (``X-Forwarded-*``, only ours)."""
    lines = [f"{scope['method']} {target.path} HTTP/1.1".encode()]
    host = b""
    chunked = _body_framing(scope)
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
        elif name == b"cookie":
            kept = _cookies_without_credential(value)
            if kept:
                lines.append(b"cookie: " + kept)
        elif name == b"referer":
            lines.append(b"referer: " + _referer_without_credential(value))
        elif name.startswith(b"x-forwarded-") or name == b"forwarded" or (chunked and name == b"content-length"):
            continue
        elif name == b"authorization" and own_credential(value):
            continue  # the caller's own to this server: the box's server may not act as the caller
        elif name not in HOP_BY_HOP or (upgrade and name in (b"connection", b"upgrade")):
            lines.append(name + b": " + value)
    lines.append(f"host: 127.0.0.1:{target.port}".encode())
    lines.append(b"x-forwarded-host: " + host)
    lines.append(f"x-forwarded-proto: {scope.get('scheme', 'http')}".encode())
    lines.append(f"x-forwarded-prefix: {target.prefix}".encode())
    if not upgrade:
        if chunked:
            lines.append(b"transfer-encoding: chunked")  # content-length, where the client sent only that, is kept
        lines.append(b"connection: close")  # one request per connection into the box
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _without_credential(query: str) -> tuple[str, str | None]:
    """The query without the credential (its name read as the box would read it), and the credential."""
    kept, credential = [], None
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if unquote_plus(name) == TOKEN_PARAMETER:
            credential = credential or unquote_plus(value)
        else:
            kept.append(part)
    return "&".join(kept), credential


def _referer_without_credential(value: bytes) -> bytes:
    address, mark, query = value.decode("latin-1").partition("?")
    query, fragment_mark, fragment = query.partition("#")
    kept = _without_credential(query)[0]
    return (address + (mark if kept else "") + kept + fragment_mark + fragment).encode("latin-1")


def _cookie(scope: Scope) -> str | None:
    """The credential the request's cookies give (read by hand: a cookie parser of the standard library
    is slow on crafted values, before any credential is checked)."""
    for name, value in scope["headers"]:
        if name == b"cookie":
            for part in value.split(b";"):
                key, _, setting = part.strip().partition(b"=")
                if key == TOKEN_PARAMETER.encode() and len(setting) <= 96:
                    return str(setting.decode("latin-1"))
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
