"""The HTTP server's connections, bounded so that no client can hold them all.

uvicorn counts every open connection against its limit, also one that has sent nothing, and times a
connection out only after a response; so a client that opens connections and stays silent (or sends
its request a byte at a time) can take every slot for as long as it likes. Here:

- a connection must send its request head within ``HEADER_TIMEOUT_S`` (of opening, or of its previous
  response) and its body within ``BODY_TIMEOUT_S`` of the head, or it is closed;
- only connections busy with a request count as served (``max_connections``; beyond, 503), and one
  with no request in progress never keeps a newcomer out: when the server, or the newcomer's address,
  holds as many connections as it may, an idle one is closed to make room;
- one client address holds at most ``per_address`` connections (an IPv6 address counts by its /64,
  which one host usually has whole); when none of its own is idle, its new connection's request gets 503.

A request without a valid token is answered at once and leaves its connection idle, so connections
that do not authenticate can use room only while nobody else needs it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import struct
import termios
from collections.abc import Callable, Coroutine
from ipaddress import IPv6Address, IPv6Network
from typing import Any, ClassVar, Literal

import h11
from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from ..policy.addresses import parse

logger = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0
"""How long a connection may take to send a request head after it opens or after its last response;
a client sends one at once, so only a silent or dribbling connection reaches it."""

BODY_TIMEOUT_S = 30.0
"""How long a request body may take to arrive after its head: 4 MiB (the default largest body) at
140 kB/s."""

IPV6_PREFIX = 64
"""An IPv6 client counts by its /64: one host or site is usually given a whole /64, so counting single
addresses would let it open as many connections as it has addresses."""

UPGRADE_READ_LIMIT = 64 * 1024
"""Most bytes of an upgraded connection held while the other side is slow to take them."""

State = Literal["waiting", "receiving", "serving"]
Upgrade = Callable[[Scope, asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


class ConnectionGuard:
    """The open connections of one server: which are idle (no request in progress), in the order they
    became so, and how many each address holds."""

    def __init__(self, max_connections: int, per_address: int) -> None:
        self.max_connections = max_connections
        self.per_address = per_address
        self.upgrade: Upgrade | None = None
        """What carries a connection that asks for a WebSocket under ``upgrade_prefix``, whole."""
        self.upgrade_prefix = "/"
        self._idle: dict[GuardedProtocol, None] = {}  # an ordered set
        self._addresses: dict[str, set[GuardedProtocol]] = {}
        self._open = 0

    @property
    def busy(self) -> int:
        """Connections with a request in progress."""
        return self._open - len(self._idle)

    def opened(self, connection: GuardedProtocol) -> bool:
        """Admit ``connection`` (idle until its request head arrives), closing idle ones to keep within the
        limits; False if its address holds as many connections as it may and none of them is idle."""
        held = self._addresses.setdefault(connection.address, set())
        held.add(connection)
        self._idle[connection] = None
        self._open += 1
        if len(held) > self.per_address and not self._evict(connection, same_address=True):
            return False
        if self._open > self.max_connections:
            # With none idle, every other connection is busy, and this one's request gets 503.
            self._evict(connection, same_address=False)
        return True

    def started(self, connection: GuardedProtocol) -> None:
        """``connection``'s request head arrived: it is busy, and not closed to make room."""
        self._idle.pop(connection, None)

    def finished(self, connection: GuardedProtocol) -> None:
        """``connection`` answered its request and waits for another."""
        if connection in self._addresses.get(connection.address, ()):
            self._idle.pop(connection, None)
            self._idle[connection] = None

    def closed(self, connection: GuardedProtocol) -> None:
        """``connection`` is gone (safe to repeat)."""
        held = self._addresses.get(connection.address)
        if held is None or connection not in held:
            return
        held.discard(connection)
        if not held:
            del self._addresses[connection.address]
        self._idle.pop(connection, None)
        self._open -= 1

    def _evict(self, newcomer: GuardedProtocol, *, same_address: bool) -> bool:
        """Close an idle connection (of ``newcomer``'s address only, with ``same_address``); False if there
        is none. One that never sent a request goes first, the longest idle first (a client sends its
        request at once, so the newest is the one most likely to be about to); one kept alive after a
        response goes only when there is no such one, since its client may be about to use it. One with
        bytes the loop has not read yet (a request on its way) stays."""
        for kept_alive in (False, True):
            for other in self._idle:
                if (
                    other is not newcomer
                    and (other.served > 0) == kept_alive
                    and (not same_address or other.address == newcomer.address)
                    and not other.has_input()
                ):
                    self.closed(other)
                    other.evict()
                    return True
        return False

    def protocol(self) -> type[GuardedProtocol]:
        """The HTTP protocol class for uvicorn (``Config(http=...)``) whose connections this guard keeps."""
        return type("BoundGuardedProtocol", (GuardedProtocol,), {"guard": self})


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol, with the deadlines and limits of its server's ``ConnectionGuard``.

    uvicorn's own limit (``limit_concurrency``) must be off: it counts idle connections, and requests
    whose answers are sent but whose tasks are still finishing."""

    guard: ClassVar[ConnectionGuard]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._application = self.app
        self.app = self._admit  # what uvicorn runs for each request
        self.address = ""
        self.served = 0
        """Requests this connection has had answered."""
        self._refused = False
        self._deadline: asyncio.TimerHandle | None = None
        self._state: tuple[State, object] = ("waiting", None)  # and the request it is about
        self._handed_over = False  # to the guard's ``upgrade``: no longer an HTTP connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.address = address_key(self.client)
        self._refused = not self.guard.opened(self)
        self._arm(HEADER_TIMEOUT_S)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.closed(self)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        self._follow()

    def _should_upgrade(self) -> bool:
        path = self.scope["path"] if self.scope else ""
        if self.guard.upgrade is not None and path.startswith(self.guard.upgrade_prefix):
            return self._get_upgrade() == b"websocket"
        return super()._should_upgrade()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        """Hand the connection, whole, to the guard's ``upgrade``; it stays busy (never closed to make
        room) until that ends."""
        upgrade = self.guard.upgrade
        assert upgrade is not None
        self._handed_over = True
        self._disarm()
        self.guard.started(self)
        if self._refused or self.guard.busy > self.guard.max_connections:
            # As ``_admit`` answers a request: this address, or the server, has no room for another.
            body = json.dumps(ADDRESS_FULL if self._refused else SERVER_FULL).encode()
            self.transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            self.guard.closed(self)
            self.transport.close()
            return
        self.connections.discard(self)  # uvicorn's, as for its own WebSocket protocols
        reader = asyncio.StreamReader(limit=UPGRADE_READ_LIMIT)
        reader.feed_data(self.conn.trailing_data[0])  # what the client sent after its request head
        carrier = asyncio.StreamReaderProtocol(reader)
        carrier.connection_made(self.transport)
        self.transport.set_protocol(carrier)
        writer = asyncio.StreamWriter(self.transport, carrier, reader, self.loop)
        task = self.loop.create_task(upgrade(dict(self.scope), reader, writer))

        def ended(task: asyncio.Task[None]) -> None:
            self.guard.closed(self)
            self.transport.close()
            if not task.cancelled() and task.exception() is not None:
                logger.warning("a carried connection failed: %s", task.exception())

        task.add_done_callback(ended)

    def has_input(self) -> bool:
        """Whether bytes have arrived on the connection that the loop has not read yet."""
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            pending = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
        except OSError:
            return False
        return bool(struct.unpack("i", pending)[0])

    def evict(self) -> None:
        """Close this idle connection now, to make room for another."""
        self._disarm()
        self.connections.discard(self)  # uvicorn counts it until the loop reports it lost
        self.transport.close()

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the application for a request, unless its connection or the server has no room for it."""
        if scope["type"] == "http" and self._refused:
            await _refuse(send, ADDRESS_FULL, close=True)
        elif scope["type"] == "http" and self.guard.busy > self.guard.max_connections:
            await _refuse(send, SERVER_FULL, close=False)
        else:
            await self._application(scope, receive, send)

    def _follow(self) -> None:
        """After each event: tell the guard whether a request is in progress, and set the deadline of the
        state the connection is now in (waiting for a head, receiving a body, or answering)."""
        if self._handed_over:
            return
        cycle = self.cycle
        state: State = "waiting"
        if cycle is not None and not cycle.response_complete:
            state = "receiving" if cycle.more_body else "serving"
        if (state, cycle) == self._state or self.transport.is_closing():
            return
        self._state = (state, cycle)
        if state == "waiting":
            self.served += 1
            self.guard.finished(self)
            self._arm(HEADER_TIMEOUT_S)
        elif state == "receiving":
            self.guard.started(self)
            self._arm(BODY_TIMEOUT_S)
        else:
            self.guard.started(self)
            self._disarm()  # the whole request is in: however long the answer takes is the application's

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        """The deadline of the state the connection is in passed: close it."""
        self._deadline = None
        self.guard.closed(self)
        self.transport.close()


def address_key(client: tuple[str, int] | None) -> str:
    """The address ``client`` counts under: its IP address (IPv4-mapped as IPv4), an IPv6 one's /64."""
    if client is None:
        return ""
    ip = parse(client[0].partition("%")[0])
    if ip is None:
        return client[0]
    if isinstance(ip, IPv6Address):
        return str(IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


ADDRESS_FULL = {
    "error": "too_many_connections",
    "error_description": "this client address holds as many connections busy with requests as one address "
    "may (PROCESS_HTTP_MAX_CONNECTIONS_PER_ADDRESS); send requests on the ones it has, or wait for one to finish",
}
SERVER_FULL = {
    "error": "too_many_connections",
    "error_description": "the server is answering as many requests as it may at once "
    "(PROCESS_HTTP_MAX_CONNECTIONS); try again in a moment",
}


async def _refuse(send: Send, body: dict[str, str], *, close: bool) -> None:
    """Answer 503 with ``body``; with ``close``, the connection closes after it."""
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
