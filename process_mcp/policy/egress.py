"""Host mode's network filter: a forward proxy that lets sandboxed processes reach only allowed domains.

A sandbox has only loopback; a bridge inside it forwards 127.0.0.1:<port> to this proxy's Unix socket, and
programs find it through HTTP_PROXY/HTTPS_PROXY/ALL_PROXY. One socket therefore speaks three protocols, told
apart by the first byte: SOCKS5 (0x05; no-auth, CONNECT only), HTTP CONNECT, and plain HTTP requests in
absolute form (``GET http://host/path``), which are sent on in origin form with ``Connection: close``.
Every destination is checked with ``domain_allowed`` before it is resolved; the proxy resolves names itself,
since the sandbox has no DNS, and connects only to public addresses (``addresses.special``). A refusal names
the domain or the address and says how to allow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

from . import addresses

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 256
"""Client connections served at once; a sandbox must not be able to exhaust the server's descriptors."""
MAX_REFUSING = 32
"""Connections past MAX_CONNECTIONS that are told so; beyond these, new ones are closed without a reply."""
HEADER_LIMIT_BYTES = 16 * 1024
"""Bound on an HTTP request line plus headers, as common servers use; more is refused, never buffered."""
HANDSHAKE_TIMEOUT_S = 10.0
"""Time a client has to send its request or SOCKS greeting; a silent client must not hold a slot."""
CONNECT_TIMEOUT_S = 10.0
"""Bound on resolving and connecting upstream; a host that does not answer by then is reported unreachable."""
RELAY_CHUNK = 64 * 1024
"""Most bytes each relay direction reads before its write drains, which bounds memory per connection."""
CLOSE_LINGER_S = 5.0
"""Time a closing connection may take to deliver its last bytes or drop a client's leftovers before it is cut."""
CLOSE_TIMEOUT_S = 5.0
"""Bound on close() waiting for cancelled connection handlers; they need a loop turn or two."""

PROXY_PORT = 3128
"""Where the proxy answers inside a box (a sandbox's own loopback, or the container's, through the agent)."""
NO_PROXY = "localhost,127.0.0.1,::1"
"""Loopback stays direct: inside the box it is the box's own."""


def proxy_environment() -> dict[str, str]:
    """The variables that point programs in a box at the proxy on PROXY_PORT (both spellings)."""
    http = f"http://127.0.0.1:{PROXY_PORT}"
    values = {"HTTP_PROXY": http, "HTTPS_PROXY": http, "ALL_PROXY": f"socks5h://127.0.0.1:{PROXY_PORT}"}
    values["NO_PROXY"] = NO_PROXY
    return {**values, **{name.lower(): value for name, value in values.items()}}


_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization"})
# What may reach a resolver or a log line: names, IPv4 and IPv6 literals (with a zone). No spaces or CR/LF.
_HOST = re.compile(r"[A-Za-z0-9._%:-]{1,255}")
_ABSOLUTE_HTTP = re.compile(r"http://([^/?#]*)(.*)", re.IGNORECASE)
_CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


class _Socks(enum.IntEnum):
    """SOCKS5 reply codes (RFC 1928, section 6) this proxy sends."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


def domain_allowed(host: str, patterns: Sequence[str]) -> bool:
    """Whether ``host`` may be reached under ``patterns`` (SANDBOX_ALLOWED_DOMAINS).

    ``*`` allows everything; ``a.com`` allows exactly a.com; ``*.a.com`` allows its subdomains but not a.com.
    Names compare case-insensitively, ignoring one trailing dot. An IP literal is allowed only when that
    address is listed (``::1`` and ``0:0:0:0:0:0:0:1`` are the same address, as are ``127.0.0.1`` and
    ``::ffff:127.0.0.1``; other forms that embed an IPv4 address reach it through a translator, and are not).
    """
    name = _normalize(host)
    address = addresses.parse(name)
    for raw in patterns:
        pattern = _normalize(raw)
        if pattern == "*":
            return True
        if not name or not pattern:
            continue
        if address is not None:
            if addresses.parse(pattern) == address:
                return True
        elif pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return True
        elif name == pattern:
            return True
    return False


def _normalize(name: str) -> str:
    return name.strip().lower().removesuffix(".")


class _Refused(Exception):
    """Ends a connection early with an error reply in the client's protocol."""

    def __init__(
        self, status: HTTPStatus, socks: _Socks | None, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.socks = socks
        self.message = message
        self.headers = headers or {}

    def reply(self, socks: bool) -> bytes:
        if socks:
            return b"" if self.socks is None else _socks_reply(self.socks)
        body = f"process-mcp sandbox: {self.message}\n".encode()
        lines = [
            f"HTTP/1.1 {self.status.value} {self.status.phrase}",
            "Content-Type: text/plain",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers.items()),
        ]
        return "\r\n".join([*lines, "", ""]).encode("latin-1") + body


