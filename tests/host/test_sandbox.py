"""The host sandbox, proved by real attempts from inside it: writes, reads, connections, signals."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from process_mcp import BackendUnavailable, HostExecutor, SpawnFailed, SpawnOptions
from process_mcp.config import SandboxConfig
from process_mcp.core.models import ProcessLimits
from process_mcp.host import sandbox as sandbox_module
from process_mcp.host.bounds import ServerBounds

from ..helpers import WAIT_S, cannot_run_here, host_config, run_boxed, sleep_argument, wait_for_output, without

pytestmark = pytest.mark.anyio

# The base interpreter, not a virtualenv's: the sandbox's private /tmp hides a checkout under /tmp. It
# may live outside the system directories (e.g. under the home directory), so the fixture shows it.
PYTHON = shlex.quote(os.path.realpath(sys.executable))
INTERPRETER = os.path.realpath(sys.base_prefix)

# Run inside the sandbox: `direct PORT` tries a plain TCP connection to the host's loopback;
# `get URL` fetches through whatever proxy the environment names, printing the status and body.
NET_PROBE = shlex.quote(
    """
import socket, sys, urllib.error, urllib.request
if sys.argv[1] == "direct":
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=5).close()
        print("connected")
    except OSError as exc:
        print("no connection:", exc.strerror)
else:
    try:
        reply = urllib.request.urlopen(sys.argv[2], timeout=5)
        print(reply.status, reply.read().decode())
    except urllib.error.HTTPError as exc:
        print(exc.code, exc.read().decode())
    except urllib.error.URLError as exc:
        print("failed:", exc.reason)
"""
)
MakeSandbox = Callable[..., Awaitable[HostExecutor]]
KILL_RACES = 20
"""Spawns killed at once, each a fresh race with the sandbox's start."""
NO_NO_PROXY = {"NO_PROXY": "", "no_proxy": ""}  # so `localhost` goes through the proxy, to the host


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[MakeSandbox]:
    """Make started, sandboxed executors working in ``tmp_path/work``; ends all of them afterwards."""
    work = tmp_path / "work"
    work.mkdir()
    made: list[HostExecutor] = []

    async def make(**settings: object) -> HostExecutor:
        settings.setdefault("allow_read", [INTERPRETER])
        executor = HostExecutor(host_config(work, sandbox=SandboxConfig(required=True, **settings)))
        made.append(executor)
        await executor.start()
        assert executor.sandboxed
        return executor

    try:
        yield make
    finally:
        for executor in made:
            await executor.cleanup()


async def run(executor: HostExecutor, command: str, **options: object) -> tuple[int | None, str]:
    result = await executor.spawn(SpawnOptions(command=command, timeout_ms=int(WAIT_S * 1000), **options))
    assert result.status == "terminated", result
    assert result.sandboxed
    return result.exit_code, result.stdout + result.stderr


async def test_writes_succeed_in_the_working_directory_and_fail_elsewhere(sandbox: MakeSandbox, tmp_path: Path) -> None:
    executor = await sandbox()
    code, output = await run(executor, "echo inside > made-here && cat made-here")
    assert (code, output) == (0, "inside\n")
    assert (tmp_path / "work" / "made-here").read_text() == "inside\n"
    # A system directory is read-only; /var/tmp is the sandbox's own; the home directory is not shown.
    for outside, error in ((Path("/etc"), "Read-only file system"), (Path("/var/tmp"), ""), (Path.home(), "")):
        target = outside / f".process-mcp-test-{sleep_argument()}"
        try:
            code, output = await run(executor, f"echo x > {target}")
            assert error in output
            assert not target.exists()
        finally:
            target.unlink(missing_ok=True)


async def test_a_kill_sent_right_after_a_spawn_is_not_lost_while_the_sandbox_starts(sandbox: MakeSandbox) -> None:
    # bwrap ignores the signals a group kill sends until the launch chain resets them; a kill arriving
    # in that window (tens of milliseconds on a loaded machine) was discarded and the command ran on.
    executor = await sandbox()
    for _ in range(KILL_RACES):
        started = await executor.spawn(SpawnOptions(command="sleep 600", background=True))
        killed = await executor.kill(started.pid)
        assert (killed.status, killed.signal) == ("terminated", "SIGTERM")


