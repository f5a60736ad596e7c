"""The server over streamable HTTP, for real: a server process on a loopback port, real HTTP clients
(the MCP Python SDK, raw httpx), tokens and JWTs the tests make. Each principal lives in its own space."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from docker import errors as docker_errors
from docker.client import DockerClient
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types import CallToolResult
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.routing import Mount

import process_mcp
from process_mcp import create_process_mcp
from process_mcp.config import SandboxConfig, environment_variables
from process_mcp.service import auth, connections

from ..helpers import (
    DEBIAN_IMAGE,
    WAIT_S,
    call,
    error,
    host_config,
    pid_alive,
    sleep_argument,
    sleepers,
    text_of,
    unique_name,
)
from ..http_server import (
    TEST_DOMAINS,
    HttpServer,
    http_server,
    mcp_client,
    run_server_to_exit,
    serving_in_process,
    write_tokens,
)

pytestmark = pytest.mark.anyio

ALICE = "alice-" + secrets.token_hex(16)
BOB = "bob-" + secrets.token_hex(16)
CAROL = "carol-" + secrets.token_hex(16)
DAVE = "dave-" + secrets.token_hex(16)
TOKENS = {"alice": ALICE, "bob": BOB, "carol": CAROL, "dave": DAVE}
INITIALIZE: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
JSON_AND_SSE = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    return write_tokens(tmp_path / "tokens", TOKENS)


@pytest.fixture
def workspaces(tmp_path: Path) -> Path:
    path = tmp_path / "workspaces"
    path.mkdir()
    return path


async def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=WAIT_S) as client:
        return await client.post(url, json=body, headers={**JSON_AND_SSE, **(headers or {})})


# Authentication.


async def test_a_request_without_a_valid_token_gets_401_with_www_authenticate(
    workspaces: Path, tokens_file: Path
) -> None:
    async with http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server:
        for headers in ({}, {"Authorization": "Bearer " + "x" * 38}, {"Authorization": f"Basic {ALICE}"}):
            response = await post(server.url, INITIALIZE, headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer ")
        # A token that is a prefix or an extension of a real one is no token.
        for near in (ALICE[:-1], ALICE + "x"):
            response = await post(server.url, INITIALIZE, {"Authorization": f"Bearer {near}"})
            assert response.status_code == 401
        response = await post(server.url, INITIALIZE, {"Authorization": f"Bearer {ALICE}"})
        assert response.status_code == 200, response.text


async def test_refused_requests_are_logged_with_the_client_and_why_but_never_the_token(
    workspaces: Path, tokens_file: Path
) -> None:
    stranger = secrets.token_urlsafe(30)
    async with http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server:
        for headers in ({}, {"Authorization": f"Basic {ALICE}"}, {"Authorization": f"Bearer {stranger}"}):
            assert (await post(server.url, INITIALIZE, headers)).status_code == 401
        await server.wait_logged("no principal in the tokens file has this token")
        refusals = [line for line in server.log if "refused a request from 127.0.0.1:" in line]
        assert len(refusals) == 3, refusals
        assert "to /mcp: no Authorization header" in refusals[0]
        assert "is not a bearer token (scheme 'Basic')" in refusals[1]
        fingerprint = hashlib.sha256(stranger.encode()).hexdigest()[:12]
        assert f"(token sha256:{fingerprint})" in refusals[2]
        # A flood of bad tokens is summed up, not logged line by line.
        for _ in range(auth.REFUSAL_LOG_BURST + 5):
            assert (await post(server.url, INITIALIZE, {"Authorization": f"Bearer {stranger}"})).status_code == 401
        refusals = [line for line in server.log if "refused a request from" in line]
        assert len(refusals) == auth.REFUSAL_LOG_BURST
    log = "\n".join(server.log)
    assert stranger not in log
    assert ALICE not in log


async def test_a_refused_jwt_is_logged_with_its_reason_and_the_subject_it_claims(
    workspaces: Path, tmp_path: Path
) -> None:
    issuer = Issuer()
    audience = "http://127.0.0.1/mcp"
    settings = issuer.settings(tmp_path / "jwks.json", audience)
    expired = issuer.token(audience, subject="mallory\nINFO forged line", exp=int(time.time()) - 120)
    async with http_server(workspaces, **settings) as server:
        assert (await post(server.url, INITIALIZE, {"Authorization": f"Bearer {expired}"})).status_code == 401
        await server.wait_logged("the JWT was refused")
    (line,) = [line for line in server.log if "refused a request from" in line]
    assert "expired" in line, line
    assert "claiming subject 'mallory\\nINFO forged line'" in line, line
    assert expired not in "\n".join(server.log)


@pytest.mark.parametrize(
    ("mode", "problem"),
    [(0o644, "let others read"), (0o620, "let others read or change"), (0o602, "let others read or change")],
)
async def test_a_tokens_file_others_can_read_or_change_stops_the_server(
    workspaces: Path, tokens_file: Path, mode: int, problem: str
) -> None:
    tokens_file.chmod(mode)
    status, log = await run_server_to_exit(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file))
    assert status == 2
    assert "PROCESS_AUTH_TOKENS_FILE" in log
    assert "chmod 600" in log
    assert ALICE not in log


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("alice short\n", "shorter than 16"),
        ("alice\n", "expected 'principal token'"),
        ("../etc " + "x" * 20 + "\n", "must be 1-48 letters"),
        (f"alice {ALICE}\nbob {ALICE}\n", "already given"),
        ("# nobody\n", "no 'principal token' lines"),
    ],
)
async def test_a_malformed_tokens_file_stops_the_server_saying_which_line(
    workspaces: Path, tmp_path: Path, content: str, complaint: str
) -> None:
    path = tmp_path / "bad-tokens"
    path.write_text(content)
    path.chmod(0o600)
    status, log = await run_server_to_exit(workspaces, PROCESS_AUTH_TOKENS_FILE=str(path))
    assert status == 2
    assert complaint in log


async def test_http_without_authentication_is_refused_unless_asked_for_on_loopback(workspaces: Path) -> None:
    status, log = await run_server_to_exit(workspaces)
    assert status == 2
    assert "HTTP needs authentication" in log
    status, log = await run_server_to_exit(
        workspaces, PROCESS_AUTH="none", PROCESS_HTTP_HOST="0.0.0.0", PROCESS_HTTP_ALLOWED_HOSTS="*"
    )
    assert status == 2
    assert "loopback host only" in log
    async with http_server(workspaces, PROCESS_AUTH="none") as server, mcp_client(server.url, None) as client:
        assert (await call(client, "spawn", {"command": "echo open"}))["stdout"] == "open\n"


async def test_listening_off_loopback_needs_the_host_names_clients_use(workspaces: Path, tokens_file: Path) -> None:
    status, log = await run_server_to_exit(
        workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file), PROCESS_HTTP_HOST="0.0.0.0"
    )
    assert status == 2
    assert "PROCESS_HTTP_ALLOWED_HOSTS" in log


async def test_host_and_origin_headers_are_checked_against_dns_rebinding(workspaces: Path, tokens_file: Path) -> None:
    auth = {"Authorization": f"Bearer {ALICE}"}
    async with http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server:
        response = await post(server.url, INITIALIZE, {**auth, "Host": "evil.example:8765"})
        assert response.status_code == 421
        response = await post(server.url, INITIALIZE, {**auth, "Origin": "http://evil.example"})
        assert response.status_code == 403
        response = await post(server.url, INITIALIZE, {**auth, "Origin": server.base})
        assert response.status_code == 200


async def test_a_session_opened_by_one_principal_cannot_be_used_by_another(workspaces: Path, tokens_file: Path) -> None:
    async with http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server:
        opened = await post(server.url, INITIALIZE, {"Authorization": f"Bearer {ALICE}"})
        session = opened.headers["mcp-session-id"]
        ps = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "ps", "arguments": {}}}
        hijack = await post(server.url, ps, {"Authorization": f"Bearer {BOB}", "Mcp-Session-Id": session})
        assert hijack.status_code in (403, 404), hijack.text
        assert "result" not in hijack.text


async def test_an_oversized_request_body_is_refused(workspaces: Path, tokens_file: Path) -> None:
    async with http_server(
        workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file), PROCESS_HTTP_MAX_BODY_BYTES="65536"
    ) as server:
        big = {**INITIALIZE, "params": {**INITIALIZE["params"], "padding": "x" * 100_000}}
        response = await post(server.url, big, {"Authorization": f"Bearer {ALICE}"})
        assert response.status_code == 413
        async with mcp_client(server.url, ALICE) as client:
            assert (await call(client, "spawn", {"command": "echo still serving"}))["stdout"] == "still serving\n"


# OAuth resource server.


class Issuer:
    """An OAuth authorization server's signing key and the tokens it would issue."""

    def __init__(self, url: str = "https://issuer.example") -> None:
        self.url = url
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = secrets.token_hex(4)

    def jwks(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**public, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def settings(self, jwks: Path, audience: str) -> dict[str, str]:
        """A server's settings for tokens of this issuer, for ``audience``: its keys written to ``jwks``."""
        jwks.write_text(json.dumps(self.jwks()))
        return {"PROCESS_AUTH_ISSUER": self.url, "PROCESS_AUTH_AUDIENCE": audience, "PROCESS_AUTH_JWKS": str(jwks)}

    def claims(self, audience: str, subject: str, **claims: Any) -> dict[str, Any]:
        now = int(time.time())
        return {"iss": self.url, "aud": audience, "sub": subject, "iat": now, "exp": now + 300, **claims}

    def token(self, audience: str, subject: str = "user-1", **claims: Any) -> str:
        return jwt.encode(
            self.claims(audience, subject, **claims), self.key, algorithm="RS256", headers={"kid": self.kid}
        )

    def confused_token(self, audience: str, **claims: Any) -> str:
        """The algorithm-confusion attack: HS256 with the issuer's public key (PEM) as the shared secret."""
        pem = self.key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        header = {"alg": "HS256", "typ": "JWT", "kid": self.kid}
        signing_input = b".".join(
            _b64(json.dumps(part).encode()) for part in (header, self.claims(audience, "x", **claims))
        )
        return (signing_input + b"." + _b64(hmac.new(pem, signing_input, hashlib.sha256).digest())).decode()


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


async def test_oauth_accepts_only_jwts_from_the_issuer_for_this_server_in_time_with_the_scope(
    workspaces: Path, tmp_path: Path
) -> None:
    issuer, stranger = Issuer(), Issuer()
    audience = "http://127.0.0.1/mcp"
    settings = {**issuer.settings(tmp_path / "jwks.json", audience), "PROCESS_AUTH_SCOPES": "processes"}
    async with http_server(workspaces, **settings) as server:
        refused = {
            "expired": issuer.token(audience, scope="processes", exp=int(time.time()) - 120),
            "another audience": issuer.token("https://other.example/mcp", scope="processes"),
            "another issuer": issuer.token(audience, scope="processes", iss="https://evil.example"),
            "another key": stranger.token(audience, scope="processes"),
            "no scope": issuer.token(audience),
            "unsigned": jwt.encode({"iss": issuer.url, "aud": audience, "sub": "x", "exp": 2**40}, "", "none"),
            "hmac with the public key as secret": issuer.confused_token(audience, scope="processes"),
        }
        for why, token in refused.items():
            response = await post(server.url, INITIALIZE, {"Authorization": f"Bearer {token}"})
            assert response.status_code == 401, why
            challenge = response.headers["www-authenticate"]
            assert "resource_metadata=" in challenge, challenge
        metadata_url = challenge.split('resource_metadata="')[1].split('"')[0]
        async with httpx2.AsyncClient() as client:
            metadata = (await client.get(metadata_url.replace("http://127.0.0.1/", server.base + "/"))).json()
        assert metadata["resource"] == audience
        assert metadata["authorization_servers"] == [issuer.url + "/"] or metadata["authorization_servers"] == [
            issuer.url
        ]
        good = issuer.token(audience, subject="ana@example.com", scope="read processes")
        async with mcp_client(server.url, good) as client:
            result = await call(client, "spawn", {"command": "pwd"})
        assert result["stdout"].startswith(str(workspaces / "ana-example.com-"))


async def test_oauth_keys_can_come_from_a_jwks_url(workspaces: Path) -> None:
    issuer = Issuer()
    body = json.dumps(issuer.jwks()).encode()

    async def handle(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(body), body)
            )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    audience = "http://127.0.0.1/mcp"
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, handle)
        async with http_server(
            workspaces,
            PROCESS_AUTH_ISSUER=issuer.url,
            PROCESS_AUTH_AUDIENCE=audience,
            PROCESS_AUTH_JWKS=f"http://127.0.0.1:{port}/jwks.json",
        ) as server:
            async with mcp_client(server.url, issuer.token(audience)) as client:
                assert (await call(client, "spawn", {"command": "echo by url"}))["stdout"] == "by url\n"
            response = await post(server.url, INITIALIZE, {"Authorization": f"Bearer {Issuer().token(audience)}"})
            assert response.status_code == 401
        tasks.cancel_scope.cancel()
    await listener.aclose()