def _bad_request(message: str) -> _Refused:
    return _Refused(HTTPStatus.BAD_REQUEST, _Socks.GENERAL_FAILURE, message)


def _socks_reply(code: _Socks) -> bytes:
    # The bound address is of no use through the bridge, so it is always 0.0.0.0:0.
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    head: bytes | None = None
    """For plain HTTP, the rewritten request head to send upstream; None for a tunnel (CONNECT, SOCKS)."""


class DomainProxy:
    """A SOCKS5 + HTTP proxy on a Unix socket that only connects to ``allowed_domains`` (see domain_allowed).

    Bounded by construction: at most MAX_CONNECTIONS clients are served at once, every handshake and
    upstream connect has a deadline, and each relay direction reads at most RELAY_CHUNK and waits for the
    other side's drain() before reading again. With the streams' own buffers (a reader pauses its socket past
    twice its limit, a writer's drain() waits past 64 KiB) one connection holds about 1 MiB at most.
    """

    def __init__(self, allowed_domains: Sequence[str], *, allow_private: bool = False) -> None:
        self._allowed = tuple(allowed_domains)
        self._allow_private = allow_private
        self._server: asyncio.Server | None = None
        self._path: str | None = None
        self._active = 0
        self._refusing = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def active_connections(self) -> int:
        """Client connections being served now (handshaking or relaying)."""
        return self._active

    async def start(self, socket_path: str) -> None:
        """Listen on a Unix socket at socket_path (created with mode 0600-ish via the directory; the caller
        makes a private directory, since the chmod to 0600 here follows the bind). Raises OSError if it cannot
        listen, RuntimeError if already listening."""
        if self._server is not None:
            raise RuntimeError("this DomainProxy is already listening")
        self._server = await asyncio.start_unix_server(self._accept, path=socket_path, limit=HEADER_LIMIT_BYTES)
        self._path = socket_path
        os.chmod(socket_path, 0o600)

    async def close(self) -> None:
        """Stop listening and close every open client and upstream connection; idempotent; bounded (never hangs)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._path = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT_S)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        busy = self._active >= MAX_CONNECTIONS
        if busy and self._refusing >= MAX_REFUSING:
            writer.transport.abort()
            return
        if busy:
            self._refusing += 1
        else:
            self._active += 1
        self._writers.add(writer)
        # Our own task, not one the server makes from a coroutine: asyncio 3.11 logs an error for each of
        # those that close() cancels. Released in a done callback, so even a task cancelled unstarted is.
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer, busy))
        self._tasks.add(task)
        task.add_done_callback(lambda _: self._release(task, writer, busy))

    def _release(self, task: asyncio.Task[None], writer: asyncio.StreamWriter, busy: bool) -> None:
        # Counted down before the close, so a client that sees EOF finds its slot free.
        if busy:
            self._refusing -= 1
        else:
            self._active -= 1
        self._tasks.discard(task)
        self._close(writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, busy: bool) -> None:
        try:
            await self._serve(reader, writer, busy)
        except (OSError, EOFError):
            pass  # the client went away mid-handshake; there is nobody left to tell
        except Exception:
            # Last resort for one connection: a bug here must not reach the server's loop.
            logger.exception("sandbox proxy: unexpected failure on a client connection")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, busy: bool) -> None:
        socks = False
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                    first = await reader.read(1)
                    if not first:
                        return
                    socks = first == b"\x05"
                    target = await (_socks_handshake(reader, writer) if socks else _http_handshake(first, reader))
            except TimeoutError:
                raise _Refused(
                    HTTPStatus.REQUEST_TIMEOUT,
                    _Socks.GENERAL_FAILURE,
                    f"no complete request within {HANDSHAKE_TIMEOUT_S:g} s",
                ) from None
            if busy:
                raise _Refused(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    _Socks.GENERAL_FAILURE,
                    f"too many open proxy connections (limit {MAX_CONNECTIONS}); close some and retry",
                )
            if not domain_allowed(target.host, self._allowed):
                raise self._refusal(target)
            upstream_reader, upstream = await _connect(target.host, target.port, allow_private=self._allow_private)
            self._writers.add(upstream)
            if socks:
                writer.write(_socks_reply(_Socks.SUCCEEDED))
            elif target.head is None:
                writer.write(_CONNECT_OK)
            else:
                upstream.write(target.head)
            await _relay(reader, writer, upstream_reader, upstream)
        except _Refused as refused:
            await _reply_and_linger(reader, writer, refused.reply(socks))
        finally:
            if upstream is not None:
                self._close(upstream)

    def _refusal(self, target: _Target) -> _Refused:
        logger.info("sandbox proxy refused %s:%d (not in SANDBOX_ALLOWED_DOMAINS)", target.host, target.port)
        allowed = ", ".join(self._allowed) or "none"
        return _Refused(
            HTTPStatus.FORBIDDEN,
            _Socks.NOT_ALLOWED,
            f"connections to '{target.host}' are not allowed (allowed: {allowed}); "
            "add the domain to SANDBOX_ALLOWED_DOMAINS to allow it",
            {"X-Process-MCP-Refused": target.host},
        )

    def _close(self, writer: asyncio.StreamWriter) -> None:
        self._writers.discard(writer)
        writer.close()
        # close() first flushes what is buffered; a peer that stops reading must not keep the socket forever.
        if writer.transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(CLOSE_LINGER_S, writer.transport.abort)


async def _socks_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Target:
    """Read a SOCKS5 greeting and CONNECT request (the version byte already read); returns the destination."""
    (count,) = await reader.readexactly(1)
    if 0 not in await reader.readexactly(count):
        writer.write(b"\x05\xff")
        raise _Refused(HTTPStatus.BAD_REQUEST, None, "SOCKS5 client offers no 'no authentication' method")
    writer.write(b"\x05\x00")
    version, command, _, kind = await reader.readexactly(4)
    if version != 5:
        raise _bad_request(f"SOCKS request version {version}, expected 5")
    if command != 1:
        raise _Refused(HTTPStatus.BAD_REQUEST, _Socks.COMMAND_NOT_SUPPORTED, "only SOCKS5 CONNECT is supported")
    if kind == 1:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif kind == 4:
        host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
    elif kind == 3:
        (length,) = await reader.readexactly(1)
        host = (await reader.readexactly(length)).decode("latin-1")
        if not _HOST.fullmatch(host):
            raise _bad_request(f"invalid SOCKS5 domain name {host!r}")
    else:
        raise _Refused(HTTPStatus.BAD_REQUEST, _Socks.ADDRESS_TYPE_NOT_SUPPORTED, f"SOCKS5 address type {kind}")
    return _Target(host, int.from_bytes(await reader.readexactly(2), "big"))


async def _http_handshake(first: bytes, reader: asyncio.StreamReader) -> _Target:
    """Read an HTTP proxy request head (its first byte already read); returns the destination."""
    if not first.isalpha():
        raise _bad_request("expected a SOCKS5 greeting or an HTTP proxy request (e.g. 'CONNECT host:443 HTTP/1.1')")
    too_large = _Refused(
        HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, None, f"request line and headers exceed {HEADER_LIMIT_BYTES} bytes"
    )
    lines: list[str] = []
    size = 0
    line = first
    while True:
        try:
            line += await reader.readline()
        except ValueError:  # one line beyond the reader's limit, which is HEADER_LIMIT_BYTES
            raise too_large from None
        size += len(line)
        if size > HEADER_LIMIT_BYTES:
            raise too_large
        if not line.endswith(b"\n"):
            raise _bad_request("the request ended before its headers did")
        text = line.decode("latin-1").rstrip("\r\n")
        if not text:
            break
        lines.append(text)
        line = b""
    request_line, *header_lines = lines
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _bad_request(f"malformed request line {request_line[:200]!r}")
    method, target, version = parts
    if method == "CONNECT":
        return _Target(*_authority(target, None))
    absolute = _ABSOLUTE_HTTP.fullmatch(target)
    if absolute is None:
        raise _bad_request(
            f"{target[:200]!r} is not an absolute http:// URL; send 'GET http://host/path' or use CONNECT for https"
        )
    headers: list[tuple[str, str]] = []
    for header in header_lines:
        name, colon, value = header.partition(":")
        if not colon or not name or name != name.strip():
            raise _bad_request(f"malformed header line {header[:200]!r}")
        headers.append((name, value.strip()))
    authority, origin = absolute.groups()
    host, port = _authority(authority, 80)
    named = [value for name, value in headers if name.lower() == "host"]
    if len(named) > 1:
        raise _bad_request("more than one Host header")
    if named and _normalize(_authority(named[0], 80)[0]) != _normalize(host):
        raise _bad_request(
            f"the Host header {named[0][:200]!r} names another host than the request line ({host!r}); "
            "send the same host in both"
        )
    kept = [f"{name}: {value}" for name, value in headers if name.lower() not in _HOP_BY_HOP]
    if not named:
        kept.insert(0, f"Host: {authority.rpartition('@')[2]}")
    head = [f"{method} {origin if origin.startswith('/') else '/' + origin} {version}", *kept, "Connection: close"]
    return _Target(host, port, "\r\n".join([*head, "", ""]).encode("latin-1"))


def _authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port``); raises _Refused unless it is a valid host and port."""
    try:
        parts = urlsplit("//" + authority)
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    port = default_port if port is None else port
    if host is None or port is None or not _HOST.fullmatch(host):
        raise _bad_request(f"{authority[:200]!r} is not a valid host:port")
    return host, port