async def test_tmp_is_private_and_writable(sandbox: MakeSandbox) -> None:
    executor = await sandbox()
    name = anyio.Path(f"/tmp/process-mcp-test-{sleep_argument()}")
    code, output = await run(executor, f"echo secret > {name} && cat {name}")
    assert (code, output) == (0, "secret\n")
    assert not await name.exists()  # the host's /tmp never saw it


async def test_allow_write_adds_a_writable_path_and_deny_write_wins_inside_it(
    sandbox: MakeSandbox, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    (shared / "locked").mkdir(parents=True)
    executor = await sandbox(allow_write=[str(shared)], deny_write=[str(shared / "locked")])
    assert await run(executor, f"echo ok > {shared}/file && cat {shared}/file") == (0, "ok\n")
    code, output = await run(executor, f"echo no > {shared}/locked/file")
    assert code != 0
    assert "Read-only file system" in output
    assert not (shared / "locked" / "file").exists()


async def test_deny_write_also_protects_a_path_inside_the_working_directory(
    sandbox: MakeSandbox, tmp_path: Path
) -> None:
    git = tmp_path / "work" / ".git"
    git.mkdir()
    (git / "config").write_text("original\n")
    executor = await sandbox(deny_write=[".git"])  # relative: to each process's working directory
    code, _ = await run(executor, "echo changed > .git/config")
    assert code != 0
    assert (git / "config").read_text() == "original\n"
    assert await run(executor, "echo fine > notes && cat notes") == (0, "fine\n")


async def test_a_denied_file_deep_in_a_read_only_directory_leaves_its_parents_read_only(
    sandbox: MakeSandbox, tmp_path: Path
) -> None:
    """The directories between a writable root and a hidden path are bound onto themselves so they cannot
    be renamed; inside a read-only path they must stay read-only (a protected name, a deny_write path)."""
    work = tmp_path / "work"
    (work / "config" / "prod").mkdir(parents=True)
    (work / "config" / "prod" / "app.yaml").write_text("original\n")
    (work / "config" / "prod" / "secrets.env").write_text("TOKEN\n")
    (work / ".devcontainer" / "docker").mkdir(parents=True)
    (work / ".devcontainer" / "docker" / ".env").write_text("TOKEN\n")
    executor = await sandbox(deny_write=[str(work / "config")], deny_read=["secrets.env", ".env"])
    _, output = await run(
        executor,
        "echo pwned >> config/prod/app.yaml; echo pwned > .devcontainer/docker/Dockerfile; "
        "cat config/prod/secrets.env .devcontainer/docker/.env",
    )
    assert output.count("Read-only file system") == 2, output
    assert "TOKEN" not in output
    assert (work / "config" / "prod" / "app.yaml").read_text() == "original\n"
    assert not (work / ".devcontainer" / "docker" / "Dockerfile").exists()


async def test_deny_read_hides_files_and_directories(sandbox: MakeSandbox, tmp_path: Path) -> None:
    secrets_dir = tmp_path / "work" / "keys"
    secrets_dir.mkdir()
    (secrets_dir / "id_ed25519").write_text("PRIVATE KEY\n")
    token = tmp_path / "work" / "token.txt"
    token.write_text("TOKEN\n")
    executor = await sandbox(deny_read=[str(secrets_dir), str(token)])
    code, output = await run(executor, f"ls -A {secrets_dir}; cat {token}; cat {secrets_dir}/id_ed25519")
    assert "PRIVATE KEY" not in output
    assert "TOKEN" not in output
    assert code != 0  # the key file is not there to read
    code, output = await run(executor, f"echo x > {token}")
    assert code != 0
    assert token.read_text() == "TOKEN\n"


async def test_nothing_is_left_in_the_working_directory(sandbox: MakeSandbox, tmp_path: Path) -> None:
    work = tmp_path / "work"
    executor = await sandbox(
        deny_read=[".env", ".ssh"], deny_write=[".git", ".vscode", ".bashrc"], allow_write=["not-there"]
    )
    assert await run(executor, "ls -A") == (0, "")
    assert await run(executor, "echo hi", tty=True) == (0, "hi")
    assert sorted(os.listdir(work)) == []


async def test_processes_get_their_own_pid_namespace_proc_and_dev(sandbox: MakeSandbox) -> None:
    executor = await sandbox()
    code, output = await run(executor, "echo $$; ls /proc | grep -c '^[0-9]'; ls /dev | wc -l")
    pid, visible, devices = (int(word) for word in output.split())
    assert code == 0
    assert pid < 10  # numbered inside its own namespace
    assert visible < 10  # sees only its own few processes, not the host's
    assert devices < 30  # a minimal /dev, not the host's


async def test_bwrap_and_seccomp_each_refuse_a_nested_user_namespace_alone(
    sandbox: MakeSandbox, tmp_path: Path
) -> None:
    # Two layers refuse a user namespace inside the sandbox: bwrap's --disable-userns (a nesting limit:
    # ENOSPC) and the seccomp filter's CLONE_NEWUSER rule (EPERM). With both on, the filter answers
    # first and hides whether the other holds, so each runs without the other; without either, the
    # same probe makes a namespace, which shows it can tell.
    sandbox_ = (await sandbox()).backend._sandbox
    assert sandbox_ is not None
    probe = "unshare --user true && echo made-a-user-namespace"
    layers = {  # whether the filter is on and --disable-userns stays, and how the probe is then refused
        "bwrap alone": (False, True, "No space left on device"),
        "seccomp alone": (True, False, "Operation not permitted"),
        "neither": (False, False, ""),
    }
    home = tmp_path / "home"
    home.mkdir()
    for layer, (filtered, nested_limit, refusal) in layers.items():
        done = await run_boxed(
            sandbox_,
            probe,
            str(tmp_path / "work"),
            str(home),
            edit=None if nested_limit else (lambda argv: without(argv, "--disable-userns")),
            program=None if filtered else b"",
        )
        assert ("made-a-user-namespace" in done.stdout) is (layer == "neither"), (layer, done)
        assert refusal in done.stderr, (layer, done.stderr)


async def test_an_empty_domain_list_means_no_network(sandbox: MakeSandbox) -> None:
    async with local_http_server() as port:
        executor = await sandbox(allowed_domains=[])
        _, output = await run(executor, f"{PYTHON} -c {NET_PROBE} direct {port}")
        assert output.startswith("no connection")
        assert "HTTP_PROXY" not in (await run(executor, "env"))[1]


async def test_star_leaves_the_network_open(sandbox: MakeSandbox) -> None:
    async with local_http_server() as port:
        executor = await sandbox(allowed_domains=["*"])
        assert await run(executor, f"{PYTHON} -c {NET_PROBE} direct {port}") == (0, "connected\n")


async def test_a_domain_list_allows_those_domains_through_the_proxy_and_nothing_else(sandbox: MakeSandbox) -> None:
    async with local_http_server() as port:
        executor = await sandbox(allowed_domains=["localhost", "*.allowed.test"], allow_private_addresses=True)
        _, direct = await run(executor, f"{PYTHON} -c {NET_PROBE} direct {port}")
        assert direct.startswith("no connection")
        _, allowed = await run(executor, f"{PYTHON} -c {NET_PROBE} get http://localhost:{port}/hi", env=NO_NO_PROXY)
        assert allowed == "200 hello from the host: GET /hi\n"
        _, refused = await run(executor, f"{PYTHON} -c {NET_PROBE} get http://refused.test/")
        assert refused.startswith("403 ")
        assert "'refused.test'" in refused
        assert "SANDBOX_ALLOWED_DOMAINS" in refused
        _, tunnel = await run(executor, f"{PYTHON} -c {NET_PROBE} get https://refused.test/")
        assert "403" in tunnel
        _, env = await run(executor, "env")
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            assert f"{name}=" in env


async def test_ctrl_c_interrupts_a_sandboxed_tty_program_and_it_keeps_running(sandbox: MakeSandbox) -> None:
    executor = await sandbox(allowed_domains=["localhost"])  # also through the network bridge
    started = await executor.spawn(SpawnOptions(command=f"{PYTHON} -q", tty=True, background=True))
    await wait_for_output(executor, started.pid, ">>>")
    await executor.stdin(started.pid, "import time; time.sleep(60)\r")
    await wait_for_output(executor, started.pid, r"sleep\(60\)")
    await executor.stdin(started.pid, "\x03")
    await wait_for_output(executor, started.pid, "KeyboardInterrupt")
    await executor.stdin(started.pid, "print(6 * 7)\r")
    await wait_for_output(executor, started.pid, "42")
    assert (await executor.get_process(started.pid)).status == "running"


async def test_a_required_sandbox_that_cannot_run_fails_spawn_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("process_mcp.host.executor.find_bwrap", lambda: str(tmp_path / "no-such-bwrap"))
    executor = HostExecutor(host_config(tmp_path, sandbox=SandboxConfig(required=True)))
    try:
        await executor.start()
        with pytest.raises(BackendUnavailable, match="SANDBOX_REQUIRED=true"):
            await executor.spawn(SpawnOptions(command="echo never"))
    finally:
        await executor.cleanup()


async def test_an_unavailable_sandbox_warns_and_runs_unsandboxed_unless_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("process_mcp.host.executor.find_bwrap", lambda: str(tmp_path / "no-such-bwrap"))
    executor = HostExecutor(host_config(tmp_path))
    try:
        await executor.start()
        assert "WITHOUT the sandbox" in caplog.text
        result = await executor.spawn(SpawnOptions(command="echo unconfined"))
        assert (result.stdout, result.sandboxed) == ("unconfined\n", False)
        assert not (await executor.get_process(result.pid)).sandboxed
    finally:
        await executor.cleanup()


async def test_a_disabled_sandbox_reports_processes_as_not_sandboxed(tmp_path: Path) -> None:
    executor = HostExecutor(host_config(tmp_path, sandbox=SandboxConfig(enabled=False)))
    try:
        outside = tmp_path.parent / f"process-mcp-test-{sleep_argument()}"
        result = await executor.spawn(SpawnOptions(command=f"touch {outside} && echo wrote"))
        assert (result.stdout, result.sandboxed) == ("wrote\n", False)
        outside.unlink()
    finally:
        await executor.cleanup()


class local_http_server:  # noqa: N801 - used as `async with local_http_server() as port`
    """An HTTP server on the host's loopback that answers every request with its method and path."""

    async def __aenter__(self) -> int:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                request = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # a bare connection test, no request
                writer.close()
                return
            method, path = request.split(b" ")[:2]
            body = b"hello from the host: " + method + b" " + path
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()

        self._server = await asyncio.start_server(answer, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()


async def test_a_working_directory_of_slash_is_the_sandboxs_own_read_only_root(sandbox: MakeSandbox) -> None:
    executor = await sandbox(allow_read=[])
    code, output = await run(executor, "echo $$; ls /dev | wc -l; ls /", cwd="/")
    pid, devices, *top = output.split()
    assert (code, int(pid) < 10, int(devices) < 30) == (0, True, True)
    assert "root" not in top or sys.base_prefix.startswith("/root/")  # only on the way to the agent's Python
    code, output = await run(executor, "ls -A /home", cwd="/")
    assert output.split() == ["agent"]  # the box's own HOME: nothing of the host's homes
    code, output = await run(executor, "echo x > /planted", cwd="/")
    assert code != 0
    assert "Read-only file system" in output


async def test_a_proxy_that_cannot_listen_never_leaves_processes_with_open_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 100)  # a Unix socket path this long cannot be bound
    deep.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(deep))
    config = SandboxConfig(required=True, allowed_domains=["example.com"])
    executor = HostExecutor(host_config(tmp_path, sandbox=config))
    try:
        await executor.start()
        with pytest.raises(BackendUnavailable, match="network proxy cannot listen"):
            await executor.spawn(SpawnOptions(command="echo never"))
        assert list(deep.iterdir()) == []  # its state directory was removed
    finally:
        await executor.cleanup()