async def test_oauth_without_its_settings_stops_the_server_naming_what_is_missing(workspaces: Path) -> None:
    status, log = await run_server_to_exit(workspaces, PROCESS_AUTH_ISSUER="https://issuer.example")
    assert status == 2
    assert "PROCESS_AUTH_AUDIENCE" in log
    assert "PROCESS_AUTH_JWKS" in log


# Principals cannot reach each other through the network.


async def test_several_principals_sharing_the_hosts_network_are_refused_and_a_domain_list_keeps_them_apart(
    workspaces: Path, tokens_file: Path, tmp_path: Path
) -> None:
    # With SANDBOX_ALLOWED_DOMAINS=* every sandbox is in the host's network namespace: a server one
    # principal's process listens on (127.0.0.1) would answer every other principal's processes.
    status, log = await run_server_to_exit(
        workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file), SANDBOX_ALLOWED_DOMAINS="*"
    )
    assert status == 2, log
    assert "SANDBOX_ALLOWED_DOMAINS=* would share this machine's network" in log
    assert "network namespace of its own" in log
    # One principal may share it with itself: the README's quick start for one token starts.
    one = write_tokens(tmp_path / "one", {"alice": ALICE})
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(one), SANDBOX_ALLOWED_DOMAINS="*") as server,
        mcp_client(server.url, ALICE) as alice,
    ):
        assert (await call(alice, "spawn", {"command": "echo alone"}))["stdout"] == "alone\n"

    # With a domain list, the attack as reported: alice serves a secret on loopback, bob's process asks.
    port = 20000 + secrets.randbelow(20000)
    serve = f"python3 -u -m http.server {port} --bind 127.0.0.1"
    connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), 5); print('reached')"
    fetch_own = (
        "import http.server, threading, urllib.request\n"
        "server = http.server.HTTPServer(('127.0.0.1', 0), http.server.SimpleHTTPRequestHandler)\n"
        "threading.Thread(target=server.serve_forever, daemon=True).start()\n"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "print(opener.open(f'http://127.0.0.1:{server.server_port}/secret.txt', timeout=5).read().decode())\n"
    )
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server,
        mcp_client(server.url, ALICE) as alice,
        mcp_client(server.url, BOB) as bob,
    ):
        await call(alice, "spawn", {"command": "echo alice-secret > secret.txt"})
        (workspaces / "alice" / "own.py").write_text(fetch_own)
        served = await call(alice, "spawn", {"command": serve, "background": True, "waitFor": "Serving HTTP"})
        assert served["waitResult"] == "matched", served
        peek = await call(bob, "spawn", {"command": f'python3 -c "{connect}"'})
        assert peek["exitCode"] != 0
        assert "reached" not in peek["stdout"]
        assert "ConnectionRefusedError" in peek["stderr"], peek
        # Each principal still reaches what its own process serves (in the same sandbox).
        assert (await call(alice, "spawn", {"command": "python3 own.py"}))["stdout"] == "alice-secret\n\n"
        # And, its box being one, what a process of an earlier call serves, and what one left in /tmp,
        # which another principal's box shows nothing of.
        reach = await call(alice, "spawn", {"command": f'python3 -c "{connect}"'})
        assert reach["stdout"] == "reached\n", reach
        await call(alice, "spawn", {"command": "echo alice-note > /tmp/note"})
        assert (await call(alice, "spawn", {"command": "cat /tmp/note"}))["stdout"] == "alice-note\n"
        assert (await call(bob, "spawn", {"command": "cat /tmp/note"}))["exitCode"] != 0
        await call(alice, "kill", {"id": served["pid"]})