async def _connect(host: str, port: int, *, allow_private: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the first address of ``host`` that answers; raises _Refused saying why none did.

    The name is resolved here and the connection made to the address found, so what was checked is what
    is reached. Unless ``allow_private``, only public addresses are used (see addresses.special, which also
    reads the IPv4 address inside NAT64, 6to4, Teredo and the other IPv6 forms): an allowed name that
    resolves to the host's own or its network's services is refused (SSRF, DNS rebinding).
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            error: OSError = socket.gaierror(f"{host} resolves to no address")
            found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            why = {str(entry[4][0]): None if allow_private else addresses.special(str(entry[4][0])) for entry in found}
            usable = [entry for entry in found if why[str(entry[4][0])] is None]
            if found and not usable:
                reasons = "; ".join(f"{address} is {reason}" for address, reason in sorted(why.items()))
                logger.info("sandbox proxy refused %s: %s", host, reasons)
                raise _Refused(
                    HTTPStatus.FORBIDDEN,
                    _Socks.NOT_ALLOWED,
                    f"'{host}' resolves only to addresses the sandbox does not reach: {reasons}; "
                    "set SANDBOX_ALLOW_PRIVATE_ADDRESSES=true to allow them",
                    {"X-Process-MCP-Refused": host},
                )
            # One address at a time, so the error reported is a real one (open_connection merges them).
            for family, _, _, _, address in usable:
                try:
                    return await asyncio.open_connection(str(address[0]), port, family=family, limit=RELAY_CHUNK)
                except OSError as exc:
                    error = exc
            raise error
    except OSError as exc:
        raise _connect_failure(host, port, exc) from None


def _connect_failure(host: str, port: int, exc: OSError) -> _Refused:
    status, code = HTTPStatus.BAD_GATEWAY, _Socks.GENERAL_FAILURE
    why = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's own text names the address, not the cause
    if isinstance(exc, TimeoutError):
        status, code = HTTPStatus.GATEWAY_TIMEOUT, _Socks.HOST_UNREACHABLE
        why = f"no answer within {CONNECT_TIMEOUT_S:g} s"
    elif isinstance(exc, socket.gaierror):
        code, why = _Socks.HOST_UNREACHABLE, f"the name does not resolve ({exc.strerror})"
    elif isinstance(exc, ConnectionRefusedError):
        code = _Socks.CONNECTION_REFUSED
    elif exc.errno == errno.ENETUNREACH:
        code = _Socks.NETWORK_UNREACHABLE
    elif exc.errno == errno.EHOSTUNREACH:
        code = _Socks.HOST_UNREACHABLE
    return _Refused(status, code, f"could not connect to {host}:{port}: {why}")


async def _relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until both directions end; an EOF is passed on as a half-close while the other runs."""
    running = 2

    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        nonlocal running
        try:
            while chunk := await source.read(RELAY_CHUNK):
                sink.write(chunk)
                await sink.drain()
            running -= 1
            # The last direction to end leaves its EOF to the close that follows, so a client sees EOF
            # only once the proxy has let go of the connection (and its slot).
            if running and sink.can_write_eof():
                sink.write_eof()
        except OSError:
            # A reset on either side: nothing more can flow, and aborting wakes the other direction.
            client_writer.transport.abort()
            upstream_writer.transport.abort()

    await asyncio.gather(pump(client_reader, upstream_writer), pump(upstream_reader, client_writer))


async def _reply_and_linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: bytes) -> None:
    """Send an error reply and end our side, then drop what the client still sends until it closes
    (bounded): closing with unread input resets the connection and can destroy the reply unread."""
    writer.write(reply)
    with contextlib.suppress(TimeoutError, OSError):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(CLOSE_LINGER_S):
            while await reader.read(RELAY_CHUNK):
                pass
