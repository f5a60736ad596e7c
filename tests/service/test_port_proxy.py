"""A box's ports over the HTTP transport: the URL ps gives proxies into the caller's box, with its
credential and to nobody else, on the host box, unsandboxed and in Docker."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
from pathlib import Path

import anyio
import httpx2
import pytest
from docker import DockerClient
from docker import errors as docker_errors
from mcp import Client

from process_mcp import create_process_mcp
from process_mcp.config import SandboxConfig
from process_mcp.service.http import _Server, prepare
from process_mcp.service.ports import Bounds

from ..contract.test_services import free_port
from ..helpers import DEBIAN_IMAGE, WAIT_S, call, host_config, unique_name
from ..http_server import TEST_DOMAINS, http_server, mcp_client, serving_in_process, write_tokens
from .test_http import Issuer

pytestmark = pytest.mark.anyio

ALICE = "alice-" + os.urandom(16).hex()
BOB = "bob-" + os.urandom(16).hex()

BOX_SERVER = r"""
import socket, sys


def connections():
    # Each connection to the port in argv[1] whose request head came whole, with that head; a
    # readiness probe connects and goes.
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", int(sys.argv[1])))
    server.listen(100)
    while True:
        conn, _ = server.accept()
        head = b""
        while b"\r\n\r\n" not in head:
            got = conn.recv(4096)
            if not got:
                break
            head += got
        if b"\r\n\r\n" in head:
            yield conn, head
        else:
            conn.close()
"""
"""What the servers below run on, in the box (standard library only)."""

WEBSOCKET_ECHO = r"""
import base64, hashlib
for conn, head in connections():
    key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    first = conn.recv(2)
    size = first[1] & 0x7F
    mask = conn.recv(4)
    data = bytes(b ^ mask[i % 4] for i, b in enumerate(conn.recv(size)))
    conn.sendall(bytes([0x81, len(data) + 5]) + b"echo " + data)
    conn.close()
"""
"""Takes a WebSocket, answers its first frame with "echo " and the frame's text, and ends it."""


HEAD_ECHO = r"""
for conn, head in connections():
    conn.sendall(b"HTTP/1.1 200 OK\r\nSet-Cookie: pmcp_token=from-the-box; Path=/\r\nSet-Cookie: app=kept\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(head), head))
    conn.close()
"""
"""Answers every request with the request head it got, and two cookies: one named as the credential."""


STREAMER = r"""
import time
silent = []
for conn, head in connections():
    if b"GET /silent" in head:
        silent.append(conn)  # held, and never answered
        continue
    try:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        while True:
            conn.sendall(b"data: tick\n\n")
            time.sleep(0.05)
    except OSError:
        print("the reader went away", flush=True)
    conn.close()
"""
"""Streams to each request until its reader goes (then says so); holds requests for /silent unanswered."""


QUIET_WEBSOCKET = r"""
held = []
for conn, head in connections():
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    held.append(conn)  # never sends, never closes
"""
"""Takes every WebSocket and then says nothing, nor ends it."""


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    return write_tokens(tmp_path / "tokens", {"alice": ALICE, "bob": BOB})


@pytest.fixture
def workspaces(tmp_path: Path) -> Path:
    path = tmp_path / "workspaces"
    path.mkdir()
    return path


async def serve_site(client: Client, text: str, name: str = "web") -> tuple[str, str]:
    """A python http.server in the caller's box serving ``text`` at /, named ``name``: (its id, its URL)."""
    port = free_port()
    command = (
        f"mkdir -p site-{port} && echo {text} > site-{port}/index.html && "
        f"exec python3 -m http.server {port} --bind 127.0.0.1 --directory site-{port}"
    )
    spawn = {"command": command, "name": name, "ready": {"port": port}, "timeoutMs": 30000}
    started = await call(client, "spawn", spawn)
    assert started["ready"], started
    again = await call(client, "spawn", spawn)
    assert (again["pid"], again["existing"]) == (started["pid"], True)
    return started["pid"], await url_of(client, started["pid"], port)


async def write_in_box(client: Client, name: str, text: str) -> None:
    """Write ``text`` to file ``name`` in the caller's box, through a process's stdin."""
    writer = await call(client, "spawn", {"command": f"cat > {name}", "background": True})
    await call(
        client, "stdin", {"id": writer["pid"], "input": text.replace("\\", "\\\\").replace("\n", "\\n"), "eof": True}
    )
    assert (await call(client, "stdout", {"id": writer["pid"], "untilExit": True}))["exitCode"] == 0


