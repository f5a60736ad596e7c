"""The agent's protocol and what the agent needs from the Python in a box."""

from __future__ import annotations

import ast
import json
import os
import pwd
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from process_mcp.box import protocol
from process_mcp.box.client import BOOTSTRAP, SHIPPED, bootstrap_payload

from ..helpers import POLL_S, WAIT_S, cannot_run_here, kill_if_alive, running_sleepers, sleep_argument, started


def test_frames_split_anywhere_across_reads_come_out_whole_and_in_order() -> None:
    stream = b"".join(
        [
            protocol.message(protocol.SPAWN, 7, command="echo hi", env={"A": "1"}),
            protocol.frame(protocol.STDOUT, 7, bytes(range(256)) * 300),
            protocol.frame(protocol.CLOSED, 7, b"1"),
            protocol.frame(protocol.BYE, 0),
        ]
    )
    for step in (1, 2, 9, 10, 4096, len(stream)):
        decoder = protocol.Decoder()
        frames = []
        for start in range(0, len(stream), step):
            frames += decoder.feed(stream[start : start + step])
        assert [(kind, channel) for kind, channel, _ in frames] == [
            (protocol.SPAWN, 7),
            (protocol.STDOUT, 7),
            (protocol.CLOSED, 7),
            (protocol.BYE, 0),
        ]
        assert protocol.fields(frames[0][2]) == {"command": "echo hi", "env": {"A": "1"}}
        assert frames[1][2] == bytes(range(256)) * 300


def test_the_stream_decoder_hands_over_output_in_pieces_and_control_frames_whole() -> None:
    output = bytes(range(256)) * 3000
    stream = b"".join(
        [
            protocol.frame(protocol.STDOUT, 3, output),
            protocol.message(protocol.EXITED, 3, code=130),
            protocol.frame(protocol.STDERR, 4, b"err"),
            protocol.frame(protocol.CLOSED, 3, b"1"),
            protocol.frame(protocol.BYE, 0),
        ]
    )
    for step in (1, 5, 9, 10, 4096, 65536, len(stream)):
        decoder = protocol.StreamDecoder()
        received: dict[tuple[int, int], bytearray] = {}
        order = []
        for start in range(0, len(stream), step):
            for kind, channel, payload in decoder.feed(stream[start : start + step]):
                if (kind, channel) not in received:
                    order.append((kind, channel))
                    received[kind, channel] = bytearray()
                received[kind, channel] += payload
        assert order == [
            (protocol.STDOUT, 3),
            (protocol.EXITED, 3),
            (protocol.STDERR, 4),
            (protocol.CLOSED, 3),
            (protocol.BYE, 0),
        ]
        assert received[protocol.STDOUT, 3] == output
        assert protocol.fields(bytes(received[protocol.EXITED, 3])) == {"code": 130}
        assert (bytes(received[protocol.STDERR, 4]), bytes(received[protocol.CLOSED, 3])) == (b"err", b"1")


def test_a_frame_announcing_more_than_the_limit_is_a_corrupt_stream() -> None:
    header = protocol.HEADER.pack(protocol.STDOUT, 1, protocol.MAX_PAYLOAD + 1)
    with pytest.raises(protocol.ProtocolError, match="announces"):
        protocol.Decoder().feed(header)
    with pytest.raises(protocol.ProtocolError, match="announces"):
        protocol.StreamDecoder().feed(header)


def test_a_control_frame_that_is_not_a_json_object_is_refused() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.fields(b"[1, 2]")
    with pytest.raises(protocol.ProtocolError):
        protocol.fields(b"{not json")


