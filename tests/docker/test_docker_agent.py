"""Docker mode through the agent in the container: what the kernel reports, a kill nothing escapes, and an
agent that nothing in its box can forge, silence or outlive.

Runs against the session's shared container (made as the server makes its own, run as its unprivileged
user: the agent runs as its processes' user) and, for the agent as root, against this module's container
made as the server makes its own (root, dropping to DOCKER_USER for each command). Every process found
here is looked for with ``docker top`` by a sleep duration unique to the test.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import pytest

from process_mcp import DockerExecutor, ProcessMcpConfig, SpawnFailed, SpawnOptions
from process_mcp.box import client, protocol
from process_mcp.box.client import AgentConnection
from process_mcp.config import Defaults, DockerConfig, SandboxConfig
from process_mcp.core.environment import defaults
from process_mcp.docker import stream
from process_mcp.docker.stream import ExecStream

from ..helpers import (
    DEBIAN_IMAGE,
    POLL_S,
    TEST_LABELS,
    WAIT_S,
    docker_config,
    sleep_argument,
    unique_name,
    wait_for_exit,
    wait_for_output,
)

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

pytestmark = pytest.mark.anyio

# Ways a process leaves its parent's environment, session or tree; each sleeps for $1.
ESCAPES = {
    "env -i": 'env -i sleep "$1" &',
    "setsid": 'setsid sleep "$1" &',
    "double fork": '(sleep "$1" &) &',
    "nohup, new group, no output": 'setsid nohup sleep "$1" >/dev/null 2>&1 </dev/null &',
}


@pytest.fixture
async def agent(shared_container: Container) -> AsyncIterator[DockerExecutor]:
    executor = DockerExecutor(docker_config(str(shared_container.name), use_existing=True))
    await executor.start()
    assert executor.via == "agent"
    try:
        yield executor
    finally:
        await executor.cleanup()


async def top(container: Container, argument: str) -> list[str]:
    """Pids of `sleep <argument>` processes in the container, as the engine's `docker top` lists them."""
    listing = await anyio.to_thread.run_sync(container.top)
    columns = listing["Titles"]
    pid, command = columns.index("PID"), columns.index("CMD")
    return [row[pid] for row in listing["Processes"] or [] if row[command] == f"sleep {argument}"]


async def wait_for_top(container: Container, argument: str, count: int) -> None:
    with anyio.move_on_after(WAIT_S):
        while len(await top(container, argument)) != count:
            await anyio.sleep(POLL_S)
        return
    pytest.fail(f"docker top never showed {count} `sleep {argument}` (last: {await top(container, argument)})")


async def test_an_exit_code_above_128_is_an_exit_code_not_a_signal(agent: DockerExecutor) -> None:
    result = await agent.spawn(SpawnOptions(command="exit 130"))
    assert (result.status, result.exit_code, result.signal, result.via) == ("terminated", 130, None, "agent")
    killed = await agent.spawn(SpawnOptions(command="kill -INT $$"))
    assert (killed.exit_code, killed.signal) == (130, "SIGINT")


async def test_a_process_that_traps_sigterm_and_exits_0_reports_0(agent: DockerExecutor) -> None:
    started = await agent.spawn(
        SpawnOptions(command="trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 0.05; done", background=True)
    )
    await wait_for_output(agent, started.pid, "ready")
    killed = await agent.kill(started.pid)
    assert (killed.status, killed.exit_code, killed.signal) == ("terminated", 0, None)


@pytest.mark.parametrize("escape", list(ESCAPES), ids=list(ESCAPES))
async def test_kill_ends_a_process_that_left_its_tree(
    agent: DockerExecutor, shared_container: Container, escape: str
) -> None:
    argument = sleep_argument()
    started = await agent.spawn(
        SpawnOptions(command=f"set -- {argument}; {ESCAPES[escape]} echo started; sleep 600", background=True)
    )
    await wait_for_output(agent, started.pid, "started")
    await wait_for_top(shared_container, argument, 1)
    killed = await agent.kill(started.pid, "KILL")
    assert (killed.status, killed.signal) == ("terminated", "SIGKILL")
    await wait_for_top(shared_container, argument, 0)