async def serve_script(client: Client, script: str) -> tuple[str, int, str]:
    """Run ``script`` (one of the servers above) in the caller's box on a free port, until it accepts
    connections: (its id, its port, its URL)."""
    port = free_port()
    name = f"server-{port}.py"
    await write_in_box(client, name, BOX_SERVER + script)
    spawn = {"command": f"exec python3 {name} {port}", "ready": {"port": port}, "timeoutMs": 30000}
    started = await call(client, "spawn", spawn)
    assert started["ready"], (started, started.get("stderr"))
    return started["pid"], port, await url_of(client, started["pid"], port)


async def url_of(client: Client, pid: str, port: int) -> str:
    [row] = [row for row in (await call(client, "ps", {}))["processes"] if row["pid"] == pid]
    assert [listed["port"] for listed in row["ports"]] == [port], row
    url: str = row["ports"][0]["url"]
    return url


async def get(
    url: str, cookies: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=WAIT_S, cookies=cookies) as http:
        return await http.get(url, headers=headers)


def ask_for_websocket(url: str) -> tuple[socket.socket, bytes, bytes]:
    """A connection that asked for a WebSocket at ``url`` (http://host:port/path?query): the socket, the
    answer's head, and what came after the head."""
    address, _, target = url.removeprefix("http://").partition("/")
    host, _, port = address.rpartition(":")
    key = base64.b64encode(os.urandom(16)).decode()
    sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
    sock.sendall(
        f"GET /{target} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        got = sock.recv(4096)
        if not got:
            break
        head += got
    head, _, rest = head.partition(b"\r\n\r\n")
    return sock, head, rest


def websocket_echo(url: str, text: str) -> bytes:
    """Open a WebSocket at ``url``, send ``text``, return the answer's payload (or the status line of an
    answer that is not 101)."""
    sock, head, rest = ask_for_websocket(url)
    with sock:
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            return status
        mask = os.urandom(4)
        payload = text.encode()
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while len(rest) < 2 or len(rest) < 2 + rest[1]:
            got = sock.recv(4096)
            if not got:
                break
            rest += got
        return rest[2 : 2 + rest[1]]


def parts(url: str) -> tuple[str, str, str, int, str]:
    """A port URL's (server address, tag, process id, port, credential query)."""
    base, _, rest = url.partition("/ports/")
    tag, pid, port, query = rest.split("/", 3)
    return base, tag, pid, int(port), query.removeprefix("?")


async def check_the_proxy(server_base: str, alice: Client, bob: Client, audit: Path | None) -> None:
    pid, url = await serve_site(alice, "served-to-alice")
    base, tag, _, port, credential = parts(url)
    assert base == server_base, url
    bare = url.partition("?")[0]

    answer = await get(url)
    assert (answer.status_code, answer.text) == (200, "served-to-alice\n")
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie, cookie
    assert f"Path=/ports/{tag}/" in cookie, cookie

    refused = await get(bare)
    assert refused.status_code == 401, refused.text
    assert "credential" in refused.text
    with_cookie = await get(bare + "index.html", cookies=dict(answer.cookies))
    assert (with_cookie.status_code, with_cookie.text) == (200, "served-to-alice\n")

    # Another principal's credential, for its own box, reaches nothing of Alice's; a forged one nothing at all.
    _, bob_url = await serve_site(bob, "served-to-bob")
    _, bob_tag, _, _, bob_credential = parts(bob_url)
    assert (await get(bob_url)).text == "served-to-bob\n"
    assert (await get(f"{bare}?{bob_credential}")).status_code == 404
    assert (await get(f"{base}/ports/{bob_tag}/{pid}/{port}/?{bob_credential}")).status_code == 404
    forged = credential[:-4] + ("0000" if not credential.endswith("0000") else "1111")
    assert (await get(f"{bare}?{forged}")).status_code == 401
    # A port the process does not listen on is not reached, though the credential is Alice's.
    assert (await get(f"{base}/ports/{tag}/{pid}/{free_port()}/?{credential}")).status_code == 404

    # A WebSocket is carried whole.
    echo, _, ws_url = await serve_script(alice, WEBSOCKET_ECHO)
    assert await anyio.to_thread.run_sync(websocket_echo, ws_url, "hello box") == b"echo hello box"
    assert (await anyio.to_thread.run_sync(websocket_echo, ws_url.partition("?")[0], "x")).endswith(b"401 Unauthorized")
    await call(alice, "kill", {"id": echo, "signal": "KILL"})

    if audit is not None:
        forwards = [json.loads(line) for line in audit.read_text().splitlines() if '"forward"' in line]
        assert {(entry["pid"], entry["url"]) for entry in forwards} >= {(pid, bare)}
        assert not any("pmcp_token" in entry["url"] for entry in forwards)

    await call(alice, "kill", {"id": pid, "signal": "KILL"})
    with anyio.fail_after(WAIT_S):
        while (await get(url)).status_code != 404:  # gone with the process
            await anyio.sleep(0.05)


@pytest.mark.parametrize("sandboxed", [True, False], ids=["box", "unsandboxed"])
async def test_a_port_is_reached_at_its_url_with_its_credential_and_by_nobody_else(
    workspaces: Path, tokens_file: Path, tmp_path: Path, sandboxed: bool
) -> None:
    settings = {"PROCESS_AUTH_TOKENS_FILE": str(tokens_file), "PROCESS_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    if not sandboxed:
        settings["SANDBOX_ENABLED"] = "false"
    async with (
        http_server(workspaces, **settings) as server,
        mcp_client(server.url, ALICE) as alice,
        mcp_client(server.url, BOB) as bob,
    ):
        await check_the_proxy(server.base, alice, bob, tmp_path / "audit.jsonl")


@pytest.mark.parametrize("sandboxed", [True, False], ids=["box", "unsandboxed"])
async def test_a_server_on_ipv6_loopback_only_is_reached_too(
    workspaces: Path, tokens_file: Path, sandboxed: bool
) -> None:
    """A dev server that listens on "localhost" may get only ::1 (Node does): the proxy connects there
    when 127.0.0.1 refuses, through the agent in a box with a network of its own, and straight on the
    server's own loopback for an unsandboxed process."""
    settings = {"PROCESS_AUTH_TOKENS_FILE": str(tokens_file)}
    if not sandboxed:
        settings["SANDBOX_ENABLED"] = "false"
    async with http_server(workspaces, **settings) as server, mcp_client(server.url, ALICE) as alice:
        port = free_port()
        command = f"exec python3 -m http.server --bind ::1 {port}"
        spawn = {"command": command, "ready": {"port": port}, "timeoutMs": 30000}
        started = await call(alice, "spawn", spawn)
        assert started["ready"], started
        answer = await get(await url_of(alice, started["pid"], port))
        assert answer.status_code == 200, answer.text
        assert "Directory listing" in answer.text
        await call(alice, "kill", {"id": started["pid"], "signal": "KILL"})


@pytest.mark.docker
async def test_a_port_in_a_principals_container_is_reached_through_its_agent(
    engine: DockerClient, workspaces: Path, tokens_file: Path
) -> None:
    container, volume = unique_name("ports"), unique_name("ports-vol")
    settings = {
        "PROCESS_AUTH_TOKENS_FILE": str(tokens_file),
        "PROCESS_MODE": "docker",
        "DOCKER_IMAGE": DEBIAN_IMAGE,
        "DOCKER_CONTAINER": container,
        "DOCKER_VOLUME": volume,
        "DEFAULT_WORKDIR": "",
    }
    try:
        async with (
            http_server(workspaces, **settings) as server,
            mcp_client(server.url, ALICE) as alice,
            mcp_client(server.url, BOB) as bob,
        ):
            await check_the_proxy(server.base, alice, bob, None)
    finally:
        for principal in ("alice", "bob"):
            with contextlib.suppress(docker_errors.NotFound):
                (await anyio.to_thread.run_sync(engine.containers.get, f"{container}-{principal}")).remove(force=True)
            with contextlib.suppress(docker_errors.NotFound):
                (await anyio.to_thread.run_sync(engine.volumes.get, f"{volume}-{principal}")).remove(force=True)


async def test_an_expired_credential_is_refused_and_ps_gives_a_new_one(workspaces: Path, tokens_file: Path) -> None:
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file), PROCESS_PORT_URL_TTL_S="1") as server,
        mcp_client(server.url, ALICE) as alice,
    ):
        pid, url = await serve_site(alice, "short-lived")
        with anyio.fail_after(WAIT_S):
            while (answer := await get(url)).status_code == 200:
                await anyio.sleep(0.1)
        assert answer.status_code == 401, answer.text
        assert "expired" in answer.text, answer.text
        port = parts(url)[3]
        assert (await get(await url_of(alice, pid, port))).text == "short-lived\n"
        await call(alice, "kill", {"id": pid, "signal": "KILL"})