@pytest.mark.parametrize("module", [name for name, _ in SHIPPED])
def test_what_runs_in_the_box_parses_as_python_3_8(module: str) -> None:
    """The agent runs with the box's Python, 3.8 or newer: no syntax from later versions."""
    source = resources.files("process_mcp.box").joinpath(module).read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    imported = {
        alias.name.partition(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    outside = imported - set(sys.stdlib_module_names) - {name for _, name in SHIPPED}
    assert not outside, f"the agent may use the standard library only, not {outside}"


def spawn_frame(channel: int, command: str, **spec: Any) -> bytes:
    """A SPAWN for ``command`` in /, with the agent's environment, no terminal, and ``spec`` over that."""
    fields = {"command": command, "cwd": "/", "env": {}, "inherit": True, "tty": False, **spec}
    return protocol.message(protocol.SPAWN, channel, **fields)


class RawAgent:
    """The agent started as the server starts it (as ``user``, default this process's), spoken to frame by frame."""

    def __init__(
        self, user: int | None = None, *, wrap: Sequence[str] = (), python: str | None = None, args: Sequence[str] = ()
    ) -> None:
        """``wrap`` is what the agent's command line runs under (a box), ``python`` its interpreter, ``args``
        what follows the bootstrap."""
        python = python or sys.executable
        if user is not None:  # another user may not run this one: the system's, as a box has its own
            python = shutil.which("python3", path="/usr/bin:/bin") or cannot_run_here("no /usr/bin/python3")
        self.process = subprocess.Popen(
            [*wrap, python, "-I", "-S", "-c", BOOTSTRAP, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            cwd="/",
            start_new_session=True,
            user=user,
        )
        self.decoder = protocol.Decoder()
        self.backlog: list[tuple[int, int, bytes]] = []
        self.send(bootstrap_payload())
        self.hello = self.next_of(protocol.HELLO)[0]

    def send(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def next_of(self, kind: int, count: int = 1) -> list[dict[str, Any]]:
        """The next ``count`` frames of ``kind``, as fields (output, closes and tunnels' frames as
        {"data": ...}); frames of other kinds read meanwhile stay for later calls."""
        found: list[dict[str, Any]] = []
        while True:
            for frame in [f for f in self.backlog if f[0] == kind][: count - len(found)]:
                self.backlog.remove(frame)
                payload = frame[2]
                raw = kind in protocol.OUTPUT_KINDS or kind == protocol.CLOSED or kind >= protocol.TUNNEL_OPEN
                found.append({"data": payload} if raw else protocol.fields(payload))
            if len(found) >= count:
                return found
            self.read(f"frame of kind {kind}")

    def read(self, awaited: str) -> None:
        """Read what the agent sent next into the backlog; fail if nothing comes within 10 s."""
        assert self.process.stdout is not None
        ready = select.select([self.process.stdout], [], [], 10)[0]
        assert ready, f"the agent sent no {awaited} within 10 s"
        data = os.read(self.process.stdout.fileno(), 1 << 20)
        assert data, "the agent's stream ended"
        self.backlog += [(got, channel, bytes(payload)) for got, channel, payload in self.decoder.feed(data)]

    def frames_until(self, kind: int, channel: int) -> list[tuple[int, int, bytes]]:
        """Every frame the agent sent, in order, up to and including the first of ``kind`` on ``channel``;
        those after it stay for later calls. Fails if it has not come within WAIT_S, however much else
        keeps coming."""
        deadline = time.monotonic() + WAIT_S
        while True:
            for at, frame in enumerate(self.backlog):
                if frame[:2] == (kind, channel):
                    found, self.backlog = self.backlog[: at + 1], self.backlog[at + 1 :]
                    return found
            assert time.monotonic() < deadline, f"no frame of kind {kind} on channel {channel} within {WAIT_S} s"
            self.read(f"frame of kind {kind} on channel {channel}")

    def close(self) -> None:
        self.send(protocol.frame(protocol.SHUTDOWN, 0))
        self.process.wait(10)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])


def test_supervisors_come_from_the_zygote_even_for_a_burst_of_spawns_at_start() -> None:
    """The agent never forks a supervisor in its own loop (a fork of the agent holds up every other
    process's output and requests): a spawn that finds no spare ready waits for the zygote's."""
    agent = RawAgent()
    try:
        # In one write, the moment the agent has said hello: more spawns than the spares it keeps.
        agent.send(b"".join(spawn_frame(channel, "sleep 60") for channel in range(1, 7)))
        leaders = [int(started["pid"]) for started in agent.next_of(protocol.STARTED, 6)]
        forkers = {parent_of(parent_of(leader)) for leader in leaders}  # leader <- supervisor <- ?
        assert forkers == {parent_of(parent_of(leaders[0]))}
        assert agent.hello["pid"] not in forkers, "the agent forked a supervisor itself"
    finally:
        agent.close()


def switches(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def test_the_agent_sleeps_while_the_server_reads_nothing_of_a_flood() -> None:
    """A full stream is retried on a timer only while the server takes some of it: a server that
    takes nothing leaves the agent waiting for room, not waking a thousand times a second."""
    agent = RawAgent()
    try:
        agent.send(spawn_frame(1, "yes flood"))
        agent.next_of(protocol.STDOUT)  # flooding; from here on nothing is read
        time.sleep(0.5)  # the stream and the process's pipe fill
        before = switches(agent.process.pid)
        time.sleep(1.0)
        woke = switches(agent.process.pid) - before
        assert woke < 50, f"the agent woke {woke} times in a second while nothing was read"
        assert len(agent.next_of(protocol.STDOUT, 20)) >= 20  # and it goes on once the server reads
    finally:
        agent.close()


def run(agent: RawAgent, channel: int, command: str, **spec: Any) -> tuple[bytes, dict[str, Any]]:
    """Run ``command`` through the agent to its end: its output, and its exit as the agent reports it."""
    agent.send(spawn_frame(channel, command, **spec))
    started = agent.next_of(protocol.STARTED)[0]
    assert "error" not in started, started  # else no exit would come
    exited = agent.next_of(protocol.EXITED)[0]
    agent.next_of(protocol.CLOSED, 2)
    output = b"".join(bytes(f[2]) for f in agent.backlog if f[:2] == (protocol.STDOUT, channel))
    agent.backlog = [f for f in agent.backlog if f[1] != channel]
    time.sleep(0.05)  # the supervisor closes its status once the tree is gone, and is free again
    return output, exited


def test_a_supervisor_starts_the_next_process_once_its_tree_is_gone_but_not_after_limits() -> None:
    agent = RawAgent()
    try:
        first, _ = run(agent, 1, "echo $PPID")
        second, _ = run(agent, 2, "echo $PPID")
        assert first == second, "the supervisor of a finished process was not used again"
        limited, _ = run(agent, 3, "echo $PPID", rlimits={"cpu": [5, 5]})
        assert limited == first  # limits are set on the supervisor itself, inherited by the command
        after, _ = run(agent, 4, "echo $PPID; ulimit -t")
        supervisor, cpu_limit = after.split()
        assert supervisor != first.strip(), "a supervisor that set limits on itself started another process"
        assert cpu_limit == b"unlimited"
        assert not Path(f"/proc/{int(first)}").exists(), "the supervisor with limits did not exit"
    finally:
        agent.close()


def test_a_late_signal_for_a_finished_process_misses_the_next_one_under_its_supervisor() -> None:
    """Once a process's tree is gone its supervisor may run the next process: a signal that comes
    late for the finished one must reach nothing."""
    agent = RawAgent()
    try:
        finished, _ = run(agent, 1, "echo $PPID")
        agent.send(spawn_frame(2, "exec sleep 60"))
        sleeper = int(agent.next_of(protocol.STARTED)[0]["pid"])
        assert parent_of(sleeper) == int(finished), "the next process did not get the finished one's supervisor"
        agent.send(protocol.message(protocol.SIGNAL, 1, seq=1, signal=signal.SIGKILL))
        assert agent.next_of(protocol.SIGNALLED)[0]["sent"] == 0
        assert Path(f"/proc/{sleeper}").exists(), "a signal for a finished process killed the next one"
    finally:
        agent.close()


STEPPED_AGENT = """
import json, os, select, signal, sys, time
from process_mcp.box import agent, proc, protocol

def frame(data):  # as if the server wrote it, and the loop read it
    os.write(server_w, data)
    box._on_stream(agent_r, 0)

def spawn(channel, command):
    frame(protocol.message(protocol.SPAWN, channel, command=command, cwd="/", env={}, inherit=True, tty=False))
    return box.processes[channel]

agent_r, server_w = os.pipe()
server_r, agent_w = os.pipe()
box = agent.Agent(agent_r, agent_w)
finished = spawn(1, "true")
deadline = time.monotonic() + 10
while not finished.done and time.monotonic() < deadline:  # its status read once: not to its end
    select.select([finished.status], [], [], 1)
    box._on_status(finished.status, 0)
assert finished.status >= 0, "the status ended in the same read"
sleeper = spawn(2, "exec sleep 60")
while not proc.descendants(sleeper.supervisor) and time.monotonic() < deadline:
    time.sleep(0.01)
frame(protocol.message(protocol.SIGNAL, 1, seq=1, signal=signal.SIGKILL))
time.sleep(0.1)
print(json.dumps({
    "same": sleeper.supervisor == finished.supervisor,
    "sleepers": len(proc.descendants(sleeper.supervisor)),
}))
os.close(box.lifeline_w)  # every supervisor ends its tree and exits, the zygote exits
"""


def test_a_signal_for_a_process_just_reported_done_misses_the_next_one_its_supervisor_took() -> None:
    """A supervisor is free for the next process as soon as it says its tree is gone, which the agent
    may read ahead of its status's end: a signal for the finished process that comes after the next
    spawn took that supervisor, before the status's end, must reach nothing. The agent's loop is
    stepped by hand (in a process of its own), so the signal comes exactly there."""
    stepped = subprocess.run(
        [sys.executable, "-c", STEPPED_AGENT],
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
        cwd=Path(__file__).parents[2],
    )
    assert stepped.stdout, stepped.stderr
    result = json.loads(stepped.stdout)
    assert result["same"], "the next process did not get the finished one's supervisor"
    assert result["sleepers"] == 1, "a signal for a finished process killed the next one"


def test_the_agent_its_zygote_and_its_supervisors_are_not_dumpable_so_their_user_cannot_reach_them() -> None:
    """What keeps a process of the agent's own user from tracing them or opening their descriptors (their
    stream to the server, their stderr) through /proc: not dumpable, their /proc entries are root's. Run
    as an unprivileged user (nobody, when the tests run as root, which may open anything)."""
    user = pwd.getpwnam("nobody").pw_uid if os.getuid() == 0 else os.getuid()
    agent = RawAgent(user)
    try:
        assert agent.hello["undumpable"] is True
        agent.send(spawn_frame(1, "exec sleep 60"))
        leader = int(agent.next_of(protocol.STARTED)[0]["pid"])
        supervisor = parent_of(leader)
        zygote = parent_of(supervisor)
        assert parent_of(zygote) == agent.process.pid
        machinery = (agent.process.pid, zygote, supervisor)
        for pid in machinery:
            assert Path(f"/proc/{pid}/fd").stat().st_uid == 0, pid
        assert Path(f"/proc/{leader}/fd").stat().st_uid == user  # the command is dumpable again
        probe = "; ".join(f"ls /proc/{pid}/fd >/dev/null 2>&1 && echo reached {pid}" for pid in machinery)
        output, _ = run(agent, 2, f"{probe}; echo probed")
        assert output == b"probed\n", output
    finally:
        agent.close()


def test_a_process_that_kills_its_supervisor_is_ended_with_what_it_started_and_reads_as_lost() -> None:
    """Its orphans, a setsid'd one too, fall to the agent (the zygote is no subreaper), which tells them
    from its own children and ends them; the exit reports its loss, not a code."""
    agent = RawAgent()
    argument = sleep_argument()
    try:
        agent.send(spawn_frame(1, "exec sleep 60"))
        bystander = int(agent.next_of(protocol.STARTED)[0]["pid"])
        agent.send(spawn_frame(2, f"setsid sleep {argument} & {started(argument)}; kill -9 $PPID; sleep 60"))
        # Its STARTED comes first, unless the supervisor was killed before it could report the start (a
        # starved supervisor): then EXITED alone, which the server takes as a spawn that failed.
        exited = agent.frames_until(protocol.EXITED, 2)[-1]
        assert protocol.fields(exited[2]) == {"lost": True}
        deadline = time.monotonic() + 10
        while running_sleepers(argument) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not running_sleepers(argument), "what the process started outlived its supervisor"
        assert Path(f"/proc/{bystander}").exists(), "another process's tree was ended too"
    finally:
        for pid in running_sleepers(argument):
            kill_if_alive(pid)
        agent.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def round_trip(agent: RawAgent, seq: int) -> None:
    """A request answered in turn: what the agent did in the loop iterations before is in the backlog."""
    agent.send(protocol.message(protocol.SIGNAL, 1 << 20, seq=seq, signal=0))
    agent.next_of(protocol.SIGNALLED)


def test_the_agent_opens_at_most_max_tunnels_and_the_next_once_one_has_closed_on_both_sides() -> None:
    """Connections beyond protocol.MAX_TUNNELS wait, unaccepted, so the server (which ends an agent that
    opens more) never sees more; a tunnel counts until each side has closed it and seen the other's close."""
    agent = RawAgent()
    port = free_port()
    clients: list[socket.socket] = []
    try:
        agent.send(protocol.message(protocol.PROXY, 0, port=port))
        round_trip(agent, 1)  # listening
        for _ in range(protocol.MAX_TUNNELS + 5):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))  # the backlog holds them
        assert len(agent.next_of(protocol.TUNNEL_OPEN, protocol.MAX_TUNNELS)) == protocol.MAX_TUNNELS
        clients[0].close()  # the process's side of the first tunnel closes: the agent says so ...
        agent.next_of(protocol.TUNNEL_CLOSE)
        round_trip(agent, 2)
        round_trip(agent, 3)
        assert not [f for f in agent.backlog if f[0] == protocol.TUNNEL_OPEN], "one opened while the server's was open"
        agent.send(protocol.frame(protocol.TUNNEL_CLOSE, protocol.TUNNEL_BASE))  # ... and then the server's side
        agent.next_of(protocol.TUNNEL_OPEN)
        round_trip(agent, 4)
        round_trip(agent, 5)
        assert not [f for f in agent.backlog if f[0] == protocol.TUNNEL_OPEN], "more than one opened for one closed"
    finally:
        for client in clients:
            client.close()


def test_a_forward_nothing_takes_acknowledges_what_came_meanwhile_and_counts_until_the_servers_close() -> None:
    """A forward's connect says only later that it was refused, on 127.0.0.1 and then on ::1; what the
    server sent meanwhile is acknowledged (its window would stay shut), the agent ends its side once,
    and the tunnel counts until the server's side has ended too, as every tunnel does."""
    agent = RawAgent()
    port = free_port()
    clients: list[socket.socket] = []
    try:
        channel = protocol.FORWARD_BASE + 1
        sent = b"x" * (protocol.TUNNEL_WINDOW // 2)
        agent.send(
            protocol.message(protocol.FORWARD, channel, port=port) + protocol.frame(protocol.TUNNEL_DATA, channel, sent)
        )
        frames = agent.frames_until(protocol.TUNNEL_CLOSE, channel)  # what came after, acknowledged too
        acked = sum(protocol.COUNT.unpack(f[2])[0] for f in frames if f[:2] == (protocol.TUNNEL_ACK, channel))
        while acked < len(sent):
            acked += protocol.COUNT.unpack(agent.next_of(protocol.TUNNEL_ACK)[0]["data"])[0]
        assert acked == len(sent), f"{acked} of {len(sent)} bytes acknowledged"
        round_trip(agent, 1)
        assert not [f for f in agent.backlog if f[1] == channel], "more than one end of the forward"
        # Counted until the server's end: MAX_TUNNELS - 1 tunnels open beside it, the next once it ends.
        proxy = free_port()
        agent.send(protocol.message(protocol.PROXY, 0, port=proxy))
        round_trip(agent, 2)
        for _ in range(protocol.MAX_TUNNELS):
            clients.append(socket.create_connection(("127.0.0.1", proxy), timeout=10))
        agent.next_of(protocol.TUNNEL_OPEN, protocol.MAX_TUNNELS - 1)
        round_trip(agent, 3)
        assert not [f for f in agent.backlog if f[0] == protocol.TUNNEL_OPEN], "opened past the count"
        agent.send(protocol.frame(protocol.TUNNEL_CLOSE, channel))
        agent.next_of(protocol.TUNNEL_OPEN)
    finally:
        for client in clients:
            client.close()
        agent.close()


def test_a_forward_the_server_ended_while_it_connected_still_reaches_a_server_on_ipv6_loopback() -> None:
    """The server may end its side (its client sent the whole request) before the forward's first connect
    is refused: the request and its end still go to the next address, and the answer comes back."""
    agent = RawAgent()
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        listener.bind(("::1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        channel = protocol.FORWARD_BASE + 1
        agent.send(
            protocol.message(protocol.FORWARD, channel, port=port)
            + protocol.frame(protocol.TUNNEL_DATA, channel, b"request")
            + protocol.frame(protocol.TUNNEL_CLOSE, channel)
        )
        listener.settimeout(WAIT_S)
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(WAIT_S)
            received = b""
            while chunk := connection.recv(4096):
                received += chunk
            assert received == b"request"  # and then its end
            connection.sendall(b"answer")
        frames = agent.frames_until(protocol.TUNNEL_CLOSE, channel)
        assert b"".join(f[2] for f in frames if f[:2] == (protocol.TUNNEL_DATA, channel)) == b"answer"
    finally:
        listener.close()
        agent.close()


BURST_BYTES = 512 * 1024
"""A burst that fits in a grown pipe (1 MiB) and in one read of the agent's."""
BURST = f"""
import fcntl, os
fcntl.fcntl(1, 1031, 1 << 20)  # F_SETPIPE_SZ: room for the whole burst while nothing reads it
os.write(1, b"x" * {BURST_BYTES - 8} + b"TAIL-OK\\n")
open("written", "w").close()
"""


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {WAIT_S} s"
        time.sleep(POLL_S)


def stream_full(agent: RawAgent) -> bool:
    """Whether the agent's stream to the server has no room left (its pipe's every buffer in use), seen
    from a write end of our own that is never written to."""
    writer = os.open(f"/proc/{agent.process.pid}/fd/1", os.O_WRONLY | os.O_NONBLOCK)
    try:
        return not select.select([], [writer], [], 0)[1]
    finally:
        os.close(writer)


def any_process_in(directory: Path) -> bool:
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "cwd") == str(directory):
                return True
        except OSError:
            continue
    return False


def test_what_a_process_wrote_before_exiting_goes_ahead_of_its_exit_while_the_stream_is_full(tmp_path: Path) -> None:
    """The server takes an exit to mean the output before it has come (a reply is cut at once), so the
    agent sends what the process wrote before exiting ahead of the exit; also when the stream to the
    server is full and output is not being read, since the exit arrives on the supervisor's own pipe."""
    if os.getuid() != 0:
        cannot_run_here("the agent and its supervisors are not dumpable: only root can watch their stream and cwd")
    agent = RawAgent()
    try:
        # A flood that fills the stream, which the test does not read: the agent stops reading output.
        agent.send(spawn_frame(1, f"head -c {16 << 20} /dev/zero"))
        wait_until(lambda: stream_full(agent), "filling the stream")
        # A burst written into the process's own pipe while nothing reads it, then its exit.
        burst = tmp_path / "burst"
        burst.mkdir()
        agent.send(spawn_frame(2, f"exec python3 -c {shlex.quote(BURST)}", cwd=str(burst)))
        wait_until((burst / "written").exists, "the burst")
        # Its supervisor leaves the directory once it has reported the exit (and the tree is gone).
        wait_until(lambda: not any_process_in(burst), "the exit report")
        frames = agent.frames_until(protocol.EXITED, 2)
        ahead = b"".join(payload for kind, channel, payload in frames if (kind, channel) == (protocol.STDOUT, 2))
        assert len(ahead) == BURST_BYTES
        assert ahead.endswith(b"TAIL-OK\n")
        agent.frames_until(protocol.EXITED, 1)  # the rest of the flood, so the agent can end at once
    finally:
        agent.close()


FLOOD_BYTES = 3 * 512 * 1024
"""More than the stream to the server holds (1 MiB), less than it and the process's own grown pipe hold
together: the flood can end while the server reads nothing, its tail still in its pipe."""
FLOOD = f"""
import fcntl, os
fcntl.fcntl(1, 1031, 1 << 20)  # F_SETPIPE_SZ: room for the tail while nothing reads it
os.read(0, 1)  # the test has seen the process and its supervisor
data = memoryview(b"x" * {FLOOD_BYTES - 8} + b"TAIL-OK\\n")
while data:
    data = data[os.write(1, data) :]
"""


def pipes(pid: int) -> set[str]:
    """The pipes ``pid`` holds, as /proc names them (``pipe:[inode]``)."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("pipe:"):
            found.add(target)
    return found


def processes_in(directory: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "cwd") == str(directory):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_floods_own_tail_goes_ahead_of_its_exit_while_part_of_it_waits_for_the_full_stream(tmp_path: Path) -> None:
    """The flood that fills the stream is itself the process that exits: the agent is in the middle of a
    frame of its output (spliced into the stream as the server makes room) and has stopped reading its
    pipe, which still holds its tail. The exit must wait for that tail, not go out behind the one frame."""
    if os.getuid() != 0:
        cannot_run_here("the agent and its supervisors are not dumpable: only root can watch their descriptors and cwd")
    agent = RawAgent()
    try:
        flood = tmp_path / "flood"
        flood.mkdir()
        agent.send(spawn_frame(1, f"exec python3 -c {shlex.quote(FLOOD)}", cwd=str(flood)))
        wait_until(lambda: len(processes_in(flood)) == 2, "the start")  # the supervisor and the process
        found = processes_in(flood)
        supervisor = next(pid for pid in found if parent_of(pid) not in found)
        # The pipes the agent shares with the supervisor: its lifeline and the status the exit is reported on.
        shared = pipes(agent.process.pid) & pipes(supervisor)
        agent.send(protocol.frame(protocol.INPUT, 1, struct.pack(">I", 1) + b"go"))
        # The agent has read the exit report once it has closed its end of the status pipe.
        wait_until(lambda: len(pipes(agent.process.pid) & shared) < len(shared), "the exit report")
        frames = agent.frames_until(protocol.EXITED, 1)
        ahead = b"".join(payload for kind, channel, payload in frames if (kind, channel) == (protocol.STDOUT, 1))
        assert len(ahead) == FLOOD_BYTES, f"{FLOOD_BYTES - len(ahead)} bytes of the flood came after its exit"
        assert ahead.endswith(b"TAIL-OK\n")
    finally:
        agent.close()


@pytest.mark.parametrize("left", ["sleep 60", "yes left"], ids=["silent", "writing"])
def test_an_exit_waits_for_what_the_process_wrote_but_not_for_a_child_left_holding_its_output(left: str) -> None:
    """A process that leaves a child holding its output pipe open (silent, or writing without end) is
    reported exited, with what it wrote ahead of the exit, while the child still holds the pipe. (A
    terminal cannot be held so: the exit of its session's leader hangs it up.)"""
    agent = RawAgent()
    try:
        agent.send(spawn_frame(1, f"{left} & echo TAIL-OK"))
        frames = agent.frames_until(protocol.EXITED, 1)
        assert not [f for f in frames if f[:2] == (protocol.CLOSED, 1)], "its output closed: nothing held it open"
        ahead = b"".join(payload for kind, channel, payload in frames if (kind, channel) == (protocol.STDOUT, 1))
        assert b"TAIL-OK" in ahead
    finally:
        agent.close()


CUT_FLOOD_BYTES = 8 << 20


def test_an_output_file_cut_short_under_a_frame_still_gives_the_frame_every_byte_it_promised() -> None:
    """The agent moves a pipe's output into the process's output file and sends the frame from there. A
    process of the box may cut that file short (it is its user's) while the frame waits for room in the
    stream: the frame must still carry the bytes its header promised, or the server would read what
    follows as part of it (and then a process could write frames of its own into the stream)."""
    if os.getuid() != 0:
        cannot_run_here("the agent is not dumpable: only root can watch its stream fill")
    agent = RawAgent()
    try:
        command = f"head -c {CUT_FLOOD_BYTES} /dev/zero | tr '\\0' x"
        agent.send(spawn_frame(1, command, files={"1": "cut.out"}, file_room=CUT_FLOOD_BYTES))
        wait_until(lambda: stream_full(agent), "filling the stream")
        kept = list(Path("/tmp").glob(f"process-mcp-{agent.hello['pid']}-*/cut.out"))
        assert len(kept) == 1, kept
        while not any(frame[:2] == (protocol.EXITED, 1) for frame in agent.backlog):
            os.truncate(kept[0], 0)  # whatever waits for the stream, from the file, finds it cut
            agent.read("output")
        frames = agent.frames_until(protocol.EXITED, 1)
        output = b"".join(payload for kind, channel, payload in frames if (kind, channel) == (protocol.STDOUT, 1))
        assert len(output) == CUT_FLOOD_BYTES  # every frame whole: nothing read as part of another
        assert set(output) <= {ord("x"), 0}  # the bytes cut from under a frame read as zeros
        announced = [protocol.fields(payload) for kind, _, payload in frames if kind == protocol.OUTPUT_FILE]
        assert announced == [{"stream": 1, "path": str(kept[0])}]
    finally:
        agent.close()
