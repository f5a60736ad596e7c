"""The host sandbox played as a hostile agent would: through the five MCP tools of a real server over
stdio, as root (how CI and containers run it) and as an unprivileged user (how most users do).

Every attack has host-side evidence (a canary that must not appear, a secret that must not come back,
a host socket that must count no connection) and sits beside the legitimate action that must keep
working. SECURITY.md lists what these prove.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from process_mcp.host import seccomp

from ..helpers import NOBODY, POLL_S, WAIT_S, as_user, cannot_run_here, sleep_argument, sleepers

pytestmark = pytest.mark.anyio

SECRET = f"server-secret-{secrets.token_hex(8)}"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Box:
    """A running server and the directories its attacks are judged by."""

    client: Client
    workspace: Path
    outside: Path  # writable by the server's user on the host, never by its sandboxes
    uid: int

    async def run(self, command: str, **arguments: Any) -> dict[str, Any]:
        result = await self.client.call_tool("spawn", {"command": command, "timeoutMs": 20000, **arguments})
        assert not result.is_error, result.content
        content: dict[str, Any] | None = result.structured_content
        assert content is not None
        assert content["sandboxed"] is True
        return content

    async def output(self, command: str, **arguments: Any) -> str:
        reply = await self.run(command, **arguments)
        return str(reply["stdout"]) + str(reply["stderr"])

    async def error(self, command: str, **arguments: Any) -> str:
        result = await self.client.call_tool("spawn", {"command": command, **arguments})
        assert result.is_error, result.structured_content
        return " ".join(getattr(block, "text", "") for block in result.content)


@pytest.fixture(scope="session")
def readable_python_path() -> Iterator[str]:
    """A PYTHONPATH with this checkout and its dependencies that any user can read (the virtualenv may
    sit where other users cannot look, e.g. under /root): the checkout itself when it is readable,
    else a copy."""
    site = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "mcp").is_dir())
    paths = f"{ROOT}:{site}"
    probe = [*as_user(NOBODY), "/usr/bin/python3", "-c", "import process_mcp, mcp, pydantic_core"]
    if os.getuid() != 0 or subprocess.run(probe, env={"PYTHONPATH": paths}, check=False).returncode == 0:
        yield paths
        return
    copy = Path(tempfile.mkdtemp(prefix="process-mcp-test-pythonpath-"))
    try:
        shutil.copytree(ROOT / "process_mcp", copy / "src" / "process_mcp")
        shutil.copytree(site, copy / "site")
        subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True)
        yield f"{copy / 'src'}:{copy / 'site'}"
    finally:
        shutil.rmtree(copy, ignore_errors=True)


@pytest.fixture
def dirs(user: int) -> Iterator[tuple[Path, Path]]:
    """A workspace and an 'outside' directory, both owned by the server's user, under a directory any
    user can reach (the test's own tmp_path may not be), beside the server's directory of box homes."""
    top = Path(tempfile.mkdtemp(prefix="process-mcp-test-attacks-"))
    top.chmod(0o755)
    workspace, outside, homes = top / "workspace", top / "outside", top / "homes"
    for path in (workspace, outside, homes):
        path.mkdir(mode=0o700)
        os.chown(path, user, user)
    try:
        yield workspace, outside
    finally:
        shutil.rmtree(top, ignore_errors=True)


class Servers:
    """Starts servers as one user over one workspace: ``await box(**env)``; all end with the test."""

    def __init__(self, stack: AsyncExitStack, user: int, workspace: Path, outside: Path, python_path: str) -> None:
        self._stack = stack
        self.uid = user
        self.workspace = workspace
        self.outside = outside
        self._python_path = python_path

    async def __call__(self, **env: str) -> Box:
        return await self.start(None, **env)

    async def start(self, cgroup_procs: str | None, **env: str) -> Box:
        """A server, first moved into the cgroup whose ``cgroup.procs`` is given (a bound it lives in)."""
        settings = {
            "DEFAULT_WORKDIR": str(self.workspace),
            "SANDBOX_HOMES_DIR": str(self.workspace.parent / "homes"),  # the boxes' homes, removed with it
            "SANDBOX_REQUIRED": "true",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "PYTHONPATH": self._python_path,
            **env,
        }
        command = [*as_user(self.uid), "/usr/bin/python3", "-m", "process_mcp"]
        if cgroup_procs is not None:
            command = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', cgroup_procs, *command]
        params = StdioServerParameters(command=command[0], args=command[1:], env=settings, cwd="/")
        client = await self._stack.enter_async_context(Client(params, read_timeout_seconds=WAIT_S * 3))
        return Box(client, self.workspace, self.outside, self.uid)


@pytest.fixture
async def box(user: int, dirs: tuple[Path, Path], readable_python_path: str) -> AsyncIterator[Servers]:
    async with AsyncExitStack() as stack:
        yield Servers(stack, user, *dirs, readable_python_path)


def _write_as(box: Box, path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    for part in [path, *path.parents]:
        if part == box.workspace.parent:
            break
        os.chown(part, box.uid, box.uid)


# 1. Code outside the sandbox: the request's environment must reach only the command inside.


async def test_a_planted_env_on_the_requested_path_runs_only_inside_the_sandbox(box: Servers) -> None:
    b: Box = await box()
    canary = b.outside / "ran-outside"
    planted = f'#!/bin/sh\ntouch {canary}\necho planted-ran\nexec /usr/bin/env "$@"\n'
    await b.output(f"mkdir -p bin && printf %s {shlex.quote(planted)} > bin/env && chmod +x bin/env")
    for name in ("env", "prlimit", "bwrap", "sh"):
        if name != "env":
            await b.output(f"cp bin/env bin/{name}")
    path = f"{b.workspace}/bin:/usr/bin:/bin"
    output = await b.output("echo $PATH; env true", env={"PATH": path})
    assert output.startswith(path)  # the request's PATH reaches the command
    assert "planted-ran" in output  # and the command's own lookups use it
    assert not canary.exists()  # but no link of the launch chain came from it


async def test_ld_preload_in_the_request_reaches_the_command_and_not_the_launch_chain(box: Servers) -> None:
    compiler = shutil.which("cc")
    assert compiler is not None, "the attack suite needs a C compiler (Debian's gcc) to build its preload library"
    b: Box = await box()
    canary = b.outside / "preloaded-outside"
    source = b.outside.parent / "preload.c"
    library = b.workspace / "preload.so"
    source.write_text(
        "#include <fcntl.h>\n#include <unistd.h>\n"
        f'__attribute__((constructor)) static void hit(void) {{ close(open("{canary}", O_CREAT | O_WRONLY, 0644));'
        ' write(2, "preloaded\\n", 10); }\n'
    )
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    os.chown(library, b.uid, b.uid)
    output = await b.output("true", env={"LD_PRELOAD": str(library)})
    assert "preloaded" in output
    assert not canary.exists()


async def test_the_outer_bwrap_process_gets_an_empty_environment(box: Servers) -> None:
    b: Box = await box()
    arg = sleep_argument()
    await b.run(f"sleep {arg}", background=True, env={"LD_PRELOAD": "/nonexistent.so", "MARK": arg})
    (sleeper,) = await sleepers(arg, 1)
    chain = _ancestors(sleeper)
    outer = [pid for pid in chain if _exe_name(pid) == "bwrap" and _ns(pid) == _ns(os.getpid())]
    assert outer, f"no bwrap outside the sandbox among {chain}"
    for pid in outer:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        # Nothing of the request's or the server's; PWD=/ is what the cgroup-joining shell exports.
        assert environ in (b"", b"PWD=/\0"), environ
    assert b"MARK=" + arg.encode() in Path(f"/proc/{sleeper}/environ").read_bytes()


# 2. Secrets in the server's environment.


async def test_the_servers_secrets_never_reach_a_process_unless_passed_through(box: Servers) -> None:
    b: Box = await box(CUSTOM_SETTING="visible-by-choice", PROCESS_ENV_PASSTHROUGH="CUSTOM_SETTING")
    output = await b.output("env; cat /proc/1/environ /proc/self/environ 2>&1 | tr '\\0' '\\n'")
    assert SECRET not in output
    assert "AWS_SECRET_ACCESS_KEY" not in output
    assert "CUSTOM_SETTING=visible-by-choice" in output
    assert "PATH=" in output
    tty = await b.output("env", tty=True)
    assert SECRET not in tty


async def test_an_unsandboxed_server_still_keeps_its_secrets_from_processes(box: Servers) -> None:
    b: Box = await box(SANDBOX_ENABLED="false", SANDBOX_REQUIRED="false")
    result = await b.client.call_tool("spawn", {"command": "env"})
    assert result.structured_content is not None
    assert result.structured_content["sandboxed"] is False
    assert SECRET not in result.structured_content["stdout"]
    assert "PATH=" in result.structured_content["stdout"]


# 3 and 9. Writes go only to the writable roots, whatever the cwd; /tmp is private.


async def test_a_cwd_outside_the_workspace_is_read_only_or_refused(box: Servers) -> None:
    b: Box = await box()
    assert "ok" in await b.output("echo ok > made && cat made")
    assert (b.workspace / "made").read_text() == "ok\n"
    for cwd in ("/", "/usr", "/etc"):
        output = await b.output("echo x > ./planted; echo x > /planted", cwd=cwd)
        assert "Read-only file system" in output
        assert not Path(cwd, "planted").exists()
    refused = await b.error("echo x > ./planted", cwd=str(b.outside))
    assert "outside what the sandbox shows" in refused
    assert not (b.outside / "planted").exists()


async def test_tmp_is_private_even_as_the_working_directory(box: Servers) -> None:
    b: Box = await box()
    name = f"process-mcp-test-{secrets.token_hex(4)}"
    output = await b.output(
        f"echo x > ./{name} && echo y > /var/tmp/{name} && echo z > /dev/shm/{name} && ls", cwd="/tmp"
    )
    assert name in output
    for host in ("/tmp", "/var/tmp", "/dev/shm"):
        assert not Path(host, name).exists()


async def test_a_workspace_that_would_open_the_system_or_home_is_refused(box: Servers) -> None:
    for workdir in ("/tmp", "/"):
        b: Box = await box(DEFAULT_WORKDIR=workdir)
        assert "will not make" in await b.error("echo never")


# 4. Persistence: what runs code later stays read-only inside the writable roots.


PROTECTED = (
    ".git",
    ".git/hooks",
    ".git/config",
    ".git/config.worktree",
    ".git/commondir",
    ".git/info",
    ".git/modules",
    ".git/worktrees",
    ".husky",
    ".githooks",
    ".vscode",
    ".idea",
    ".devcontainer",
    ".envrc",
    ".bashrc",
    ".bash_profile",
    ".bash_login",
    ".bash_logout",
    ".profile",
    ".zshrc",
    ".zshenv",
    ".zprofile",
    ".zlogin",
    ".ssh",
    ".gnupg",
    ".gitconfig",
    ".config/git",
    ".config/autostart",
    ".local/bin",
)
"""Every name SECURITY.md promises read-only in the writable roots, written here rather than read from
the sandbox, so that a name dropped there fails the test below."""
PLANTS = {
    ".git": ".git/HEAD",
    ".git/hooks": ".git/hooks/pre-commit",
    ".git/config": ".git/config",
    ".git/config.worktree": ".git/config.worktree",
    ".git/commondir": ".git/commondir",
    ".git/info": ".git/info/attributes",
    ".git/modules": ".git/modules/m/config",
    ".git/worktrees": ".git/worktrees/w/commondir",
    ".husky": ".husky/pre-commit",
    ".githooks": ".githooks/pre-commit",
    ".vscode": ".vscode/tasks.json",
    ".idea": ".idea/workspace.xml",
    ".devcontainer": ".devcontainer/devcontainer.json",
    ".envrc": ".envrc",
    ".bashrc": ".bashrc",
    ".bash_profile": ".bash_profile",
    ".bash_login": ".bash_login",
    ".bash_logout": ".bash_logout",
    ".profile": ".profile",
    ".zshrc": ".zshrc",
    ".zshenv": ".zshenv",
    ".zprofile": ".zprofile",
    ".zlogin": ".zlogin",
    ".ssh": ".ssh/authorized_keys",
    ".gnupg": ".gnupg/gpg.conf",
    ".gitconfig": ".gitconfig",
    ".config/git": ".config/git/config",
    ".config/autostart": ".config/autostart/evil.desktop",
    ".local/bin": ".local/bin/git",
}
"""A file planted for each protected name (the name itself, or a file in it). ``.git`` is read-only whole,
which covers the names under it; with ``.git`` allowed, those names are what holds."""
NESTED = "nested/deeper/lib"
"""Where every plant is made a second time: protected names count at any depth."""


@pytest.mark.parametrize("allowed", ["", ".git"], ids=["default", "git-allowed"])
async def test_files_that_run_code_later_cannot_be_planted_or_changed(box: Servers, allowed: str) -> None:
    assert set(PLANTS) == set(PROTECTED)  # the test's own bookkeeping: a plant for every name
    b: Box = await box(SANDBOX_ALLOW_PROTECTED=allowed)
    workspace = b.workspace
    held = {name: plant for name, plant in PLANTS.items() if name != allowed}
    targets = [*held.values(), *(f"{NESTED}/{plant}" for plant in held.values())]
    for target in targets:
        _write_as(b, workspace / target, "original\n")
    _write_as(b, workspace / NESTED / "main.py", "print('hi')\n")
    # A protected directory also takes no new file.
    new_files = [
        f"{prefix}{name}/planted-new" for name in held if PLANTS[name] != name for prefix in ("", f"{NESTED}/")
    ]
    attack = [f"echo evil > {t}; echo evil >> {t}; rm -f {t}" for t in targets] + [
        f"echo evil > {n}" for n in new_files
    ]
    output = await b.output("; ".join(attack) + "; echo done")
    assert "done" in output
    changed = [t for t in targets if not (workspace / t).exists() or (workspace / t).read_text() != "original\n"]
    assert changed == [], output
    assert [n for n in new_files if (workspace / n).exists()] == [], output
    # Moving a protected directory away, planting, and moving it back is refused at the first step.
    output = await b.output("mv .git moved && echo evil > moved/hooks/x; mv nested other")
    assert "busy" in output.lower()
    assert not (workspace / "moved").exists()
    assert (workspace / "nested").is_dir()
    # The legitimate work next to them: editing code, reading the repository's configuration and, with
    # .git allowed, what a commit writes.
    assert "original" in await b.output(f"cat .git/config && echo edited > {NESTED}/main.py")
    assert (workspace / NESTED / "main.py").read_text() == "edited\n"
    if allowed:
        await b.output(f"echo ref: refs/heads/work > {PLANTS[allowed]}")
        assert (workspace / PLANTS[allowed]).read_text() == "ref: refs/heads/work\n"


async def test_a_repository_without_a_hooks_directory_cannot_get_one(box: Servers) -> None:
    b: Box = await box()
    _write_as(b, b.workspace / "repo/.git/config", "[core]\n")
    _write_as(b, b.workspace / "repo/main.py", "print(1)\n")
    output = await b.output("mkdir repo/.git/hooks && echo evil > repo/.git/hooks/pre-commit; echo 2 > repo/main.py")
    assert "Read-only file system" in output
    assert not (b.workspace / "repo/.git/hooks").exists()
    assert (b.workspace / "repo/main.py").read_text() == "2\n"


async def test_a_protected_path_can_be_allowed_explicitly(box: Servers) -> None:
    b: Box = await box(SANDBOX_ALLOW_PROTECTED=".vscode")
    _write_as(b, b.workspace / ".vscode/settings.json", "{}\n")
    await b.output("echo changed > .vscode/settings.json")
    assert (b.workspace / ".vscode/settings.json").read_text() == "changed\n"


async def test_files_in_etc_that_other_users_cannot_read_stay_hidden_even_from_their_owner(box: Servers) -> None:
    # A file the server's own user may read and others may not: hidden from its sandboxes whoever runs
    # the server (for nobody, /etc/shadow alone would prove nothing: nobody cannot read it anyway).
    if os.getuid() != 0:
        cannot_run_here("only a root test run can place a private file in /etc for the server's user")
    private = Path(f"/etc/process-mcp-test-{secrets.token_hex(4)}")
    private.write_text(SECRET)
    try:
        private.chmod(0o600)
        os.chown(private, box.uid, box.uid)
        b: Box = await box()  # after the file exists: what is hidden is decided at the server's start
        assert _as_user_reads(box.uid, private) == SECRET  # the server's user can read it on the host
        output = await b.output(f"cat {private} /etc/shadow /etc/gshadow; head -1 /etc/passwd")
        assert "root:" in output  # /etc/passwd is world-readable and shown
        assert SECRET not in output
        if box.uid == 0:
            shadow = Path("/etc/shadow").read_text()
            assert shadow, "the host has no /etc/shadow to test with"
            assert shadow.splitlines()[0] not in output
    finally:
        private.unlink()


def _as_user_reads(uid: int, path: Path) -> str:
    command = [*as_user(uid), "cat", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=WAIT_S, check=True).stdout


async def test_the_users_home_is_not_shown_at_all(box: Servers) -> None:
    b: Box = await box()
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)  # the test runner's home, which has files
    assert any(home.iterdir())
    output = await b.output(f"ls -A {home}; echo x >> {home}/.bashrc; echo HOME=$HOME; echo kept > ~/note")
    assert "HOME=/home/agent" in output  # the box's own, neither the user's home nor the workspace
    assert f"ls: cannot access '{home}': No such file or directory" in output
    assert not (b.workspace / "note").exists()
    assert await b.output("cat ~/note") == "kept\n"


async def test_a_repository_an_earlier_call_made_is_protected_from_every_later_one(box: Servers) -> None:
    """The box lives across calls: what one call makes (a repository) must be protected in the next as
    if it had been there when the box started, and ordinary reading git works."""
    b: Box = await box()
    assert "created" in await b.output("git init -q repo && git -C repo config user.email a@b && echo created")
    attempt = (
        "echo evil > repo/.git/hooks/pre-commit; git -C repo config core.fsmonitor 'touch /tmp/x'; "
        "git -C repo config core.hooksPath /tmp; git -C repo status --short; echo end"
    )
    reply = await b.run(attempt)
    assert reply["stdout"] == "end\n", reply
    assert str(reply["stderr"]).count("Read-only file system") == 3, reply
    assert not (b.workspace / "repo/.git/hooks/pre-commit").exists()
    config = (b.workspace / "repo/.git/config").read_text()
    assert "fsmonitor" not in config
    assert "hooksPath" not in config
    assert "a@b" in config  # what the first call wrote, before it was protected


async def test_a_process_started_before_a_repository_cannot_write_it_once_a_later_call_protects_it(
    box: Servers,
) -> None:
    """An older process (a shell, a tmux server another call drives) must not keep a view of the box in
    which a repository made since is writable."""
    b: Box = await box()
    older = await b.run(
        "mkdir -p go; while [ ! -e go/now ]; do sleep 0.05; done; echo evil > repo/.git/hooks/pre-commit; echo done",
        background=True,
    )
    await b.output("git init -q repo")
    await b.output("touch go/now")  # this call's plan protects repo/.git, for every process of the box
    for _ in range(int(WAIT_S / POLL_S)):  # its output, polled through the tool
        reply = await b.client.call_tool("stdout", {"id": older["pid"]})
        if "done" in str(reply.structured_content):
            break
        await anyio.sleep(POLL_S)
    assert "Read-only file system" in str(reply.structured_content), reply
    assert not (b.workspace / "repo/.git/hooks/pre-commit").exists()


async def test_the_workspace_cannot_be_moved_in_the_box_to_carry_its_protections_elsewhere(box: Servers) -> None:
    """The directories above a workspace under /tmp are the box's own, in its writable /tmp: moved, they
    would carry the workspace and every protection on it to paths the server's plans do not name, and a
    later plan could lift the protection that shows at a path it names no more (a review's attack)."""
    repo = box.workspace / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for part in [repo, *repo.rglob("*")]:
        os.chown(part, box.uid, box.uid)
    b: Box = await box()
    top, name = str(box.workspace.parent), box.workspace.name
    assert "Read-only file system" in await b.output("touch repo/.git/hooks/x")
    moved = await b.run(f"cd / && mv {top} /tmp/T; mkdir -p {top}/{name}/d/{name}/repo/.git; echo end")
    assert "busy" in str(moved["stderr"]), moved  # a mount point: it cannot be renamed
    await b.output(f"cd / && mv {top} /tmp/F; mkdir -p {top}/{name} && mv /tmp/T {top}/{name}/d")
    await b.output("true")
    hook = f"{top}/{name}/d/{name}/repo/.git/hooks/pre-commit"
    await b.output(f"echo evil > {hook}; echo evil > repo/.git/hooks/pre-commit; git -C repo config core.fsmonitor x")
    assert not (repo / ".git/hooks/pre-commit").exists()
    assert "fsmonitor" not in (repo / ".git/config").read_text()


async def test_a_hard_link_made_before_a_repository_was_protected_fails_the_next_spawn(box: Servers) -> None:
    """A repository that appears while the box lives (the user clones into the workspace) is protected
    from the next spawn on; a process already running can link its config before then, and the link
    outlives every box. The next spawn must refuse to run with it, naming the file."""
    b: Box = await box()
    poller = "while [ ! -e u/.git/config ]; do sleep 0.02; done; ln u/.git/config .cfg-link; echo linked"
    await b.run(poller, background=True)
    made = box.outside / "u"  # made whole elsewhere, then moved in: it appears at once, the user's
    subprocess.run(["git", "init", "-q", str(made)], check=True)
    for part in [made, *made.rglob("*")]:
        os.chown(part, box.uid, box.uid)
    made.rename(box.workspace / "u")
    for _ in range(int(WAIT_S / POLL_S)):  # until the process has linked it
        if (box.workspace / ".cfg-link").exists():
            break
        await anyio.sleep(POLL_S)
    refused = await b.error("echo '[core] fsmonitor = touch /tmp/pwned' >> .cfg-link")
    assert "hard links" in refused, refused
    assert str(box.workspace / "u/.git/config") in refused
    assert "fsmonitor" not in (box.workspace / "u/.git/config").read_text()
    (box.workspace / ".cfg-link").unlink()  # as the message says: then the spawns go on
    assert "ok" in await b.output("echo ok")


# 4b. Links: nothing the sandbox mounts follows a symbolic link a process could have made.


def _plant_link(b: Box, name: str, target: str) -> Path:
    link = b.workspace / name
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)
    os.lchown(link, b.uid, b.uid)
    for part in link.parents:
        if part == b.workspace.parent:
            break
        os.chown(part, b.uid, b.uid)
    return link


async def test_a_protected_name_that_is_a_link_is_refused_and_never_mounted(box: Servers) -> None:
    workspace, outside = box.workspace, box.outside
    shared = outside / "shared"  # shown read-only; a link must not make it writable
    (shared / "bin").mkdir(parents=True)
    (outside / "secret").write_text(SECRET)
    for path in (shared, shared / "bin", outside / "secret"):
        os.chown(path, box.uid, box.uid)
    b: Box = await box(SANDBOX_ALLOW_READ=str(shared))
    up = "../" * len(workspace.parts)  # from the workspace to the host's /
    canary = f"/usr/process-mcp-canary-{secrets.token_hex(4)}"
    attack = f"cat {outside}/secret; echo x > {canary}; echo x > {shared}/bin/planted; ls /proc/1/root/"
    links = [
        (".bashrc", up),  # the host's root as the sandbox's /
        (".local", f"{up}usr"),  # /usr, with .local/bin in it, bound writable as a parent
        (".ssh", "/proc"),
        (".git", str(outside)),
        ("deep/er/.vscode", f"../../{up}"),
        (".config", str(shared)),  # the first component of .config/autostart
        (".local", str(shared)),  # .local/bin exists in the shown directory
    ]
    try:
        for name, target in links:
            link = _plant_link(b, name, target)
            refused = await b.error(attack, env={})
            assert "symbolic link" in refused, (name, refused)
            assert SECRET not in refused
            link.unlink()
    finally:
        Path(canary).unlink(missing_ok=True)
    assert not Path(canary).exists()
    assert not (shared / "bin/planted").exists()
    # With the links gone, the same workspace works, and the attack finds nothing it should not.
    output = await b.output(attack)
    assert SECRET not in output
    assert not Path(canary).exists()
    assert not (shared / "bin/planted").exists()
    assert "Read-only file system" in output  # the shown directory stays read-only


async def test_a_protected_name_behind_a_link_is_refused_when_the_relative_deny_rules_name_it(box: Servers) -> None:
    b: Box = await box(SANDBOX_DENY_READ=".env")
    _write_as(b, b.workspace / "real/.env", SECRET)
    _plant_link(b, "app/.env", "../real/.env")
    assert "symbolic link" in await b.error("cat app/.env")
    (b.workspace / "app/.env").unlink()
    assert SECRET not in await b.output("cat real/.env app/.env; echo done")


async def test_a_link_cannot_uncover_a_denied_file_or_move_a_deny_rule(box: Servers) -> None:
    workspace = box.workspace
    b: Box = await box(SANDBOX_DENY_READ=f"{workspace}/secret,{workspace}/keys/id")
    _write_as(b, workspace / "secret", SECRET)
    _write_as(b, workspace / "keys/id", SECRET)
    _write_as(b, workspace / "decoy/id", "decoy\n")
    # A protected name deeper than the denied file, linked to the workspace, would be mounted over it.
    link = _plant_link(b, "a/b/.ssh", "../..")
    refused = await b.error("cat secret a/b/.ssh/secret")
    assert "symbolic link" in refused
    assert SECRET not in refused
    link.unlink()
    assert SECRET not in await b.output("cat secret; echo done")
    # A deny path whose parent became a link is refused, not followed to whatever the link names.
    (workspace / "keys").rename(workspace / "keys.real")
    _plant_link(b, "keys", "decoy")
    refused = await b.error("cat keys.real/id")
    assert "symbolic link" in refused
    assert SECRET not in refused


async def test_a_directory_made_unreadable_is_held_read_only_not_skipped_by_the_search(box: Servers) -> None:
    b: Box = await box()
    _write_as(b, b.workspace / "repo/.git/config", "[core]\n")
    _write_as(b, b.workspace / "repo/.git/hooks/README", "hooks\n")
    _write_as(b, b.workspace / "repo/main.py", "print(1)\n")
    # A process of the server's own user may chmod its directories; an unprivileged server then cannot
    # list them, and the search for protected paths must not take that as "nothing here".
    await b.output("chmod 0300 repo")
    output = await b.output("chmod 0755 repo; echo evil >> repo/.git/config; echo evil > repo/.git/hooks/pre-commit")
    (b.workspace / "repo").chmod(0o755)
    assert (b.workspace / "repo/.git/config").read_text() == "[core]\n", output
    assert not (b.workspace / "repo/.git/hooks/pre-commit").exists()
    # Once it can be listed again, the rest of the repository is as writable as before.
    await b.output("echo 2 > repo/main.py")
    assert (b.workspace / "repo/main.py").read_text() == "2\n"


async def test_a_protected_path_inside_a_hidden_directory_does_not_fail_later_spawns(box: Servers) -> None:
    b: Box = await box(SANDBOX_DENY_READ="secret")
    await b.output("mkdir -p a/secret/r/.git/hooks")
    assert "still-spawning" in await b.output("echo still-spawning; ls -A a/secret")


# 4c. Git reads configuration and code from many files in .git: none of them may be the agent's.


def _git(repo: Path, uid: int, *args: str) -> subprocess.CompletedProcess[str]:
    """The user's git on the host, in ``repo``: what the agent's plants are aimed at."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(repo.parent.parent), "GIT_CONFIG_NOSYSTEM": "1"}
    command = [*as_user(uid), "git", "-c", "safe.directory=*", *args]
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=WAIT_S, check=False)


def _repository(b: Box, name: str) -> Path:
    repo = b.workspace / name
    _write_as(b, repo / "main.py", "print(1)\n")
    for args in (
        ("init", "-q"),
        ("add", "main.py"),
        ("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "1"),
    ):
        done = _git(repo, b.uid, *args)
        assert done.returncode == 0, done.stderr
    return repo


async def test_git_runs_nothing_the_agent_wrote_into_any_file_it_reads(box: Servers) -> None:
    b: Box = await box()
    repo = _repository(b, "repo")
    canary = b.outside / "git-ran-agent-code"
    script = f"#!/bin/sh\ntouch {canary}\n"
    evil = b.workspace / "evil"
    plants = [
        # commondir: git then reads the config and hooks of a directory the agent controls.
        f"mkdir -p {evil}/hooks && printf '[core]\\n\\tfsmonitor = {evil}/run\\n' > {evil}/config"
        f" && printf %s {shlex.quote(script)} > {evil}/run && chmod +x {evil}/run",
        f"echo {evil} > repo/.git/commondir",
        "printf '[core]\\n\\tfsmonitor = ../evil/run\\n' > repo/.git/config.worktree",
        "printf '[extensions]\\n\\tworktreeConfig = true\\n' >> repo/.git/config",
        "echo '* filter=evil' > repo/.git/info/attributes",
        f"mkdir -p repo/.git/worktrees/w && echo {evil} > repo/.git/worktrees/w/commondir",
        f"printf %s {shlex.quote(script)} > repo/.git/hooks/post-checkout",
        "mkdir -p repo/.git/modules/m && echo '[core]' > repo/.git/modules/m/config",
        "echo ref: refs/heads/evil > repo/.git/HEAD",
    ]
    output = await b.output("; ".join(plants) + "; ls repo/.git")
    assert output.count("Read-only file system") >= len(plants) - 1, output
    for name in ("commondir", "config.worktree", "info/attributes", "worktrees", "modules"):
        assert not (repo / ".git" / name).exists(), name
    # The user's git on the host, with the plants attempted: nothing of the agent's runs.
    for args in (("status",), ("checkout", "-q", "-b", "other"), ("log", "--oneline")):
        _git(repo, b.uid, *args)
    assert not canary.exists()
    # The legitimate use: the agent reads the repository and edits the code.
    output = await b.output("cd repo && git -c safe.directory='*' log --oneline; git status --short; echo 2 > main.py")
    assert " 1" in output
    assert (repo / "main.py").read_text() == "2\n"


async def test_a_worktree_pointer_protects_the_git_directory_it_names(box: Servers) -> None:
    b: Box = await box()
    _write_as(b, b.workspace / "gitdirs/proj/hooks/README", "hooks\n")
    _write_as(b, b.workspace / "gitdirs/proj/config", "[core]\n")
    _write_as(b, b.workspace / "proj/.git", "gitdir: ../gitdirs/proj\n")
    output = await b.output("echo evil > gitdirs/proj/hooks/pre-commit; echo evil >> gitdirs/proj/config; echo ok")
    assert "Read-only file system" in output
    assert not (b.workspace / "gitdirs/proj/hooks/pre-commit").exists()
    assert (b.workspace / "gitdirs/proj/config").read_text() == "[core]\n"


async def test_allowing_git_lets_the_agent_commit_while_hooks_and_config_stay_read_only(box: Servers) -> None:
    b: Box = await box(SANDBOX_ALLOW_PROTECTED=".git")
    repo = _repository(b, "repo")
    git = "git -c safe.directory='*' -c user.name=agent -c user.email=a@a"
    output = await b.output(
        f"cd repo && echo 2 > main.py && {git} commit -qam two && {git} log --oneline | wc -l;"
        " echo evil > .git/hooks/pre-commit; echo evil >> .git/config"
    )
    assert "2" in output.split()
    assert "Read-only file system" in output
    assert not (repo / ".git/hooks/pre-commit").exists()
    assert "evil" not in (repo / ".git/config").read_text()


# 5. Deny rules hold against rename, hard links, symbolic links and paths that do not exist yet.


async def test_deny_read_holds_against_renaming_a_parent(box: Servers) -> None:
    workspace = box.workspace
    b: Box = await box(SANDBOX_DENY_READ=f"{workspace}/secrets/key,{workspace}/vault")
    _write_as(b, workspace / "secrets/key", SECRET)
    _write_as(b, workspace / "vault/token", SECRET)
    output = await b.output("mv secrets moved; mv vault v2; cat secrets/key moved/key vault/token v2/token; ls vault")
    assert SECRET not in output
    assert (workspace / "secrets/key").read_text() == SECRET
    assert SECRET not in await b.output("cat secrets/key; ls -A vault; ln -s secrets/key link; cat link")
    assert (workspace / "secrets").is_dir()


async def test_deny_read_refuses_a_file_with_another_hard_link(box: Servers) -> None:
    workspace = box.workspace
    b: Box = await box(SANDBOX_DENY_READ=f"{workspace}/key")
    _write_as(b, workspace / "key", SECRET)
    os.link(workspace / "key", workspace / "copy")
    assert "hard links" in await b.error("cat copy")
    (workspace / "copy").unlink()
    assert SECRET not in await b.output("cat key; echo done")


async def test_a_denied_path_that_does_not_exist_cannot_be_created(box: Servers) -> None:
    workspace = box.workspace
    b: Box = await box(SANDBOX_DENY_WRITE=f"{workspace}/later/config", SANDBOX_DENY_READ=f"{workspace}/env/.env")
    output = await b.output("mkdir -p later env; echo evil > later/config; echo x > env/.env; echo fine > notes")
    assert "Read-only file system" in output
    assert not (workspace / "later").exists()
    assert not (workspace / "env").exists()
    # Its nearest existing ancestor, here the workspace, is read-only; once it exists, only it is.
    _write_as(b, workspace / "later/config", "original\n")
    _write_as(b, workspace / "env/.env", SECRET)
    output = await b.output("echo evil > later/config; cat env/.env; echo fine > notes && cat notes")
    assert "fine" in output
    assert SECRET not in output
    assert (workspace / "later/config").read_text() == "original\n"


async def test_relative_deny_rules_apply_at_any_depth_and_leave_nothing_behind(box: Servers) -> None:
    b: Box = await box(SANDBOX_DENY_WRITE="generated", SANDBOX_DENY_READ=".env")
    _write_as(b, b.workspace / "a/b/generated/out.txt", "original\n")
    _write_as(b, b.workspace / "a/.env", SECRET)
    output = await b.output("echo evil > a/b/generated/out.txt; cat a/.env; echo ok > a/b/fine && cat a/b/fine")
    assert "ok" in output
    assert SECRET not in output
    assert (b.workspace / "a/b/generated/out.txt").read_text() == "original\n"
    assert sorted(p.name for p in b.workspace.iterdir()) == ["a"]


# 6. Host IPC: SysV shared memory, Unix sockets by path and in the abstract namespace.


async def test_host_sysv_shared_memory_is_not_visible(box: Servers) -> None:
    b: Box = await box()
    created = subprocess.run(["ipcmk", "-M", "4096"], capture_output=True, text=True, check=True).stdout
    shm_id = created.split()[-1]
    try:
        output = await b.output("ipcs -m")
        assert shm_id not in output.split()
        assert "ok" in await b.output("ipcmk -M 4096 >/dev/null && echo ok")  # its own IPC namespace works
    finally:
        subprocess.run(["ipcrm", "-m", shm_id], check=False)


async def test_host_unix_sockets_cannot_be_reached_by_path_or_abstract_name(box: Servers) -> None:
    b: Box = await box()
    name = f"process-mcp-test-{secrets.token_hex(4)}"
    # Where services keep their sockets (/run), when the tests may write there; else beside the workspace.
    hidden_dir = (Path("/run") if os.access("/run", os.W_OK) else b.outside.parent) / name
    hidden_dir.mkdir()
    hidden_dir.chmod(0o777)
    with _listening(str(hidden_dir / "host.sock")) as by_path, _listening("\0" + name) as abstract:
        probe = (
            "import socket,sys\n"
            "for a in sys.argv[1:]:\n"
            "    s=socket.socket(socket.AF_UNIX)\n"
            "    try: s.connect(a.replace('@','\\0',1)); print('CONNECTED', a)\n"
            "    except OSError as e: print('refused', a, e.errno)\n"
        )
        targets = [str(hidden_dir / "host.sock"), "@" + name, "/var/run/docker.sock", "/run/docker.sock"]
        output = await b.output(f"python3 -c {shlex.quote(probe)} {' '.join(targets)}")
        assert "CONNECTED" not in output
        assert output.count("refused") == len(targets)
        assert (by_path.accepted, abstract.accepted) == (0, 0)
    shutil.rmtree(hidden_dir)
    # The legitimate use: a sandbox's own sockets, by path and abstract, between its processes.
    own = (
        "import socket,os\n"
        "for a in ('own.sock', '\\0own-" + name + "'):\n"
        "    srv=socket.socket(socket.AF_UNIX); srv.bind(a); srv.listen()\n"
        "    c=socket.socket(socket.AF_UNIX); c.connect(a); print('own ok')\n"
    )
    assert (await b.output(f"python3 -c {shlex.quote(own)}")).count("own ok") == 2


# 7. Root: no capabilities inside, whoever runs the server; mounts and unmounts fail.


async def test_no_capability_survives_into_the_sandbox_and_mounts_fail(box: Servers) -> None:
    workspace = box.workspace
    b: Box = await box(SANDBOX_DENY_READ=f"{workspace}/hidden")
    _write_as(b, workspace / "hidden/key", SECRET)
    status = await b.output("grep -E '^(CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status")
    fields = dict(line.split(":\t") for line in status.strip().splitlines())
    assert {fields[k] for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")} == {"0000000000000000"}
    assert (fields["NoNewPrivs"], fields["Seccomp"]) == ("1", "2")
    output = await b.output(
        "mount -o remount,rw / ; mount -o remount,rw /usr; umount hidden; umount -l hidden; "
        "mount -t tmpfs none hidden; unshare -U -r true; echo x > /usr/planted; cat hidden/key"
    )
    assert SECRET not in output
    assert not Path("/usr/planted").exists()
    assert "Operation not permitted" in output  # unshare


async def test_seccomp_refuses_terminal_injection_keyrings_and_namespaces(box: Servers) -> None:
    b: Box = await box()
    _, numbers = seccomp._TABLES[os.uname().machine]
    probe = (
        "import ctypes, fcntl, termios\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def call(name, *args):\n"
        "    r = libc.syscall(*args); print(name, r, ctypes.get_errno())\n"
        f"call('tiocsti', {numbers['ioctl']}, 0, ctypes.c_ulong({seccomp.TIOCSTI}), b'x')\n"
        f"call('tiocsti-high', {numbers['ioctl']}, 0, ctypes.c_ulong({seccomp.TIOCSTI} | (1 << 32)), b'x')\n"
        f"call('tioclinux', {numbers['ioctl']}, 0, ctypes.c_ulong({seccomp.TIOCLINUX}), b'x')\n"
        f"call('keyctl', {numbers['keyctl']}, 0, 0)\n"
        f"call('unshare', {numbers['unshare']}, 0x10000000)\n"
        "import os; print('stty', os.popen('stty size').read().strip())\n"
    )
    output = await b.output(f"python3 -c {shlex.quote(probe)}", tty=True)
    for name in ("tiocsti", "tiocsti-high", "tioclinux", "keyctl", "unshare"):
        assert f"{name} -1 1" in output, output  # EPERM
    assert "stty 30 120" in output  # the terminal itself works


# 8. The network filter: allowed names must not lead to the host's own services.


async def test_an_allowed_name_that_resolves_to_loopback_is_refused_unless_allowed(box: Servers) -> None:
    with _http_server() as server:
        fetch = (
            "import urllib.request, urllib.error\n"
            f"try: print(urllib.request.urlopen('http://localhost:{server.port}/x', timeout=5).status)\n"
            "except urllib.error.HTTPError as e: print(e.code, e.read().decode())\n"
        )
        proxied = {"NO_PROXY": "", "no_proxy": ""}
        b: Box = await box(SANDBOX_ALLOWED_DOMAINS="localhost")
        output = await b.output(f"python3 -c {shlex.quote(fetch)}", env=proxied)
        assert output.startswith("403")
        assert "SANDBOX_ALLOW_PRIVATE_ADDRESSES" in output
        assert server.requests == []
        allowed: Box = await box(SANDBOX_ALLOWED_DOMAINS="localhost", SANDBOX_ALLOW_PRIVATE_ADDRESSES="true")
        assert (await allowed.output(f"python3 -c {shlex.quote(fetch)}", env=proxied)).startswith("200")
        assert len(server.requests) == 1


async def test_a_host_header_naming_another_host_is_refused(box: Servers) -> None:
    with _http_server() as server:
        b: Box = await box(SANDBOX_ALLOWED_DOMAINS="localhost", SANDBOX_ALLOW_PRIVATE_ADDRESSES="true")
        smuggle = (
            "import socket\n"
            "s = socket.create_connection(('127.0.0.1', 3128))\n"
            f"s.sendall(b'GET http://localhost:{server.port}/x HTTP/1.1\\r\\nHost: refused.example\\r\\n\\r\\n')\n"
            "print(s.recv(200).split(b'\\r\\n')[0].decode())\n"
        )
        assert "400" in await b.output(f"python3 -c {shlex.quote(smuggle)}")
        assert server.requests == []


# 10. Denial of service: one sandbox's fork bomb, memory or /tmp never stops the server.


async def test_a_fork_bomb_is_bounded_and_the_server_keeps_spawning(box: Servers) -> None:
    b: Box = await box(SANDBOX_MAX_PROCESSES="64")
    bomb = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(500):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(300); os._exit(0)\n"
        "        n += 1\n"
        "    except OSError as e:\n"
        "        print('fork failed:', e.strerror, flush=True); break\n"
        "print('forked', n, flush=True); time.sleep(300)\n"
    )
    started = await b.run(f"python3 -c {shlex.quote(bomb)}", waitFor="forked", timeoutMs=20000)
    try:
        assert started["status"] == "running"
        forked = int(str(started["stdout"]).split("forked")[1].split()[0])
        assert forked < 64
        assert "fork failed" in started["stdout"]
        # While the bomb holds every process it may have, the server and other sandboxes go on.
        assert "still spawning" in await b.output("echo still spawning")
    finally:
        await b.client.call_tool("kill", {"id": started["pid"], "signal": "SIGKILL"})


async def test_a_fork_bomb_or_a_memory_hog_under_a_spawn_limit_is_ended_and_named(box: Servers) -> None:
    b: Box = await box()
    bomb = "import os, time\nwhile True:\n    try: os.fork() or time.sleep(300)\n    except OSError: pass"
    forks = await b.run(f"python3 -c {shlex.quote(bomb)}", limits={"processes": 16})  # retries every refused fork
    assert (forks["status"], forks["endedBy"], forks["limit"]) == ("terminated", "limit", "processes")
    hog = "python3 -c 'import time; b = bytearray(48 << 20); time.sleep(300)'"
    memory = await b.run(f"{hog} & {hog} & {hog} & wait", limits={"memoryMb": 96})
    assert (memory["status"], memory["endedBy"], memory["limit"]) == ("terminated", "limit", "memory")
    assert "ok" in await b.output("echo ok", limits={"processes": 16, "memoryMb": 96})


@contextmanager
def _pids_cgroup(limit: int) -> Iterator[Path]:
    """A cgroup v1 pids group of ``limit`` processes, as a container or a systemd unit would put a server in."""
    top = Path("/sys/fs/cgroup/pids")
    if os.getuid() != 0 or not top.is_dir():
        cannot_run_here("making a bounded cgroup for the server needs root and a cgroup v1 pids hierarchy")
    group = top / f"process-mcp-test-bound-{secrets.token_hex(4)}"
    group.mkdir()
    try:
        (group / "pids.max").write_text(str(limit))
        yield group
    finally:
        # The server (and the groups it made below its own) may outlive the test's body: end them all.
        deadline = time.monotonic() + WAIT_S
        while group.exists():
            groups = [*sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), group]
            for each in groups:
                for pid in (each / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                with contextlib.suppress(OSError):
                    each.rmdir()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{group} still has processes")
            time.sleep(0.05)


async def test_a_fork_bomb_in_a_bounded_server_leaves_room_to_spawn_and_kill(box: Servers) -> None:
    with _pids_cgroup(400) as group:
        b: Box = await box.start(str(group / "cgroup.procs"))
        retrying = "import os, time\nwhile True:\n    try: os.fork()\n    except OSError: time.sleep(0.01)\n"
        bomb = await b.run(f"python3 -c {shlex.quote(retrying)}", background=True)
        # Until the bomb has taken all its tree may (three quarters of its box's, which is half of what the
        # bound leaves the server's boxes: about 120 here), or the whole bound where nothing keeps it from
        # that: no change for a second.
        readings: list[int] = []
        with anyio.fail_after(WAIT_S * 2):
            while len(readings) < 4 or readings[-1] < 100 or len(set(readings[-4:])) > 1:
                readings.append(int((group / "pids.current").read_text()))
                await anyio.sleep(0.3)
        assert readings[-1] < 400, readings  # never the whole bound
        listed = await b.client.call_tool("ps", {})
        assert not listed.is_error
        # The next spawn still starts, and the kill that ends the bomb works.
        assert "still-spawning" in await b.output("echo still-spawning")
        killed = await b.client.call_tool("kill", {"id": bomb["pid"], "signal": "SIGKILL"})
        assert not killed.is_error, killed.content
        assert "after" in await b.output("echo after")


async def test_memory_and_tmp_are_bounded_with_a_clear_error(box: Servers) -> None:
    b: Box = await box(SANDBOX_MAX_MEMORY_MB="128", SANDBOX_TMP_SIZE_MB="16")
    output = await b.output("python3 -c 'x = bytearray(512 * 1024 * 1024)'; echo exit=$?")
    assert "MemoryError" in output
    output = await b.output("head -c 64M /dev/zero > /tmp/fill; echo exit=$?; du -m /tmp/fill")
    assert "No space left on device" in output
    assert "ok" in await b.output("echo ok")


async def test_shared_memory_is_bounded_where_the_sandbox_has_cgroups_and_by_its_tmpfs_elsewhere(box: Servers) -> None:
    b: Box = await box(SANDBOX_MAX_MEMORY_MB="128", SANDBOX_TMP_SIZE_MB="64")
    memfd = (
        "import os\nfd = os.memfd_create('x')\n"
        "for i in range(768):\n    os.write(fd, b'x' * (1 << 20))\nprint('held', i + 1, 'MiB')\n"
    )
    # /dev/shm is a tmpfs of the sandbox's own, sized: what a process can hold there is bounded everywhere.
    output = await b.output("head -c 200M /dev/zero > /dev/shm/fill; echo exit=$?; du -m /dev/shm/fill")
    assert "No space left on device" in output
    if box.uid == 0:
        # A root server gives each sandbox memory cgroups, which charge memfd and shm pages too.
        result = await b.client.call_tool("spawn", {"command": f"python3 -c {shlex.quote(memfd)}", "timeoutMs": 20000})
        content = result.structured_content
        assert content is not None
        assert "held" not in content["stdout"], content
        assert content.get("exitCode") == 137 or content.get("signal") == "SIGKILL", content
    # Without cgroups (an unprivileged server on cgroup v1) a memfd is outside RLIMIT_DATA: SECURITY.md
    # says so, and this is not asserted as a bound.
    assert "ok" in await b.output("echo ok")


# Helpers.


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            break
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        chain.append(pid)
    return chain


def _exe_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().rsplit("/", 1)[-1]
    except OSError:
        return ""


def _ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


@contextmanager
def _accepting(server: socket.socket, handle: Callable[[socket.socket], None]) -> Iterator[None]:
    """Accept connections on ``server`` in a thread, passing each to ``handle``, until the block ends."""
    server.listen()
    server.settimeout(0.1)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                handle(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(WAIT_S)
        server.close()


class _Counter:
    accepted = 0


@contextmanager
def _listening(address: str) -> Iterator[_Counter]:
    """A Unix socket server on the host that counts the connections it accepts."""
    counter = _Counter()
    server = socket.socket(socket.AF_UNIX)
    server.bind(address)
    if not address.startswith("\0"):
        os.chmod(address, 0o777)

    def count(_: socket.socket) -> None:
        counter.accepted += 1

    with _accepting(server, count):
        yield counter


class _Http:
    port = 0

    def __init__(self) -> None:
        self.requests: list[bytes] = []


@contextmanager
def _http_server() -> Iterator[_Http]:
    """An HTTP server on the host's loopback that records each request it gets."""
    state = _Http()
    server = socket.create_server(("127.0.0.1", 0))
    state.port = server.getsockname()[1]

    def answer(conn: socket.socket) -> None:
        conn.settimeout(WAIT_S)
        try:
            state.requests.append(conn.recv(65536))
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            pass

    with _accepting(server, answer):
        yield state


async def test_a_process_cannot_lower_the_limits_or_priority_of_the_boxs_agent_supervisors_or_other_processes(
    box: Servers,
) -> None:
    """They all share the box's user, for which the kernel allows another's rlimits, nice value, CPUs,
    scheduling and I/O priority to be changed; a supervisor starts the box's next process, so what it
    took would reach that process too (a file size of 0 kills it at its first write)."""
    b: Box = await box()
    probe = "ulimit -f; ulimit -n; nice; taskset -p $$ | cut -d: -f2; ionice -p $$; echo written > f && cat f"
    before = await b.output(probe)
    await b.run("sleep 300", background=True)
    others = (await b.output("pgrep -x sleep")).split()
    assert others, "the other spawn's process should be visible in the box"
    victims = " ".join(["$PPID", "1", "2", *others])  # its supervisor, bwrap's init, the agent, another spawn
    attack = (
        f'for pid in {victims}; do prlimit --pid "$pid" --fsize=0:0 --nofile=64:64 && echo "limited $pid"; '
        'renice -n 19 -p "$pid" && echo "reniced $pid"; taskset -p 1 "$pid" && echo "pinned $pid"; '
        'chrt -i -p 0 "$pid" && echo "idled $pid"; ionice -c3 -p "$pid" && echo "ioniced $pid"; done; '
        "renice -n 19 -u \"$(id -u)\" && echo 'reniced every process of the user'"
    )
    output = await b.output(attack)
    assert "Operation not permitted" in output
    for word in ("limited", "reniced", "pinned", "idled", "ioniced"):
        assert word not in output, output
    # The next spawn (on the supervisor the attack ran under) starts with what any spawn gets.
    assert await b.output(probe) == before
    # A process may still change its own: ulimit, nice, taskset and ionice on itself.
    own = await b.output("ulimit -n 100 && nice -n 5 true && taskset -c 0 true && ionice -c3 true && echo fine")
    assert own.strip().endswith("fine"), own