# Each principal in its own space.


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_principals_see_only_their_own_processes_and_cannot_touch_anothers(
    workspaces: Path, tokens_file: Path, mode: str
) -> None:
    argument = sleep_argument()
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server,
        mcp_client(server.url, ALICE, mode=mode) as alice,
        mcp_client(server.url, BOB, mode=mode) as bob,
    ):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(call, alice, "spawn", {"command": "echo alice-secret > secret.txt"})
            tasks.start_soon(call, bob, "spawn", {"command": "echo bob was here"})
        sleeper = await call(alice, "spawn", {"command": f"sleep {argument}", "background": True})
        repl = await call(alice, "spawn", {"command": "cat", "background": True})
        [host_pid] = await sleepers(argument, 1)

        alice_ids = {p["pid"] for p in (await call(alice, "ps", {}))["processes"]}
        bob_ids = {p["pid"] for p in (await call(bob, "ps", {}))["processes"]}
        assert alice_ids == {"host-1", sleeper["pid"], repl["pid"]}
        assert bob_ids == {"host-1"}
        bob_commands = [p["command"] for p in (await call(bob, "ps", {}))["processes"]]
        assert bob_commands == ["echo bob was here"]

        for tool, arguments in (
            ("stdout", {"id": sleeper["pid"]}),
            ("stdin", {"id": repl["pid"], "input": "from bob\\n"}),
            ("kill", {"id": sleeper["pid"], "signal": "KILL"}),
        ):
            refused = await error(bob, tool, arguments)
            assert "process_not_found: " in refused, refused
            never = await error(bob, tool, {**arguments, "id": "host-99"})
            assert refused == never.replace("host-99", arguments["id"])
        assert pid_alive(host_pid)
        assert (await call(alice, "stdout", {"id": repl["pid"]}))["stdout"] == ""

        # Nor through the file system: bob's sandbox shows neither alice's workspace nor her file.
        alice_file = workspaces / "alice" / "secret.txt"
        assert alice_file.read_text() == "alice-secret\n"
        peek = await call(bob, "spawn", {"command": f"cat {alice_file}"})
        assert "alice-secret" not in peek["stdout"]
        assert peek["exitCode"] != 0
        assert (await call(bob, "spawn", {"command": f"ls {workspaces}"}))["stdout"].split() == ["bob"]
        assert (await call(alice, "spawn", {"command": "cat secret.txt"}))["stdout"] == "alice-secret\n"
        await call(alice, "kill", {"id": sleeper["pid"], "signal": "KILL"})


async def test_a_link_in_one_principals_workspace_never_mounts_anothers(workspaces: Path, tokens_file: Path) -> None:
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server,
        mcp_client(server.url, ALICE) as alice,
        mcp_client(server.url, BOB) as bob,
    ):
        await call(alice, "spawn", {"command": "echo alice-secret > secret.txt"})
        alice_file = workspaces / "alice" / "secret.txt"
        up = "../" * len((workspaces / "bob").parts)  # from bob's workspace to the host's /
        attack = f"cat {alice_file}; echo bob >> {alice_file}"
        for plant in (f"ln -s {up} .bashrc", f"mkdir -p a/b && ln -s ../../{up} a/b/.ssh", "ln -s ../alice .git"):
            await call(bob, "spawn", {"command": plant})
            refused = await error(bob, "spawn", {"command": attack})
            assert "symbolic link" in refused, refused
            assert "alice-secret" not in refused
            listed = await call(alice, "ps", {})  # alice is unaffected meanwhile
            assert listed["processes"]
            for name in (".bashrc", "a/b/.ssh", ".git"):
                (workspaces / "bob" / name).unlink(missing_ok=True)
        assert alice_file.read_text() == "alice-secret\n"
        peek = await call(bob, "spawn", {"command": attack})
        assert "alice-secret" not in peek["stdout"]
        assert alice_file.read_text() == "alice-secret\n"


async def test_limits_hold_per_principal(workspaces: Path, tokens_file: Path) -> None:
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file), PROCESS_MAX_LIVE="2") as server,
        mcp_client(server.url, ALICE) as alice,
        mcp_client(server.url, BOB) as bob,
    ):
        for _ in range(2):
            await call(alice, "spawn", {"command": "sleep 60", "background": True})
        refused = await error(alice, "spawn", {"command": "sleep 60", "background": True})
        assert "too_many_processes: " in refused, refused
        for _ in range(2):
            await call(bob, "spawn", {"command": "sleep 60", "background": True})


async def test_a_principal_with_too_many_calls_in_progress_is_told_to_wait_and_others_are_not(
    workspaces: Path, tokens_file: Path
) -> None:
    argument = sleep_argument()
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file), PROCESS_MAX_REQUESTS="1") as server,
        mcp_client(server.url, ALICE) as alice,
        mcp_client(server.url, BOB) as bob,
    ):
        gate = await call(alice, "spawn", {"command": f"sleep {argument}", "background": True})
        [host_pid] = await sleepers(argument, 1)
        held: list[CallToolResult] = []

        async def hold_the_only_slot() -> None:
            while True:  # the polling below may hold the slot for a moment: try again then
                result = await alice.call_tool("stdout", {"id": gate["pid"], "untilExit": True, "waitMs": 30000})
                if not (result.is_error and "too_many_requests: " in text_of(result)):
                    held.append(result)
                    return

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(hold_the_only_slot)
            with anyio.fail_after(WAIT_S):
                while not (refused := await alice.call_tool("ps", {})).is_error:
                    await anyio.sleep(0.02)
            assert "too_many_requests: " in text_of(refused), text_of(refused)
            assert "PROCESS_MAX_REQUESTS=1" in text_of(refused)
            await call(bob, "ps", {})
            await call(bob, "spawn", {"command": "true"})
            os.kill(host_pid, signal.SIGKILL)  # the test's own sleeper: ends the wait
        [result] = held
        assert result.structured_content is not None
        assert result.structured_content["waitResult"] == "exited"
        await call(alice, "ps", {})


async def test_an_idle_principals_space_is_reclaimed_but_not_while_something_runs(
    workspaces: Path, tokens_file: Path
) -> None:
    argument = sleep_argument()
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file), PROCESS_IDLE_TIMEOUT_S="1") as server,
        mcp_client(server.url, ALICE) as alice,
        mcp_client(server.url, BOB) as bob,
    ):
        await call(alice, "spawn", {"command": "echo kept > kept.txt"})
        sleeper = await call(bob, "spawn", {"command": f"sleep {argument}", "background": True})
        await server.wait_logged("principal alice: space reclaimed")
        assert (await call(alice, "ps", {}))["processes"] == []
        assert (workspaces / "alice" / "kept.txt").read_text() == "kept\n"  # the workspace stays
        assert not server.logged("principal bob: space reclaimed")
        [host_pid] = await sleepers(argument, 1)
        assert pid_alive(host_pid)
        assert (await call(bob, "ps", {}))["processes"][0]["status"] == "running"
        await call(bob, "kill", {"id": sleeper["pid"]})
        await server.wait_logged("principal bob: space reclaimed")
        # A reclaimed principal comes back to a new space in the same workspace.
        assert (await call(alice, "spawn", {"command": "cat kept.txt"}))["stdout"] == "kept\n"


async def test_sigterm_ends_the_processes_of_every_principal(workspaces: Path, tokens_file: Path) -> None:
    argument = sleep_argument()
    async with http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server:
        for token in (ALICE, BOB):
            async with mcp_client(server.url, token) as client:
                await call(client, "spawn", {"command": f"sleep {argument} & sleep {argument}", "background": True})
        found = await sleepers(argument, 4)
        assert await server.stop(signal.SIGTERM) == 0
        assert server.logged("all processes ended")
    assert not [pid for pid in found if pid_alive(pid)]


