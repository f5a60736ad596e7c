"""What the tests share besides fixtures: the backends and their configurations, bounded waits on real
conditions, and process checks."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent

from process_mcp import ProcessExecutor, ProcessMcpConfig, create_executor
from process_mcp.config import Defaults, DockerConfig, Limits, SandboxConfig
from process_mcp.host.sandbox import Sandbox, find_bwrap

DEBIAN_IMAGE = "process-mcp-test/debian:bookworm-r2"
BULLSEYE_IMAGE = "process-mcp-test/debian:bullseye"
BUSYBOX_IMAGE = "process-mcp-test/busybox:latest"
TEST_LABELS = {"process-mcp.test": "true"}
TESTS = Path(__file__).resolve().parent
"""This folder; the repository is its parent."""
ROOT = TESTS.parent


@dataclass(frozen=True)
class Backend:
    """A backend the contract suite runs against, and what it can do (declared once, here)."""

    mode: Literal["host", "docker"]
    sandboxed: bool
    """Host mode with the sandbox on; Docker mode is always confined by its container."""
    agent: bool
    """Docker mode through the agent in the container (else one exec per process)."""
    limits: bool
    """Applies per-process limits and reports what a process's tree uses."""
    exact_exits: bool
    """Reports how a process ended as the kernel did (one exec per process has only the engine's exit code)."""
    input_wanted: bool
    """Tells when a process waits for input (one exec per process cannot look into the container)."""
    output_files: bool = True
    """Keeps each output stream whole in a file in the box (the agent does; one exec per process cannot)."""


BACKENDS = {
    "host": Backend("host", sandboxed=True, agent=False, limits=True, exact_exits=True, input_wanted=True),
    "host-unsandboxed": Backend("host", sandboxed=False, agent=False, limits=True, exact_exits=True, input_wanted=True),
    "docker": Backend("docker", sandboxed=True, agent=True, limits=True, exact_exits=True, input_wanted=True),
    "docker-exec": Backend(
        "docker", sandboxed=True, agent=False, limits=False, exact_exits=False, input_wanted=False, output_files=False
    ),
}
"""Host mode sandboxed (the default) and not (where bwrap cannot run), Docker mode through the agent and with
one exec per process (images without Python)."""


def backends(*needs: str) -> list[str]:
    """The backends that have every capability in ``needs`` (fields of ``Backend``), for a fixture's params."""
    return [name for name, backend in BACKENDS.items() if all(getattr(backend, need) for need in needs)]


if TYPE_CHECKING:
    from docker.models.containers import Container

WAIT_S = 10.0
"""Bound on every wait for a condition in the tests; generous, since CI machines are shared."""
POLL_S = 0.02


def host_config(workdir: str | Path, *, sandbox: SandboxConfig | None = None, **limits: int) -> ProcessMcpConfig:
    """Host mode over ``workdir``; the boxes' homes where the test keeps them (``SANDBOX_HOMES_DIR``)."""
    sandbox = sandbox or SandboxConfig()
    if sandbox.homes_dir is None:
        sandbox = sandbox.model_copy(update={"homes_dir": os.environ.get("SANDBOX_HOMES_DIR")})
    return ProcessMcpConfig(
        mode="host", defaults=Defaults(workdir=str(workdir)), limits=Limits(**limits), sandbox=sandbox
    )


def docker_config(container: str, workdir: str = "/home/agent", **docker: object) -> ProcessMcpConfig:
    return ProcessMcpConfig(
        mode="docker",
        defaults=Defaults(workdir=workdir),
        docker=DockerConfig(container_name=container, **docker),
    )


def unique_name(what: str) -> str:
    return f"process-mcp-test-{what}-{secrets.token_hex(4)}"


def backend_config(request: pytest.FixtureRequest, backend: str, workdir: str) -> ProcessMcpConfig:
    """The configuration a test of ``backend`` runs with (see ``backend``), to adjust before starting."""
    declared = BACKENDS[backend]
    if declared.mode == "host":
        return host_config(workdir, sandbox=SandboxConfig(enabled=declared.sandboxed, required=True))
    container: Container = request.getfixturevalue("shared_container")
    return docker_config(str(container.name), workdir, use_existing=True, agent=declared.agent)


@contextlib.asynccontextmanager
async def configured_executor(
    request: pytest.FixtureRequest, backend: str, workdir: str, **changes: Any
) -> AsyncIterator[ProcessExecutor]:
    """A started executor of ``backend`` with ``changes`` set over the configuration its tests run with
    (``backend_config``); every process it started is ended afterwards."""
    executor = executor_for(backend_config(request, backend, workdir).model_copy(update=changes))
    await executor.start()
    try:
        yield executor
    finally:
        await executor.cleanup()


def executor_for(config: ProcessMcpConfig) -> ProcessExecutor:
    return create_executor(config)


NOBODY = 65534
"""The unprivileged user the tests run servers and boxes as, when they run as root."""


def as_user(uid: int) -> list[str]:
    """The command prefix that runs what follows as ``uid`` (nothing when that is this process's user)."""
    if uid == os.getuid():
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]