async def test_the_box_gets_the_request_as_sent_without_the_credential_and_cannot_set_it(
    workspaces: Path, tokens_file: Path
) -> None:
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server,
        mcp_client(server.url, ALICE) as alice,
    ):
        echo, port, url = await serve_script(alice, HEAD_ECHO)
        bare, _, credential = url.partition("?")
        _, tag, pid, _, _ = parts(url)
        # An encoded line break in the path or the query stays encoded: it never starts a header (or a second
        # request) in the box; the client's own X-Forwarded-* are not passed on as the proxy's.
        async with httpx2.AsyncClient(timeout=WAIT_S) as http:
            answer = await http.get(
                f"{bare}a%0d%0aX-Injected:%20yes?q=%0d%0aX-Also:%20yes&{credential}&after=1",
                headers={"X-Forwarded-Host": "spoofed.example", "Cookie": f"{credential}; theirs=1"},
            )
        assert answer.status_code == 200, answer.text
        head = answer.text.split("\r\n")
        assert head[0] == "GET /a%0d%0aX-Injected:%20yes?q=%0d%0aX-Also:%20yes&after=1 HTTP/1.1", head
        lowered = [line.lower() for line in head]
        assert not any(line.startswith(("x-injected", "x-also")) for line in lowered), head
        assert "pmcp_token" not in answer.text
        assert "cookie: theirs=1" in lowered
        assert f"x-forwarded-prefix: /ports/{tag}/{pid}/{port}" in lowered
        assert [line for line in lowered if line.startswith("x-forwarded-host")] == [
            f"x-forwarded-host: {server.base.removeprefix('http://')}"
        ]
        # A bearer token of this server's (any principal's) is the caller's, not the box's; others are the app's.
        for authorization, passed in (
            (f"Bearer {ALICE}", False),
            (f"bearer  {BOB}", False),
            (ALICE, False),
            (f"token\t{ALICE}", False),
            ("Basic " + base64.b64encode(f"alice:{ALICE}".encode()).decode(), False),
            ("Bearer an-apps-own-token", True),
            ("Basic dXNlcjpwYXNz", True),
        ):
            seen = await get(url, headers={"Authorization": authorization})
            assert seen.status_code == 200, seen.text
            assert ("authorization: " + authorization.strip().lower() in seen.text.lower()) is passed, authorization
            assert ALICE not in seen.text
            assert BOB not in seen.text
        # The box sets its own cookies, for its port's paths only, and not one named as the credential;
        # nor headers that act on the whole origin.
        cookies = answer.headers.get_list("set-cookie")
        ours = [cookie for cookie in cookies if cookie.startswith(f"pmcp_token={credential.partition('=')[2]};")]
        assert len(ours) == 1, cookies
        assert [cookie for cookie in cookies if cookie not in ours] == [f"app=kept; Path=/ports/{tag}/{pid}/{port}/"]
        assert "clear-site-data" not in answer.headers
        assert "service-worker-allowed" not in answer.headers
        # A navigation moves the credential out of the address (and so out of every Referer) into the cookie.
        async with httpx2.AsyncClient(timeout=WAIT_S) as http:
            moved = await http.get(url + "&page=2", headers={"Sec-Fetch-Mode": "navigate"})
            assert moved.status_code == 303, moved.text
            assert moved.headers["location"] == f"/ports/{tag}/{pid}/{port}/?page=2"
            assert moved.cookies.get("pmcp_token") == credential.partition("=")[2]
            followed = await http.get(f"{server.base}{moved.headers['location']}", headers={"Referer": url})
            assert followed.status_code == 200, followed.text
        assert "pmcp_token" not in followed.text  # not from the cookie, nor the Referer
        assert f"referer: {bare}" in followed.text.lower()
        # Encoded, the credential's name is still the credential's.
        encoded = await get(f"{bare}?pmcp%5Ftoken={credential.partition('=')[2]}&x=1")
        assert encoded.status_code == 200
        assert "pmcp" not in encoded.text.split("\r\n")[0]
        # A page of the server's own origin (a box's) may not call the server's endpoints.
        async with httpx2.AsyncClient(timeout=WAIT_S) as http:
            framed = await http.post(server.url, json={}, headers={"Sec-Fetch-Site": "same-origin"})
        assert framed.status_code == 403, framed.text
        # Methods that are not carried, and credentials that are not even text, are answered plainly.
        async with httpx2.AsyncClient(timeout=WAIT_S) as http:
            assert (await http.request("TRACE", url)).status_code == 405
        assert (await get(f"{bare}?pmcp_token=a.1.%C3%A9")).status_code == 401
        assert (await get(bare, cookies={"pmcp_token": "\\" * 4000})).status_code == 401
        await call(alice, "kill", {"id": echo, "signal": "KILL"})