@pytest.mark.parametrize("escape", list(ESCAPES), ids=list(ESCAPES))
async def test_shutdown_ends_a_process_that_left_its_tree_after_its_parent_exited(
    shared_container: Container, escape: str
) -> None:
    """The parent is gone (its record terminated, nothing left to kill by id); its escapee is not."""
    executor = DockerExecutor(docker_config(str(shared_container.name), use_existing=True))
    await executor.start()
    argument = sleep_argument()
    try:
        parent = await executor.spawn(SpawnOptions(command=f"set -- {argument}; {ESCAPES[escape]} echo started"))
        assert (parent.status, parent.exit_code) == ("terminated", 0)
        await wait_for_top(shared_container, argument, 1)
    finally:
        await executor.cleanup()
    await wait_for_top(shared_container, argument, 0)


async def test_exit_is_reported_at_once_while_a_background_child_holds_the_output(agent: DockerExecutor) -> None:
    result = await agent.spawn(SpawnOptions(command="sleep 30 & echo parent done; exit 3", timeout_ms=1500))
    assert (result.status, result.exit_code, result.stdout) == ("terminated", 3, "parent done\n")
    assert result.wait_result is None


async def test_resize_changes_the_terminal_and_sends_sigwinch(agent: DockerExecutor) -> None:
    started = await agent.spawn(
        SpawnOptions(
            command="trap 'stty size' WINCH; stty size; echo ready; while :; do sleep 0.05; done",
            tty=True,
            background=True,
        )
    )
    await wait_for_output(agent, started.pid, "ready")
    handle = agent._registry.get(started.pid).handle
    from process_mcp.box.client import AgentProcess

    assert isinstance(handle, AgentProcess)
    await handle.resize(80, 24)
    await wait_for_output(agent, started.pid, "24 80")


async def test_the_agent_killed_from_outside_ends_its_processes_and_the_next_spawn_brings_it_back(
    agent: DockerExecutor, shared_container: Container
) -> None:
    argument = sleep_argument()
    flood = await agent.spawn(SpawnOptions(command="yes flood", background=True))
    sleeper = await agent.spawn(SpawnOptions(command=f"setsid sleep {argument} & sleep 600", background=True))
    await wait_for_top(shared_container, argument, 1)
    connection = agent.backend._agent
    assert connection is not None
    kill = ["kill", "-9", str(connection.hello["pid"])]
    result = await anyio.to_thread.run_sync(lambda: shared_container.exec_run(kill))
    assert result.exit_code == 0, result.output
    with anyio.fail_after(WAIT_S):
        while (await agent.get_process(flood.pid)).status == "running":
            await anyio.sleep(POLL_S)
    assert (await agent.get_process(sleeper.pid)).status == "terminated"
    await wait_for_top(shared_container, argument, 0)  # each supervisor ended its tree
    again = await agent.spawn(SpawnOptions(command="echo back"))
    assert (again.stdout, again.via, again.exit_code) == ("back\n", "agent", 0)
    assert agent.backend._agent is not None
    assert agent.backend._agent is not connection


async def test_input_and_ps_stay_prompt_while_another_process_floods(agent: DockerExecutor) -> None:
    flood = await agent.spawn(SpawnOptions(command="yes 0123456789abcdef", background=True))
    echo = await agent.spawn(SpawnOptions(command="while read x; do echo got:$x; done", background=True))
    for n in range(20):
        answered = await agent.stdin(echo.pid, f"line {n}\n", wait_for=f"got:line {n}", wait_ms=int(WAIT_S * 1000))
        assert answered.wait_result == "matched"
        assert {p.pid for p in await agent.list_processes()} >= {flood.pid, echo.pid}
    assert (await agent.get_process(flood.pid)).status == "running"


async def test_output_is_whole_when_a_process_exits_in_the_middle_of_a_flood(agent: DockerExecutor) -> None:
    """A process that ends while its output is still being moved to the server: every byte arrives, in
    order, and the stream to the agent stays intact for the next one."""
    connection = agent.backend._agent
    for n in range(12):
        size = 2_000_000 + n * 250_000
        result = await agent.spawn(SpawnOptions(command=f"head -c {size} /dev/zero | tr '\\0' x; echo; echo END-{n}"))
        record = agent._registry.get(result.pid)
        assert await record.wait(WAIT_S, output=True)
        assert (result.exit_code, record.stdout.total) == (0, size + len(f"\nEND-{n}\n"))
        assert record.stdout.tail(8).endswith(f"END-{n}\n".encode())
    assert agent.backend._agent is connection


