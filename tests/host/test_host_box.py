"""A long-lived box over a workspace, started from the sandbox's own configuration, with the agent
inside: what its processes share across spawns, and what each is still confined by."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from process_mcp.box.local import LocalAgent
from process_mcp.config import SandboxConfig
from process_mcp.core.contract import LaunchSpec
from process_mcp.core.registry import ManagedProcess
from process_mcp.errors import SpawnFailed
from process_mcp.host.sandbox import Sandbox, Tools, find_bwrap, find_tool
from process_mcp.host.seccomp import build_filter

from ..helpers import WAIT_S, cannot_run_here, machine_can_sandbox

pytestmark = pytest.mark.anyio
PREFIX = os.path.realpath(sys.base_prefix)


@dataclass
class HostBox:
    agent: LocalAgent
    sandbox: Sandbox
    workspace: Path
    home: Path
    count: int = 0

    def plan(self) -> dict[str, Any]:
        """The plan the server would send with a spawn now."""
        return self.sandbox.confine_plan(build_filter(), scopes=True)

    async def start(self, command: str, plan: dict[str, Any] | None = None) -> ManagedProcess:
        """Start ``command`` in the workspace, confined by ``plan`` (default: the plan for now)."""
        self.count += 1
        pid = f"host-{self.count}"
        record = ManagedProcess(pid, command, str(self.workspace), tty=False, buffer_bytes=1 << 20, cols=80, rows=24)
        spec = LaunchSpec(pid, f"{{ {command}\n}} 2>&1", str(self.workspace), {}, False, None)
        env = {"PATH": "/usr/bin:/bin", "HOME": self.sandbox.home_in_box(str(self.home))}
        record.handle = await self.agent.connection.spawn(
            spec, record, env, inherit=False, workdir=str(self.workspace), confine=plan or self.plan()
        )
        return record

    async def run(self, command: str, plan: dict[str, Any] | None = None) -> str:
        """Run ``command`` as ``start`` does, to its end; its output."""
        record = await self.start(command, plan)
        assert await record.wait(WAIT_S, output=True), f"{command!r} did not end"
        return record.stdout.tail().decode()


@pytest.fixture
async def host_box(tmp_path: Path) -> AsyncIterator[HostBox]:
    if not machine_can_sandbox():
        cannot_run_here("bwrap cannot make its namespaces on this machine")
    bwrap, prlimit = find_bwrap(), find_tool("prlimit")
    assert bwrap
    assert prlimit
    workspace, state, home = tmp_path / "workspace", tmp_path / "state", tmp_path / "home"
    for directory in (workspace, state / "empty-dir", home):
        directory.mkdir(parents=True)
    (state / "empty").touch()
    (workspace / "early" / ".git" / "hooks").mkdir(parents=True)  # protected by the box's own view too
    sandbox = Sandbox(
        SandboxConfig(),
        Tools(bwrap=bwrap, prlimit=prlimit),
        workspace=str(workspace),
        home=str(home),
        state_dir=str(state),
    )

    def boxing(argv: list[str]) -> tuple[list[str], list[int]]:
        launch = sandbox.box(str(home), argv, sandbox.box_bounds())
        return launch.argv, list(launch.pass_fds)

    agent = await LocalAgent.start("box", boxing)
    try:
        yield HostBox(agent, sandbox, workspace, home)
    finally:
        await agent.stop()


async def test_tmp_loopback_and_home_last_across_the_spawns_of_one_box(host_box: HostBox) -> None:
    await host_box.run("echo kept > /tmp/note")
    assert await host_box.run("cat /tmp/note") == "kept\n"
    # A server started in the background by one spawn, reached on loopback by the next.
    listen = "s=socket.socket();s.bind(('127.0.0.1',0));s.listen();print(s.getsockname()[1],flush=True)"
    await host_box.run(
        f"python3 -c \"import socket;{listen};s.accept()[0].sendall(b'hello')\" > /tmp/port 2>/dev/null & sleep 0.5"
    )
    port = (await host_box.run("cat /tmp/port")).strip()
    reply = await host_box.run(
        f"python3 -c 'import socket;s=socket.create_connection((\"127.0.0.1\",{port}));print(s.recv(5).decode())'"
    )
    assert reply == "hello\n"
    await host_box.run("git config --global user.name Agent")
    assert "Agent" in (host_box.home / ".gitconfig").read_text()
    assert await host_box.run("echo $HOME") == "/home/agent\n"


async def test_a_repository_an_earlier_spawn_made_is_protected_in_the_next(host_box: HostBox) -> None:
    # One there when the box started (its protection is the box's, locked: bound again only with it).
    output = await host_box.run("echo evil > early/.git/hooks/pre-commit; echo ok > early/file; cat early/file")
    assert "Read-only file system" in output
    assert output.endswith("ok\n")
    before = host_box.plan()  # made before the repository: it names nothing in it
    await host_box.run("git init -q repo && echo hi > repo/file")
    hook = host_box.workspace / "repo" / ".git" / "hooks" / "pre-commit"
    # The box's own view (made before the repository was) does not hold it: the plan does.
    await host_box.run("echo evil > repo/.git/hooks/pre-commit", before)
    assert hook.exists()
    hook.unlink()
    output = await host_box.run("echo evil > repo/.git/hooks/pre-commit; git -C repo add file && echo added")
    assert "Read-only file system" in output
    assert not hook.exists()


async def test_a_process_that_ran_before_a_protection_is_held_by_it_too(host_box: HostBox) -> None:
    """A process started before ``repo/.git`` existed (a shell, a tmux server another process drives)
    must not keep a view in which it is writable once a later spawn protects it."""
    (host_box.workspace / "go").mkdir()
    older = await host_box.start("while [ ! -e go/now ]; do sleep 0.05; done; echo evil > repo/.git/hooks/pre-commit")
    await host_box.run("git init -q repo")
    await host_box.run("touch go/now")  # the plan of this spawn names repo/.git
    assert await older.wait(WAIT_S, output=True)
    assert "Read-only file system" in older.stdout.tail().decode()
    assert not (host_box.workspace / "repo" / ".git" / "hooks" / "pre-commit").exists()


async def test_a_spawn_without_a_plan_is_refused_by_the_boxs_agent(host_box: HostBox) -> None:
    """A process started without a plan would keep the agent's capabilities over the box."""
    spec = LaunchSpec("host-99", "true", str(host_box.workspace), {}, False, None)
    record = ManagedProcess("host-99", "true", str(host_box.workspace), tty=False, buffer_bytes=1024, cols=80, rows=24)
    with pytest.raises(SpawnFailed, match="must come with a plan"):
        await host_box.agent.connection.spawn(spec, record, {}, inherit=False, workdir=str(host_box.workspace))


