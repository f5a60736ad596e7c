"""Services an agent starts: named processes, groups, a kill that escalates, and stats history."""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

import anyio
import pytest
from pydantic import ValidationError

from process_mcp import InvalidInput, ProcessExecutor, ProcessNotFound, SpawnOptions
from process_mcp.config import Limits, PolicyConfig
from process_mcp.core.models import HealthCheck, ProcessInfo, ProcessLimits, ReadyCheck, RestartPolicy
from process_mcp.errors import PolicyDenied, TooManyProcesses

from ..helpers import (
    BACKENDS,
    POLL_S,
    WAIT_S,
    backend_config,
    backends,
    configured_executor,
    executor_for,
    sleep_argument,
    wait_for_exit,
)

pytestmark = pytest.mark.anyio


async def test_a_name_returns_the_process_that_runs_instead_of_starting_another(executor: ProcessExecutor) -> None:
    argument = sleep_argument()
    first = await executor.spawn(SpawnOptions(command=f"echo up; sleep {argument}", name="web", wait_for="up"))
    assert (first.name, first.existing, first.status) == ("web", None, "running")
    again = await executor.spawn(SpawnOptions(command="echo another", name="web"))
    assert (again.pid, again.existing, again.status) == (first.pid, True, "running")
    assert [p.pid for p in await executor.list_processes() if p.name == "web"] == [first.pid]
    # Every tool takes the name for the id.
    assert (await executor.get_output("web")).stdout == "up\n"
    assert (await executor.get_process("web")).name == "web"
    await executor.kill("web", "SIGKILL")
    await wait_for_exit(executor, first.pid)
    # Once it has ended, the name starts a new one; the name means the newest.
    second = await executor.spawn(SpawnOptions(command="echo second", name="web"))
    assert second.pid != first.pid
    assert second.existing is None
    assert (await executor.get_output("web")).pid == second.pid


async def test_spawns_of_one_name_at_once_start_one_process(executor: ProcessExecutor) -> None:
    argument = sleep_argument()
    results = []

    async def start() -> None:
        results.append(await executor.spawn(SpawnOptions(command=f"sleep {argument}", name="once", background=True)))

    async with anyio.create_task_group() as tasks:
        for _ in range(5):
            tasks.start_soon(start)
    assert len({result.pid for result in results}) == 1
    assert sorted(bool(result.existing) for result in results) == [False, True, True, True, True]
    await executor.kill("once", "SIGKILL")


async def test_a_name_is_checked(executor: ProcessExecutor) -> None:
    prefix = (await executor.spawn(SpawnOptions(command="true"))).pid.rsplit("-", 1)[0]
    with pytest.raises(InvalidInput, match="form of a process id"):
        await executor.spawn(SpawnOptions(command="true", name=f"{prefix}-99"))
    for bad in ("a b", "-x", "x" * 65, "../etc", ""):
        with pytest.raises(ValidationError):
            SpawnOptions(command="true", name=bad)
    with pytest.raises(ProcessNotFound, match="or are the name a spawn gave"):
        await executor.get_output("nothing-of-that-name")


async def test_a_group_is_listed_and_killed_together_and_nothing_else(executor: ProcessExecutor) -> None:
    argument = sleep_argument()
    members = [
        await executor.spawn(SpawnOptions(command=f"sleep {argument}", group="pipeline", background=True))
        for _ in range(3)
    ]
    other = await executor.spawn(SpawnOptions(command=f"sleep {argument}", group="other", background=True))
    listed = await executor.list_processes(group="pipeline")
    assert [p.pid for p in listed] == [m.pid for m in members]
    assert {p.group for p in listed} == {"pipeline"}
    killed = await executor.kill_group("pipeline", "SIGTERM")
    assert (killed.group, killed.sent, killed.status) == ("pipeline", "SIGTERM", "terminated")
    assert killed.members is not None
    assert sorted(m.pid or "" for m in killed.members) == sorted(m.pid for m in members)
    assert {m.signal for m in killed.members} == {"SIGTERM"}
    assert (await executor.get_process(other.pid)).status == "running"
    with pytest.raises(ProcessNotFound, match="no process of group 'pipeline' runs any more"):
        await executor.kill_group("pipeline")
    await executor.kill(other.pid, "SIGKILL")


