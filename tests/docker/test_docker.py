"""Docker mode against a real engine: the container it makes, what survives, and what it never touches.

Containers and volumes made here are labelled ``process-mcp.test=true`` and removed by name.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import anyio
import anyio.abc
import anyio.to_thread
import pytest
from mcp import Client, StdioServerParameters

from process_mcp import BackendUnavailable, ProcessMcpConfig, SpawnOptions, create_process_mcp, load_config
from process_mcp.config import Defaults, DockerConfig, SandboxConfig
from process_mcp.docker import DockerExecutor
from process_mcp.docker.engine import KEPT_CAPABILITIES, MANAGED_LABEL
from process_mcp.docker.per_exec import stopped_ids

from ..helpers import (
    BULLSEYE_IMAGE,
    BUSYBOX_IMAGE,
    DEBIAN_IMAGE,
    POLL_S,
    TEST_LABELS,
    WAIT_S,
    docker_config,
    sleep_argument,
    unique_name,
    wait_for_output,
)

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

pytestmark = pytest.mark.anyio

# Prints the pid of every process whose environment has a line matching $1.
_MATCHING_PIDS = (
    "for d in /proc/[0-9]*; do tr '\\0' '\\n' < \"$d/environ\" 2>/dev/null | grep -q -e \"$1\" "
    '&& echo "${d#/proc/}"; done; true'
)


class Made:
    """Names of what a test had the executor create, so they are removed even if it fails."""

    def __init__(self) -> None:
        self.container = unique_name("ctr")
        self.volume = unique_name("vol")


@pytest.fixture
def made(docker_client: DockerClient) -> Iterator[Made]:
    import docker.errors

    names = Made()
    yield names
    with contextlib.suppress(docker.errors.NotFound):
        docker_client.containers.get(names.container).remove(force=True)
    with contextlib.suppress(docker.errors.NotFound):
        docker_client.volumes.get(names.volume).remove(force=True)


def created_executor(made: Made, image: str = DEBIAN_IMAGE) -> DockerExecutor:
    """An executor that creates (and at cleanup removes) its own container."""
    config = docker_config(made.container, image=image, volume_name=made.volume)
    return DockerExecutor(config, labels=TEST_LABELS)


StartExecutor = Callable[[DockerExecutor], Awaitable[DockerExecutor]]


@pytest.fixture
async def started() -> AsyncIterator[StartExecutor]:
    """Start executors for one test: ``executor = await started(DockerExecutor(...))``. Each is cleaned
    up after the test (newest first), ending its processes and removing a container it created."""
    made: list[DockerExecutor] = []

    async def start(executor: DockerExecutor) -> DockerExecutor:
        made.append(executor)
        await executor.start()
        return executor

    try:
        yield start
    finally:
        for executor in reversed(made):
            await executor.cleanup()


@pytest.fixture
async def shared(shared_container: Container) -> AsyncIterator[DockerExecutor]:
    """An executor on the session's container, as DOCKER_USE_EXISTING would run it."""
    executor = DockerExecutor(docker_config(str(shared_container.name), use_existing=True))
    await executor.start()
    try:
        yield executor
    finally:
        await executor.cleanup()


async def matching_pids(container: Container, pattern: str, user: str = "") -> list[str]:
    """Pids whose environment matches ``pattern``, looked for as ``user``: only the processes' own user
    (or a root with CAP_SYS_PTRACE, which the created container drops) may read their environments."""
    result = await anyio.to_thread.run_sync(
        lambda: container.exec_run(["/bin/sh", "-c", _MATCHING_PIDS, "sh", pattern], user=user, stderr=False)
    )
    assert result.exit_code == 0, result.output
    assert isinstance(result.output, bytes)
    return result.output.decode().split()


async def wait_until_none_match(container: Container, pattern: str, user: str = "") -> None:
    with anyio.move_on_after(WAIT_S):
        while await matching_pids(container, pattern, user):
            await anyio.sleep(POLL_S)
        return
    pytest.fail(f"processes matching {pattern!r} still run in the container after {WAIT_S}s")


async def test_the_container_it_creates_has_the_documented_limits(
    engine: DockerClient, made: Made, started: StartExecutor
) -> None:
    executor = await started(created_executor(made))
    attrs = await anyio.to_thread.run_sync(engine.api.inspect_container, made.container)
    host = attrs["HostConfig"]
    assert host["Memory"] == host["MemorySwap"] == 512 * 1024 * 1024
    assert host["NanoCpus"] == 1_000_000_000
    assert host["PidsLimit"] == 4096
    assert host["Init"] is True
    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"]
    assert sorted(host["CapAdd"]) == sorted(KEPT_CAPABILITIES)
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert (host["NetworkMode"], host["ReadonlyRootfs"]) == ("bridge", False)
    assert host["Tmpfs"] == {"/tmp": "rw,size=100m,noexec,nosuid", "/var/tmp": "rw,size=100m,noexec,nosuid"}
    mounts = [(m["Type"], m["Name"], m["Destination"]) for m in attrs["Mounts"]]
    assert mounts == [("volume", made.volume, "/home/agent")]
    assert attrs["Config"]["WorkingDir"] == "/home/agent"
    assert attrs["Config"]["Cmd"] == ["tail", "-f", "/dev/null"]
    assert attrs["Config"]["Labels"] == {"process-mcp.managed": "true", **TEST_LABELS}
    assert attrs["Config"]["User"] == ""  # root for the lease and kill; processes run as DOCKER_USER
    who = await executor.spawn(SpawnOptions(command="pwd; id -u; echo $HOME; echo ok > mine && cat mine"))
    assert who.stdout == "/home/agent\n1000\n/home/agent\nok\n"


