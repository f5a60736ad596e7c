"""The sandbox's domain proxy, over real sockets: a real proxy on a Unix socket, real local upstreams."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from process_mcp.policy import egress as proxy_module
from process_mcp.policy.addresses import is_loopback, special
from process_mcp.policy.egress import HEADER_LIMIT_BYTES, DomainProxy, domain_allowed

from ..helpers import WAIT_S

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
EOF_MARK = b"<eof>"


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    return str(tmp_path / "p.sock")


@contextlib.asynccontextmanager
async def serving(
    socket_path: str, allowed: Sequence[str], *, allow_private: bool = True
) -> AsyncIterator[DomainProxy]:
    """A proxy on ``socket_path``; the upstreams in these tests are on loopback, so private addresses are
    allowed unless a test says otherwise."""
    proxy = DomainProxy(allowed, allow_private=allow_private)
    await proxy.start(socket_path)
    try:
        yield proxy
    finally:
        with anyio.fail_after(WAIT_S):
            await proxy.close()


@contextlib.asynccontextmanager
async def upstream(handler: Handler) -> AsyncIterator[int]:
    """A real TCP server on 127.0.0.1; yields its port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with anyio.fail_after(WAIT_S):
            await server.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo everything; on EOF, send EOF_MARK and close (shows the other direction outlives a half-close)."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write(EOF_MARK)
        await writer.drain()
    writer.close()