async def test_a_kill_with_grace_forces_a_tree_that_ignores_the_signal_and_not_one_that_obeys(
    executor: ProcessExecutor, backend: str
) -> None:
    argument = sleep_argument()
    # The background sleep inherits the ignored TERM: the whole tree outlives the grace.
    stubborn = await executor.spawn(
        SpawnOptions(command=f"trap '' TERM; sleep {argument} & echo ready; wait", wait_for="ready")
    )
    forced = await executor.kill(stubborn.pid, "SIGTERM", grace_ms=300)
    assert (forced.forced, forced.status) == (True, "terminated")
    if BACKENDS[backend].exact_exits:
        assert forced.signal == "SIGKILL"
    obeying = await executor.spawn(SpawnOptions(command=f"sleep {argument}", background=True))
    ended = await executor.kill(obeying.pid, "SIGTERM", grace_ms=5000)
    assert (ended.forced, ended.status) == (False, "terminated")
    with pytest.raises(InvalidInput, match="SIGSTOP does not end one"):
        await executor.kill(obeying.pid, "SIGSTOP", grace_ms=100)
    plain = await executor.spawn(SpawnOptions(command=f"sleep {argument}", background=True))
    assert (await executor.kill(plain.pid, "SIGKILL")).forced is None


@pytest.mark.parametrize("backend", backends("limits"))
async def test_a_named_process_keeps_a_history_of_its_stats(executor: ProcessExecutor) -> None:
    service = await executor.spawn(SpawnOptions(command=f"sleep {sleep_argument()}", name="svc", background=True))
    await anyio.sleep(2.5)
    output = await executor.get_output("svc", history=True)
    assert output.history is not None
    assert len(output.history) >= 2, output.history
    assert [sample.at for sample in output.history] == sorted(sample.at for sample in output.history)
    assert all(sample.processes >= 1 for sample in output.history)
    assert (await executor.get_output("svc")).history is None
    await executor.kill(service.pid, "SIGKILL")


async def until(executor: ProcessExecutor, pid: str, seen: Callable[[ProcessInfo], bool], what: str) -> ProcessInfo:
    """Poll ps for ``pid`` until ``seen`` holds; fail after WAIT_S."""
    info = None
    with anyio.move_on_after(WAIT_S):
        while True:
            info = await executor.get_process(pid)
            if seen(info):
                return info
            await anyio.sleep(POLL_S)
    pytest.fail(f"{pid} was not {what} within {WAIT_S} s: {info}")