async def test_a_writable_root_too_large_to_search_fails_the_spawn_clearly(
    sandbox: MakeSandbox, tmp_path: Path
) -> None:
    for index in range(10):
        (tmp_path / "work" / f"dir{index}").mkdir()
    (tmp_path / "work" / "node_modules" / "many" / "more").mkdir(parents=True)  # not searched
    executor = await sandbox(scan_limit=11)
    assert await run(executor, "echo fits") == (0, "fits\n")
    (tmp_path / "work" / "dir10").mkdir()
    with pytest.raises(SpawnFailed, match="SANDBOX_SCAN_LIMIT"):
        await executor.spawn(SpawnOptions(command="echo never"))


async def test_an_allowed_read_path_in_tmp_is_shown_over_the_private_tmp(sandbox: MakeSandbox, tmp_path: Path) -> None:
    shown = tmp_path / "shown"  # tmp_path is in /tmp, which each sandbox gets a private tmpfs of
    shown.mkdir()
    (shown / "data").write_text("visible\n")
    executor = await sandbox(allow_read=[INTERPRETER, str(shown)])
    _, output = await run(executor, f"cat {shown}/data; echo x > {shown}/planted")
    assert "visible" in output
    assert "Read-only file system" in output
    assert not (shown / "planted").exists()


