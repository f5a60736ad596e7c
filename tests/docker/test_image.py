"""The server's own image, for real: built offline by scripts/build-image.sh, run hardened (read-only
root, no capabilities, no-new-privileges, tmpfs /tmp), and driven over HTTP by the TypeScript SDK."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2
import pytest
from docker import errors as docker_errors
from docker.client import DockerClient
from docker.models.containers import Container

from ..helpers import WAIT_S, call, cannot_run_here, unique_name
from ..http_server import mcp_client
from ..service.test_http import JS_CLIENTS, node_command

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

ROOT = Path(__file__).parents[2]
SERVER_UID = 10001
TOKEN = secrets.token_hex(16)


@pytest.fixture(scope="session")
def image(docker_client: DockerClient) -> str:
    """process-mcp:latest, built from this checkout (layers are cached, so a rebuild is quick)."""
    if os.getuid() != 0:
        cannot_run_here("building the image needs root (debootstrap)")
    built = subprocess.run([str(ROOT / "scripts" / "build-image.sh")], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    return built.stdout.strip().splitlines()[-1]


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    """The tokens file as a platform mounts a secret: root's, readable by the server's group only."""
    directory = tmp_path / "secrets"
    directory.mkdir()
    tokens = directory / "tokens"
    tokens.write_text(f"alice {TOKEN}\n")
    os.chown(tokens, 0, SERVER_UID)
    tokens.chmod(0o440)
    directory.chmod(0o755)
    return directory


@pytest.fixture
def box(docker_client: DockerClient, image: str, secrets_dir: Path) -> Iterator[Container]:
    name, volume = unique_name("image"), unique_name("image-vol")
    container = docker_client.containers.run(  # type: ignore[call-overload]
        image,
        name=name,
        detach=True,
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        tmpfs={"/tmp": "rw,nosuid,nodev,size=64m"},
        volumes={str(secrets_dir): {"bind": "/run/secrets", "mode": "ro"}, volume: {"bind": "/workspace"}},
        environment={"PROCESS_AUTH_TOKENS_FILE": "/run/secrets/tokens"},
        ports={"8765/tcp": ("127.0.0.1", None)},  # None: any free port, which the stubs do not know
        labels={"process-mcp.test": "true"},
    )
    try:
        yield container
    finally:
        with contextlib.suppress(docker_errors.NotFound):
            container.remove(force=True)
        with contextlib.suppress(docker_errors.NotFound):
            docker_client.volumes.get(volume).remove(force=True)


async def base_url(container: Container) -> str:
    """The published address once /healthz answers."""
    await anyio.to_thread.run_sync(container.reload)
    port = container.attrs["NetworkSettings"]["Ports"]["8765/tcp"][0]["HostPort"]
    url = f"http://127.0.0.1:{port}"
    await wait_answering(url + "/healthz")
    return url


async def wait_answering(url: str) -> None:
    """Wait (bounded) until ``url`` answers 200: the server in the container is up."""
    async with httpx2.AsyncClient(timeout=2) as http:
        with anyio.fail_after(WAIT_S * 3):
            while True:
                with contextlib.suppress(httpx2.TransportError):
                    if (await http.get(url)).status_code == 200:
                        return
                await anyio.sleep(0.1)


async def test_the_hardened_image_serves_the_typescript_client_and_stops_cleanly(box: Container) -> None:
    url = await base_url(box)
    async with httpx2.AsyncClient(timeout=WAIT_S) as http:
        assert (await http.get(url + "/readyz")).text == "ok\n"
        assert (await http.post(url + "/mcp", json={})).status_code == 401
    with anyio.fail_after(WAIT_S * 3):
        driven = await anyio.run_process(
            node_command(str(JS_CLIENTS / "drive.mjs"), "sdk1", url + "/mcp", TOKEN), check=False
        )
    assert driven.returncode == 0, driven.stderr.decode()
    seen = json.loads(driven.stdout)
    assert seen["echo"] == "hello from /bin/sh\n"
    assert seen["replTurn"].splitlines()[:2] == ["6*7", "42"]
    assert seen["kill"]["endedBy"] == "kill"

    async with mcp_client(url + "/mcp", TOKEN) as alice:
        whoami = await call(alice, "spawn", {"command": "id -u; pwd; echo kept > kept.txt"})
        assert whoami["stdout"] == f"{SERVER_UID}\n/workspace/alice\n"
        assert whoami["sandboxed"] is False  # the container is the box; the server claims no sandbox in it
        await call(alice, "spawn", {"command": "sleep 600", "background": True})
        await call(alice, "spawn", {"command": "sleep 600 & sleep 600", "background": True})
    await anyio.to_thread.run_sync(lambda: box.stop(timeout=10))
    await anyio.to_thread.run_sync(box.reload)
    assert box.attrs["State"]["ExitCode"] == 0, box.logs().decode()[-2000:]
    assert "all processes ended" in box.logs().decode()

    await anyio.to_thread.run_sync(box.start)  # the workspace (a volume) outlives the container's run
    url = await base_url(box)
    async with mcp_client(url + "/mcp", TOKEN) as alice:
        assert (await call(alice, "spawn", {"command": "cat kept.txt"}))["stdout"] == "kept\n"


async def test_the_image_runs_as_any_non_root_uid(docker_client: DockerClient, image: str, secrets_dir: Path) -> None:
    """As Kubernetes runs it with runAsUser and an fsGroup that may read the mounted secret."""
    container = docker_client.containers.run(  # type: ignore[call-overload]
        image,
        name=unique_name("image-uid"),
        user="23456:23456",
        group_add=[str(SERVER_UID)],
        detach=True,
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        tmpfs={"/tmp": "rw,size=16m", "/workspace": "rw,size=16m,mode=1777"},
        volumes={str(secrets_dir): {"bind": "/run/secrets", "mode": "ro"}},
        environment={"PROCESS_AUTH_TOKENS_FILE": "/run/secrets/tokens"},
        ports={"8765/tcp": ("127.0.0.1", None)},  # None: any free port, which the stubs do not know
        labels={"process-mcp.test": "true"},
    )
    try:
        url = await base_url(container)
        async with mcp_client(url + "/mcp", TOKEN) as alice:
            assert (await call(alice, "spawn", {"command": "id -u"}))["stdout"] == "23456\n"
    finally:
        container.remove(force=True)


async def test_the_compose_file_is_valid_and_brings_up_a_hardened_box(
    docker_client: DockerClient, image: str, secrets_dir: Path
) -> None:
    compose = ["docker-compose", "-f", str(ROOT / "deploy" / "compose.yaml"), "-p", unique_name("compose")]
    with socket_port() as port:
        tokens = str(secrets_dir / "tokens")
        environment = {**os.environ, "PROCESS_MCP_PORT": str(port), "PROCESS_MCP_TOKENS": tokens}
    checked = await anyio.run_process([*compose, "config"], env=environment, check=False)
    assert checked.returncode == 0, checked.stderr.decode()
    config = checked.stdout.decode()
    for hardening in ("read_only: true", "- ALL", "no-new-privileges:true", "127.0.0.1", "pids_limit: 2048"):
        assert hardening in config
    up = await anyio.run_process([*compose, "up", "-d"], env=environment, check=False)
    try:
        assert up.returncode == 0, up.stderr.decode()
        url = f"http://127.0.0.1:{port}"
        await wait_answering(url + "/readyz")
        async with mcp_client(url + "/mcp", TOKEN) as alice:
            assert (await call(alice, "spawn", {"command": "echo composed"}))["stdout"] == "composed\n"
    finally:
        with anyio.CancelScope(shield=True):
            down = await anyio.run_process([*compose, "down", "-v"], env=environment, check=False)
        assert down.returncode == 0, down.stderr.decode()


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    """A loopback port free at this moment."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        yield probe.getsockname()[1]