# Linux capability numbers (linux/capability.h) of what the created container keeps.
CAPABILITY_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7}


async def test_the_created_container_runs_processes_unprivileged_with_only_the_kept_capabilities_for_root(
    engine: DockerClient, made: Made, started: StartExecutor
) -> None:
    expected = sum(1 << bit for bit in CAPABILITY_BITS.values())
    probe = "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status"
    unprivileged = await started(created_executor(made))  # the default user has none of them
    status = await unprivileged.spawn(SpawnOptions(command=probe))
    fields = dict(line.split(":\t") for line in status.stdout.strip().splitlines())
    assert (int(fields["CapBnd"], 16), int(fields["CapEff"], 16), fields["NoNewPrivs"]) == (expected, 0, "1")
    assert fields["Seccomp"] == "2"  # Docker's default profile, kept
    await unprivileged.cleanup()  # it removes the container, which the next one creates anew
    executor = await started(
        DockerExecutor(
            docker_config(made.container, image=DEBIAN_IMAGE, volume_name=made.volume, user="root"), labels=TEST_LABELS
        )
    )
    status = await executor.spawn(SpawnOptions(command=probe))
    fields = dict(line.split(":\t") for line in status.stdout.strip().splitlines())
    assert int(fields["CapBnd"], 16) == int(fields["CapEff"], 16) == expected
    assert fields["NoNewPrivs"] == "1"
    refused = await executor.spawn(SpawnOptions(command="mknod /home/agent/dev c 1 3; echo exit=$?"))
    assert "Operation not permitted" in refused.stdout + refused.stderr
    allowed = await executor.spawn(SpawnOptions(command="touch f && chown 1234:1234 f && stat -c %u f"))
    assert allowed.stdout == "1234\n"


async def test_a_root_package_install_works_with_docker_user_root_and_the_kept_capabilities(
    engine: DockerClient, made: Made, tmp_path: Path, started: StartExecutor
) -> None:
    """dpkg -i of a package (built here, no registry) whose files belong to another user and have a
    setgid mode: it needs CHOWN, FOWNER, FSETID and DAC_OVERRIDE."""
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: process-mcp-test-pkg\nVersion: 1.0\nArchitecture: all\nMaintainer: tests <t@example.invalid>\n"
        "Description: a package the Docker tests install\n"
    )
    shared = root / "opt" / "process-mcp-test" / "shared"
    shared.mkdir(parents=True)
    (shared / "data").write_text("installed\n")
    for path in (shared, shared / "data"):
        os.chown(path, 1234, 1234)
    shared.chmod(0o2775)
    deb = tmp_path / "pkg.deb"
    await anyio.run_process(["dpkg-deb", "--build", str(root), str(deb)])
    config = docker_config(made.container, image=DEBIAN_IMAGE, volume_name=made.volume, user="root")
    executor = await started(DockerExecutor(config, labels=TEST_LABELS))
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(deb, arcname="pkg.deb")
    container = await anyio.to_thread.run_sync(engine.containers.get, made.container)
    assert await anyio.to_thread.run_sync(container.put_archive, "/home/agent", archive.getvalue())
    installed = "/opt/process-mcp-test/shared"
    command = f"apt-get install -y /home/agent/pkg.deb && stat -c '%u %a' {installed} && cat {installed}/data"
    result = await executor.spawn(SpawnOptions(command=command, timeout_ms=30000))
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout.endswith("1234 2775\ninstalled\n")


