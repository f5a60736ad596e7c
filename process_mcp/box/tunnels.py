"""The agent's tunnels: connections processes in the box make to the proxy port, each carried to the
server's egress proxy over the stream as a channel of its own.

The server asks the agent to listen on a loopback port (PROXY); each connection accepted there is a
tunnel (TUNNEL_OPEN), its bytes go both ways in TUNNEL_DATA frames, bounded by a window each side
grants the other with TUNNEL_ACK, and each side's end is a TUNNEL_CLOSE. At most MAX_TUNNELS are open;
further connections wait in the listener's backlog. Shipped into the box with the agent: standard
library only, and syntax Python 3.8 parses.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import sys
from collections.abc import Callable

try:
    from . import protocol
except ImportError:  # in the box: the loader registered it under this name first
    import process_mcp_box_protocol as protocol  # type: ignore[import-not-found,no-redef]

TUNNEL_CHUNK = 64 * 1024
"""Bytes moved between a tunnel's socket and the stream per call."""


class Tunnel:
    """One connection a process made to the proxy port, carried to the server over the stream."""

    def __init__(self, channel: int, sock: socket.socket) -> None:
        self.channel = channel
        self.sock = sock
        self.window = protocol.TUNNEL_WINDOW  # bytes we may still send the server before it acknowledges
        self.out = bytearray()  # from the server, not yet written to the process
        self.reading = True  # the process may still send
        self.peer_done = False  # the server sends no more
        self.broken = False  # the process's end failed: what the server sends is dropped
        self.shut = False
        self.events = 0
        self.port = 0  # of a forward: the port it connects to
        self.untried: list[tuple[int, str]] = []  # of a forward still connecting: the addresses after this one
        self.connecting = False  # a forward's connection is not yet made (nothing is written meanwhile)