async def test_progress_and_cancellation_work_over_http(workspaces: Path, tokens_file: Path) -> None:
    reported: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reported.append(progress)

    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server,
        mcp_client(server.url, ALICE) as alice,
    ):
        result = await alice.call_tool(
            "spawn",
            {"command": "sleep 2.5; echo done", "timeoutMs": 20000},
            progress_callback=on_progress,
        )
        assert result.structured_content is not None
        assert result.structured_content["stdout"] == "done\n"
        assert reported, "no progress notification during a 2.5 s wait"
        gate = await call(alice, "spawn", {"command": "read line; echo got $line", "background": True})
        with anyio.move_on_after(0.5):
            await alice.call_tool("stdout", {"id": gate["pid"], "untilExit": True, "waitMs": 60000})
        # The cancelled wait is gone; the process and the server are not.
        typed = await call(alice, "stdin", {"id": gate["pid"], "input": "go\\n", "waitFor": "got go"})
        assert "got go" in typed["stdout"]


async def test_a_long_wait_survives_over_http(workspaces: Path, tokens_file: Path) -> None:
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server,
        mcp_client(server.url, ALICE) as alice,
    ):
        result = await call(alice, "spawn", {"command": "sleep 6; echo READY; sleep 60", "waitFor": "READY"})
        assert result["waitResult"] == "matched"
        assert result["status"] == "running"


async def test_a_hundred_concurrent_calls_from_four_principals_are_all_answered_correctly(
    workspaces: Path, tokens_file: Path
) -> None:
    answers: dict[str, list[str]] = {}
    async with http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server:

        async def principal(name: str, token: str, mode: str) -> None:
            async with mcp_client(server.url, token, mode=mode) as client:

                async def one(i: int) -> None:
                    result = await call(client, "spawn", {"command": f"echo {name}-{i}; pwd"})
                    answers.setdefault(name, []).append(result["stdout"])

                async with anyio.create_task_group() as tasks:
                    for i in range(25):
                        tasks.start_soon(one, i)

        with anyio.fail_after(WAIT_S * 6):
            async with anyio.create_task_group() as tasks:
                for (name, token), mode in zip(TOKENS.items(), ["legacy", "2026-07-28"] * 2, strict=True):
                    tasks.start_soon(principal, name, token, mode)
    assert sorted(answers) == sorted(TOKENS)
    for name, outputs in answers.items():
        assert sorted(outputs) == sorted(f"{name}-{i}\n{workspaces / name}\n" for i in range(25))


# Other clients: the TypeScript SDK (both protocol generations) and the Inspector CLI.

JS_CLIENTS = Path(__file__).parents[1] / "js"


def node_command(*arguments: str) -> list[str]:
    if not (JS_CLIENTS / "node_modules").is_dir():
        pytest.fail("the JavaScript clients are not installed: run npm ci --prefix tests/js (./verify.sh does)")
    return ["node", *arguments]


@pytest.mark.parametrize(("flavour", "protocol"), [("sdk1", "2025-11-25"), ("sdk2", "2026-07-28")])
async def test_the_typescript_sdk_drives_the_server_over_http(
    workspaces: Path, tokens_file: Path, flavour: str, protocol: str
) -> None:
    async with http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server:
        with anyio.fail_after(WAIT_S * 3):
            result = await anyio.run_process(
                node_command(str(JS_CLIENTS / "drive.mjs"), flavour, server.url, ALICE), check=False
            )
        assert result.returncode == 0, result.stderr.decode()
        seen = json.loads(result.stdout)
        async with mcp_client(server.url, BOB) as bob:
            assert (await call(bob, "ps", {}))["processes"] == []
    assert seen["protocolVersion"] == protocol
    assert (seen["sessionId"] is not None) == (flavour == "sdk1")
    assert seen["tools"] == ["kill", "ps", "spawn", "stdin", "stdout"]
    assert seen["echo"] == "hello from /bin/sh\n"
    assert seen["replTurn"].splitlines()[:2] == ["6*7", "42"]
    assert seen["kill"]["status"] == "terminated"
    assert seen["kill"]["signal"] == "SIGTERM"
    assert seen["kill"]["endedBy"] == "kill"
    assert [status for _, status in seen["ps"]] == ["terminated"] * 3


@pytest.mark.parametrize("flavour", ["sdk1", "sdk2"])
async def test_a_typescript_client_answers_askuser_and_the_answer_is_in_no_reply_audit_record_or_log(
    workspaces: Path, tokens_file: Path, tmp_path: Path, flavour: str
) -> None:
    secret = f"vault-{secrets.token_hex(8)}"
    audit = tmp_path / "audit.jsonl"
    settings = {"PROCESS_AUDIT_LOG": str(audit), "PROCESS_AUDIT_REDACT": "false", "PROCESS_LOG_LEVEL": "DEBUG"}
    async with http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file), **settings) as server:
        with anyio.fail_after(WAIT_S * 3):
            result = await anyio.run_process(
                node_command(str(JS_CLIENTS / "ask.mjs"), flavour, server.url, ALICE, secret), check=False
            )
        assert result.returncode == 0, result.stderr.decode()
        seen = json.loads(result.stdout)
    assert len(seen["questions"]) == 1
    assert "Password for the test vault?" in seen["questions"][0]
    assert seen["spawned"]["structuredContent"]["secret"] is True
    assert seen["typed"]["structuredContent"]["asked"] == "answered"
    assert f"length {len(secret)}" in seen["read"]["structuredContent"]["stdout"]  # it was typed
    for where, text in (("a reply", result.stdout.decode()), ("the audit log", audit.read_text())):
        assert secret not in text.replace(f"said {secret}", ""), f"the answer is in {where}"
    assert "askUser" in audit.read_text()
    assert any("DEBUG" in line for line in server.log), "the server did not log at DEBUG: the check means little"
    assert not [line for line in server.log if secret in line], "the answer is in the server's log"


async def test_the_inspector_cli_calls_tools_with_a_token_and_is_refused_without(
    workspaces: Path, tokens_file: Path
) -> None:
    inspector = str(JS_CLIENTS / "node_modules" / ".bin" / "mcp-inspector")
    async with http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server:
        spawn = ["--method", "tools/call", "--tool-name", "spawn", "--tool-arg", "command=echo inspected"]
        with anyio.fail_after(WAIT_S * 3):
            result = await anyio.run_process(
                node_command(inspector, "--cli", server.url, "--header", f"Authorization: Bearer {CAROL}", *spawn),
                check=False,
            )
            assert result.returncode == 0, result.stderr.decode()
            assert json.loads(result.stdout)["structuredContent"]["stdout"] == "inspected\n"
            refused = await anyio.run_process(node_command(inspector, "--cli", server.url, *spawn), check=False)
        assert refused.returncode != 0
        assert b"inspected" not in refused.stdout
        assert server.logged("principal carol: new space")


# The command line.


async def test_help_lists_every_option_and_environment_variable_and_version_prints_it() -> None:
    with anyio.fail_after(WAIT_S * 2):
        shown = await anyio.run_process([sys.executable, "-m", "process_mcp", "--help"])
        version = await anyio.run_process([sys.executable, "-m", "process_mcp", "--version"])
    text = shown.stdout.decode()
    for option in ("--transport", "--host", "--port", "--version", "--help"):
        assert option in text
    lines = text.split("environment variables")[1].splitlines()
    for name, _, description in environment_variables():
        [line] = [line for line in lines if line.split()[:1] == [name]]
        assert description in line
    assert version.stdout.decode().strip() == f"process-mcp {process_mcp.__version__}"


async def test_the_command_line_overrides_the_environment(workspaces: Path, tokens_file: Path) -> None:
    options = ["--transport", "http", "--host", "127.0.0.1", "--port", "0"]
    environment = {"PROCESS_HTTP_HOST": "0.0.0.0", "PROCESS_HTTP_PORT": "1"}
    async with (
        http_server(
            workspaces, options, PROCESS_TRANSPORT="stdio", PROCESS_AUTH_TOKENS_FILE=str(tokens_file), **environment
        ) as server,
        mcp_client(server.url, ALICE) as alice,
    ):
        assert server.url.startswith("http://127.0.0.1:")
        assert (await call(alice, "spawn", {"command": "echo over http"}))["stdout"] == "over http\n"
    with anyio.fail_after(WAIT_S * 2):
        result = await anyio.run_process(
            [sys.executable, "-m", "process_mcp", "--transport", "http", "--port", "99999"], check=False
        )
    assert result.returncode != 0
    assert b"--port 99999 is not a port" in result.stderr