def _wheel(directory: Path, name: str, version: str) -> Path:
    """A pure-Python wheel, made here (no index, no build backend in the image): a zip with the
    package, its metadata and a RECORD with hashes."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


async def test_pip_install_user_and_npm_install_work_as_the_default_user(
    engine: DockerClient, made: Made, tmp_path: Path, started: StartExecutor
) -> None:
    """What an agent does first in a fresh box, as DOCKER_USER (1000:1000, no capabilities), offline:
    packages from the workspace, installed under the home directory the volume gives that user."""
    wheel = _wheel(tmp_path, "pmcp_wheel_demo", "1.2")
    package = tmp_path / "pmcp-npm-demo"
    package.mkdir()
    (package / "package.json").write_text('{"name": "pmcp-npm-demo", "version": "1.0.0", "main": "index.js"}\n')
    (package / "index.js").write_text("module.exports = 'npm demo loaded';\n")
    executor = await started(created_executor(made))
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for path, arcname in ((wheel, wheel.name), (package, "pmcp-npm-demo")):
            tar.add(path, arcname=f"incoming/{arcname}", filter=lambda info: _owned_by(info, 1000))
    container = await anyio.to_thread.run_sync(engine.containers.get, made.container)
    assert await anyio.to_thread.run_sync(container.put_archive, "/home/agent", archive.getvalue())
    # Debian marks its Python externally managed (PEP 668): --user needs --break-system-packages there.
    pip = await executor.spawn(
        SpawnOptions(
            command=f"pip install --user --break-system-packages --no-index incoming/{wheel.name} && "
            "python3 -c 'import pmcp_wheel_demo, sys; print(pmcp_wheel_demo.VERSION, pmcp_wheel_demo.__file__)'",
            timeout_ms=60000,
        )
    )
    assert pip.exit_code == 0, pip.stdout + pip.stderr
    assert pip.stdout.splitlines()[-1].startswith("1.2 /home/agent/.local/lib/python3")
    npm = await executor.spawn(
        SpawnOptions(
            command="mkdir app && cd app && (cd ../incoming/pmcp-npm-demo && npm pack --silent) && "
            "npm install --offline --no-audit --no-fund ../incoming/pmcp-npm-demo/pmcp-npm-demo-1.0.0.tgz && "
            "node -e \"console.log(require('pmcp-npm-demo'))\" && id -u",
            timeout_ms=60000,
        )
    )
    assert npm.exit_code == 0, npm.stdout + npm.stderr
    assert npm.stdout.endswith("npm demo loaded\n1000\n")


def _owned_by(info: tarfile.TarInfo, uid: int) -> tarfile.TarInfo:
    info.uid = info.gid = uid
    return info


async def test_a_read_only_root_no_network_and_added_capabilities_when_asked(
    engine: DockerClient, made: Made, started: StartExecutor
) -> None:
    config = docker_config(
        made.container,
        image=DEBIAN_IMAGE,
        volume_name=made.volume,
        read_only=True,
        network="none",
        cap_add=["net_raw", "CAP_SYS_PTRACE"],
    )
    executor = await started(DockerExecutor(config, labels=TEST_LABELS))
    writes = await executor.spawn(
        SpawnOptions(command="echo x > /etc/planted; echo ok > /home/agent/f && echo ok > /tmp/f && cat /tmp/f")
    )
    assert "Read-only file system" in writes.stderr
    assert writes.stdout == "ok\n"
    routes = await executor.spawn(SpawnOptions(command="tail -n +2 /proc/net/route; ls /sys/class/net"))
    assert routes.stdout == "lo\n"  # no route and no interface but loopback
    attrs = await anyio.to_thread.run_sync(engine.api.inspect_container, made.container)
    assert {"NET_RAW", "SYS_PTRACE"} <= set(attrs["HostConfig"]["CapAdd"])  # DOCKER_CAP_ADD, either spelling


# Run in the container: a GET through the proxy its environment names (so `localhost` is the host's, as
# the proxy resolves it), then a CONNECT tunnel carrying $3 bytes to the host's echo server and back.
_THROUGH_THE_PROXY = """
import hashlib, os, socket, sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": os.environ["HTTP_PROXY"]}))
for url in sys.argv[1:3]:
    try:
        print(opener.open(url, timeout=10).read().decode().strip())
    except urllib.error.HTTPError as exc:
        print(exc.code, exc.read().decode().strip())
size = int(sys.argv[4])
tunnel = socket.create_connection(("127.0.0.1", 3128), timeout=10)
tunnel.sendall(("CONNECT localhost:%s HTTP/1.1\\r\\n\\r\\n" % sys.argv[3]).encode())
reply = b""
while not reply.endswith(b"\\r\\n\\r\\n"):
    reply += tunnel.recv(1)
print(reply.split(b"\\r\\n")[0].decode())
payload = os.urandom(size)
tunnel.sendall(payload)
tunnel.shutdown(socket.SHUT_WR)
echoed = b""
while True:
    chunk = tunnel.recv(65536)
    if not chunk:
        break
    echoed += chunk