async def test_the_box_shows_nothing_of_the_host_but_its_view(host_box: HostBox) -> None:
    output = await host_box.run("ls -A /root; ls /home; echo $HOME; id -u")
    lines = output.splitlines()
    assert lines[-3:] == ["agent", "/home/agent", str(os.getuid())]
    if PREFIX.startswith("/root/"):  # /root is there only on the way to the agent's Python
        assert lines[:-3] == [PREFIX.split("/")[2]]
    else:
        assert "No such file or directory" in lines[0]


async def test_the_agents_python_is_shown_and_nothing_beside_it(host_box: HostBox) -> None:
    listing = (await host_box.run(f"ls {PREFIX}/lib | grep -c python3; ls -A {os.path.dirname(PREFIX)}")).splitlines()
    assert int(listing[0]) >= 1  # the standard library is there
    if not PREFIX.startswith(("/usr/", "/opt/")):  # a Python outside the system view: only its prefix is shown
        assert listing[1:] == [os.path.basename(PREFIX)]


async def test_a_directory_swapped_for_a_link_after_the_plan_is_not_what_gets_mounted(host_box: HostBox) -> None:
    """The server looks for protected paths when it makes a spawn's plan; a process of the box can swap a
    directory on the way for a link (here to /usr, relative, so the same from inside) before the agent
    mounts. The agent must mount what the plan names (or refuse), never what the name leads to by then:
    a pin, bound writable, would be the host's /usr."""
    (host_box.workspace / "d" / ".git").mkdir(parents=True)  # read-only, so its parent d is pinned
    plan = host_box.plan()
    assert str(host_box.workspace / "d") in plan["pinned"]
    (host_box.workspace / "d").rename(host_box.workspace / "d.real")
    (host_box.workspace / "d").symlink_to("../" * (len(host_box.workspace.parts) - 1) + "usr")
    with pytest.raises(SpawnFailed, match="symbolic link"):
        await host_box.run("echo ran", plan)
    assert "Read-only file system" in await host_box.run(f"touch {host_box.workspace}/d/canary")