class HttpUpstream:
    """Answers one request per connection with ``body``, and records each request head it received."""

    def __init__(self, body: bytes = b"hello from upstream") -> None:
        self.body = body
        self.heads: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(self.body))
            writer.write(self.body)
            await writer.drain()
        writer.close()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port with a bound socket that does not listen, so connecting is refused (and nobody can take it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def send(socket_path: str, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(data)
    return reader, writer


async def exchange(socket_path: str, data: bytes) -> bytes:
    """Send ``data`` and return everything the proxy answers until it closes."""
    reader, writer = await send(socket_path, data)
    try:
        return await reader.read()
    finally:
        writer.close()


async def open_tunnel(socket_path: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await send(socket_path, f"CONNECT localhost:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection established\r\n\r\n"
    return reader, writer


async def assert_tunnel_echoes(socket_path: str, port: int) -> None:
    reader, writer = await open_tunnel(socket_path, port)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.write_eof()
    assert await reader.read() == EOF_MARK
    writer.close()


def socks_request(address: bytes, port: int, command: int = 1) -> bytes:
    return b"\x05\x01\x00" + bytes([5, command, 0]) + address + port.to_bytes(2, "big")


def socks_domain(name: str) -> bytes:
    return b"\x03" + bytes([len(name)]) + name.encode()


def socks_ipv4(address: str) -> bytes:
    return b"\x01" + socket.inet_aton(address)


async def socks_connect(
    socket_path: str, address: bytes, port: int
) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await send(socket_path, socks_request(address, port))
    assert await reader.readexactly(2) == b"\x05\x00"
    reply = await reader.readexactly(10)
    assert reply[0] == 5
    return reply[1], reader, writer


def http_parts(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, headers, body


@pytest.mark.parametrize(
    ("host", "patterns", "allowed"),
    [
        ("github.com", ["github.com"], True),
        ("GitHub.COM", ["github.com"], True),
        ("github.com.", ["github.com"], True),
        ("github.com", ["GITHUB.com."], True),
        ("api.github.com", ["github.com"], False),
        ("notgithub.com", ["github.com"], False),
        ("x.npmjs.org", ["*.npmjs.org"], True),
        ("y.x.npmjs.org", ["*.npmjs.org"], True),
        ("npmjs.org", ["*.npmjs.org"], False),
        ("evilnpmjs.org", ["*.npmjs.org"], False),
        ("anything.example", ["*"], True),
        ("10.1.2.3", ["*"], True),
        ("github.com", [], False),
        ("127.0.0.1", ["127.0.0.1"], True),
        ("127.0.0.1", ["localhost"], False),
        ("127.0.0.1", ["*.0.0.1"], False),
        ("127.0.0.2", ["127.0.0.1"], False),
        ("::1", ["0:0:0:0:0:0:0:1"], True),
        ("0:0:0:0:0:0:0:1", ["::1"], True),
        ("::1", ["[::1]"], True),
        ("::2", ["::1"], False),
        ("::ffff:127.0.0.1", ["127.0.0.1"], True),
        ("127.0.0.1", ["::ffff:7f00:1"], True),
        ("64:ff9b::7f00:1", ["127.0.0.1"], False),
        ("::7f00:1", ["127.0.0.1"], False),
        ("", ["github.com"], False),
        ("", [""], False),
    ],
)
def test_domain_allowed_follows_the_pattern_rules(host: str, patterns: list[str], allowed: bool) -> None:
    assert domain_allowed(host, patterns) is allowed


# Addresses that are not public, each with the reason a refusal gives; the IPv6 forms that embed an IPv4
# address are judged by it (127.0.0.1 is 7f00:1, 169.254.169.254 is a9fe:a9fe, 10.0.0.1 is a00:1; a Teredo
# client address is stored inverted, so 127.0.0.1 is 80ff:fffe and 8.8.4.4 is f7f7:fbfb).
FORBIDDEN = [
    ("64:ff9b::7f00:1", "127.0.0.1 in NAT64 form (64:ff9b::/96), which is loopback (127.0.0.0/8)"),
    ("64:ff9b::a9fe:a9fe", "169.254.169.254 in NAT64 form (64:ff9b::/96), which is link-local (169.254.0.0/16)"),
    ("64:ff9b:1::a00:1", "10.0.0.1 in local-use NAT64 form (64:ff9b:1::/48), which is private (10.0.0.0/8)"),
    ("64:ff9b:1:7f00:0:100::", "127.0.0.1 in local-use NAT64 form (64:ff9b:1::/48), which is loopback"),
    ("::7f00:1", "127.0.0.1 in IPv4-compatible form (::/96), which is loopback (127.0.0.0/8)"),
    ("::ffff:127.0.0.1", "127.0.0.1 in IPv4-mapped form (::ffff:0:0/96), which is loopback (127.0.0.0/8)"),
    ("::ffff:0:7f00:1", "127.0.0.1 in SIIT IPv4-translated form (::ffff:0:0:0/96), which is loopback"),
    ("2002:7f00:1::1", "127.0.0.1 in 6to4 form (2002::/16), which is loopback (127.0.0.0/8)"),
    ("2002:a9fe:a9fe::1", "169.254.169.254 in 6to4 form (2002::/16), which is link-local"),
    ("2001:0:808:808::80ff:fffe", "127.0.0.1 in Teredo form (2001::/32), which is loopback"),
    ("2001:0:a9fe:a9fe::f7f7:fbfb", "169.254.169.254 in Teredo form (2001::/32), which is link-local"),
    ("fec0::1", "site-local, deprecated (fec0::/10)"),
    ("::", "unspecified (::/128)"),
    ("::1", "loopback (::1/128)"),
    ("ff02::1", "multicast (ff00::/8)"),
    ("fd00::1", "unique local, private (fc00::/7)"),
    ("fe80::1", "link-local (fe80::/10)"),
    ("2001:db8::1", "documentation (2001:db8::/32)"),
    ("3fff::1", "documentation (3fff::/20)"),
    ("2001:2::1", "benchmarking (2001:2::/48)"),
    ("100::1", "reserved (100::/64)"),
    ("4000::1", "reserved, outside global unicast (2000::/3)"),
    ("0.0.0.0", "unspecified (0.0.0.0/32)"),
    ("0.1.2.3", "'this network' (0.0.0.0/8)"),
    ("127.0.0.1", "loopback (127.0.0.0/8)"),
    ("10.1.2.3", "private (10.0.0.0/8)"),
    ("100.64.0.1", "shared, carrier-grade NAT (100.64.0.0/10)"),
    ("169.254.169.254", "link-local (169.254.0.0/16)"),
    ("192.0.2.1", "documentation (192.0.2.0/24)"),
    ("198.18.0.1", "benchmarking (198.18.0.0/15)"),
    ("224.0.0.1", "multicast (224.0.0.0/4)"),
    ("255.255.255.255", "reserved (240.0.0.0/4)"),
]


@pytest.mark.parametrize(("address", "reason"), FORBIDDEN)
def test_a_special_purpose_address_is_not_public_also_when_an_ipv6_form_embeds_it(address: str, reason: str) -> None:
    found = special(address)
    assert found is not None
    assert reason in str(found)


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "2001:4860:4860::8888",
        "2606:4700:4700::1111",
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8: how an IPv6-only host behind DNS64 reaches an IPv4-only site
        "64:ff9b:1::808:808",
        "::ffff:8.8.8.8",
        "2002:808:808::1",
        "2001:0:808:808::f7f7:fbfb",  # Teredo, server 8.8.8.8, client 8.8.4.4
    ],
)
def test_a_public_address_stays_public_in_every_form(address: str) -> None:
    assert special(address) is None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("::ffff:127.0.0.1", True),  # how a dual-stack socket shows a client on 127.0.0.1
        # These deliver to 127.0.0.1 through a translator or relay: as a listening or peer address they
        # are not this machine, so they must not pass for loopback (no authentication, /metrics).
        ("64:ff9b::7f00:1", False),
        ("64:ff9b:1::7f00:1", False),
        ("::7f00:1", False),
        ("::ffff:0:7f00:1", False),
        ("2002:7f00:1::1", False),
        ("2001:0:808:808::80ff:fffe", False),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("box.example.com", False),
    ],
)
def test_only_this_machines_own_loopback_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("address", "reason"), FORBIDDEN)
async def test_connect_and_socks5_to_a_non_public_address_are_refused_naming_why(
    socket_path: str, address: str, reason: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were the filter to let one through, the proxy would try the network: a short bound keeps the test short.
    monkeypatch.setattr(proxy_module, "CONNECT_TIMEOUT_S", 1.0)
    caplog.set_level(logging.INFO, logger="process_mcp.policy.egress")
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["*"], allow_private=False):
            literal = f"[{address}]" if ":" in address else address
            response = await exchange(socket_path, f"CONNECT {literal}:443 HTTP/1.1\r\n\r\n".encode())
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            kind = b"\x04" if ":" in address else b"\x01"
            code, reader, writer = await socks_connect(socket_path, kind + socket.inet_pton(family, address), 443)
            assert await reader.read() == b""
            writer.close()
    status, headers, body = http_parts(response)
    assert status == "HTTP/1.1 403 Forbidden", body
    assert headers["x-process-mcp-refused"] == address
    assert reason.encode() in body
    assert b"SANDBOX_ALLOW_PRIVATE_ADDRESSES=true" in body
    assert code == 2  # "connection not allowed by ruleset"; the log says why
    assert caplog.text.count(reason) == 2