print(len(echoed), hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest())
"""


async def test_a_domain_list_reaches_an_allowed_host_server_through_the_agent_and_refuses_another(
    engine: DockerClient, made: Made
) -> None:
    """The created container gets no network; processes reach the server's domain proxy at
    127.0.0.1:3128 in the container, carried over the agent's stream (so a remote engine works too)."""

    async def serve(reader: anyio.abc.ByteStream) -> None:
        async with reader:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await reader.receive()
            if request.startswith(b"GET "):
                await reader.send(b"HTTP/1.0 200 OK\r\nContent-Length: 16\r\n\r\nhello from host\n")
                return
            await reader.send(request.partition(b"\r\n\r\n")[2])

    async def echo(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    await stream.send(await stream.receive(65536))

    config = ProcessMcpConfig(
        mode="docker",
        defaults=Defaults(workdir="/home/agent"),
        docker=DockerConfig(container_name=made.container, image=DEBIAN_IMAGE, volume_name=made.volume),
        sandbox=SandboxConfig(allowed_domains=["localhost"], allow_private_addresses=True),
    )
    web = await anyio.create_tcp_listener(local_host="127.0.0.1")
    echoes = await anyio.create_tcp_listener(local_host="127.0.0.1")
    web_port, echo_port = (listener.extra(anyio.abc.SocketAttribute.local_port) for listener in (web, echoes))
    executor = DockerExecutor(config, labels=TEST_LABELS)
    async with web, echoes, anyio.create_task_group() as group:
        group.start_soon(web.serve, serve)
        group.start_soon(echoes.serve, echo)
        await executor.start()
        try:
            routes = await executor.spawn(SpawnOptions(command="tail -n +2 /proc/net/route; ls /sys/class/net"))
            assert routes.stdout == "lo\n"  # no way out but the agent
            urls = [f"http://localhost:{web_port}/", "http://example.com/"]
            command = f"python3 -c '{_THROUGH_THE_PROXY}' {' '.join(urls)} {echo_port} 1000000"
            direct = {"NO_PROXY": "", "no_proxy": ""}  # so `localhost` goes through the proxy, to the host
            result = await executor.spawn(SpawnOptions(command=command, env=direct, timeout_ms=30_000))
            assert result.exit_code == 0, result.stderr
            lines = result.stdout.splitlines()
            assert lines[0] == "hello from host", result.stdout
            assert lines[1].startswith("403 process-mcp sandbox: connections to 'example.com' are not allowed")
            assert lines[2:] == ["HTTP/1.1 200 Connection established", "1000000 True"]
        finally:
            await executor.cleanup()
            group.cancel_scope.cancel()


async def test_home_agent_survives_a_restart_in_the_volume(
    engine: DockerClient, made: Made, started: StartExecutor
) -> None:
    import docker.errors

    first = await started(created_executor(made))
    assert (await first.spawn(SpawnOptions(command="echo kept > note.txt"))).exit_code == 0
    await first.cleanup()  # it removes the container it created, and keeps the volume
    with pytest.raises(docker.errors.NotFound):
        await anyio.to_thread.run_sync(engine.containers.get, made.container)

    second = await started(created_executor(made))
    assert (await second.spawn(SpawnOptions(command="cat note.txt"))).stdout == "kept\n"


async def test_an_existing_container_is_started_used_and_left_alone(engine: DockerClient, made: Made) -> None:
    container = await anyio.to_thread.run_sync(
        lambda: engine.containers.create(
            DEBIAN_IMAGE, ["tail", "-f", "/dev/null"], name=made.container, labels=TEST_LABELS, init=True
        )
    )
    executor = DockerExecutor(docker_config(made.container, workdir="/tmp", use_existing=True))
    await executor.start()  # the container was created, never started: start must start it
    try:
        await anyio.to_thread.run_sync(container.reload)
        assert container.status == "running"
        ours = await executor.spawn(SpawnOptions(command="sleep 300", background=True))
        await anyio.to_thread.run_sync(
            lambda: container.exec_run(["sleep", "301"], detach=True, environment={"NOT_OURS": "1"})
        )
        assert await matching_pids(container, f"^{executor.marker(ours.pid)}$")
    finally:
        await executor.cleanup()
    await anyio.to_thread.run_sync(container.reload)
    assert container.status == "running"
    assert await matching_pids(container, "^NOT_OURS=1$"), "a process the server did not start was ended"
    assert not await matching_pids(container, f"^{executor.marker()}")


@pytest.mark.parametrize("image", [DEBIAN_IMAGE, BUSYBOX_IMAGE], ids=["agent", "exec per process"])
async def test_the_environment_defaults_yield_to_the_containers_own_and_to_the_request(
    engine: DockerClient, made: Made, image: str, started: StartExecutor
) -> None:
    """PYTHONUNBUFFERED=1 is a default: a container whose environment sets it keeps its value, and a
    request's env wins over both."""
    await anyio.to_thread.run_sync(
        lambda: engine.containers.run(
            image,
            ["tail", "-f", "/dev/null"],
            name=made.container,
            labels=TEST_LABELS,
            environment={"PYTHONUNBUFFERED": "the-operators"},
            detach=True,
        )
    )
    executor = await started(DockerExecutor(docker_config(made.container, workdir="/tmp", use_existing=True)))
    assert executor.via == ("agent" if image == DEBIAN_IMAGE else "exec")
    kept = await executor.spawn(SpawnOptions(command='echo "[$PYTHONUNBUFFERED]"'))
    assert kept.stdout == "[the-operators]\n"
    asked = await executor.spawn(SpawnOptions(command='echo "[$PYTHONUNBUFFERED]"', env={"PYTHONUNBUFFERED": "0"}))
    assert asked.stdout == "[0]\n"


@pytest.mark.parametrize(
    ("image", "working_dir", "expected"),
    [(DEBIAN_IMAGE, None, "/"), (DEBIAN_IMAGE, "/srv", "/srv"), (BUSYBOX_IMAGE, "/tmp", "/tmp")],
    ids=["stock-no-workdir", "custom-workdir", "no-bash"],
)
async def test_an_existing_container_works_on_the_first_spawn_in_its_own_working_directory(
    engine: DockerClient, made: Made, image: str, working_dir: str | None, expected: str, started: StartExecutor
) -> None:
    """As a user brings one: `docker run -d [-w DIR] IMAGE tail -f /dev/null`, and nothing but the
    variables that name it (no DEFAULT_WORKDIR, no /home/agent in the image)."""
    await anyio.to_thread.run_sync(
        lambda: engine.containers.run(
            image,
            ["tail", "-f", "/dev/null"],
            name=made.container,
            labels=TEST_LABELS,
            init=True,
            detach=True,
            working_dir=working_dir,
        )
    )
    config = load_config({"PROCESS_MODE": "docker", "DOCKER_USE_EXISTING": "true", "DOCKER_CONTAINER": made.container})
    executor = await started(DockerExecutor(config))
    first = await executor.spawn(SpawnOptions(command="pwd; ls >/dev/null && echo listed"))
    assert (first.exit_code, first.stdout) == (0, f"{expected}\nlisted\n")
    relative = await executor.spawn(SpawnOptions(command="pwd", cwd="."))
    assert relative.stdout == f"{expected}\n"
    assert executor.workdir == expected


@pytest.fixture
def passwordless_image(docker_client: DockerClient) -> Iterator[str]:
    """The busybox test image without /etc/passwd and /etc/group, as distroless-style and scratch images
    are: no user has a name there."""
    name = unique_name("nopasswd").replace("process-mcp-test-", "process-mcp-test/") + ":latest"
    source = docker_client.containers.create(BUSYBOX_IMAGE, ["true"], labels=TEST_LABELS)
    try:
        exported = b"".join(cast("Iterator[bytes]", source.export()))  # typed as str; the engine sends bytes
    finally:
        source.remove(force=True)
    stripped = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(exported)) as tar, tarfile.open(fileobj=stripped, mode="w") as out:
        for member in tar.getmembers():
            if member.name.lstrip("./") not in ("etc/passwd", "etc/group"):
                out.addfile(member, tar.extractfile(member) if member.isfile() else None)
    docker_client.api.import_image_from_data(
        stripped.getvalue(), repository=name.partition(":")[0], tag="latest", changes=["LABEL process-mcp.test=true"]
    )
    try:
        yield name
    finally:
        docker_client.images.remove(name, force=True)


