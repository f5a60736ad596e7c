"""A Docker daemon restarting mid-session, on a private daemon this test starts (so the session's engine
and its containers are not disturbed) and ends, with everything it made."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import pytest

from process_mcp import SpawnOptions
from process_mcp.docker import DockerExecutor

from ..helpers import BUSYBOX_IMAGE, TEST_LABELS, WAIT_S, docker_config, unique_name, wait_for_output

if TYPE_CHECKING:
    from docker import DockerClient

pytestmark = pytest.mark.anyio

DAEMON_START_S = 30.0
"""Bound on a private dockerd answering after it is started."""
DAEMON_STOP_S = 30.0
"""Bound on a private dockerd exiting after SIGTERM (it stops its containers first)."""


class PrivateDaemon:
    """A dockerd with its own socket, data and exec roots and network namespace, and the busybox test image."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"unix://{root}/docker.sock"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        root = self.root
        # Its own network namespace: with no bridge of its own, dockerd deletes docker0, which the
        # session's engine needs.
        argv = ["unshare", "--net", "--", "dockerd", "--host", self.url]
        argv += ["--data-root", f"{root}/data", "--exec-root", f"{root}/exec"]
        argv += ["--pidfile", f"{root}/docker.pid", "--bridge", "none", "--iptables=false", "--ip-masq=false"]
        with open(root / "dockerd.log", "ab") as log:  # noqa: ASYNC230 - a local file, opened once
            self.process = subprocess.Popen(  # noqa: ASYNC220 - it outlives this call; waited on in a thread
                argv, stdout=log, stderr=log, start_new_session=True
            )
        with anyio.fail_after(DAEMON_START_S):
            while (await anyio.run_process(["docker", "-H", self.url, "info"], check=False)).returncode:
                assert self.process.poll() is None, (root / "dockerd.log").read_text()[-2000:]
                await anyio.sleep(0.2)

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await anyio.to_thread.run_sync(process.wait, DAEMON_STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the daemon and its containerd
            await anyio.to_thread.run_sync(process.wait)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def client(self) -> DockerClient:
        import docker

        return docker.DockerClient(base_url=self.url, timeout=30)


@pytest.fixture
async def private_daemon(docker_client: DockerClient) -> AsyncIterator[PrivateDaemon]:
    if shutil.which("dockerd") is None:
        pytest.fail("dockerd is not installed; run scripts/docker-engine.sh")
    root = Path(tempfile.mkdtemp(prefix="process-mcp-test-dockerd-"))
    daemon = PrivateDaemon(root)
    try:
        await daemon.start()
        copy = f"docker save {BUSYBOX_IMAGE} | docker -H {daemon.url} load"
        await anyio.run_process(["/bin/sh", "-c", copy])
        yield daemon
    finally:
        await daemon.stop()
        # dockerd bind-mounts its data root; a mount left behind would keep the directory busy.
        mountinfo = await anyio.Path("/proc/self/mountinfo").read_text()
        mounts = [line.split()[4] for line in mountinfo.splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(root))), reverse=True):
            await anyio.run_process(["umount", "-l", mount], check=False)
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(root, ignore_errors=True))


async def test_a_daemon_restart_ends_the_processes_and_the_next_spawn_brings_the_container_back(
    private_daemon: PrivateDaemon,
) -> None:
    config = docker_config(unique_name("ctr"), image=BUSYBOX_IMAGE, volume_name=unique_name("vol"))
    executor = DockerExecutor(config, client_factory=private_daemon.client, labels=TEST_LABELS)
    await executor.start()
    try:
        running = await executor.spawn(SpawnOptions(command="echo started; sleep 300", background=True))
        await wait_for_output(executor, running.pid, "started")
        await private_daemon.restart()
        ended = await executor.get_output(running.pid, until_exit=True, wait_ms=int(WAIT_S * 2000))
        assert ended.status == "terminated"  # never "running" forever
        again = await executor.spawn(SpawnOptions(command="echo back"))
        assert (again.stdout, again.exit_code) == ("back\n", 0)
    finally:
        await executor.cleanup()