async def test_http_connect_to_an_allowed_host_relays_bytes_both_ways(socket_path: str) -> None:
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost"]) as proxy, upstream(echo) as port:
            await assert_tunnel_echoes(socket_path, port)
            assert proxy.active_connections == 0


async def test_http_connect_to_a_refused_host_gets_403_naming_the_host(
    socket_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="process_mcp.policy.egress")
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["github.com", "*.npmjs.org"]):
            response = await exchange(socket_path, b"CONNECT refused.example:443 HTTP/1.1\r\n\r\n")
    status, headers, body = http_parts(response)
    assert status == "HTTP/1.1 403 Forbidden"
    assert headers["x-process-mcp-refused"] == "refused.example"
    assert headers["content-type"] == "text/plain"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert body == (
        b"process-mcp sandbox: connections to 'refused.example' are not allowed "
        b"(allowed: github.com, *.npmjs.org); add the domain to SANDBOX_ALLOWED_DOMAINS to allow it\n"
    )
    assert "refused.example" in caplog.text


async def test_plain_get_reaches_the_upstream_in_origin_form_and_the_response_comes_back(socket_path: str) -> None:
    http = HttpUpstream()
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost"]), upstream(http) as port:
            response = await exchange(
                socket_path,
                f"GET http://localhost:{port}/path?q=1 HTTP/1.1\r\nHost: localhost:{port}\r\n"
                "Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\nKeep-Alive: 5\r\n"
                "Connection: keep-alive\r\nX-Kept: yes\r\n\r\n".encode(),
            )
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"\r\n\r\nhello from upstream")
    (head,) = http.heads
    assert head == (
        f"GET /path?q=1 HTTP/1.1\r\nHost: localhost:{port}\r\nX-Kept: yes\r\nConnection: close\r\n\r\n".encode()
    )


async def test_plain_get_to_a_refused_host_gets_403(socket_path: str) -> None:
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost"]):
            response = await exchange(
                socket_path, b"GET http://refused.example/x HTTP/1.1\r\nHost: refused.example\r\n\r\n"
            )
    status, headers, body = http_parts(response)
    assert status == "HTTP/1.1 403 Forbidden"
    assert headers["x-process-mcp-refused"] == "refused.example"
    assert b"'refused.example'" in body
    assert b"SANDBOX_ALLOWED_DOMAINS" in body