async def test_an_image_without_etc_passwd_runs_processes_as_the_numeric_user(
    made: Made, started: StartExecutor, passwordless_image: str
) -> None:
    executor = await started(created_executor(made, image=passwordless_image))
    result = await executor.spawn(SpawnOptions(command="id -u; id -g; test -w /home/agent && echo home-writable"))
    assert (result.exit_code, result.stdout.split()) == (0, ["1000", "1000", "home-writable"]), result


async def test_a_container_that_could_not_start_is_removed_and_a_stale_one_is_made_anew(
    engine: DockerClient, made: Made, started: StartExecutor
) -> None:
    import docker.errors

    config = docker_config(made.container, volume_name=made.volume, network="process-mcp-test-no-such-network")
    with pytest.raises(BackendUnavailable):
        await DockerExecutor(config, labels=TEST_LABELS).start()
    with pytest.raises(docker.errors.NotFound):  # not left behind to be reused with the bad setting
        await anyio.to_thread.run_sync(engine.containers.get, made.container)
    # A stopped container of the server's own from another configuration (here another image) is made anew.
    first = await started(created_executor(made, image=BUSYBOX_IMAGE))
    await first.cleanup()
    await anyio.to_thread.run_sync(
        lambda: engine.containers.create(
            BUSYBOX_IMAGE,
            ["tail", "-f", "/dev/null"],
            name=made.container,
            labels={**TEST_LABELS, MANAGED_LABEL: "true"},
        )
    )
    second = await started(created_executor(made, image=DEBIAN_IMAGE))
    assert "bookworm" in (await second.spawn(SpawnOptions(command="cat /etc/os-release"))).stdout


async def test_a_running_container_that_differs_from_the_configuration_is_refused_naming_the_difference(
    engine: DockerClient, made: Made
) -> None:
    await anyio.to_thread.run_sync(
        lambda: engine.containers.run(
            BUSYBOX_IMAGE, ["tail", "-f", "/dev/null"], name=made.container, labels=TEST_LABELS, detach=True
        )
    )
    with pytest.raises(BackendUnavailable, match=r"runs image .*busybox.*, not DOCKER_IMAGE=") as caught:
        await DockerExecutor(docker_config(made.container, volume_name=made.volume), labels=TEST_LABELS).start()
    assert "docker rm -f" in caught.value.message
    assert (await anyio.to_thread.run_sync(engine.containers.get, made.container)).status == "running"  # untouched


@pytest.mark.parametrize("fault", ["kill", "stop", "remove"])
async def test_a_container_lost_behind_the_servers_back_ends_its_processes_and_comes_back(
    engine: DockerClient, made: Made, fault: str, started: StartExecutor
) -> None:
    executor = await started(created_executor(made, image=BUSYBOX_IMAGE))
    # Printing all along, so the fault breaks its exec stream mid-output.
    running = await executor.spawn(SpawnOptions(command="while :; do echo tick; sleep 0.01; done", background=True))
    await wait_for_output(executor, running.pid, "(?s)tick.*tick")
    container = await anyio.to_thread.run_sync(engine.containers.get, made.container)
    if fault == "kill":
        await anyio.to_thread.run_sync(container.kill)
    elif fault == "stop":
        await anyio.to_thread.run_sync(lambda: container.stop(timeout=1))
    else:
        await anyio.to_thread.run_sync(lambda: container.remove(force=True))
    with anyio.fail_after(WAIT_S * 2):  # never "running" forever
        while (await executor.get_process(running.pid)).status == "running":
            await anyio.sleep(POLL_S)
    again = await executor.spawn(SpawnOptions(command="echo back"))
    assert (again.stdout, again.exit_code) == ("back\n", 0)
    container = await anyio.to_thread.run_sync(engine.containers.get, made.container)
    assert container.status == "running"