def free_port() -> int:
    """A port free on this machine's loopback now (a box on the host's network shares it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_server_is_ready_once_its_port_and_path_answer(executor: ProcessExecutor, backend: str) -> None:
    port = free_port()
    server = f"exec python3 -m http.server {port} --bind 127.0.0.1"
    ready = SpawnOptions(command=server, name="web", ready=ReadyCheck(port=port, http="/"), timeout_ms=30000)
    if not BACKENDS[backend].output_files:  # no agent in the box: nothing there can check a port
        with pytest.raises(InvalidInput, match=re.escape("use ready {pattern}")):
            await executor.spawn(ready)
        assert await executor.list_processes() == []  # refused before anything started
        return
    result = await executor.spawn(ready)
    assert (result.ready, result.status, result.ready_detail) == (True, "running", f"port {port}: HTTP 200")
    again = await executor.spawn(SpawnOptions(command=server, name="web", ready=ReadyCheck(port=port)))
    assert (again.pid, again.existing) == (result.pid, True)
    await executor.kill("web", "SIGKILL")
    # A path without a port: asked of whatever port it comes to listen on.
    other = free_port()
    late = f"sleep 0.3; exec python3 -m http.server {other} --bind 127.0.0.1"
    found = await executor.spawn(SpawnOptions(command=late, ready=ReadyCheck(http="/"), timeout_ms=30000))
    assert (found.ready, found.ready_detail) == (True, f"port {other}: HTTP 200")
    await executor.kill(found.pid, "SIGKILL")


async def test_ready_says_why_not_when_the_process_exits_or_the_pattern_never_comes(
    executor: ProcessExecutor, backend: str
) -> None:
    exits = ReadyCheck(port=free_port()) if BACKENDS[backend].output_files else ReadyCheck(pattern="never")
    exited = await executor.spawn(SpawnOptions(command="exit 3", ready=exits))
    assert (exited.ready, exited.wait_result, exited.exit_code) == (False, "exited", 3)
    shown = await executor.spawn(
        SpawnOptions(
            command="echo starting; sleep 0.3; echo listening; exec sleep 600", ready=ReadyCheck(pattern="listen")
        )
    )
    assert (shown.ready, shown.status, shown.wait_result) == (True, "running", None)
    late = await executor.spawn(
        SpawnOptions(command="exec sleep 600", ready=ReadyCheck(pattern="never"), timeout_ms=300)
    )
    assert (late.ready, late.wait_result) == (False, "timeout")
    for pid in (shown.pid, late.pid):
        await executor.kill(pid, "SIGKILL")
    with pytest.raises(ValidationError, match=r"a port.* or a pattern"):
        ReadyCheck(port=80, pattern="x")
    with pytest.raises(ValidationError, match="one of them"):
        ReadyCheck(http="/", pattern="x")


async def test_a_failing_service_is_restarted_with_backoff_in_its_record_then_left_with_its_count(
    executor: ProcessExecutor,
) -> None:
    policy = RestartPolicy(policy="on-failure", max_restarts=2, backoff_ms=50)
    first = await executor.spawn(SpawnOptions(command="echo run; exit 1", name="flaky", restart=policy))
    assert (first.restarts, first.exit_code) == (0, 1)
    await until(executor, "flaky", lambda p: (p.restarts, p.status) == (2, "terminated"), "restarted twice")
    await anyio.sleep(0.5)  # (a third restart would come within 200 ms)
    done = await executor.get_output("flaky")
    assert (done.pid, done.restarts, done.status, done.exit_code) == (first.pid, 2, "terminated", 1)
    assert done.stdout.count("run") == 3
    assert "[process-mcp: restart 1 of at most 2, 50 ms after exit code 1]" in done.stdout
    assert "[process-mcp: restart 2 of at most 2, 100 ms after exit code 1]" in done.stdout
    # A clean exit ends it under on-failure; always starts it again.
    clean = await executor.spawn(SpawnOptions(command="true", restart=policy))
    await anyio.sleep(0.3)
    assert (await executor.get_process(clean.pid)).restarts == 0


async def test_a_kill_stops_a_service_and_its_restarting(executor: ProcessExecutor) -> None:
    always = RestartPolicy(policy="always", max_restarts=50, backoff_ms=2000)
    service = await executor.spawn(
        SpawnOptions(command=f"sleep {sleep_argument()}", name="keeper", restart=always, background=True)
    )
    killed = await executor.kill("keeper", "SIGTERM")
    assert (killed.status, killed.ended_by) == ("terminated", "kill")
    await anyio.sleep(0.3)
    assert (await executor.get_process(service.pid)).restarts == 0
    # One that ended on its own and waits out its backoff: the kill cancels the restart.
    quick = await executor.spawn(SpawnOptions(command="exit 0", restart=always))
    cancelled = await executor.kill(quick.pid)
    assert (cancelled.status, cancelled.exit_code) == ("terminated", 0)
    await anyio.sleep(2.5)
    assert (await executor.get_process(quick.pid)).restarts == 0


async def test_health_checks_mark_a_service_and_an_unhealthy_one_is_restarted(
    executor: ProcessExecutor, backend: str
) -> None:
    marker = f"/tmp/healthy-{sleep_argument()}"
    check = HealthCheck(command=f"test -e {marker}", interval_ms=200, failures=2)
    policy = RestartPolicy(policy="on-failure", max_restarts=1, backoff_ms=50)
    service = await executor.spawn(
        SpawnOptions(command=f"touch {marker}; exec sleep 600", health=check, restart=policy, background=True)
    )
    assert service.health == "starting"
    await until(executor, service.pid, lambda p: p.health == "healthy", "healthy")
    await executor.spawn(SpawnOptions(command=f"rm {marker}"))
    # Two failed checks: unhealthy, ended, and started again.
    await until(executor, service.pid, lambda p: p.restarts == 1, "started again")
    output = await executor.get_output(service.pid)
    assert "after signal SIGTERM, ended by unhealthy]" in output.stdout or "ended by unhealthy]" in output.stdout
    assert [p.pid for p in await executor.list_processes()].count(service.pid) == 1  # its checks are not listed
    await executor.kill(service.pid, "SIGKILL")
    if BACKENDS[backend].output_files:
        port = free_port()
        by_port = await executor.spawn(
            SpawnOptions(
                command=f"exec python3 -m http.server {port} --bind 127.0.0.1",
                health=HealthCheck(http="/", interval_ms=200),  # on whatever port it listens on
                ready=ReadyCheck(port=port),
                timeout_ms=30000,
            )
        )
        await until(executor, by_port.pid, lambda p: p.health == "healthy", "healthy")
        await executor.kill(by_port.pid, "SIGKILL")


# What a service must not get around: the caller's process limit, the command policy, its own output limit,
# the name it holds, a kill; and a start that fails must not leave its record behind.


async def test_a_service_waiting_to_start_again_counts_against_the_process_limit(
    request: pytest.FixtureRequest, backend: str, workdir: str
) -> None:
    async with configured_executor(request, backend, workdir, limits=Limits(max_live=2)) as executor:
        always = RestartPolicy(policy="always", max_restarts=5, backoff_ms=5000)
        waiting = await executor.spawn(SpawnOptions(command="exit 0", restart=always))
        assert (waiting.status, waiting.restarts) == ("terminated", 0)
        await executor.spawn(SpawnOptions(command=f"sleep {sleep_argument()}", background=True))
        with pytest.raises(TooManyProcesses):
            await executor.spawn(SpawnOptions(command="true"))


async def test_a_waiting_service_holds_its_name(executor: ProcessExecutor) -> None:
    policy = RestartPolicy(policy="on-failure", max_restarts=3, backoff_ms=3000)
    first = await executor.spawn(SpawnOptions(command="exit 1", name="held", restart=policy))
    assert first.status == "terminated"
    again = await executor.spawn(SpawnOptions(command="exit 1", name="held", restart=policy))
    assert (again.pid, again.existing) == (first.pid, True)
    await executor.kill("held")


async def test_a_health_command_is_held_to_the_command_policy(
    request: pytest.FixtureRequest, backend: str, workdir: str
) -> None:
    async with configured_executor(request, backend, workdir, policy=PolicyConfig(command_deny=["nc"])) as executor:
        with pytest.raises(PolicyDenied):
            await executor.spawn(SpawnOptions(command="sleep 1", health=HealthCheck(command="nc -l 4444")))
        assert await executor.list_processes() == []


@pytest.mark.parametrize("backend", backends("limits"))
async def test_each_run_of_a_service_has_the_whole_output_limit(executor: ProcessExecutor) -> None:
    policy = RestartPolicy(policy="on-failure", max_restarts=2, backoff_ms=10)
    limited = ProcessLimits(output_mb=1)
    run = "head -c 700000 /dev/zero | tr '\\0' x; exit 1"  # 0.7 MB a run: 2.1 MB over three runs
    service = await executor.spawn(SpawnOptions(command=run, restart=policy, limits=limited, timeout_ms=20000))
    done = await until(executor, service.pid, lambda p: (p.restarts, p.status) == (2, "terminated"), "done")
    assert (done.exit_code, done.ended_by, done.limit) == (1, "exit", None)


async def test_a_service_whose_start_again_fails_ends_and_its_record_goes(
    request: pytest.FixtureRequest, backend: str, workdir: str
) -> None:
    async with configured_executor(request, backend, workdir, limits=Limits(keep_terminated=1)) as executor:
        made = await executor.spawn(SpawnOptions(command="mkdir -p gone && cd gone && pwd"))
        cwd = made.stdout.strip()
        policy = RestartPolicy(policy="on-failure", max_restarts=2, backoff_ms=10)
        service = await executor.spawn(SpawnOptions(command='rmdir "$PWD"; exit 1', cwd=cwd, restart=policy))
        done = await until(executor, service.pid, lambda p: (p.restarts, p.status) == (2, "terminated"), "done")
        assert done.ended_by == "lost"
        assert "it could not be started again" in (await executor.get_output(service.pid)).stdout
        for _ in range(2):  # one finished record is kept: the service's goes
            await executor.spawn(SpawnOptions(command="true"))
        with pytest.raises(ProcessNotFound):
            await executor.get_process(service.pid)


async def test_a_reload_signal_does_not_stop_restarts_but_a_terminating_kill_does(executor: ProcessExecutor) -> None:
    policy = RestartPolicy(policy="on-failure", max_restarts=3, backoff_ms=10)
    service = await executor.spawn(
        SpawnOptions(command="trap 'exit 1' HUP; echo up; while :; do sleep 0.05; done", restart=policy, wait_for="up")
    )
    await executor.kill(service.pid, "SIGHUP")  # it exits 1 on a HUP: a failure, started again
    await until(executor, service.pid, lambda p: (p.restarts, p.status) == (1, "running"), "started again")
    stopped = await executor.kill(service.pid, "SIGTERM")
    assert (stopped.status, stopped.ended_by) == ("terminated", "kill")
    await anyio.sleep(0.3)
    assert (await executor.get_process(service.pid)).restarts == 1


async def fetch(url: str) -> bytes:
    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=WAIT_S) as answer:
            return bytes(answer.read())

    return await anyio.to_thread.run_sync(get)


async def serve_and_reach(executor: ProcessExecutor) -> None:
    """A server in the box is listed with its port, and reached from here at the URL ps gives, until it ends."""
    port = free_port()
    server = await executor.spawn(
        SpawnOptions(
            command=f"mkdir -p site && echo served-from-the-box > site/index.html && "
            f"exec python3 -m http.server {port} --bind 127.0.0.1 --directory site",
            ready=ReadyCheck(port=port),
            timeout_ms=30000,
        )
    )
    assert server.ready, server.ready_detail
    quiet = await executor.spawn(SpawnOptions(command=f"sleep {sleep_argument()}", background=True))
    rows = {row.pid: row for row in await executor.list_processes()}
    assert rows[quiet.pid].ports is None
    listed = rows[server.pid].ports
    assert listed is not None
    assert [p.port for p in listed] == [port]
    url = listed[0].url
    assert url is not None
    assert await fetch(url) == b"served-from-the-box\n"
    assert (await executor.get_process(server.pid)).ports == listed  # the same forward, not another
    await executor.kill(server.pid, "SIGKILL")
    await executor.kill(quiet.pid, "SIGKILL")
    await wait_for_exit(executor, server.pid)
    with pytest.raises(urllib.error.URLError):  # the forward (or the port itself) is gone with the process
        await fetch(url)


@pytest.mark.parametrize("backend", backends("output_files"))
async def test_a_port_a_process_listens_on_is_listed_and_reached_from_here(executor: ProcessExecutor) -> None:
    await serve_and_reach(executor)


async def test_a_port_in_a_box_without_a_network_is_reached_through_the_agent(
    request: pytest.FixtureRequest, workdir: str
) -> None:
    """A box with a network namespace of its own (no network, or a domain list): nothing here reaches its
    loopback but the forward the agent carries."""
    config = backend_config(request, "host", workdir)
    sandbox = config.sandbox.model_copy(update={"allowed_domains": []})
    executor = executor_for(config.model_copy(update={"sandbox": sandbox}))
    await executor.start()
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    try:
        await serve_and_reach(executor)
        # A forward reaches the box's loopback only: the same port number here, a server of this machine's
        # own loopback, is not what it reaches (the agent connects inside the box's network).
        alive = await executor.spawn(SpawnOptions(command=f"sleep {sleep_argument()}", background=True))
        handle = executor._registry.get(alive.pid).handle
        assert handle is not None
        url = await handle.port_url(host.server_address[1])
        assert url is not None
        assert not url.endswith(f":{host.server_address[1]}/")
        with pytest.raises((urllib.error.URLError, http.client.RemoteDisconnected, ConnectionError)):
            await fetch(url)
        await executor.kill(alive.pid, "SIGKILL")
    finally:
        host.shutdown()
        host.server_close()
        await executor.cleanup()