# Docker mode: a container and a volume per principal.


@pytest.mark.docker
async def test_in_docker_mode_each_principal_gets_a_container_and_volume_of_its_own(
    engine: DockerClient, workspaces: Path, tokens_file: Path
) -> None:
    container, volume = unique_name("http"), unique_name("http-vol")
    containers = {name: f"{container}-{name}" for name in ("alice", "bob")}
    volumes = {name: f"{volume}-{name}" for name in ("alice", "bob")}
    settings = {
        "PROCESS_AUTH_TOKENS_FILE": str(tokens_file),
        "PROCESS_MODE": "docker",
        "DOCKER_IMAGE": DEBIAN_IMAGE,
        "DOCKER_CONTAINER": container,
        "DOCKER_VOLUME": volume,
        "PROCESS_IDLE_TIMEOUT_S": "2",
        "DEFAULT_WORKDIR": "",  # the container's /home/agent
    }
    try:
        async with (
            http_server(workspaces, **settings) as server,
            mcp_client(server.url, ALICE) as alice,
            mcp_client(server.url, BOB) as bob,
        ):
            mine = await call(alice, "spawn", {"command": "hostname; echo alice-data > /home/agent/mine"})
            assert mine["via"] == "agent"
            alice_container = await anyio.to_thread.run_sync(engine.containers.get, containers["alice"])
            assert mine["stdout"].strip() == str(alice_container.id)[:12]
            peek = await call(bob, "spawn", {"command": "hostname; cat /home/agent/mine"})
            assert "alice-data" not in peek["stdout"]
            assert peek["exitCode"] != 0
            bob_container = await anyio.to_thread.run_sync(engine.containers.get, containers["bob"])
            assert peek["stdout"].split()[0] == str(bob_container.id)[:12]
            await call(bob, "spawn", {"command": "sleep 600", "background": True})

            await server.wait_logged("principal alice: space reclaimed")
            with pytest.raises(docker_errors.NotFound):
                await anyio.to_thread.run_sync(engine.containers.get, containers["alice"])
            await anyio.to_thread.run_sync(engine.volumes.get, volumes["alice"])  # kept
            assert (await call(alice, "spawn", {"command": "cat /home/agent/mine"}))["stdout"] == "alice-data\n"
        for name in containers.values():  # SIGTERM removed every principal's container
            with pytest.raises(docker_errors.NotFound):
                await anyio.to_thread.run_sync(engine.containers.get, name)
    finally:
        for name in containers.values():
            with contextlib.suppress(docker_errors.NotFound):
                (await anyio.to_thread.run_sync(engine.containers.get, name)).remove(force=True)
        for name in volumes.values():
            with contextlib.suppress(docker_errors.NotFound):
                (await anyio.to_thread.run_sync(engine.volumes.get, name)).remove(force=True)


@pytest.mark.docker
async def test_in_docker_mode_a_principals_container_cannot_reach_anothers_but_reaches_its_own_and_out(
    engine: DockerClient, workspaces: Path, tokens_file: Path
) -> None:
    container, volume = unique_name("http-net"), unique_name("http-net-vol")
    names = {name: f"{container}-{name}" for name in ("alice", "bob")}
    settings = {
        "PROCESS_AUTH_TOKENS_FILE": str(tokens_file),
        "PROCESS_MODE": "docker",
        "DOCKER_IMAGE": DEBIAN_IMAGE,
        "DOCKER_CONTAINER": container,
        "DOCKER_VOLUME": volume,
        "SANDBOX_ALLOWED_DOMAINS": "*",  # a network, not only the domain proxy
        "DEFAULT_WORKDIR": "",
    }
    serve = "echo {0}-secret > secret.txt; python3 -u -m http.server 8000"
    fetch = (
        "import sys, urllib.request\n"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "try:\n"
        "    print(opener.open(f'http://{sys.argv[1]}:8000/secret.txt', timeout=3).read().decode().strip())\n"
        "except OSError as exc:\n"
        "    print('unreachable', type(exc).__name__)\n"
    )
    reach_out = (
        "import socket, sys; print(socket.create_connection((sys.argv[1], int(sys.argv[2])), 5).recv(64).decode())"
    )

    async def answer(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            await stream.send(b"outside\n")

    listeners: list[anyio.abc.Listener[anyio.abc.SocketStream]] = []
    try:
        async with (
            http_server(workspaces, **settings) as server,
            mcp_client(server.url, ALICE) as alice,
            mcp_client(server.url, BOB) as bob,
            anyio.create_task_group() as tasks,
        ):
            clients = {"alice": alice, "bob": bob}
            address, gateway = {}, {}
            for name, client in clients.items():
                served = await call(client, "spawn", {"command": serve.format(name), "background": True,
                                                       "waitFor": "Serving HTTP"})  # fmt: skip
                assert served["waitResult"] == "matched", served
                await call(client, "spawn", {"command": f"cat > fetch.py <<'EOF'\n{fetch}EOF"})
                found = await anyio.to_thread.run_sync(engine.containers.get, names[name])
                # Host-side: each container is on a network of its own, named after it, labelled, made by the server.
                assert list(found.attrs["NetworkSettings"]["Networks"]) == [names[name]]
                net = await anyio.to_thread.run_sync(engine.networks.get, names[name])
                assert net.attrs["Labels"].get("process-mcp.managed") == "true"
                address[name] = found.attrs["NetworkSettings"]["Networks"][names[name]]["IPAddress"]
                gateway[name] = net.attrs["IPAM"]["Config"][0]["Gateway"]
            for name, other in (("alice", "bob"), ("bob", "alice")):
                # The outside: a server on the host, at the address it has on this principal's network.
                outside = await anyio.create_tcp_listener(local_host=gateway[name], local_port=0)
                listeners.append(outside)
                tasks.start_soon(outside.serve, answer)
                port = outside.extra(anyio.abc.SocketAttribute.local_port)
                own = await call(clients[name], "spawn", {"command": f"python3 fetch.py {address[name]}"})
                assert own["stdout"] == f"{name}-secret\n", own
                theirs = await call(clients[name], "spawn", {"command": f"python3 fetch.py {address[other]}"})
                assert theirs["stdout"].startswith("unreachable"), theirs
                assert "secret" not in theirs["stdout"]
                out = await call(
                    clients[name], "spawn", {"command": f'python3 -c "{reach_out}" {gateway[name]} {port}'}
                )
                assert out["stdout"] == "outside\n\n", out
            tasks.cancel_scope.cancel()
        for name in names.values():  # SIGTERM removed the containers, and then their networks
            with pytest.raises(docker_errors.NotFound):
                await anyio.to_thread.run_sync(engine.networks.get, name)
    finally:
        for listener in listeners:
            await listener.aclose()
        for name in names.values():
            with contextlib.suppress(docker_errors.NotFound):
                (await anyio.to_thread.run_sync(engine.containers.get, name)).remove(force=True)
            with contextlib.suppress(docker_errors.NotFound):
                (await anyio.to_thread.run_sync(engine.networks.get, name)).remove()
            with contextlib.suppress(docker_errors.NotFound):
                (await anyio.to_thread.run_sync(engine.volumes.get, f"{volume}-{name.rsplit('-', 1)[1]}")).remove()


@pytest.mark.parametrize("network", ["host", "shared-net"])
async def test_in_docker_mode_a_network_every_principal_would_share_is_refused_at_start(
    workspaces: Path, tokens_file: Path, network: str
) -> None:
    status, log = await run_server_to_exit(
        workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file), PROCESS_MODE="docker", DOCKER_NETWORK=network
    )
    assert status == 2, log
    assert f"DOCKER_NETWORK={network} would put every principal's container on one network" in log