async def test_a_stopped_existing_container_is_a_clear_error_and_left_alone(
    engine: DockerClient, made: Made, started: StartExecutor
) -> None:
    container = await anyio.to_thread.run_sync(
        lambda: engine.containers.run(
            BUSYBOX_IMAGE, ["tail", "-f", "/dev/null"], name=made.container, labels=TEST_LABELS, detach=True
        )
    )
    executor = await started(DockerExecutor(docker_config(made.container, workdir="/tmp", use_existing=True)))
    await anyio.to_thread.run_sync(container.kill)
    with pytest.raises(BackendUnavailable, match="DOCKER_USE_EXISTING=true this server does not start"):
        await executor.spawn(SpawnOptions(command="echo never"))
    await anyio.to_thread.run_sync(container.reload)
    assert container.status == "exited"  # not started behind the user's back either


async def test_use_existing_with_no_such_container_is_a_clear_error(engine: DockerClient, made: Made) -> None:
    executor = DockerExecutor(docker_config(made.container, use_existing=True))
    with pytest.raises(BackendUnavailable, match=f"container '{made.container}' does not exist"):
        await executor.start()


async def test_an_image_that_cannot_be_pulled_is_a_clear_error_naming_it(engine: DockerClient, made: Made) -> None:
    image = f"process-mcp-test/{unique_name('no-such-image')}:never"
    executor = created_executor(made, image=image)
    with pytest.raises(BackendUnavailable) as caught:
        await executor.start()
    assert image in caught.value.message
    assert "Dockerfile.custom" in caught.value.message
    assert "DOCKER_IMAGE" in caught.value.message


async def test_an_image_without_bash_runs_commands_terminals_and_kills(
    engine: DockerClient, made: Made, started: StartExecutor
) -> None:
    executor = await started(created_executor(made, image=BUSYBOX_IMAGE))
    assert executor.via == "exec"  # no Python for the agent: one exec per process, chosen by itself
    hi = await executor.spawn(SpawnOptions(command='echo hi; echo "[$PYTHONUNBUFFERED]"; ls /bin/bash 2>&1'))
    assert (hi.via, hi.stdout.startswith("hi\n[1]\n")) == ("exec", True)  # the environment's default too
    assert [p.via for p in await executor.list_processes()] == ["exec"]
    assert (await executor.spawn(SpawnOptions(command="stty size", tty=True))).stdout == "30 120"
    tree = await executor.spawn(SpawnOptions(command="sleep 300 & sleep 301 & echo started; wait", background=True))
    await wait_for_output(executor, tree.pid, "started")
    container = await anyio.to_thread.run_sync(engine.containers.get, made.container)
    tree_pattern = f"^{executor.marker(tree.pid)}$"
    assert len(await matching_pids(container, tree_pattern, executor.exec_user)) == 3  # sh, both sleeps
    assert (await executor.kill(tree.pid, "STOP")).stopped is True  # busybox's sh and tools tell it too
    assert (await executor.kill(tree.pid, "CONT")).stopped is None
    killed = await executor.kill(tree.pid, "KILL")
    assert (killed.status, killed.signal, killed.exit_code) == ("terminated", "SIGKILL", 137)
    await wait_until_none_match(container, tree_pattern, executor.exec_user)


def test_a_process_of_its_own_exec_reads_stopped_when_it_or_the_child_it_waits_on_in_vfork_is() -> None:
    """What the exec-per-process path makes of the walk of /proc in the container (pid, ppid, state, id)."""
    listing = "\n".join(
        [
            "10 0 T docker-1",  # stopped
            "20 0 D docker-2",  # in vfork, on a stopped child
            "21 20 T docker-2",
            "30 0 D docker-3",  # in uninterruptible sleep, its child running
            "40 0 S docker-4",
            "41 40 T docker-4",  # a stopped child of a running process: the process runs
            "50 7 T docker-5",  # a stopped orphan under the container's init
            "garbage",
        ]
    )
    assert stopped_ids(listing) == {"docker-1", "docker-2"}


async def test_the_agent_runs_on_an_old_python_without_splice(
    engine: DockerClient, made: Made, started: StartExecutor
) -> None:
    """Python 3.9 (Debian 11's, the oldest a reachable mirror has): no os.splice, so output is read and
    written by the agent; exits exact, terminals sized, escapes killed, floods whole."""
    executor = await started(created_executor(made, image=BULLSEYE_IMAGE))
    assert executor.via == "agent"
    assert executor.backend._agent is not None
    assert executor.backend._agent.hello["python"].startswith("3.9.")
    exited = await executor.spawn(SpawnOptions(command="exit 130"))
    assert (exited.via, exited.exit_code, exited.signal) == ("agent", 130, None)
    assert (await executor.spawn(SpawnOptions(command="stty size", tty=True))).stdout == "30 120"
    flood = await executor.spawn(SpawnOptions(command="head -c 5000000 /dev/zero | tr '\\0' x; echo END"))
    record = executor._registry.get(flood.pid)
    assert await record.wait(WAIT_S, output=True)
    assert (record.stdout.total, record.stdout.tail(4)) == (5_000_004, b"END\n")
    argument = sleep_argument()
    escaped = await executor.spawn(SpawnOptions(command=f"setsid sleep {argument} & sleep 600", background=True))
    container = await anyio.to_thread.run_sync(engine.containers.get, made.container)
    pattern = f"^{executor.marker(escaped.pid)}$"
    with anyio.fail_after(WAIT_S):
        while len(await matching_pids(container, pattern, executor.exec_user)) < 3:  # sh, both sleeps
            await anyio.sleep(POLL_S)
    await executor.kill(escaped.pid, "KILL")
    await wait_until_none_match(container, pattern, executor.exec_user)