async def test_a_spawns_limits_never_change_what_the_next_spawn_gets(sandbox: MakeSandbox) -> None:
    # Sandboxes' cgroups are pooled: a group raised from a small memory limit to a larger one must take
    # it (the kernel refuses a memory limit above the swap limit), and one that failed is never reused.
    executor = await sandbox()
    probe = "grep 'Max data size' /proc/self/limits"
    for memory_mb in (100, 300, None, 50, 2000, None, 100):
        limits = ProcessLimits(memory_mb=memory_mb) if memory_mb else None
        code, output = await run(executor, probe, limits=limits)
        assert code == 0, output
        expected = (memory_mb or 4096) * 1024 * 1024
        assert output.split()[3] == str(expected), (memory_mb, output)


@pytest.fixture
def root_only_file() -> Iterator[Path]:
    """A file in /usr that only root may read, as packages leave some (polkit rules, private keys)."""
    if os.getuid() != 0:
        cannot_run_here("only a root server can read root-only files in /usr, which is what is hidden")
    secret = Path("/usr/local/share", f"process-mcp-test-{sleep_argument()}")
    secret.write_text("root-only\n")
    secret.chmod(0o600)
    try:
        yield secret
    finally:
        secret.unlink(missing_ok=True)


async def test_files_in_usr_that_only_root_may_read_are_hidden_from_a_root_servers_sandbox(
    sandbox: MakeSandbox, root_only_file: Path
) -> None:
    sandbox_module._searches.clear()  # the search is once per process: make it see this file
    executor = await sandbox()
    _, output = await run(executor, f"cat {root_only_file}; cat /usr/bin/env >/dev/null && echo shown")
    assert "root-only" not in output
    assert "shown" in output  # the rest of /usr is there
    # A hidden file removed since the server looked (a package uninstalled) leaves nothing to hide.
    await anyio.Path(root_only_file).unlink()
    assert (await run(executor, "echo still-spawning"))[1] == "still-spawning\n"


async def test_an_allowed_read_path_inside_the_workspace_stays_read_only(sandbox: MakeSandbox, tmp_path: Path) -> None:
    vendor = tmp_path / "work" / "vendor"
    vendor.mkdir()
    (vendor / "lib.txt").write_text("original\n")
    executor = await sandbox(allow_read=[INTERPRETER, str(vendor)])
    _, output = await run(executor, "echo changed > vendor/lib.txt; echo fine > mine.txt")
    assert "Read-only file system" in output
    assert (vendor / "lib.txt").read_text() == "original\n"
    assert (tmp_path / "work" / "mine.txt").read_text() == "fine\n"


def test_the_machines_own_task_and_memory_limits_bound_the_sandboxes_together() -> None:
    bounds = ServerBounds.read()
    assert any(bound.machine and "pid_max" in bound.where for bound in bounds.processes)
    assert any(bound.machine for bound in bounds.memory)
    total = bounds.processes_total()
    assert total is not None
    assert total < int(Path("/proc/sys/kernel/pid_max").read_text())