# The agent nothing in its box can reach.


@pytest.fixture(scope="module")
def made_container(docker_client: DockerClient) -> Iterator[Container]:
    """A container made as the server makes its own (root, its hardening, a volume at /home/agent), which
    this module's executors use as if they had made it: their agent runs as root and drops to
    DOCKER_USER (1000:1000) for each command. Removed, with its volume, at the end of the module."""
    from process_mcp.docker.engine import container_options

    volume = docker_client.volumes.create(unique_name("root-agent-vol"), labels=TEST_LABELS)
    config = DockerConfig(image=DEBIAN_IMAGE, container_name=unique_name("root-agent"), volume_name=str(volume.name))
    container = None
    try:
        container = docker_client.containers.run(**container_options(config, TEST_LABELS), detach=True)
        yield container
    finally:
        if container is not None:
            container.remove(force=True)
        volume.remove(force=True)


def config_for(container: Container, *, made: bool, domains: list[str] | None = None) -> ProcessMcpConfig:
    """The server's configuration for ``container``: as one it made (``made``: the agent runs as root) or
    as DOCKER_USE_EXISTING's (the agent runs as the container's user, the processes' own); with
    ``domains``, the domain proxy that the agent's tunnels reach."""
    return ProcessMcpConfig(
        mode="docker",
        defaults=Defaults(workdir="/home/agent"),
        # As made_container was made (its image, the default bridge), or the server would make it anew.
        docker=DockerConfig(
            container_name=str(container.name), use_existing=not made, image=DEBIAN_IMAGE, network="bridge"
        )
        if made
        else DockerConfig(container_name=str(container.name), use_existing=True),
        sandbox=SandboxConfig(allowed_domains=domains) if domains is not None else SandboxConfig(),
    )


MODES = ["root agent", "agent of the processes' user"]
"""The two ways the agent runs: as root in a container the server made (its processes cannot signal it),
and as the processes' own user in an existing container (they can; see SECURITY.md)."""


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def box(mode: str, request: pytest.FixtureRequest) -> Container:
    """The container of ``mode``."""
    fixture = "made_container" if mode == "root agent" else "shared_container"
    container: Container = request.getfixturevalue(fixture)
    return container


@pytest.fixture
async def boxed(box: Container, mode: str) -> AsyncIterator[DockerExecutor]:
    """A started executor on the container of ``mode``, through the agent."""
    executor = DockerExecutor(config_for(box, made=mode == "root agent"))
    await executor.start()
    try:
        yield executor
    finally:
        await executor.cleanup()


def live_agent(executor: DockerExecutor) -> AgentConnection:
    connection = executor.backend._agent
    assert connection is not None
    assert connection.alive
    return connection


# Run in the box by a process attacking its agent. Finds its supervisor, the zygote and the agent (the
# ancestors that run the agent's bootstrap, `python3 -I -S -c BOOTSTRAP`, nearest first) and, per argv[1],
# tries on each: "write", forged frames (its own exit with code 0, and both its streams closed) into the
# stream to the server, and forged log lines and 64 MiB into the agent's stderr; "trace", PTRACE_ATTACH;
# "stop", SIGSTOP; "kill", SIGSTOP, then SIGKILL to all three. It prints one line per attempt
# ("<attempt> <whom>: ok" or ": refused <errno>"), then "attempted", then sleeps (ignoring a closed output).
ATTACK = f"""
import ctypes, errno, json, os, signal, struct, sys, time
def parent(pid):
    with open("/proc/%d/stat" % pid, "rb") as stat:
        return int(stat.read().rsplit(b")", 1)[1].split()[1])
chain, pid = [], os.getpid()
while pid > 1:
    pid = parent(pid)
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
            if cmdline.read().split(b"\\0")[1:4] == [b"-I", b"-S", b"-c"]:  # python3 -I -S -c BOOTSTRAP
                chain.append(pid)
    except OSError:
        pass
roles = dict(zip(chain, ["supervisor", "zygote", "agent"]))
def say(line):
    try:
        print(line, flush=True)
    except OSError:
        pass
say("chain: " + " ".join(roles[pid] for pid in chain))
n = int(os.environ["PROCESS_MCP_ID"].rpartition("-")[2])
header = struct.Struct("{protocol.HEADER.format}")
exited = json.dumps({{"code": 0}}).encode()
frames = header.pack({protocol.EXITED}, n, len(exited)) + exited
frames += header.pack({protocol.CLOSED}, n, 1) + b"1" + header.pack({protocol.CLOSED}, n, 1) + b"2"
forged = b"2025-01-01 00:00:00,000 INFO process_mcp.service.spaces: principal bob: FORGED\\n\\x1b[2J\\r"
libc = ctypes.CDLL(None, use_errno=True)
def attempt(what, pid):
    try:
        if what == "write":
            with open("/proc/%d/fd/1" % pid, "wb") as out:
                out.write(frames)
            with open("/proc/%d/fd/2" % pid, "wb") as err:
                err.write(forged * 1000 + b"x" * (64 << 20))
        elif what == "trace":
            if libc.ptrace(16, pid, None, None) != 0:
                raise OSError(ctypes.get_errno(), "ptrace")
            os.waitpid(pid, 0x40000000)  # __WALL: the tracee is not a child
            libc.ptrace(17, pid, None, None)
        else:
            os.kill(pid, signal.SIGSTOP)  # all three stopped first, so none can act on the end of another
        say(what + " " + roles[pid] + ": ok")
    except OSError as exc:
        say(what + " " + roles[pid] + ": refused " + errno.errorcode.get(exc.errno, str(exc.errno)))
for pid in chain:
    attempt(sys.argv[1], pid)
for pid in chain if sys.argv[1] == "kill" else ():
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
say("attempted")
time.sleep(600)
"""