class Tunnels:
    """Every tunnel of one agent. ``send`` queues a frame (header, payload) for the server; ``may_read``
    says whether the stream to the server has room, without which no tunnel is read."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        send: Callable[[bytes, bytes], None],
        may_read: Callable[[], bool],
    ) -> None:
        self.selector = selector
        self.send = send
        self.may_read = may_read
        self.open: dict[int, Tunnel] = {}  # by socket descriptor
        self.next_channel = protocol.TUNNEL_BASE
        self.listener: socket.socket | None = None
        self.accepting = False  # the listener is watched (fewer than MAX_TUNNELS are open)

    def listen(self, port: int) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(64)
        except OSError as exc:
            listener.close()
            sys.stderr.write(f"process-mcp agent: cannot listen on 127.0.0.1:{port} for the proxy: {exc}\n")
            return
        listener.setblocking(False)
        self.listener = listener
        self._accept_while_room()

    def forward(self, channel: int, port: int) -> None:
        """Connect to loopback ``port`` (127.0.0.1, else ::1: a server on "localhost" may listen on
        either) and carry the connection on ``channel``."""
        self._forward(channel, port, [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], None)

    def _forward(self, channel: int, port: int, addresses: list[tuple[int, str]], previous: Tunnel | None) -> None:
        """Connect to the first of ``addresses`` that takes a connection on ``port``, in place of
        ``previous`` (an attempt that was refused: what the server sent meanwhile, and whether it has
        ended its side, carry over). A non-blocking connect says only later whether it was refused
        (``_connected``); the next address is tried then."""
        while addresses and 0 < port < 65536 and (previous is not None or len(self.open) < protocol.MAX_TUNNELS):
            family, host = addresses.pop(0)
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)  # no IPv6 on this kernel, no descriptors
            except OSError:
                continue
            sock.setblocking(False)
            result = sock.connect_ex((host, port))
            if result not in (0, errno.EINPROGRESS) and addresses:
                sock.close()
                continue
            tunnel = Tunnel(channel, sock)
            tunnel.port, tunnel.untried = port, addresses
            if previous is not None:
                tunnel.out, tunnel.peer_done = previous.out, previous.peer_done
                del self.open[previous.sock.fileno()]
                previous.sock.close()
            self.open[sock.fileno()] = tunnel
            if result in (0, errno.EINPROGRESS):
                tunnel.connecting = result == errno.EINPROGRESS
                self._io(tunnel)
            else:
                self._failed(tunnel)
            return
        if previous is not None:
            self._failed(previous)
        else:  # nothing to connect with: the forward ends at once, and is never counted here
            self.send(protocol.frame(protocol.TUNNEL_CLOSE, channel), b"")

    def _connected(self, tunnel: Tunnel) -> bool:
        """Whether a forward's connection was made; if it was refused, the next address is tried in its
        place (unless the server reset its side meanwhile), or it fails (``_failed``)."""
        error = tunnel.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not error:
            tunnel.connecting = False
            return True
        if tunnel.events:
            self.selector.unregister(tunnel.sock)
            tunnel.events = 0
        if tunnel.broken:
            self._failed(tunnel)
        else:
            self._forward(tunnel.channel, tunnel.port, tunnel.untried, tunnel)
        return False

    def _failed(self, tunnel: Tunnel) -> None:
        """A forward that nothing took: its end, as a connection whose process end failed (what the server
        sent, and sends until its own end, is acknowledged and dropped). It stays counted until the server
        has ended its side too, as every tunnel does."""
        tunnel.connecting = False
        tunnel.broken = True
        if tunnel.out:
            self.send(protocol.frame(protocol.TUNNEL_ACK, tunnel.channel, protocol.COUNT.pack(len(tunnel.out))), b"")
            tunnel.out.clear()
        if tunnel.reading:
            tunnel.reading = False
            self.send(protocol.frame(protocol.TUNNEL_CLOSE, tunnel.channel), b"")
        self._io(tunnel)

    def handle(self, kind: int, channel: int, payload: bytes) -> None:
        """A TUNNEL_DATA, TUNNEL_ACK or TUNNEL_CLOSE frame from the server."""
        tunnel = next((t for t in self.open.values() if t.channel == channel), None)
        if tunnel is None:
            return  # already closed here
        if kind == protocol.TUNNEL_DATA:
            if len(tunnel.out) + len(payload) > protocol.TUNNEL_WINDOW:
                raise protocol.ProtocolError(f"tunnel {channel} overran its window")
            if tunnel.broken:  # nothing can be delivered: acknowledged, so the server's side drains
                self.send(protocol.frame(protocol.TUNNEL_ACK, channel, protocol.COUNT.pack(len(payload))), b"")
                return
            tunnel.out += payload
        elif kind == protocol.TUNNEL_ACK:
            tunnel.window += protocol.COUNT.unpack(payload)[0]
        else:
            tunnel.peer_done = True
            if payload == protocol.TUNNEL_RESET:  # nobody takes what the process sends: drop the connection
                tunnel.out.clear()
                tunnel.broken = True
                with contextlib.suppress(OSError):  # closed with a reset: the process's next write fails
                    tunnel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if tunnel.reading:
                    tunnel.reading = False
                    self.send(protocol.frame(protocol.TUNNEL_CLOSE, tunnel.channel), b"")
        self._io(tunnel)

    def rewatch(self) -> None:
        """Watch every tunnel again for what it can do now (the stream to the server filled or emptied)."""
        for tunnel in list(self.open.values()):
            self._watch(tunnel)

    def _accept_while_room(self) -> None:
        """Accept connections while fewer than MAX_TUNNELS are open; beyond, they wait in the backlog."""
        if self.listener is None:
            return
        room = len(self.open) < protocol.MAX_TUNNELS
        if room != self.accepting:
            if room:
                self.selector.register(self.listener, selectors.EVENT_READ, self._on_connection)
            else:
                self.selector.unregister(self.listener)
            self.accepting = room

    def _on_connection(self, fd: int, events: int) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        tunnel = Tunnel(self.next_channel, sock)
        self.next_channel += 1
        self.open[sock.fileno()] = tunnel
        self.send(protocol.frame(protocol.TUNNEL_OPEN, tunnel.channel), b"")
        self._watch(tunnel)
        self._accept_while_room()

    def _watch(self, tunnel: Tunnel) -> None:
        """Watch for what the tunnel can do now: read while the server has room, write while data waits
        (or until its connection is made)."""
        wanted = selectors.EVENT_READ if tunnel.reading and tunnel.window > 0 and self.may_read() else 0
        if tunnel.connecting:
            wanted = selectors.EVENT_WRITE
        elif tunnel.out:
            wanted |= selectors.EVENT_WRITE
        if wanted == tunnel.events:
            return
        if not tunnel.events:
            self.selector.register(tunnel.sock, wanted, self._on_tunnel)
        elif not wanted:
            self.selector.unregister(tunnel.sock)
        else:
            self.selector.modify(tunnel.sock, wanted, self._on_tunnel)
        tunnel.events = wanted

    def _on_tunnel(self, fd: int, events: int) -> None:
        tunnel = self.open.get(fd)
        if tunnel is None or (tunnel.connecting and not self._connected(tunnel)):
            return
        if events & selectors.EVENT_READ and tunnel.reading:
            try:
                data = tunnel.sock.recv(min(tunnel.window, TUNNEL_CHUNK))
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data:
                tunnel.window -= len(data)
                self.send(protocol.HEADER.pack(protocol.TUNNEL_DATA, tunnel.channel, len(data)), data)
            elif data is not None:
                tunnel.reading = False
                self.send(protocol.frame(protocol.TUNNEL_CLOSE, tunnel.channel), b"")
        self._io(tunnel)

    def _io(self, tunnel: Tunnel) -> None:
        """Write what the server sent, acknowledge it, pass its end on, and close when both ends are done."""
        if tunnel.connecting:
            self._watch(tunnel)
            return
        written = 0
        try:
            while tunnel.out:
                sent = tunnel.sock.send(tunnel.out[:TUNNEL_CHUNK])
                del tunnel.out[:sent]
                written += sent
        except BlockingIOError:
            pass
        except OSError:  # the process closed its end: nothing more can be delivered
            written += len(tunnel.out)  # acknowledged all the same, so the server's side drains
            tunnel.out.clear()
            tunnel.broken = True
            if tunnel.reading:
                tunnel.reading = False
                self.send(protocol.frame(protocol.TUNNEL_CLOSE, tunnel.channel), b"")
        if written:
            self.send(protocol.frame(protocol.TUNNEL_ACK, tunnel.channel, protocol.COUNT.pack(written)), b"")
        if tunnel.peer_done and not tunnel.out and not tunnel.shut:
            tunnel.shut = True
            with contextlib.suppress(OSError):
                tunnel.sock.shutdown(socket.SHUT_WR)
        # Open until both sides have closed and each has seen the other's close: the server counts it the
        # same way, so the two never disagree on how many are open (see protocol.MAX_TUNNELS).
        if tunnel.shut and not tunnel.reading:
            if tunnel.events:
                self.selector.unregister(tunnel.sock)
            del self.open[tunnel.sock.fileno()]
            tunnel.sock.close()
            self._accept_while_room()
            return
        self._watch(tunnel)