async def test_no_oauth_token_of_this_servers_issuer_nor_its_metrics_token_reaches_a_box(
    workspaces: Path, tmp_path: Path
) -> None:
    """With OAuth, a JWT of the server's issuer (the caller's, even expired or without the scope) and the
    metrics token are the caller's credentials to the server: never passed on to a box's server. A JWT of
    another issuer for another audience is an app's, and is."""
    issuer, stranger = Issuer(), Issuer("https://apps.example")
    audience = "http://127.0.0.1/mcp"
    metrics_token = "metrics-token-0123456789"
    settings = {**issuer.settings(tmp_path / "jwks.json", audience), "PROCESS_METRICS_TOKEN": metrics_token}
    good = issuer.token(audience, subject="ana")
    async with http_server(workspaces, **settings) as server, mcp_client(server.url, good) as ana:
        echo, _, url = await serve_script(ana, HEAD_ECHO)
        withheld = {
            "the caller's": good,
            "expired": issuer.token(audience, exp=1),
            "another audience of the issuer": issuer.token("https://other.example/mcp"),
            "another issuer's for this server": stranger.token(audience),
            "the metrics token": metrics_token,
        }
        for why, token in withheld.items():
            seen = await get(url, headers={"Authorization": f"Bearer {token}"})
            assert seen.status_code == 200, seen.text
            assert "authorization" not in seen.text.lower(), why
        apps = stranger.token("https://api.apps.example")
        seen = await get(url, headers={"Authorization": f"Bearer {apps}"})
        assert f"authorization: bearer {apps.lower()}" in seen.text.lower()
        await call(ana, "kill", {"id": echo, "signal": "KILL"})