async def test_kill_reaches_grandchildren_inside_the_container(
    shared: DockerExecutor, shared_container: Container
) -> None:
    result = await shared.spawn(
        SpawnOptions(command="sh -c 'sleep 300 & wait' & sleep 301 & echo started; wait", background=True)
    )
    await wait_for_output(shared, result.pid, "started")
    pattern = f"^{shared.marker(result.pid)}$"
    with anyio.fail_after(WAIT_S):
        while len(await matching_pids(shared_container, pattern)) < 4:  # sh, sh, sleep, sleep
            await anyio.sleep(POLL_S)
    killed = await shared.kill(result.pid)
    assert (killed.status, killed.signal, killed.exit_code) == ("terminated", "SIGTERM", 143)
    await wait_until_none_match(shared_container, pattern)


async def test_a_trap_inside_the_container_receives_the_signal(shared: DockerExecutor) -> None:
    result = await shared.spawn(
        SpawnOptions(command="trap 'echo caught HUP' HUP; echo ready; while :; do sleep 0.05; done", background=True)
    )
    await wait_for_output(shared, result.pid, "ready")
    await shared.kill(result.pid, "HUP")
    await wait_for_output(shared, result.pid, "caught HUP")


async def test_shutdown_leaves_no_stray_processes_in_the_container(
    shared: DockerExecutor, shared_container: Container
) -> None:
    # Detached children whose parent has exited: no running record points at them any more.
    await shared.spawn(SpawnOptions(command="nohup sleep 300 >/dev/null 2>&1 &"))
    await shared.spawn(SpawnOptions(command="setsid sleep 301 </dev/null >/dev/null 2>&1 &"))
    await shared.spawn(SpawnOptions(command="trap '' TERM; sleep 302", background=True))
    assert len(await matching_pids(shared_container, f"^{shared.marker()}")) >= 3
    await shared.cleanup()
    await wait_until_none_match(shared_container, f"^{shared.marker()}")


async def test_the_engine_is_the_one_the_configuration_names(engine: DockerClient, tmp_path: Path) -> None:
    socket = "unix:///var/run/docker.sock"  # where scripts/docker-engine.sh's engine listens
    base = {"PROCESS_MODE": "docker", "DOCKER_USE_EXISTING": "true", "DOCKER_CONTAINER": unique_name("none")}
    missing = DockerExecutor(load_config({**base, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}))
    with pytest.raises(BackendUnavailable, match="cannot reach the Docker engine"):
        await missing.start()
    named = DockerExecutor(load_config({**base, "DOCKER_HOST": socket}))
    with pytest.raises(BackendUnavailable, match="does not exist"):  # reached the engine, found no container
        await named.start()


async def test_an_unreachable_engine_is_backend_unavailable(made: Made) -> None:
    import docker

    def unreachable() -> DockerClient:
        return docker.from_env(environment={"DOCKER_HOST": "tcp://127.0.0.1:1"}, timeout=5)

    executor = DockerExecutor(docker_config(made.container), client_factory=unreachable)
    with pytest.raises(BackendUnavailable, match="cannot reach the Docker engine"):
        await executor.start()


async def test_the_mcp_tools_drive_docker_mode(shared_container: Container, engine: DockerClient) -> None:
    config = docker_config(str(shared_container.name), use_existing=True)
    async with await create_process_mcp(config) as mcp, Client(mcp.server, read_timeout_seconds=WAIT_S) as client:
        result = await client.call_tool("spawn", {"command": "echo from docker; pwd"})
        assert not result.is_error
        assert result.structured_content is not None
        assert result.structured_content["pid"] == "docker-1"
        assert result.structured_content["stdout"] == "from docker\n/home/agent\n"
        listed = await client.call_tool("ps", {})
        assert listed.structured_content is not None
        assert [p["pid"] for p in listed.structured_content["processes"]] == ["docker-1"]


async def test_a_client_over_stdio_drives_docker_mode_and_disconnecting_ends_its_processes(
    shared_container: Container,
) -> None:
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "process_mcp"],
        env={"PROCESS_MODE": "docker", "DOCKER_USE_EXISTING": "true", "DOCKER_CONTAINER": str(shared_container.name)},
    )
    async with Client(server, read_timeout_seconds=WAIT_S) as client:
        echo = await client.call_tool("spawn", {"command": "echo over stdio; pwd", "tty": True})
        assert echo.structured_content is not None
        assert echo.structured_content["pid"] == "docker-1"
        assert echo.structured_content["stdout"] == "over stdio\n/home/agent"
        sleeper = await client.call_tool("spawn", {"command": "echo $PROCESS_MCP_ID; sleep 300", "timeoutMs": 500})
        assert sleeper.structured_content is not None
        assert sleeper.structured_content["status"] == "running"
        marker = f"PROCESS_MCP_ID={sleeper.structured_content['stdout'].strip()}"
    # The server is gone, and so is every process it started in the container.
    with anyio.fail_after(WAIT_S):
        result = await anyio.to_thread.run_sync(
            lambda: shared_container.exec_run(["/bin/sh", "-c", _MATCHING_PIDS, "sh", f"^{marker}$"])
        )
    assert isinstance(result.output, bytes)
    assert result.output.decode().split() == []