async def test_socks5_connect_by_domain_name_relays_to_an_allowed_host(socket_path: str) -> None:
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost"]), upstream(echo) as port:
            code, reader, writer = await socks_connect(socket_path, socks_domain("localhost"), port)
            assert code == 0
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.write_eof()
            assert await reader.read() == EOF_MARK
            writer.close()


async def test_socks5_connect_to_a_refused_domain_is_answered_not_allowed(socket_path: str) -> None:
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost"]):
            code, reader, writer = await socks_connect(socket_path, socks_domain("refused.example"), 443)
            assert await reader.read() == b""
            writer.close()
    assert code == 2


@pytest.mark.parametrize(("allowed", "code"), [(["localhost"], 2), (["localhost", "127.0.0.1"], 0)])
async def test_socks5_ipv4_literal_is_allowed_only_when_listed(socket_path: str, allowed: list[str], code: int) -> None:
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, allowed), upstream(echo) as port:
            got, _, writer = await socks_connect(socket_path, socks_ipv4("127.0.0.1"), port)
            writer.close()
    assert got == code


async def test_socks5_ipv6_literal_is_refused_unless_listed(socket_path: str) -> None:
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost", "127.0.0.1"]):
            got, _, writer = await socks_connect(socket_path, b"\x04" + socket.inet_pton(socket.AF_INET6, "::1"), 80)
            writer.close()
    assert got == 2


async def test_an_upstream_that_refuses_gives_502_over_http_and_connection_refused_over_socks(
    socket_path: str, refused_port: int
) -> None:
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost"]):
            response = await exchange(socket_path, f"CONNECT localhost:{refused_port} HTTP/1.1\r\n\r\n".encode())
            code, _, writer = await socks_connect(socket_path, socks_domain("localhost"), refused_port)
            writer.close()
    status, _, body = http_parts(response)
    assert status == "HTTP/1.1 502 Bad Gateway"
    assert body == f"process-mcp sandbox: could not connect to localhost:{refused_port}: Connection refused\n".encode()
    assert code == 5