def cannot_run_here(why: str) -> NoReturn:
    """Skip a test this machine cannot run, loudly; in CI (CI=true), which can run every test, fail it."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CANNOT RUN IN CI: {why}")
    pytest.skip(f"SKIPPED: {why}")


@functools.cache
def machine_can_sandbox() -> bool:
    """Whether bubblewrap can make a user and PID namespace here: what a server's ``sandboxed`` is
    checked against, rather than assumed, since many machines (some containers, CI runners) cannot."""
    bwrap = find_bwrap()
    if bwrap is None:
        return False
    trial = [bwrap, "--unshare-user", "--unshare-pid", "--ro-bind", "/", "/", "--proc", "/proc", "--", "/bin/true"]
    return subprocess.run(trial, capture_output=True, check=False, timeout=WAIT_S).returncode == 0


async def wait_for_output(executor: ProcessExecutor, pid: str, pattern: str, *, lines: int = 200) -> str:
    """Poll stdout until ``pattern`` matches it; fail after WAIT_S. Returns the output."""
    regex = re.compile(pattern)
    output = ""
    with anyio.move_on_after(WAIT_S):
        while True:
            output = (await executor.get_output(pid, lines)).stdout
            if regex.search(output):
                return output
            await anyio.sleep(POLL_S)
    pytest.fail(f"{pattern!r} did not appear in the output of {pid} within {WAIT_S}s; last output:\n{output}")


async def wait_for_exit(executor: ProcessExecutor, pid: str) -> None:
    with anyio.move_on_after(WAIT_S):
        while (await executor.get_process(pid)).status == "running":
            await anyio.sleep(POLL_S)
        return
    pytest.fail(f"{pid} did not exit within {WAIT_S}s")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by its new parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_until_gone(pid: int) -> None:
    with anyio.move_on_after(WAIT_S):
        while pid_alive(pid):
            await anyio.sleep(POLL_S)
        return
    pytest.fail(f"pid {pid} is still alive after {WAIT_S}s")


def kill_if_alive(pid: int) -> None:
    """Test hygiene: end a process a failing test left behind (by pid, never by name)."""
    if pid_alive(pid):
        os.kill(pid, 9)


def sleep_argument() -> str:
    """A `sleep` duration unique to one test, so its processes can be found on the host (inside the
    sandbox's PID namespace, `$!` is not a host pid). Found by it, ended only by pid."""
    return f"300.{secrets.randbelow(10**6):06d}"


def running_sleepers(argument: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and argv[:2] == [b"sleep", argument.encode()] and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


async def sleepers(argument: str, count: int) -> list[int]:
    """Host pids of the `count` processes running `sleep <argument>`; fail if they do not appear."""
    found: list[int] = []
    with anyio.move_on_after(WAIT_S):
        while len(found) < count:
            found = running_sleepers(argument)
            await anyio.sleep(POLL_S)
        return found
    pytest.fail(f"expected {count} `sleep {argument}` processes, found {found}")


def started(argument: str) -> str:
    """Shell that waits until the `sleep <argument>` just started in the background has exec'd."""
    return f'until grep -q "{argument}" /proc/$!/cmdline 2>/dev/null; do :; done'


def text_of(result: CallToolResult) -> str:
    """The text a tool's reply shows."""
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


async def call(client: Client, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Call ``tool``, which must succeed; its structured content."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, text_of(result)
    content: dict[str, Any] | None = result.structured_content
    assert content is not None
    return content


async def error(client: Client, tool: str, arguments: dict[str, Any]) -> str:
    """Call ``tool``, which must fail; its error text."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result
    return text_of(result)


@dataclass
class Boxed:
    """How a command ran in a box: its exit code (128 + the signal where one ended it), and its output."""

    code: int | None
    stdout: str
    stderr: str


async def run_boxed(
    sandbox: Sandbox,
    command: str,
    cwd: str,
    home: str,
    *,
    edit: Callable[[list[str]], list[str]] | None = None,
    program: bytes | None = None,
) -> Boxed:
    """Run ``command`` in a box of its own that ``sandbox`` makes, its command line changed by ``edit``,
    confined by the plan the server would send with ``program`` as the seccomp filter (an empty one:
    none): the seam for proving one protection layer with another taken away."""
    from process_mcp.box.local import LocalAgent
    from process_mcp.core.contract import LaunchSpec
    from process_mcp.core.registry import ManagedProcess
    from process_mcp.host.seccomp import build_filter

    groups: list[str | None] = []

    def boxing(argv: list[str]) -> tuple[list[str], list[int]]:
        launch = sandbox.box(home, argv, sandbox.box_bounds())
        groups.append(launch.cgroup)
        return (edit(launch.argv) if edit is not None else launch.argv), list(launch.pass_fds)

    agent = await LocalAgent.start("test", boxing)
    try:
        plan = sandbox.confine_plan(build_filter() if program is None else program, scopes=True)
        if not plan["seccomp"]:
            del plan["seccomp"]
        record = ManagedProcess("host-1", command, cwd, tty=False, buffer_bytes=1 << 20, cols=80, rows=24)
        spec = LaunchSpec("host-1", command, cwd, {}, False, None)
        env = {"PATH": "/usr/bin:/bin", "HOME": sandbox.home_in_box(home)}
        record.handle = await agent.connection.spawn(spec, record, env, inherit=False, workdir=cwd, confine=plan)
        assert await record.wait(WAIT_S, output=True), f"{command!r} did not end"
        return Boxed(record.exit_code, record.stdout.tail().decode(), record.stderr.tail().decode())
    finally:
        await agent.stop()
        for group in groups:
            if group is not None and sandbox.cgroups is not None:
                sandbox.cgroups.release(group)


def without(argv: list[str], option: str, values: int = 0) -> list[str]:
    """``argv`` without ``option`` and the ``values`` arguments that follow it; it must be there."""
    assert option in argv, f"the command line has no {option}: {argv}"
    at = argv.index(option)
    return argv[:at] + argv[at + 1 + values :]


def replaced(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with the one argument after ``option`` replaced by ``value``; the option must be there."""
    assert option in argv, f"the command line has no {option}: {argv}"
    at = argv.index(option)
    return [*argv[: at + 1], value, *argv[at + 2 :]]