async def test_a_client_that_disconnects_mid_wait_costs_nothing(workspaces: Path, tokens_file: Path) -> None:
    argument = sleep_argument()
    settings = {"PROCESS_AUTH_TOKENS_FILE": str(tokens_file), "PROCESS_MAX_REQUESTS": "1"}
    headers = {**JSON_AND_SSE, "Authorization": f"Bearer {ALICE}"}
    async with http_server(workspaces, **settings) as server, httpx2.AsyncClient(timeout=WAIT_S) as http:
        opened = await http.post(server.url, json=INITIALIZE, headers=headers)
        headers |= {"Mcp-Session-Id": opened.headers["mcp-session-id"], "Mcp-Protocol-Version": "2025-11-25"}
        await http.post(server.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)

        def tool(request_id: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
            params = {"name": name, "arguments": arguments}
            return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}

        spawn = {"command": f"sleep {argument}", "background": True}
        await http.post(server.url, json=tool(1, "spawn", spawn), headers=headers)
        [host_pid] = await sleepers(argument, 1)
        wait = {"id": "host-1", "untilExit": True, "waitMs": 60000}
        with pytest.raises(httpx2.ReadTimeout):  # the client gives up and hangs up mid-wait
            await http.post(server.url, json=tool(2, "stdout", wait), headers=headers, timeout=1)
        # The abandoned wait no longer holds the principal's only slot, and the process runs on.
        with anyio.fail_after(WAIT_S):
            while True:
                answer = await http.post(server.url, json=tool(3, "ps", {}), headers=headers)
                assert answer.status_code == 200, answer.text
                result = json.loads(answer.text.split("data: ", 1)[1])["result"]
                if not result["isError"]:
                    break
                assert "too_many_requests" in result["content"][0]["text"]
                await anyio.sleep(0.05)
        assert result["structuredContent"]["processes"][0]["status"] == "running"
        assert pid_alive(host_pid)
        async with mcp_client(server.url, ALICE) as alice:
            await call(alice, "kill", {"id": "host-1"})


# The library: mounting the app in an application with its own authentication.


class HeaderUsers(AuthenticationBackend):
    """An application's own authentication, as simple as can be: the user is what X-User says."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        name = conn.headers.get("x-user")
        return (AuthCredentials(["authenticated"]), SimpleUser(name)) if name else None


async def test_an_application_mounts_the_app_under_its_own_authentication(workspaces: Path) -> None:
    config = host_config(workspaces, sandbox=SandboxConfig(allowed_domains=[TEST_DOMAINS]))
    config.service.transport = "http"
    mcp = await create_process_mcp(config)
    app = Starlette(
        routes=[Mount("/", app=mcp.http_app(authenticate=False))],
        middleware=[Middleware(AuthenticationMiddleware, backend=HeaderUsers())],
        lifespan=lambda _: mcp.serving(),
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
    async with mcp, serving_in_process(server) as url:
        ann_http = create_mcp_http_client(headers={"X-User": "ann"})
        ben_http = create_mcp_http_client(headers={"X-User": "ben"})
        async with (
            ann_http,
            ben_http,
            Client(streamable_http_client(url, http_client=ann_http)) as ann,
            Client(streamable_http_client(url, http_client=ben_http)) as ben,
        ):
            assert (await call(ann, "spawn", {"command": "pwd"}))["stdout"] == f"{workspaces / 'ann'}\n"
            assert (await call(ben, "ps", {}))["processes"] == []
        assert (await post(url, INITIALIZE)).status_code == 401


async def test_connections_busy_beyond_the_limit_are_refused_with_503_and_idle_ones_make_room(
    workspaces: Path, tokens_file: Path
) -> None:
    argument = sleep_argument()
    settings = {
        "PROCESS_AUTH_TOKENS_FILE": str(tokens_file),
        "PROCESS_HTTP_MAX_CONNECTIONS": "3",
        "PROCESS_HTTP_MAX_CONNECTIONS_PER_ADDRESS": "3",
    }
    headers = {**JSON_AND_SSE, "Authorization": f"Bearer {ALICE}"}
    async with http_server(workspaces, **settings) as server:
        async with contextlib.AsyncExitStack() as stack:
            # Each client keeps its connection open between requests, as MCP clients do: idle, those
            # connections do not keep a fifth client out.
            clients = [await stack.enter_async_context(httpx2.AsyncClient(timeout=WAIT_S)) for _ in range(5)]
            statuses = [(await c.post(server.url, json=INITIALIZE, headers=headers)).status_code for c in clients]
            assert statuses == [200] * 5
        work = workspaces / "alice"

        async def spawn_and_wait(i: int) -> None:
            async with httpx2.AsyncClient(timeout=WAIT_S * 6) as client:
                opened = await client.post(server.url, json=INITIALIZE, headers=headers)
                session = {"Mcp-Session-Id": opened.headers["mcp-session-id"], "Mcp-Protocol-Version": "2025-11-25"}
                initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                await client.post(server.url, json=initialized, headers={**headers, **session})
                arguments = {"command": f"touch started-{i}; sleep {argument}", "timeoutMs": 60000}
                spawn = {"jsonrpc": "2.0", "id": 2, "method": "tools/call"}
                spawn["params"] = {"name": "spawn", "arguments": arguments}
                answer = await client.post(server.url, json=spawn, headers={**headers, **session})
                assert answer.status_code == 200, answer.text

        async with anyio.create_task_group() as tasks:
            for i in range(3):
                tasks.start_soon(spawn_and_wait, i)
            # Each spawn waits for its process to exit, on a connection of its own.
            found = await sleepers(argument, 3)
            with anyio.fail_after(WAIT_S):
                while not all((work / f"started-{i}").exists() for i in range(3)):
                    await anyio.sleep(0.02)
            async with httpx2.AsyncClient(timeout=WAIT_S) as fourth:
                refused = await fourth.post(server.url, json=INITIALIZE, headers=headers)
            assert refused.status_code == 503
            assert established_to(port_of(server)) <= 4
            for pid in found:
                os.kill(pid, signal.SIGKILL)  # the test's own sleepers: ends the spawns' waits
        async with httpx2.AsyncClient(timeout=WAIT_S) as fourth:
            assert (await fourth.post(server.url, json=INITIALIZE, headers=headers)).status_code == 200


def port_of(server: HttpServer) -> int:
    return int(server.url.rsplit(":", 1)[1].split("/")[0])


def established_to(port: int) -> int:
    """How many TCP connections to ``port`` on this machine are established (the server's ends)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if int(local.split(":")[1], 16) == port and state == "01":
            count += 1
    return count


@pytest.mark.parametrize("sources", [["127.0.0.1"], ["127.0.0.2", "127.0.0.3", "127.0.0.4"]])
async def test_connections_that_send_nothing_do_not_keep_a_principal_out(
    workspaces: Path, tokens_file: Path, sources: list[str]
) -> None:
    # The attack as reported: 270 connections that send nothing, against the default 256, from the
    # principals' own address (a sandbox on this machine) or spread over several.
    async with http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server:
        port = port_of(server)
        silent = [await raw_connection(port, sources[i % len(sources)]) for i in range(270)]
        try:
            with anyio.fail_after(WAIT_S):  # answered at once while the silent connections are open
                async with mcp_client(server.url, BOB) as bob:
                    assert (await call(bob, "spawn", {"command": "echo answered"}))["stdout"] == "answered\n"
            assert established_to(port) <= 256
            with anyio.fail_after(WAIT_S):  # the server closed the silent connections it needed room for
                while sum(closed_by_server(sock) for sock in silent) < 270 - 256:
                    await anyio.sleep(0.02)
        finally:
            for sock in silent:
                sock.close()


async def test_a_connection_that_does_not_complete_its_request_in_time_is_closed(
    workspaces: Path, tokens_file: Path
) -> None:
    async with http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server:
        port = port_of(server)
        silent = await raw_connection(port)
        head = await raw_connection(port)  # sends its head a byte at a time
        body = await raw_connection(port)  # a whole head with a token, then its body a byte at a time
        head_bytes = f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Padding: {'x' * 100}\r\n".encode()
        await anyio.to_thread.run_sync(
            body.sendall,
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {ALICE}\r\n"
            f"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
            f"Content-Length: 1000\r\n\r\n".encode(),
        )
        ended: dict[str, bool] = {}

        async def dribble(name: str, sock: socket.socket, data: bytes) -> None:
            for i in range(len(data)):
                try:
                    await anyio.to_thread.run_sync(sock.sendall, data[i : i + 1])
                except OSError:
                    break
                if closed_by_server(sock):
                    break
                await anyio.sleep(1)  # the attacker's pace, just under any single timeout
            ended[name] = closed_by_server(sock)

        async def wait_closed(name: str, sock: socket.socket) -> None:
            while not closed_by_server(sock):
                await anyio.sleep(0.1)
            ended[name] = True

        with anyio.fail_after(connections.BODY_TIMEOUT_S + WAIT_S):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wait_closed, "silent", silent)
                tasks.start_soon(dribble, "head", head, head_bytes)
                tasks.start_soon(dribble, "body", body, b"{" + b" " * 998 + b"}")
        assert ended == {"silent": True, "head": True, "body": True}
        async with mcp_client(server.url, BOB) as bob:
            assert (await call(bob, "spawn", {"command": "echo served"}))["stdout"] == "served\n"
        for sock in (silent, head, body):
            sock.close()