# A docker-mode server in miniature: starts, spawns one command, says so, and runs until killed.
_SERVE_ONE_SPAWN = """
import sys, anyio
from process_mcp import DockerExecutor, ProcessMcpConfig, SpawnOptions
from process_mcp.config import Defaults, DockerConfig

async def main():
    docker = DockerConfig(container_name=sys.argv[1], use_existing=True, agent=sys.argv[3] == "agent")
    executor = DockerExecutor(ProcessMcpConfig(mode="docker", defaults=Defaults(workdir="/home/agent"), docker=docker))
    await executor.start()
    await executor.spawn(SpawnOptions(command=sys.argv[2], background=True))
    print("spawned", flush=True)
    await anyio.sleep_forever()

anyio.run(main)
"""
# Prints the pid of every process running `sleep $1` (not the tr and grep doing the looking).
_SLEEPERS = (
    "for d in /proc/[0-9]*; do tr '\\0' ' ' < \"$d/cmdline\" 2>/dev/null | grep -q \"^sleep $1 \" "
    '&& echo "${d#/proc/}"; done; true'
)


async def sleepers_in(container: Container, argument: str) -> list[str]:
    result = await anyio.to_thread.run_sync(lambda: container.exec_run(["/bin/sh", "-c", _SLEEPERS, "sh", argument]))
    assert isinstance(result.output, bytes)
    return result.output.decode().split()


async def start_server_process(container: Container, command: str, via: str = "exec") -> subprocess.Popen[bytes]:
    server = subprocess.Popen(  # noqa: ASYNC220 - started once; its output is read off the loop
        [sys.executable, "-c", _SERVE_ONE_SPAWN, str(container.name), command, via], stdout=subprocess.PIPE
    )
    assert server.stdout is not None
    stream = server.stdout
    with anyio.fail_after(WAIT_S * 3):
        line = await anyio.to_thread.run_sync(stream.readline, abandon_on_cancel=True)
    assert line == b"spawned\n"
    return server


def stop(server: subprocess.Popen[bytes], how: int) -> None:
    if server.poll() is None:
        server.send_signal(how)
    server.wait()
    if server.stdout is not None:
        server.stdout.close()


async def test_a_killed_servers_agent_ends_its_processes_at_once_even_those_that_escaped(
    shared_container: Container,
) -> None:
    """SIGKILL: no cleanup runs, but the engine closes the agent's input, and the agent (or, if it is
    killed too, each supervisor) ends every tree, whatever the processes did to leave it."""
    arguments = [sleep_argument() for _ in range(3)]
    escapes = f"env -i sleep {arguments[0]} & setsid sleep {arguments[1]} & (sleep {arguments[2]} &) ; sleep 600"
    server = await start_server_process(shared_container, escapes, via="agent")
    try:
        with anyio.fail_after(WAIT_S):
            while not all([await sleepers_in(shared_container, argument) for argument in arguments]):
                await anyio.sleep(POLL_S)
    finally:
        stop(server, signal.SIGKILL)
    with anyio.fail_after(WAIT_S):
        while any([await sleepers_in(shared_container, argument) for argument in arguments]):
            await anyio.sleep(POLL_S)


async def test_a_new_server_ends_what_a_killed_server_left_and_spares_a_live_one(
    shared_container: Container,
) -> None:
    """One exec per process (DOCKER_AGENT=false, or no Python in the image): what a killed server left
    runs on until the next server's start sweeps it."""
    dead_arg, alive_arg = sleep_argument(), sleep_argument()
    dead = await start_server_process(shared_container, f"sleep {dead_arg}")
    alive = await start_server_process(shared_container, f"sleep {alive_arg}")
    try:
        stop(dead, signal.SIGKILL)  # no cleanup runs: its sleeper stays behind in the container
        assert len(await sleepers_in(shared_container, dead_arg)) == 1
        newcomer = DockerExecutor(docker_config(str(shared_container.name), use_existing=True))
        await newcomer.start()
        try:
            with anyio.fail_after(WAIT_S):
                while await sleepers_in(shared_container, dead_arg):
                    await anyio.sleep(POLL_S)
            assert len(await sleepers_in(shared_container, alive_arg)) == 1  # its server still runs
        finally:
            await newcomer.cleanup()
    finally:
        stop(dead, signal.SIGKILL)
        stop(alive, signal.SIGKILL)
    # That one is gone now too (killed, no cleanup): the next start ends what it left.
    sweeper = DockerExecutor(docker_config(str(shared_container.name), use_existing=True))
    await sweeper.start()
    await sweeper.cleanup()
    with anyio.fail_after(WAIT_S):
        while await sleepers_in(shared_container, alive_arg):
            await anyio.sleep(POLL_S)


def test_host_mode_never_imports_docker() -> None:
    code = (
        "import sys, process_mcp; "
        "process_mcp.create_executor(process_mcp.ProcessMcpConfig(mode='host')); "
        "print(sorted(m for m in sys.modules if m == 'docker' or m.startswith('process_mcp.docker')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT_S, check=True)
    assert out.stdout.strip() == "[]"