async def test_a_client_that_goes_away_frees_the_box_and_one_principal_cannot_hold_every_connection(
    workspaces: Path, tokens_file: Path
) -> None:
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server,
        mcp_client(server.url, ALICE) as alice,
        mcp_client(server.url, BOB) as bob,
    ):
        streamer, _, url = await serve_script(alice, STREAMER)
        bare, _, credential = url.partition("?")
        # A reader of an endless answer that goes away: the proxy stops reading it, the box sees its reader gone.
        async with httpx2.AsyncClient(timeout=WAIT_S) as http, http.stream("GET", url) as answer:
            async for chunk in answer.aiter_bytes():
                assert b"tick" in chunk
                break
        gone = await call(alice, "stdout", {"id": streamer, "waitFor": "the reader went away", "waitMs": 10000})
        assert "the reader went away" in gone["stdout"], gone

        # Requests the box never answers, whose clients give up: each connection into the box is dropped with
        # its client (the agent carries at most 128 at once; one left open each time would use them all).
        silent_url = f"{bare}silent?{credential}"
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(WAIT_S, read=0.05)) as http:
            for _ in range(140):
                with pytest.raises(httpx2.ReadTimeout):
                    await http.get(silent_url)
        assert await status_of_stream(url) == 200

        # Connections held open to one principal's ports stop at MAX_CARRIED_PER_SPACE; others are still served.
        held = []
        try:
            for number in range(64):  # requests and WebSocket upgrades count together
                sock = socket.create_connection(("127.0.0.1", int(parts(url)[0].rpartition(":")[2])), timeout=WAIT_S)
                upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n" if number % 2 else ""
                path = f"{bare.partition(server.base)[2]}silent?{credential}"
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{upgrade}\r\n".encode())
                held.append(sock)
            refused = None
            async with httpx2.AsyncClient(timeout=httpx2.Timeout(WAIT_S, read=0.2)) as http:
                with anyio.fail_after(WAIT_S):
                    while refused is None:  # until all 64 are carried: the next is refused, not held
                        with contextlib.suppress(httpx2.ReadTimeout):
                            refused = await http.get(f"{bare}silent?{credential}")
            assert refused.status_code == 503, refused.text
            assert "64 connections" in refused.text
            assert (await call(bob, "spawn", {"command": "echo still served"}))["stdout"] == "still served\n"
        finally:
            for sock in held:
                sock.close()
        with anyio.fail_after(WAIT_S):
            while await status_of_stream(url) == 503:  # the held connections' room is given back
                await anyio.sleep(0.05)
        await call(alice, "kill", {"id": streamer, "signal": "KILL"})