async def test_one_address_cannot_hold_every_connection_even_with_a_token(workspaces: Path, tokens_file: Path) -> None:
    settings = {"PROCESS_AUTH_TOKENS_FILE": str(tokens_file), "PROCESS_HTTP_MAX_CONNECTIONS": "8"}
    async with http_server(workspaces, **settings) as server:
        port = port_of(server)
        # Alice, from an address of her own, opens requests whose bodies never come: each keeps its
        # connection busy. Her address may hold half the connections.
        held = []
        for _ in range(8):
            sock = await raw_connection(port, "127.0.0.2")
            await anyio.to_thread.run_sync(
                sock.sendall,
                f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {ALICE}\r\n"
                f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode(),
            )
            held.append(sock)
        try:
            with anyio.fail_after(WAIT_S):
                async with mcp_client(server.url, BOB) as bob:
                    assert (await call(bob, "spawn", {"command": "echo served"}))["stdout"] == "served\n"
            with anyio.fail_after(WAIT_S):  # what her address had no room for was refused
                while len(refused := [a for a in map(answer_on, held) if a.startswith(b"HTTP/1.1 503")]) < 4:
                    await anyio.sleep(0.02)
            assert all(b"too_many_connections" in answer for answer in refused)
        finally:
            for sock in held:
                sock.close()


async def raw_connection(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to the server from ``source`` (any address of 127.0.0.0/8 is this machine)."""

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((source, 0))
        sock.settimeout(WAIT_S)
        sock.connect(("127.0.0.1", port))
        sock.settimeout(None)  # blocking, so that a read without waiting (MSG_DONTWAIT) returns at once
        return sock

    return await anyio.to_thread.run_sync(connect)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock``'s connection (end of stream or reset), without waiting."""
    try:
        data = sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    if not data:
        return True
    sock.recv(len(data))  # an answer (e.g. 408 or 503): read it, and look again
    return closed_by_server(sock)


def answer_on(sock: socket.socket) -> bytes:
    """What the server has answered on ``sock`` so far, left to be read again (b"" if nothing)."""
    try:
        return sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return b""


async def test_a_principal_at_its_session_cap_is_refused_and_others_are_not(
    workspaces: Path, tokens_file: Path
) -> None:
    # The attack as reported: one principal opens sessions as fast as it can and never ends them.
    headers = {**JSON_AND_SSE, "Authorization": f"Bearer {ALICE}"}
    async with http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server:
        statuses: list[int] = []
        refusals: list[str] = []

        async def flood(http: httpx2.AsyncClient) -> None:
            for _ in range(50):
                answer = await http.post(server.url, json=INITIALIZE, headers=headers)
                statuses.append(answer.status_code)
                if answer.status_code != 200:
                    refusals.append(answer.json()["error"]["message"])

        async with httpx2.AsyncClient(timeout=WAIT_S) as http, anyio.create_task_group() as tasks:
            for _ in range(8):
                tasks.start_soon(flood, http)
            with anyio.fail_after(WAIT_S):  # answered while the flood runs
                async with mcp_client(server.url, BOB) as bob:
                    assert (await call(bob, "spawn", {"command": "echo answered"}))["stdout"] == "answered\n"
        assert statuses.count(200) == 32
        assert set(statuses) == {200, 429}
        assert refusals[0].startswith("too_many_sessions: alice has 32 MCP sessions open"), refusals[0]
        assert "PROCESS_MAX_SESSIONS_PER_PRINCIPAL=32" in refusals[0]
        created = [line for line in server.log if "Created new transport with session ID" in line]
        assert len(created) <= 32 + 1  # alice's and bob's: the refused never reached the SDK
        # Alice's sessions still work, and so do her stateless (2026-07-28) calls, which open none.
        async with mcp_client(server.url, ALICE, mode="2026-07-28") as alice:
            assert (await call(alice, "spawn", {"command": "echo stateless"}))["stdout"] == "stateless\n"


async def test_a_session_ended_or_idle_frees_its_principals_room(workspaces: Path, tokens_file: Path) -> None:
    headers = {**JSON_AND_SSE, "Authorization": f"Bearer {ALICE}"}
    settings = {
        "PROCESS_AUTH_TOKENS_FILE": str(tokens_file),
        "PROCESS_MAX_SESSIONS_PER_PRINCIPAL": "2",
        "PROCESS_SESSION_IDLE_TIMEOUT_S": "2",
    }
    async with http_server(workspaces, **settings) as server, httpx2.AsyncClient(timeout=WAIT_S) as http:
        first, second = [(await http.post(server.url, json=INITIALIZE, headers=headers)) for _ in range(2)]
        assert (await http.post(server.url, json=INITIALIZE, headers=headers)).status_code == 429
        ended = await http.delete(server.url, headers={**headers, "Mcp-Session-Id": first.headers["mcp-session-id"]})
        assert ended.status_code == 200
        third = await http.post(server.url, json=INITIALIZE, headers=headers)
        assert third.status_code == 200
        assert (await http.post(server.url, json=INITIALIZE, headers=headers)).status_code == 429
        # Without requests, the sessions end by themselves, and with them the count.
        with anyio.fail_after(WAIT_S):
            while (await http.post(server.url, json=INITIALIZE, headers=headers)).status_code != 200:
                await anyio.sleep(0.1)
        session = {"Mcp-Session-Id": second.headers["mcp-session-id"], "Mcp-Protocol-Version": "2025-11-25"}
        ps = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "ps", "arguments": {}}}
        assert (await http.post(server.url, json=ps, headers={**headers, **session})).status_code == 404


async def test_spawns_beyond_the_rate_limit_are_refused_with_the_time_to_wait(
    workspaces: Path, tokens_file: Path
) -> None:
    settings = {"PROCESS_AUTH_TOKENS_FILE": str(tokens_file), "PROCESS_RATE_SPAWNS_PER_MIN": "3"}
    async with (
        http_server(workspaces, **settings) as server,
        mcp_client(server.url, ALICE) as alice,
        mcp_client(server.url, BOB) as bob,
    ):
        # Spawns that never started (a cwd that is not there, a bad argument) do not count.
        for _ in range(4):
            assert "invalid_input" in await error(alice, "spawn", {"command": "true", "cwd": "/nonexistent"})
        for i in range(3):
            assert (await call(alice, "spawn", {"command": f"echo {i}"}))["stdout"] == f"{i}\n"
        refused = await error(alice, "spawn", {"command": "echo 3"})
        assert "rate_limited: " in refused
        assert "PROCESS_RATE_SPAWNS_PER_MIN=3" in refused
        wait = float(refused.split("try again in ")[1].split(" s")[0])
        assert 0 < wait <= 60
        await call(alice, "ps", {})  # other tools are not limited
        for i in range(3):
            await call(bob, "spawn", {"command": f"echo {i}"})