@pytest.mark.parametrize(
    ("request_bytes", "reply_prefix"),
    [
        pytest.param(b"hello there\r\n\r\n", b"HTTP/1.1 400 ", id="garbage-line"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00", b"HTTP/1.1 400 ", id="tls-to-the-proxy"),
        pytest.param(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 400 ", id="origin-form"),
        pytest.param(b"GET https://localhost/ HTTP/1.1\r\n\r\n", b"HTTP/1.1 400 ", id="https-absolute-form"),
        pytest.param(b"CONNECT localhost HTTP/1.1\r\n\r\n", b"HTTP/1.1 400 ", id="connect-without-port"),
        pytest.param(b"GET http://[::1/ HTTP/1.1\r\n\r\n", b"HTTP/1.1 400 ", id="bad-ipv6-literal"),
        pytest.param(b"GET http://a b/ HTTP/1.1\r\n\r\n", b"HTTP/1.1 400 ", id="four-words"),
        pytest.param(b"GET http://localhost/ HTTP/1.1\r\nNoColon\r\n\r\n", b"HTTP/1.1 400 ", id="bad-header"),
        pytest.param(
            b"GET http://localhost/ HTTP/1.1\r\nX-Big: " + b"a" * HEADER_LIMIT_BYTES + b"\r\n\r\n",
            b"HTTP/1.1 431 ",
            id="one-header-over-the-limit",
        ),
        pytest.param(
            b"GET http://localhost/ HTTP/1.1\r\n" + b"X-Many: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" * 1000 + b"\r\n",
            b"HTTP/1.1 431 ",
            id="headers-over-the-limit",
        ),
        pytest.param(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b"HTTP/1.1 400 ", id="socks4"),
        pytest.param(b"\x05\x01\x02", b"\x05\xff", id="socks5-without-no-auth"),
        pytest.param(b"\x05\x01\x00\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00\x05\x01", id="socks-version"),
        pytest.param(socks_request(socks_ipv4("127.0.0.1"), 80, command=2), b"\x05\x00\x05\x07", id="socks-bind"),
        pytest.param(b"\x05\x01\x00\x05\x01\x00\x09\x00\x00", b"\x05\x00\x05\x08", id="socks-address-type"),
        pytest.param(socks_request(b"\x03\x05a\r\nb.", 80), b"\x05\x00\x05\x01", id="socks-crlf-in-domain"),
    ],
)
async def test_malformed_requests_get_an_error_and_the_proxy_keeps_serving(
    socket_path: str, request_bytes: bytes, reply_prefix: bytes
) -> None:
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost"]), upstream(echo) as port:
            assert (await exchange(socket_path, request_bytes)).startswith(reply_prefix)
            await assert_tunnel_echoes(socket_path, port)


async def test_a_client_that_connects_and_closes_at_once_does_not_disturb_the_proxy(socket_path: str) -> None:
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost"]) as proxy, upstream(echo) as port:
            _, writer = await asyncio.open_unix_connection(socket_path)
            writer.close()
            await writer.wait_closed()
            await assert_tunnel_echoes(socket_path, port)
            assert proxy.active_connections == 0


async def test_a_silent_client_gets_408_after_the_handshake_timeout(
    socket_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy_module, "HANDSHAKE_TIMEOUT_S", 0.1)
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost"]):
            assert (await exchange(socket_path, b"")).startswith(b"HTTP/1.1 408 ")


async def test_connections_past_the_limit_are_refused_at_once_until_one_closes(
    socket_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy_module, "MAX_CONNECTIONS", 2)
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost"]) as proxy, upstream(echo) as port:
            held = [await open_tunnel(socket_path, port) for _ in range(2)]
            assert proxy.active_connections == 2
            response = await exchange(socket_path, f"CONNECT localhost:{port} HTTP/1.1\r\n\r\n".encode())
            assert response.startswith(b"HTTP/1.1 503 ")
            assert b"too many open proxy connections" in response
            code, _, writer = await socks_connect(socket_path, socks_domain("localhost"), port)
            writer.close()
            assert code == 1

            reader, writer = held.pop()
            writer.write_eof()
            assert await reader.read() == EOF_MARK
            writer.close()
            assert proxy.active_connections == 1
            await assert_tunnel_echoes(socket_path, port)
            for _, writer in held:
                writer.close()


async def test_close_ends_open_relays_and_is_idempotent(socket_path: str) -> None:
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost"]) as proxy, upstream(echo) as port:
            reader, writer = await open_tunnel(socket_path, port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            await proxy.close()
            assert await reader.read() == b""
            writer.close()
            await proxy.close()
            assert proxy.active_connections == 0
            with pytest.raises(FileNotFoundError):
                await asyncio.open_unix_connection(socket_path)


async def test_a_large_response_arrives_intact_through_the_proxy(socket_path: str) -> None:
    body = os.urandom(8 * 1024 * 1024)
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost"]), upstream(HttpUpstream(body)) as port:
            response = await exchange(socket_path, f"GET http://localhost:{port}/big HTTP/1.1\r\n\r\n".encode())
    status, _, received = http_parts(response)
    assert status == "HTTP/1.1 200 OK"
    assert len(received) == len(body)
    assert hashlib.sha256(received).digest() == hashlib.sha256(body).digest()


@contextlib.asynccontextmanager
async def tcp_forwarder(socket_path: str) -> AsyncIterator[int]:
    """What the sandbox's bridge does: forward each TCP connection on 127.0.0.1 to the proxy's Unix socket."""

    async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.write_eof()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proxy_reader, proxy_writer = await asyncio.open_unix_connection(socket_path)
        await asyncio.gather(copy(reader, proxy_writer), copy(proxy_reader, writer))
        proxy_writer.close()
        writer.close()

    async with upstream(forward) as port:
        yield port


async def test_urllib_works_through_the_proxy(socket_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    http = HttpUpstream()
    with anyio.fail_after(WAIT_S):
        async with serving(socket_path, ["localhost"]), upstream(http) as port, tcp_forwarder(socket_path) as bridge:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{bridge}"}))

            def fetch(url: str) -> bytes:
                with opener.open(url, timeout=WAIT_S) as response:
                    return bytes(response.read())

            def fetch_refused() -> tuple[int, bytes]:
                with pytest.raises(urllib.error.HTTPError) as refused:
                    fetch("http://refused.example/x")
                with refused.value:
                    return refused.value.code, refused.value.read()

            assert await anyio.to_thread.run_sync(fetch, f"http://localhost:{port}/hello") == http.body
            code, body = await anyio.to_thread.run_sync(fetch_refused)
    assert http.heads[0].startswith(b"GET /hello HTTP/1.1\r\n")
    assert code == 403
    assert b"'refused.example'" in body