def attack(what: str) -> str:
    """The command a process runs to attack its agent, supervisor and zygote with ``what``."""
    assert "'" not in ATTACK
    return f"python3 -c '{ATTACK}' {what}"


async def attacked(executor: DockerExecutor, what: str) -> str:
    """Start a process that attacks its agent with ``what``; return its id once it has tried, after
    checking that it found all three and was refused by each."""
    started = await executor.spawn(SpawnOptions(command=attack(what), background=True))
    output = await wait_for_output(executor, started.pid, "attempted")
    assert "chain: supervisor zygote agent" in output, output
    for whom in ("supervisor", "zygote", "agent"):
        assert f"{what} {whom}: refused" in output, output
    return started.pid


@pytest.mark.parametrize("what", ["write", "trace"])
async def test_a_process_can_neither_write_into_its_agents_stream_nor_trace_it(
    boxed: DockerExecutor, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Not dumpable (and, as root, another user's): /proc/PID/fd and ptrace are closed to the process, so
    it cannot forge its own exit nor lines of the server's log; the server's view stays true."""
    connection = live_agent(boxed)
    pid = await attacked(boxed, what)
    process = await boxed.get_process(pid)
    assert process.status == "running", process
    assert boxed.backend._agent is connection
    assert connection.alive
    assert "FORGED" not in caplog.text
    killed = await boxed.kill(pid)
    assert (killed.status, killed.signal, killed.ended_by) == ("terminated", "SIGTERM", "kill")


@pytest.mark.parametrize("what", ["stop", "kill"])
async def test_a_process_can_neither_stop_nor_kill_the_agent_the_zygote_or_its_supervisor_of_a_root_agent(
    made_container: Container, what: str
) -> None:
    executor = DockerExecutor(config_for(made_container, made=True))
    await executor.start()
    try:
        connection = live_agent(executor)
        pid = await attacked(executor, what)
        assert (await executor.get_process(pid)).status == "running"
        assert executor.backend._agent is connection
        assert connection.alive
        killed = await executor.kill(pid, "KILL")
        assert (killed.status, killed.signal) == ("terminated", "SIGKILL")
    finally:
        await executor.cleanup()


async def process_state(container: Container, pid: int) -> str:
    """The state (R, S, T, ...) of ``pid`` in the container, as its /proc/PID/stat says; "" once gone."""
    result = await anyio.to_thread.run_sync(lambda: container.exec_run(["cat", f"/proc/{pid}/stat"]))
    assert isinstance(result.output, bytes)
    return result.output.rpartition(b")")[2].split()[0].decode() if result.exit_code == 0 else ""


async def test_what_stops_its_agent_of_its_own_user_costs_one_spawn_and_is_ended_with_it(
    shared_container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped agent answers nothing: the spawn that waits for it in vain loses it, and the backend
    kills it, resumes its supervisors so they end their trees, and starts a new agent for the next spawn."""
    monkeypatch.setattr(client, "REQUEST_TIMEOUT_S", 1.0)
    executor = DockerExecutor(config_for(shared_container, made=False))
    await executor.start()
    try:
        connection = live_agent(executor)
        argument = sleep_argument()
        started = await executor.spawn(
            SpawnOptions(command=f"setsid sleep {argument} & {attack('stop')}", background=True)
        )
        await wait_for_top(shared_container, argument, 1)
        with anyio.fail_after(WAIT_S):
            while await process_state(shared_container, connection.hello["pid"]) != "T":
                await anyio.sleep(POLL_S)
        with pytest.raises(SpawnFailed, match="did not answer a spawn"):
            await executor.spawn(SpawnOptions(command="echo never"))
        assert not connection.alive
        assert (await executor.get_process(started.pid)).ended_by == "lost"
        await wait_for_top(shared_container, argument, 0)
        again = await executor.spawn(SpawnOptions(command="echo back"))
        assert (again.stdout, again.via) == ("back\n", "agent")
    finally:
        await executor.cleanup()


async def test_what_kills_its_agent_of_its_own_user_is_ended_with_it(shared_container: Container) -> None:
    """Where the agent runs as its processes' user, they can SIGKILL it (SECURITY.md says so). The server
    then reads every process as lost and ends what carries their markers: the killer, and what it left
    under the container's init, which no supervisor holds any more."""
    executor = DockerExecutor(config_for(shared_container, made=False))
    await executor.start()
    try:
        connection = live_agent(executor)
        argument = sleep_argument()
        started = await executor.spawn(
            SpawnOptions(command=f"setsid sleep {argument} & {attack('kill')}", background=True)
        )
        await wait_for_top(shared_container, argument, 1)
        await wait_for_exit(executor, started.pid)
        assert (await executor.get_process(started.pid)).ended_by == "lost"
        assert not connection.alive
        await wait_for_top(shared_container, argument, 0)  # the sleep the killer left under docker-init
        again = await executor.spawn(SpawnOptions(command="echo back"))
        assert (again.stdout, again.via) == ("back\n", "agent")
    finally:
        await executor.cleanup()


async def test_the_root_agents_processes_run_as_docker_user_with_what_an_exec_as_that_user_has(
    made_container: Container,
) -> None:
    """The same user (no supplementary groups), environment, home and terminal as before the agent ran as
    root, and stats that read their I/O."""
    executor = DockerExecutor(config_for(made_container, made=True))
    await executor.start()
    try:
        connection = live_agent(executor)
        assert connection.hello["user"] == [1000, 1000]
        who = await executor.spawn(SpawnOptions(command="id -u; id -g; id -G; pwd; echo ok > mine && cat mine"))
        assert who.stdout == "1000\n1000\n1000\n/home/agent\nok\n"
        environment = await executor.spawn(SpawnOptions(command="env | sort"))
        plain = await anyio.to_thread.run_sync(
            lambda: made_container.exec_run(["/bin/sh", "-c", "env | sort"], user="1000:1000", workdir="/home/agent")
        )
        assert isinstance(plain.output, bytes)
        # The marker, the C locale Python's agent coerces to UTF-8, and the environment's defaults.
        ours = {"PROCESS_MCP_ID", "LC_CTYPE", *defaults(tty=False)}
        assert {line.partition("=")[0] for line in environment.stdout.splitlines()} - ours == {
            line.partition("=")[0] for line in plain.output.decode().splitlines()
        }
        assert "HOME=/home/agent" in environment.stdout.splitlines()
        terminal = await executor.spawn(SpawnOptions(command='stat -c %u "$(tty)"; stty size', tty=True))
        assert terminal.stdout.split() == ["1000", "30", "120"]
        io = await executor.spawn(SpawnOptions(command="head -c 3000000 /dev/zero; echo; sleep 30", background=True))
        with anyio.fail_after(WAIT_S):
            while True:
                stats = (await executor.get_process(io.pid)).stats
                if stats is not None and (stats.read_bytes or 0) >= 3_000_000:
                    break
                await anyio.sleep(POLL_S)
    finally:
        await executor.cleanup()


AGENT_ARGV_MAX = 256
"""Most bytes of the command line `ps` in the box may show for each of the agent's processes (its
bootstrap was 600 bytes, shown once for the agent, the zygote and every supervisor)."""

# Prints the command line of every process in the box, one a line, its arguments and lines joined by spaces
# (busybox too).
_COMMAND_LINES = "for d in /proc/[0-9]*; do tr '\\0\\n' '  ' < \"$d/cmdline\" 2>/dev/null && echo; done; true"


async def test_ps_in_the_box_shows_the_agents_processes_by_name_in_a_short_command_line(
    boxed: DockerExecutor,
) -> None:
    """`ps` in the box lists the agent, its zygote and a supervisor per process: each reads as
    process-mcp-agent, without the code that loads it, so the processes the user started stand out."""
    for _ in range(3):
        await boxed.spawn(SpawnOptions(command="sleep 600", background=True))
    # A background spawn returns once its shell started; under load the shell may not have exec'd sleep yet.
    with anyio.fail_after(WAIT_S):
        while True:
            lines = (await boxed.spawn(SpawnOptions(command=_COMMAND_LINES))).stdout.splitlines()
            if sum(line.strip() == "sleep 600" for line in lines) == 3:
                break
            await anyio.sleep(POLL_S)
    agents = [line for line in lines if client.AGENT_NAME in line.split()]
    assert len(agents) >= 5, lines  # the agent, the zygote, and the supervisors of three sleeps and of this one
    assert all(len(line) <= AGENT_ARGV_MAX for line in agents), agents
    assert not [line for line in lines if "process_mcp_box_agent" in line or "def take" in line], lines


# A stream that breaks the protocol: each frame below is played into the client as if the agent had
# written it (what a process that could write into the stream would write).

FORGED: dict[str, Callable[[AgentConnection], bytes]] = {
    "a header announcing 4 GiB": lambda agent: protocol.HEADER.pack(protocol.STDOUT, agent.last_channel, 2**32 - 1),
    "an exit of a process it was never asked to start": lambda agent: protocol.message(
        protocol.EXITED, agent.last_channel + 1, code=0
    ),
    "output for process 0x7fffffff": lambda agent: protocol.frame(protocol.STDOUT, 0x7FFFFFFF, b"forged"),
    "an answer to a request never made": lambda agent: protocol.message(
        protocol.SIGNALLED, agent.last_channel, seq=10**9, sent=1
    ),
    "a BYE the server did not ask for": lambda agent: protocol.frame(protocol.BYE, 0),
    "a second HELLO": lambda agent: protocol.message(protocol.HELLO, 0, **agent.hello),
    "a second start of its process": lambda agent: protocol.message(protocol.STARTED, agent.last_channel, pid=1),
    "file bytes for a read never asked": lambda agent: protocol.frame(
        protocol.FILE_BYTES, agent.last_channel, protocol.COUNT.pack(10**9) + b"forged"
    ),
    "file bytes without a sequence number": lambda agent: protocol.frame(
        protocol.FILE_BYTES, agent.last_channel, b"ab"
    ),
    "data for a forward the server never opened": lambda agent: protocol.frame(
        protocol.TUNNEL_DATA, protocol.FORWARD_BASE + 1000, b"forged"
    ),
    "ports that answer nothing asked": lambda agent: protocol.message(protocol.PORTS, 0, seq=10**9, ports={}),
    "an output file outside the box's /tmp": lambda agent: protocol.message(
        protocol.OUTPUT_FILE, agent.last_channel, stream=1, path="/etc/passwd"
    ),
    "a supervisor kept in a path": lambda agent: protocol.message(protocol.KEPT, 0, cgroup="../../p1"),
    "a supervisor kept in no group": lambda agent: protocol.message(protocol.KEPT, 0),
}


async def agent_exec_running(executor: DockerExecutor, exec_id: str) -> bool:
    assert executor.session.client is not None
    api = executor.session.client.api
    return bool((await anyio.to_thread.run_sync(api.exec_inspect, exec_id))["Running"])


async def assert_lost_with_everything(
    executor: DockerExecutor, container: Container, connection: AgentConnection, exec_id: str, pid: str, argument: str
) -> None:
    """The agent was lost: its process reads as lost, every process of its tree is gone (an escapee too),
    the agent's exec has ended, and the next spawn starts a new agent."""
    assert not connection.alive
    record = await executor.get_process(pid)
    assert (record.status, record.ended_by) == ("terminated", "lost"), record
    await wait_for_top(container, argument, 0)
    with anyio.fail_after(WAIT_S):
        while await agent_exec_running(executor, exec_id):
            await anyio.sleep(POLL_S)
    again = await executor.spawn(SpawnOptions(command="echo back"))
    assert (again.stdout, again.via, again.exit_code) == ("back\n", "agent", 0)
    assert executor.backend._agent is not None
    assert executor.backend._agent is not connection


@pytest.mark.parametrize("forged", list(FORGED), ids=list(FORGED))
async def test_a_frame_the_agent_may_not_send_ends_it_and_its_processes_and_the_next_spawn_works(
    boxed: DockerExecutor, box: Container, forged: str
) -> None:
    connection = live_agent(boxed)
    exec_id = boxed.backend._agent_execs[connection]
    argument = sleep_argument()
    started = await boxed.spawn(
        SpawnOptions(command=f"setsid sleep {argument} & exec sleep {argument}", background=True)
    )
    await wait_for_top(box, argument, 2)
    connection.feed([FORGED[forged](connection)])
    await assert_lost_with_everything(boxed, box, connection, exec_id, started.pid, argument)


async def test_five_thousand_tunnels_opened_at_once_end_the_agent_not_the_servers_descriptors(
    box: Container, mode: str
) -> None:
    """Each tunnel costs the server a connection to its proxy: past protocol.MAX_TUNNELS open at once, the
    agent is lost before the server holds more."""
    executor = DockerExecutor(config_for(box, made=mode == "root agent", domains=["example.invalid"]))
    await executor.start()
    try:
        connection = live_agent(executor)
        exec_id = executor.backend._agent_execs[connection]
        argument = sleep_argument()
        started = await executor.spawn(SpawnOptions(command=f"exec sleep {argument}", background=True))
        await wait_for_top(box, argument, 1)
        before = len(os.listdir("/proc/self/fd"))
        opens = b"".join(protocol.frame(protocol.TUNNEL_OPEN, protocol.TUNNEL_BASE + n) for n in range(5000))
        connection.feed([opens])
        assert len(os.listdir("/proc/self/fd")) <= before + 8  # the loss closed the stream, made no connection
        await assert_lost_with_everything(executor, box, connection, exec_id, started.pid, argument)
    finally:
        await executor.cleanup()


def stderr_frames(data: bytes) -> bytes:
    """``data`` as the engine frames an exec's stderr (stream 2, size), in frames of at most 1 MiB."""
    step = 1 << 20
    return b"".join(
        bytes([2, 0, 0, 0]) + len(data[at : at + step]).to_bytes(4, "big") + data[at : at + step]
        for at in range(0, len(data), step)
    )


def test_the_agents_stderr_reaches_the_log_escaped_and_bounded_however_much_it_writes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What reached the agent's stderr (whoever wrote it) cannot forge a line of the server's log nor grow
    it by more than a few lines per interval: 64 MiB with forged lines and escape sequences."""
    forged = b"2025-01-01 00:00:00,000 INFO process_mcp.service.spaces: principal bob: FORGED\n\x1b[2J\r\xe2\x80\xa8"
    data = stderr_frames(forged * 1000 + b"x" * (64 << 20) + b"\nlast words\n")
    ours, theirs = socket.socketpair()
    channel = ExecStream(ours, ours, "box")

    def write() -> None:
        with theirs:
            theirs.sendall(data)

    writer = threading.Thread(target=write)
    caplog.set_level(logging.WARNING, logger=stream.__name__)
    writer.start()
    try:
        while True:
            ours.setblocking(True)
            try:
                assert channel.receive() == []
            except EOFError:
                break
    finally:
        writer.join(WAIT_S)
        channel.close()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) <= stream.STDERR_LINES_PER_WINDOW + 1
    assert sum(len(message) for message in messages) <= 4 * stream.STDERR_BYTES_PER_WINDOW + 1024
    assert all(message.startswith("agent box") for message in messages), messages[:3]
    assert not any(char in message for message in messages for char in "\n\r\x1b\u2028")
    assert "agent box says: 2025-01-01 00:00:00,000 INFO process_mcp.service.spaces: principal bob: FORGED" in messages
    assert "\\x1b[2J\\r\\u2028" in messages[1]
    dropped = messages[-1]
    assert "were not logged" in dropped, dropped
    assert int(dropped.split("(")[1].split()[0]) >= 64 << 20  # every dropped byte is counted