async def status_of_stream(url: str) -> int:
    async with httpx2.AsyncClient(timeout=WAIT_S) as http, http.stream("GET", url) as answer:
        return answer.status_code


async def test_a_websocket_upgrade_is_admitted_as_a_request_is(workspaces: Path, tokens_file: Path) -> None:
    """Upgrades held by the box count against their address's connections: past the limit, 503."""
    settings = {"PROCESS_AUTH_TOKENS_FILE": str(tokens_file), "PROCESS_HTTP_MAX_CONNECTIONS_PER_ADDRESS": "3"}
    async with http_server(workspaces, **settings) as server, mcp_client(server.url, ALICE) as alice:
        streamer, port, url = await serve_script(alice, STREAMER)
        base, tag, pid, _, credential = parts(url)
        address = ("127.0.0.1", int(base.rpartition(":")[2]))
        upgrade = (
            f"GET /ports/{tag}/{pid}/{port}/silent?{credential} HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

        def held_then_refused() -> bytes:
            held = []
            try:
                for _ in range(3):  # from an address of their own: carried to a box that never answers, busy
                    sock = socket.create_connection(address, timeout=WAIT_S, source_address=("127.0.0.2", 0))
                    sock.sendall(upgrade)
                    held.append(sock)
                with socket.create_connection(address, timeout=WAIT_S, source_address=("127.0.0.2", 0)) as last:
                    last.sendall(upgrade)
                    return last.recv(4096)
            finally:
                for sock in held:
                    sock.close()

        answer = await anyio.to_thread.run_sync(held_then_refused)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"too_many_connections" in answer
        await call(alice, "kill", {"id": streamer, "signal": "KILL"})


def upgraded(url: str) -> socket.socket:
    """A connection that asked for a WebSocket at ``url`` and was answered 101."""
    sock, head, _ = ask_for_websocket(url)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


def ended_by_the_server(sock: socket.socket) -> bool:
    """Whether the server ends ``sock`` (within WAIT_S) while the client sends nothing."""
    with sock:
        try:
            return sock.recv(4096) == b""
        except TimeoutError:
            return False


async def test_a_carried_websocket_ends_when_quiet_and_when_its_credential_expires(
    workspaces: Path, tokens_file: Path
) -> None:
    """Each bound, made short here, ends a WebSocket whose box's end never does: quiet, its credential
    expired, or its client's end come and the box's not."""
    config = host_config(workspaces, sandbox=SandboxConfig(allowed_domains=[TEST_DOMAINS]))
    config.service.transport = "http"
    config.service.tokens_file = str(tokens_file)
    mcp = await create_process_mcp(config)
    server = _Server(prepare(mcp, "127.0.0.1", 0))
    async with mcp, serving_in_process(server) as url, mcp_client(url, ALICE) as alice:
        quiet, port, _ = await serve_script(alice, QUIET_WEBSOCKET)
        ports = mcp.spaces.ports

        ports.bounds = Bounds(idle_s=1.0, half_closed_s=600.0)
        sock = await anyio.to_thread.run_sync(upgraded, await url_of(alice, quiet, port))
        assert await anyio.to_thread.run_sync(ended_by_the_server, sock), "a quiet WebSocket stayed open"

        ports.bounds = Bounds(idle_s=600.0, half_closed_s=600.0)
        mcp.spaces.links.ttl_s = 3
        sock = await anyio.to_thread.run_sync(upgraded, await url_of(alice, quiet, port))
        assert await anyio.to_thread.run_sync(ended_by_the_server, sock), "an expired WebSocket stayed open"

        ports.bounds = Bounds(idle_s=600.0, half_closed_s=1.0)
        mcp.spaces.links.ttl_s = 3600
        sock = await anyio.to_thread.run_sync(upgraded, await url_of(alice, quiet, port))
        sock.shutdown(socket.SHUT_WR)  # the client's end; the box's never comes
        assert await anyio.to_thread.run_sync(ended_by_the_server, sock), "a half-closed WebSocket stayed open"
        await call(alice, "kill", {"id": quiet, "signal": "KILL"})