async def test_metrics_are_served_to_their_token_and_parse_as_prometheus_text(
    workspaces: Path, tokens_file: Path, tmp_path: Path
) -> None:
    token = secrets.token_hex(16)
    settings = {
        "PROCESS_AUTH_TOKENS_FILE": str(tokens_file),
        "PROCESS_METRICS_TOKEN": token,
        "PROCESS_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
    }
    async with http_server(workspaces, **settings) as server:
        async with mcp_client(server.url, ALICE) as alice:
            await call(alice, "spawn", {"command": "echo hello"})
            await call(alice, "spawn", {"command": "sleep 60", "background": True})
            await error(alice, "stdout", {"id": "host-9"})
        async with httpx2.AsyncClient(timeout=WAIT_S) as http:
            assert (await http.get(server.base + "/metrics")).status_code == 401
            wrong = await http.get(server.base + "/metrics", headers={"Authorization": f"Bearer {ALICE}"})
            assert wrong.status_code == 401
            scraped = await http.get(server.base + "/metrics", headers={"Authorization": f"Bearer {token}"})
        assert scraped.status_code == 200
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(scraped.text)
            for sample in family.samples
        }
    assert samples[("process_mcp_tool_calls_total", (("outcome", "ok"), ("tool", "spawn")))] == 2
    assert samples[("process_mcp_tool_calls_total", (("outcome", "process_not_found"), ("tool", "stdout")))] == 1
    assert samples[("process_mcp_live_processes", (("principal", "alice"),))] == 1
    assert samples[("process_mcp_spawn_launch_seconds_count", ())] == 2
    assert samples[("process_mcp_output_bytes_total", ())] == len("hello\n")
    assert ("process_mcp_audit_queue_depth", ()) in samples


async def test_without_a_metrics_token_this_machine_may_scrape_when_it_shares_its_network_with_nobody(
    workspaces: Path, tmp_path: Path
) -> None:
    # One principal, and sandboxes with a domain list (a network namespace each): a client on loopback
    # can only be the operator's.
    one = write_tokens(tmp_path / "one", {"alice": ALICE})
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(one)) as server,
        httpx2.AsyncClient(timeout=WAIT_S) as http,
    ):
        scraped = await http.get(server.base + "/metrics")
    assert scraped.status_code == 200
    assert "process_mcp_tool_calls" in scraped.text
    assert not server.logged("/metrics is off")


@pytest.mark.parametrize(
    ("tokens", "settings", "why"),
    [
        (TOKENS, {}, "several principals"),
        ({"alice": ALICE}, {"SANDBOX_ALLOWED_DOMAINS": "*"}, "SANDBOX_ALLOWED_DOMAINS=*"),
        ({"alice": ALICE}, {"SANDBOX_ENABLED": "false"}, "unsandboxed"),
    ],
)
async def test_metrics_need_their_token_when_loopback_is_shared_with_principals_or_sandboxes(
    workspaces: Path, tmp_path: Path, tokens: dict[str, str], settings: dict[str, str], why: str
) -> None:
    tokens_file = write_tokens(tmp_path / "tokens", tokens)
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file), **settings) as server,
        httpx2.AsyncClient(timeout=WAIT_S) as http,
    ):
        async with mcp_client(server.url, ALICE) as alice:
            await call(alice, "spawn", {"command": "echo counted"})
        for headers in ({}, {"Authorization": f"Bearer {ALICE}"}):
            scraped = await http.get(server.base + "/metrics", headers=headers)
            assert scraped.status_code == 403
            assert "PROCESS_METRICS_TOKEN" in scraped.text
            assert "alice" not in scraped.text
    [line] = [line for line in server.log if "/metrics is off" in line]
    assert why in line
    assert "PROCESS_METRICS_TOKEN" in line


async def test_a_sandboxed_process_cannot_scrape_metrics_on_loopback(workspaces: Path, tmp_path: Path) -> None:
    # One principal may share the host's network with its own sandboxes (SANDBOX_ALLOWED_DOMAINS=*), but
    # /metrics is then no longer served to whoever is on loopback.
    one = write_tokens(tmp_path / "one", {"alice": ALICE})
    fetch = (
        "import sys, urllib.request, urllib.error\n"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "for path in ('/healthz', '/metrics'):\n"
        "    try:\n"
        "        answer = opener.open(sys.argv[1] + path, timeout=5)\n"
        "        print(path, answer.status, answer.read().decode().strip())\n"
        "    except urllib.error.HTTPError as exc:\n"
        "        print(path, exc.code, exc.read().decode().strip())\n"
    )
    (workspaces / "alice").mkdir()
    (workspaces / "alice" / "fetch.py").write_text(fetch)
    settings = {"PROCESS_AUTH_TOKENS_FILE": str(one), "SANDBOX_ALLOWED_DOMAINS": "*"}
    async with http_server(workspaces, **settings) as server, mcp_client(server.url, ALICE) as alice:
        await call(alice, "spawn", {"command": "sleep 60", "background": True})
        result = await call(alice, "spawn", {"command": f"python3 fetch.py {server.base}"})
    lines = result["stdout"].splitlines()
    assert lines[0] == "/healthz 200 ok"  # the sandbox does reach the server on loopback
    assert lines[1].startswith("/metrics 403 "), result
    assert "process_mcp_" not in result["stdout"]


async def test_a_client_on_ipv4_loopback_seen_through_a_dual_stack_socket_may_scrape(workspaces: Path) -> None:
    # The one local caller (PROCESS_AUTH=none), with sandboxes in network namespaces of their own: loopback
    # is this machine's operator.
    config = host_config(workspaces, sandbox=SandboxConfig(allowed_domains=[TEST_DOMAINS]))
    config.service.transport = "http"
    config.service.auth = "none"
    mcp = await create_process_mcp(config)
    server = uvicorn.Server(uvicorn.Config(mcp.http_app(), log_config=None, lifespan="on"))
    # An application serving the app on a dual-stack socket sees a client on 127.0.0.1 as ::ffff:127.0.0.1.
    # This socket listens on that address alone, so nothing off this machine can reach it.
    with socket.socket(socket.AF_INET6) as dual_stack:
        dual_stack.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual_stack.bind(("::ffff:127.0.0.1", 0))
        port = dual_stack.getsockname()[1]
        async with mcp, anyio.create_task_group() as tasks:
            tasks.start_soon(functools.partial(server.serve, sockets=[dual_stack]))
            try:
                with anyio.fail_after(WAIT_S):
                    while not server.started:
                        await anyio.sleep(0.02)
                async with httpx2.AsyncClient(timeout=WAIT_S) as http:
                    scraped = await http.get(f"http://127.0.0.1:{port}/metrics")
            finally:
                server.should_exit = True
    assert scraped.status_code == 200
    assert "process_mcp_tool_calls" in scraped.text


async def test_http_without_authentication_is_refused_on_an_address_that_only_embeds_127_0_0_1(
    workspaces: Path,
) -> None:
    # A translator or relay delivers these to 127.0.0.1 somewhere else: listening on one is not loopback.
    for host in ("64:ff9b::7f00:1", "::7f00:1", "2002:7f00:1::1"):  # NAT64, IPv4-compatible, 6to4
        status, log = await run_server_to_exit(workspaces, PROCESS_AUTH="none", PROCESS_HTTP_HOST=host)
        assert status == 2, log
        assert "loopback host only" in log


async def test_logs_are_json_lines_on_request(workspaces: Path, tokens_file: Path) -> None:
    settings = {"PROCESS_AUTH_TOKENS_FILE": str(tokens_file), "PROCESS_LOG_FORMAT": "json"}
    async with http_server(workspaces, **settings) as server, mcp_client(server.url, ALICE) as alice:
        await call(alice, "spawn", {"command": "true"})
        await server.wait_logged("principal alice: new space")
    entries = [json.loads(line) for line in server.log if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(entry["message"] == "principal alice: new space" for entry in entries)
    assert any(entry["message"] == "all processes ended; bye" for entry in entries)


async def test_health_and_readiness_answer_without_a_token_and_say_nothing_more(
    workspaces: Path, tokens_file: Path, tmp_path: Path
) -> None:
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file)) as server,
        httpx2.AsyncClient(timeout=WAIT_S) as http,
    ):
        for path in ("/healthz", "/readyz"):
            answer = await http.get(server.base + path)
            assert (answer.status_code, answer.text) == (200, "ok\n")
    no_engine = {"PROCESS_MODE": "docker", "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", "DEFAULT_WORKDIR": ""}
    async with (
        http_server(workspaces, PROCESS_AUTH_TOKENS_FILE=str(tokens_file), **no_engine) as server,
        httpx2.AsyncClient(timeout=WAIT_S) as http,
    ):
        assert (await http.get(server.base + "/healthz")).status_code == 200
        answer = await http.get(server.base + "/readyz")
        assert (answer.status_code, answer.text) == (503, "not ready\n")
