"""The server's end of an agent's stream: processes started and driven through the agent in a box.

A backend supplies a ``Channel`` (for Docker, the socket of the one exec that runs the agent) and gets
back an ``AgentConnection`` that starts processes and hands out a ``ProcessHandle`` for each. Output
frames go straight into the process's record on the event loop; requests wait (bounded) for their
answer.

The stream comes from inside the box, so it is read as hostile: a frame is taken only where the agent
may send it (for a channel, a request or a tunnel the server opened, a BYE only once the server asked
it to shut down, at most MAX_PAYLOAD bytes, at most protocol.MAX_TUNNELS tunnels). Anything else is a
protocol error, and a protocol error, like the end of the stream, loses the agent: the server closes
its stream (an agent that still runs then ends every process and exits), every process it ran is
reported ended with ``ended_by`` "lost", and the backend's ``on_lost`` makes sure of the rest (in
Docker, it kills the agent and what is left of its processes through the engine) and starts a new
agent for the next spawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import select
import socket
import struct
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib import resources
from typing import Any

import anyio

from ..core.contract import LaunchSpec, ProcessSink
from ..core.handle import InputWanted, ProcessHandle, SharedAnswer, TreeRoot
from ..core.models import CPU_GRACE_S, TERMINAL_COLS, TERMINAL_ROWS, ProcessLimits
from ..core.stats import TreeSample
from ..core.streams import STDIN_WRITE_TIMEOUT_S, wait_writable
from ..errors import InvalidInput, KillFailed, SpawnFailed, StdinFailed
from . import proc, protocol

logger = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
"""How long the agent may take to start (a Python interpreter in a loaded container) and say hello."""
REQUEST_TIMEOUT_S = 10.0
"""Bound on waiting for the agent to answer a spawn or a signal; it answers in milliseconds."""
SEND_TIMEOUT_S = 10.0
"""Bound on waiting for room in the stream; the agent reads it whatever its processes do."""
SHUTDOWN_TIMEOUT_S = 5.0
"""How long shutdown waits for the agent to end its processes and say BYE."""
OUTPUT_FILE = re.compile(r"/tmp/process-mcp-[0-9]+-[0-9]+(?:-[0-9a-f]{8})?/(?P<name>[a-z0-9-]+?)(?:-[0-9a-f]{8})?")
"""An output file's path in the box (``outfiles``): the agent's directory, the process id (suffixed when the
name was taken), and .out or .err."""
_CGROUP_NAME = re.compile(r"[a-z0-9]{1,32}")
"""The form of a name of a process's group below its box's (``host.cgroups``), as KEPT names it."""
FILE_READ_MAX = 1024 * 1024
"""Most bytes of an output file one READ_FILE asks for."""
INPUT_CHUNK = 64 * 1024
"""Largest input frame; longer input goes in several, each acknowledged."""
SHIPPED = (
    ("protocol.py", "process_mcp_box_protocol"),
    ("proc.py", "process_mcp_box_proc"),
    ("confine.py", "process_mcp_box_confine"),
    ("supervisor.py", "process_mcp_box_supervisor"),
    ("spares.py", "process_mcp_box_spares"),
    ("tunnels.py", "process_mcp_box_tunnels"),
    ("outfiles.py", "process_mcp_box_outfiles"),
    ("probes.py", "process_mcp_box_probes"),
    ("agent.py", "process_mcp_box_agent"),
)
"""What is sent into a box, in order, and the name each module is imported by there (they are sent, not
installed): the protocol, the /proc reading the agent shares with this side, what confines a process
in a long-lived box, the zygote and supervisors, the spare supervisors, the tunnels to the egress proxy,
the files that keep each output whole, the probes of the box's ports, and the agent itself, whose ``main`` the loader
runs. Each is imported only after those it imports."""

AGENT_NAME = "process-mcp-agent"
"""The agent's first argument after the bootstrap, by which `ps` in the box names the agent, its zygote
and its supervisors."""

# Run as `python3 -I -S -c BOOTSTRAP process-mcp-agent [USER]` with the stream on stdin and stdout. Short,
# since `ps` in the box shows it for the agent, its zygote and every supervisor: it runs one line it reads
# from the stream, the loader (see ``bootstrap_payload``).
BOOTSTRAP = "import sys;exec(sys.stdin.buffer.readline())"
# Read from the stream by the bootstrap, as one line. First it makes itself not dumpable (before it reads
# anything more: no process of its user may then trace it or open its descriptors). Then it reads the
# length-prefixed modules (``SHIPPED``: the agent last) through the same buffered reader (the line's read
# may have taken the start of them; nothing follows them until the agent's HELLO), and runs the agent
# (which, run as root, drops to USER for each command). Python 3.0-3.7 run it too, and say why they
# cannot run the agent.
_LOADER = f"""
import sys, types
try:
    import ctypes
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
except Exception:
    pass
if sys.version_info < (3, 8):
    sys.stderr.write("process-mcp agent: Python %d.%d is older than 3.8\\n" % sys.version_info[:2])
    sys.exit(3)
def take(n):
    data = sys.stdin.buffer.read(n)
    if len(data) < n:
        sys.exit(4)
    return data
def load(name):
    module = types.ModuleType(name)
    exec(compile(take(int(take(10))), "<" + name + ">", "exec"), module.__dict__)
    sys.modules[name] = module
    return module
for name in {[name for _, name in SHIPPED]!r}[:-1]:
    load(name)
sys.exit(load("{SHIPPED[-1][1]}").main(sys.argv[2:]))
"""


def bootstrap_payload() -> bytes:
    """What the bootstrap reads from the stream: the loader as one line, then the modules ``SHIPPED``
    names, each with its length."""
    payload = f"exec(compile({_LOADER!r}, '<loader>', 'exec'))\n".encode()
    for name, _ in SHIPPED:
        source = resources.files(__package__).joinpath(name).read_bytes()
        payload += b"%010d" % len(source) + source
    return payload


class AgentUnavailable(Exception):
    """The agent could not be started or stopped answering; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Channel(ABC):
    """A non-blocking byte stream to an agent, whose descriptor the event loop watches."""

    @property
    @abstractmethod
    def read_fd(self) -> int:
        """The descriptor to wait on until the agent has written something."""

    @property
    @abstractmethod
    def write_fd(self) -> int:
        """The descriptor to wait on until the stream has room (may be ``read_fd``)."""

    @abstractmethod
    def receive(self) -> Sequence[bytes | memoryview] | None:
        """What the agent wrote since the last call, in pieces: None when there is nothing yet. Raises
        EOFError at the end of the stream."""

    @abstractmethod
    def send(self, data: memoryview) -> int:
        """Write without blocking and return how much was written; raise BlockingIOError when full."""

    @abstractmethod
    def close(self) -> None:
        """Close the stream; the agent sees its end."""


ProxyConnector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
"""Opens a connection to the server's domain proxy, for one tunnel."""


class AgentConnection:
    """One running agent: start it with ``connect``, then ``spawn`` processes through it."""

    def __init__(self, channel: Channel, name: str, on_lost: Callable[[AgentConnection], None] | None = None) -> None:
        self.name = name
        self.same_pids = False
        """Whether the box's pids are this machine's (the agent runs here), so /proc can be read for stats."""
        self.same_network = False
        """Whether the box's loopback is this machine's, so a port in the box is reached here as it is."""
        self.on_kept: Callable[[str], None] | None = None
        """Told the name of each cgroup in which the agent says it keeps a supervisor (KEPT)."""
        self._last_forward = protocol.FORWARD_BASE - 1  # the server numbers forwards upwards from FORWARD_BASE
        self._ports = SharedAnswer(self._ask_ports)
        self.hello: dict[str, Any] = {}
        self._channel = channel
        self._fd = channel.read_fd
        self._loop = asyncio.get_running_loop()
        self._decoder = protocol.StreamDecoder()
        self._processes: dict[int, AgentProcess] = {}
        self._waiters: dict[tuple[int, int, int], asyncio.Future[dict[str, Any]]] = {}
        self._seq_issued = 0
        self._first_channel = 0  # the process channels this agent was asked to start lie from here ...
        self._last_channel = 0  # ... to here (0: none yet)
        self._last_tunnel = protocol.TUNNEL_BASE - 1  # the agent numbers its tunnels upwards from TUNNEL_BASE
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._on_lost = on_lost
        self._proxy: ProxyConnector | None = None
        self._tunnels: dict[int, _Tunnel] = {}
        self._lost: str | None = None
        self._shutdown_sent = False
        self._stopped = SharedAnswer(self._question_stopped)
        self._said_bye = False
        self._closed = False
        self._unanswered: set[asyncio.Task[None]] = set()  # frames sent without waiting (FORGET_FILES)
        self._reading = True
        self._channel_open = True
        self._loop.add_reader(self._fd, self._on_readable)

    @property
    def alive(self) -> bool:
        return self._lost is None and not self._closed

    def send_later(self, frame: bytes) -> None:
        """Send ``frame`` from a task: for a frame that nothing answers, from code that cannot wait."""

        async def send() -> None:
            with contextlib.suppress(AgentUnavailable):
                await self._send(frame)

        task = asyncio.ensure_future(send())
        self._unanswered.add(task)
        task.add_done_callback(self._unanswered.discard)

    @property
    def last_channel(self) -> int:
        """The highest process channel (the N of the record's ``<prefix>-N``) this agent was asked to start."""
        return self._last_channel

    async def connect(self, payload: bytes) -> dict[str, Any]:
        """Send the bootstrap ``payload`` and wait for the agent's hello; raise AgentUnavailable."""
        hello = self._expect(protocol.HELLO, 0, 0)
        await self._send(payload)
        self.hello = await self._answer(hello, HELLO_TIMEOUT_S, "start")
        if self.hello.get("version") != protocol.VERSION:
            raise AgentUnavailable(f"the agent speaks protocol {self.hello.get('version')}, not {protocol.VERSION}")
        return self.hello

    async def spawn(
        self,
        spec: LaunchSpec,
        sink: ProcessSink,
        env: dict[str, str],
        *,
        inherit: bool,
        workdir: str,
        where: str = "",
        confine: dict[str, Any] | None = None,
    ) -> AgentProcess:
        """Start ``spec.command`` in ``spec.cwd`` as ``spec``'s process, reporting into ``sink``. With
        ``inherit``, ``env`` is set over the agent's own environment, else it is the whole environment.
        ``confine`` is the plan the process is confined by as it starts, in a box (``confine``).
        Raises InvalidInput for a missing cwd (naming ``workdir``), SpawnFailed otherwise; ``where``
        (e.g. " in the container") goes into both messages."""
        number = int(spec.pid.rpartition("-")[2])
        process = AgentProcess(self, number, sink)
        self._processes[number] = process
        self._first_channel = min(self._first_channel or number, number)
        self._last_channel = max(self._last_channel, number)
        started = self._expect(protocol.STARTED, number, 0)
        request = {
            "command": spec.command,
            "cwd": spec.cwd,
            "env": env,
            "inherit": inherit,
            "tty": spec.tty,
            "cols": TERMINAL_COLS,
            "rows": TERMINAL_ROWS,
        }
        if spec.limits is not None:
            request["rlimits"] = rlimits(spec.limits)
        if spec.file_room > 0:
            files = {"1": f"{spec.pid}.out"}
            if not spec.tty:
                files["2"] = f"{spec.pid}.err"
            request["files"] = files
            request["file_room"] = spec.file_room
        if confine is not None:
            request["confine"] = confine
        try:
            await self._send(protocol.message(protocol.SPAWN, number, **request))
            answer = await self._answer(started, REQUEST_TIMEOUT_S, "spawn")
        except AgentUnavailable as exc:
            process.detach()
            raise SpawnFailed(f"could not start {spec.command!r}{where}: {exc.reason}") from None
        except BaseException:
            process.detach()
            raise
        if answer.get("error") == "nocwd":
            process.detach()
            raise InvalidInput(
                f"cwd {spec.cwd!r} does not exist or is not a directory{where}; pass an existing directory "
                f"or omit cwd to use {workdir}"
            )
        if answer.get("error") == "confine":
            process.detach()
            raise SpawnFailed(
                f"the sandbox could not protect what it must before {spec.command!r} ran: {answer.get('message')}"
            )
        if "error" in answer:
            process.detach()
            raise SpawnFailed(f"could not start {spec.command!r}{where}: {answer.get('message') or answer['error']}")
        return process

    async def serve_proxy(self, port: int, connect: ProxyConnector) -> None:
        """Have the agent listen on 127.0.0.1:``port`` in the box and carry each connection to a
        connection ``connect`` opens (the server's domain proxy). Raises AgentUnavailable."""
        self._proxy = connect
        await self._send(protocol.message(protocol.PROXY, 0, port=port))

    async def shutdown(self) -> None:
        """Ask the agent to end every process and exit, wait (bounded) for it, and close the stream."""
        if self.alive:
            bye = self._expect(protocol.BYE, 0, 0)
            with anyio.move_on_after(SHUTDOWN_TIMEOUT_S):
                try:
                    self._shutdown_sent = True
                    await self._send(protocol.frame(protocol.SHUTDOWN, 0))
                    await self._answer(bye, SHUTDOWN_TIMEOUT_S, "shut down")
                except AgentUnavailable as exc:
                    logger.warning("agent %s: %s", self.name, exc.reason)
        self.close()

    def close(self) -> None:
        """Close the stream (the agent, if it still runs, ends every process and exits); a process not
        reported ended yet reads as ended by "lost" unless something had moved to end it."""
        if self._closed:
            return
        self._closed = True
        self._close_channel()
        self._end_all("the server closed the agent's stream", lost=False)

    async def stopped_channels(self) -> frozenset[int] | None:
        """The channels of the processes that are stopped, as the agent reads its box's /proc: one
        question for them all, whose answer the callers meanwhile and for STOPPED_FRESH_S after share
        (the rows of one ps); None when it cannot be told."""
        return await self._stopped.get()

    async def _question_stopped(self) -> frozenset[int] | None:
        seq = self.next_seq()
        answer = self._expect(protocol.STOPPED, 0, seq)
        try:
            await self._send(protocol.message(protocol.ASK_STOPPED, 0, seq=seq))
            fields = await self._answer(answer, REQUEST_TIMEOUT_S, "question")
        except AgentUnavailable:
            return None
        channels = fields.get("stopped")
        return frozenset(c for c in channels if type(c) is int) if isinstance(channels, list) else None

    async def listening_ports(self) -> dict[int, list[int]] | None:
        """The ports each process's tree listens on in the box (by process channel), as the agent reads its
        network tables: one question for every caller meanwhile and for STOPPED_FRESH_S after (the rows of
        one ps); None when it cannot be told."""
        return await self._ports.get()

    async def _ask_ports(self) -> dict[int, list[int]] | None:
        seq = self.next_seq()
        answer = self._expect(protocol.PORTS, 0, seq)
        try:
            await self._send(protocol.message(protocol.LIST_PORTS, 0, seq=seq))
            fields = await self._answer(answer, REQUEST_TIMEOUT_S, "list ports")
        except AgentUnavailable:
            return None
        found = fields.get("ports")
        ports: dict[int, list[int]] = {}
        for channel, listed in list(found.items() if isinstance(found, dict) else ())[:4096]:
            if isinstance(channel, str) and channel.isdigit() and isinstance(listed, list):
                ports[int(channel)] = [p for p in listed[:64] if type(p) is int and 0 < p < 65536]
        return ports if isinstance(found, dict) else None

    async def forward(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Carry the connection (``reader``, ``writer``) to loopback ``port`` in the box, through the agent.
        Raises AgentUnavailable."""
        if len(self._tunnels) >= protocol.MAX_TUNNELS:
            writer.close()
            return
        self._last_forward += 1
        channel = self._last_forward

        async def connected() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return reader, writer

        self._tunnels[channel] = _Tunnel(self, channel, connected)
        await self._send(protocol.message(protocol.FORWARD, channel, port=port))

    def next_seq(self) -> int:
        """A sequence number for a request whose answer the agent numbers the same way."""
        self._seq_issued += 1
        return self._seq_issued

    # Requests and answers.

    def _expect(self, kind: int, channel: int, seq: int) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._waiters[kind, channel, seq] = future
        return future

    async def _answer(self, future: asyncio.Future[dict[str, Any]], timeout_s: float, what: str) -> dict[str, Any]:
        if self._lost is not None:
            raise AgentUnavailable(self._lost)
        with anyio.move_on_after(timeout_s):
            return await future
        # It answers in milliseconds whatever its processes do: one that does not is stopped or wedged,
        # and would fail every later request the same way.
        self._lose(f"the agent did not answer a {what} within {timeout_s:g} s")
        raise AgentUnavailable(self._lost or f"the agent did not answer a {what} within {timeout_s:g} s")

    async def _send(self, data: bytes) -> None:
        if self._lost is not None or self._closed:
            raise AgentUnavailable(self._lost or "the agent's stream is closed")
        # The lock is taken without a yield when free (most sends), and most frames fit the pipe at once:
        # the timeout's scope is made only for a frame that has to wait.
        async with self._send_lock:
            view = self._write_some(memoryview(data))
            if not view:
                return
            with anyio.move_on_after(SEND_TIMEOUT_S):
                while view:
                    await wait_writable(self._channel.write_fd)
                    view = self._write_some(view)
                return
        self._lose(f"the agent did not read its stream for {SEND_TIMEOUT_S:g} s")
        raise AgentUnavailable(self._lost or "")

    def _write_some(self, view: memoryview) -> memoryview:
        """What is left of ``view`` once the stream took what it could without waiting."""
        if not self._channel_open:
            raise AgentUnavailable(self._lost or "the agent's stream is closed")
        try:
            return view[self._channel.send(view) :]
        except BlockingIOError:
            return view
        except OSError as exc:
            self._lose(f"writing to the agent failed: {exc}")
            raise AgentUnavailable(self._lost or str(exc)) from None

    def _on_readable(self) -> None:
        try:
            pieces = self._channel.receive()
        except EOFError:
            self._lose("the agent's stream ended")
            return
        except OSError as exc:
            self._lose(f"reading from the agent failed: {exc}")
            return
        self.feed(pieces or ())

    def feed(self, pieces: Iterable[bytes | memoryview]) -> None:
        """Act on what the agent wrote (what the channel read): the frames it holds, in order, until a
        frame the agent may not send, which loses the agent. Called by the reader; tests call it to play
        a hostile agent."""
        for piece in pieces:
            try:
                for kind, channel, payload in self._decoder.feed(piece):
                    if not self._reading:
                        return
                    self._dispatch(kind, channel, payload)
            except protocol.ProtocolError as exc:
                self._lose(f"the agent broke the protocol: {exc}")
                return
            if not self._reading:
                return

    def _dispatch(self, kind: int, channel: int, payload: bytes | memoryview) -> None:
        """Act on one frame; output arrives in pieces, views that are valid only during this call.
        Raises ProtocolError for a frame the agent may not send."""
        if not self.hello and kind != protocol.HELLO:
            raise protocol.ProtocolError(f"its first frame is of kind {kind}, not HELLO")
        if channel >= protocol.TUNNEL_BASE:
            self._tunnel_frame(kind, channel, payload)
        elif channel == 0:
            self._agent_frame(kind, payload)
        elif not self._first_channel <= channel <= self._last_channel or not self._first_channel:
            raise protocol.ProtocolError(f"a frame of kind {kind} for process {channel}, which it was never asked for")
        else:
            self._process_frame(kind, channel, payload)

    def _agent_frame(self, kind: int, payload: bytes | memoryview) -> None:
        if kind == protocol.HELLO and not self.hello:
            hello = protocol.fields(bytes(payload))
            _number(hello, "pid", 1, 2**31)
            _number(hello, "started", 0, 2**63)
            self.hello = hello
            self._resolve(protocol.HELLO, 0, 0, hello)
        elif kind == protocol.BYE and self._shutdown_sent and not self._said_bye:
            self._said_bye = True
            self._resolve(protocol.BYE, 0, 0, {})
        elif kind == protocol.BYE:
            raise protocol.ProtocolError("it said BYE, but the server had not asked it to shut down")
        elif kind in (protocol.STOPPED, protocol.PORTS):
            answer = protocol.fields(bytes(payload))
            self._resolve(kind, 0, _number(answer, "seq", 1, self._seq_issued), answer)
        elif kind == protocol.KEPT:
            name = protocol.fields(bytes(payload)).get("cgroup")
            if not isinstance(name, str) or not _CGROUP_NAME.fullmatch(name):
                raise protocol.ProtocolError(f"it kept a supervisor in {str(name)[:32]!r}, not a group's name")
            if self.on_kept is not None:
                self.on_kept(name)
        else:
            raise protocol.ProtocolError(f"a frame of kind {kind} for the agent itself")

    def _process_frame(self, kind: int, channel: int, payload: bytes | memoryview) -> None:
        process = self._processes.get(channel)  # None: one the server let go of, whose late frames are dropped
        if kind == protocol.STDOUT or kind == protocol.STDERR:
            stream = 1 if kind == protocol.STDOUT else 2
            if process is not None:
                if stream not in process.open_streams:
                    raise protocol.ProtocolError(f"output on stream {stream} of process {channel}, which is closed")
                (process.record.stdout if stream == 1 else process.record.stderr).append(payload)
            return
        if kind == protocol.CLOSED:
            closed = {b"1": 1, b"2": 2}.get(bytes(payload))
            if closed is None:
                raise protocol.ProtocolError(f"process {channel} closed stream {bytes(payload)[:16]!r}")
            if process is not None:
                if closed not in process.open_streams:
                    raise protocol.ProtocolError(f"process {channel} closed stream {closed}, which is closed")
                process.stream_closed(closed)
            return
        if kind == protocol.FILE_BYTES:
            if len(payload) < protocol.COUNT.size:
                raise protocol.ProtocolError(f"file bytes for process {channel} without a sequence number")
            seq = protocol.COUNT.unpack(payload[: protocol.COUNT.size])[0]
            if not 1 <= seq <= self._seq_issued:
                raise protocol.ProtocolError(f"file bytes for process {channel} answer {seq}, which was never asked")
            self._resolve(kind, channel, seq, {"data": bytes(payload[protocol.COUNT.size :])})
            return
        answer = protocol.fields(bytes(payload)) if payload else {}
        if kind == protocol.STARTED:
            self._started(channel, process, answer)
        elif kind == protocol.OUTPUT_FILE:
            if process is not None:
                stream, path = _output_file(answer, process)
                process.files[stream] = path
        elif kind == protocol.EXITED:
            self._exited(channel, process, answer)
        elif kind in (protocol.WRITTEN, protocol.SIGNALLED, protocol.SAMPLED, protocol.INPUT_STATE, protocol.PROBED):
            seq = _number(answer, "seq", 1, self._seq_issued)
            self._resolve(kind, channel, seq, answer)  # none waits: an answer that came too late
        else:
            raise protocol.ProtocolError(f"a frame of kind {kind} for process {channel}")

    def _started(self, channel: int, process: AgentProcess | None, answer: dict[str, Any]) -> None:
        if (protocol.STARTED, channel, 0) not in self._waiters:
            if process is not None:
                raise protocol.ProtocolError(f"it said process {channel} started, which it had said already")
            return  # a spawn that stopped waiting for it
        if "error" in answer:
            if not isinstance(answer["error"], str):
                raise protocol.ProtocolError(f"process {channel} failed to start with error {answer['error']!r}")
        elif process is not None:
            process.leader = _number(answer, "pid", 1, 2**31)
        self._resolve(protocol.STARTED, channel, 0, answer)

    def _exited(self, channel: int, process: AgentProcess | None, answer: dict[str, Any]) -> None:
        if process is None:
            return
        if not process.leader:
            if (protocol.STARTED, channel, 0) not in self._waiters:
                raise protocol.ProtocolError(f"it said process {channel} exited, which never started")
            # Its supervisor ended before it started the command (it was killed): the spawn failed.
            self._resolve(protocol.STARTED, channel, 0, {"error": "spawn", "message": "its supervisor ended"})
            return
        if process.has_exited:
            raise protocol.ProtocolError(f"it said process {channel} exited, which it had said already")
        if "signal" in answer:
            _number(answer, "signal", 1, 64)
        elif "code" in answer:
            _number(answer, "code", 0, 255)
        elif answer.get("lost", True) is not True:
            raise protocol.ProtocolError(f"process {channel} exited with lost={str(answer['lost'])[:16]!r}")
        process.exited(answer)

    def _resolve(self, kind: int, channel: int, seq: int, answer: dict[str, Any]) -> None:
        future = self._waiters.pop((kind, channel, seq), None)
        if future is not None and not future.done():
            future.set_result(answer)

    def _tunnel_frame(self, kind: int, channel: int, payload: bytes | memoryview) -> None:
        if channel >= protocol.FORWARD_BASE:  # the server's own: never opened by the agent
            if kind == protocol.TUNNEL_OPEN or channel > self._last_forward:
                raise protocol.ProtocolError(f"a frame of kind {kind} for forward {channel}, which it never got")
        elif kind == protocol.TUNNEL_OPEN:
            if self._proxy is None:
                raise protocol.ProtocolError(f"it opened tunnel {channel}, but the server asked for no proxy")
            if channel <= self._last_tunnel:
                raise protocol.ProtocolError(f"it opened tunnel {channel} again, or out of order")
            if len(self._tunnels) >= protocol.MAX_TUNNELS:
                raise protocol.ProtocolError(f"it opened more than {protocol.MAX_TUNNELS} tunnels at once")
            self._last_tunnel = channel
            self._tunnels[channel] = _Tunnel(self, channel, self._proxy)
            return
        if kind not in (protocol.TUNNEL_DATA, protocol.TUNNEL_ACK, protocol.TUNNEL_CLOSE):
            raise protocol.ProtocolError(f"a frame of kind {kind} for tunnel {channel}")
        if self._last_tunnel < channel < protocol.FORWARD_BASE:
            raise protocol.ProtocolError(f"a frame for tunnel {channel}, which it never opened")
        tunnel = self._tunnels.get(channel)
        if tunnel is None:
            return  # ended here already
        if kind == protocol.TUNNEL_DATA:
            tunnel.received(bytes(payload))
        elif kind == protocol.TUNNEL_ACK:
            if len(payload) != protocol.COUNT.size:
                raise protocol.ProtocolError(f"an acknowledgement of {len(payload)} bytes for tunnel {channel}")
            tunnel.acknowledged(protocol.COUNT.unpack(payload)[0])
        else:
            tunnel.received(None)
            self._forget_tunnel_if_done(tunnel)

    def _forget_tunnel_if_done(self, tunnel: _Tunnel) -> None:
        """A tunnel counts against MAX_TUNNELS until each side has closed it and seen the other's close,
        as the agent counts it."""
        if tunnel.agent_closed and tunnel.close_sent and self._tunnels.get(tunnel.channel) is tunnel:
            del self._tunnels[tunnel.channel]

    # Losing the agent.

    def _lose(self, reason: str) -> None:
        if self._lost is not None or self._closed:
            return
        self._lost = reason
        if self._said_bye:  # the agent ended as asked; close() follows
            self._stop_reading()
            return
        logger.warning("agent %s: %s; it is dropped and its processes are ended", self.name, reason)
        self._close_channel()  # an agent that still runs sees its input end: it ends every process and exits
        self._end_all(reason, lost=True)
        if self._on_lost is not None:
            self._on_lost(self)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _close_channel(self) -> None:
        self._stop_reading()
        if self._channel_open:
            self._channel_open = False
            self._channel.close()

    def _end_all(self, reason: str, *, lost: bool) -> None:
        for tunnel in list(self._tunnels.values()):
            tunnel.cancel()
        self._tunnels.clear()
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(AgentUnavailable(reason))
        self._waiters.clear()
        for process in list(self._processes.values()):
            process.lost(override=lost)


def _output_file(answer: dict[str, Any], process: AgentProcess) -> tuple[int, str]:
    """The stream and path of an OUTPUT_FILE frame: a stream the process has and no file for yet, at the
    path asked for or that path with a suffix (``outfiles.make``)."""
    stream, path = answer.get("stream"), str(answer.get("path"))
    found = OUTPUT_FILE.fullmatch(path[:-4]) if len(path) < 256 else None
    if (
        not isinstance(stream, int)
        or isinstance(stream, bool)
        or stream not in ((1,) if process.record.tty else (1, 2))
        or stream in process.files
        or found is None
        or found.group("name") != process.record.pid
        or not path.endswith(".out" if stream == 1 else ".err")
    ):
        raise protocol.ProtocolError(f"process {process.number} made an output file {str(answer)[:80]!r}")
    return stream, path


def _number(fields: dict[str, Any], name: str, low: int, high: int) -> int:
    """The integer ``fields[name]``, which must lie from ``low`` to ``high``; else a ProtocolError."""
    value = fields.get(name)
    if type(value) is not int or not low <= value <= high:
        raise protocol.ProtocolError(f"{name} is {str(value)[:32]!r}, not a whole number from {low} to {high}")
    return value


def rlimits(limits: ProcessLimits) -> dict[str, list[int]]:
    """The resource limits (soft, hard) the agent's supervisor sets before it starts the command.

    Not RLIMIT_NPROC: it counts every process of the user (the agent's, other spawns', the server's
    own when run locally), not this tree; the executor ends a tree that reaches its processes limit,
    and the box's own pids limit bounds the moments between its measurements.
    """
    found: dict[str, list[int]] = {}
    if limits.cpu_seconds is not None:
        found["cpu"] = [limits.cpu_seconds, limits.cpu_seconds + CPU_GRACE_S]
    if limits.memory_mb is not None:
        found["data"] = [limits.memory_mb * 1024 * 1024] * 2
    return found


class AgentProcess(ProcessHandle):
    """One process run by the agent."""

    def __init__(self, connection: AgentConnection, number: int, record: ProcessSink) -> None:
        self.connection = connection
        self.number = number
        self.record = record
        self.leader = 0  # its pid in the box, once started
        self.open_streams = {1} if record.tty else {1, 2}
        """The output streams the agent has not closed yet (1 stdout, 2 stderr)."""
        self.has_exited = False
        self.files: dict[int, str] = {}
        """The output files in the box (``outfiles``): stream number -> path."""
        self._forwards: dict[int, asyncio.Server] = {}  # port in the box -> its listener here
        self.bases = {1: record.stdout.total, 2: record.stderr.total}
        """Where in each stream its file starts: a process started again in its record (a restart) has
        files of its own, from where the stream stood then."""
        self._state: proc.StateReader | None = None  # its /proc/PID/stat, where the box's pids are ours
        for _ in self.open_streams:
            record.stream_opened()

    def tree_root(self) -> TreeRoot | None:
        if not self.connection.same_pids or not self.leader:
            return None
        # Its supervisor, a subreaper, holds the leader and whatever escaped from it; itself not counted.
        try:
            with open(f"/proc/{self.leader}/stat", "rb") as file:
                parent = int(file.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return TreeRoot(parent, included=False)

    def stream_closed(self, stream: int) -> None:
        if stream in self.open_streams:
            self.open_streams.discard(stream)
            self.record.stream_closed()

    def exited(self, answer: dict[str, Any]) -> None:
        if self.has_exited:
            return
        self.has_exited = True
        self._close_forwards()
        if "signal" in answer:
            self.record.finish(None, int(answer["signal"]))
        elif answer.get("lost"):  # its supervisor was killed; the agent ended what was left of its tree
            self.record.finish(None, cause="lost")
        else:
            self.record.finish(answer.get("code"))

    def lost(self, *, override: bool) -> None:
        """The agent is gone, and with it this process (its supervisor kills the tree; the backend makes
        sure). It reads as ended by "lost": with ``override`` (the agent was lost) whatever had moved to
        end it, else (the server closed the stream) only if nothing had."""
        for stream in list(self.open_streams):
            self.stream_closed(stream)
        self._close_forwards()
        if not self.has_exited:
            self.has_exited = True
            if override:
                self.record.finish(None, cause="lost")
            else:
                self.record.ending("lost")
                self.record.finish(None)
        self.detach()

    def detach(self) -> None:
        if self.connection._processes.get(self.number) is self:
            del self.connection._processes[self.number]

    async def write(self, data: bytes) -> None:
        pid = self.record.pid
        with anyio.move_on_after(STDIN_WRITE_TIMEOUT_S):
            for start in range(0, len(data), INPUT_CHUNK) if data else ():
                seq = self.connection.next_seq()
                written = self.connection._expect(protocol.WRITTEN, self.number, seq)
                chunk = struct.pack(">I", seq) + data[start : start + INPUT_CHUNK]
                try:
                    await self.connection._send(protocol.frame(protocol.INPUT, self.number, chunk))
                    answer = await written
                except AgentUnavailable as exc:
                    raise StdinFailed(f"{pid} no longer accepts input ({exc.reason})") from None
                if "error" in answer:
                    raise StdinFailed(
                        f"{pid} no longer accepts input ({answer['error']}); call stdout to see what it printed"
                    )
            return
        raise StdinFailed(
            f"{pid} is not reading its input (not all of {len(data)} bytes were taken after "
            f"{STDIN_WRITE_TIMEOUT_S:g} s); call stdout to see what it is doing"
        )

    async def end_input(self) -> None:
        pid, connection = self.record.pid, self.connection
        seq = connection.next_seq()
        written = connection._expect(protocol.WRITTEN, self.number, seq)
        with anyio.move_on_after(STDIN_WRITE_TIMEOUT_S):
            try:
                await connection._send(protocol.message(protocol.END_INPUT, self.number, seq=seq))
                answer = await written
            except AgentUnavailable as exc:
                raise StdinFailed(f"{pid} no longer accepts input ({exc.reason})") from None
            if "error" in answer:
                raise StdinFailed(f"{pid}'s input is closed already ({answer['error']})")
            return
        raise StdinFailed(
            f"{pid} is not reading its input (what was sent before its end was not taken after "
            f"{STDIN_WRITE_TIMEOUT_S:g} s); call stdout to see what it is doing"
        )

    async def signal(self, signum: int) -> None:
        connection = self.connection
        if not connection.alive:
            return  # the agent is gone, and its processes with it
        seq = connection.next_seq()
        answer = connection._expect(protocol.SIGNALLED, self.number, seq)
        try:
            await connection._send(protocol.message(protocol.SIGNAL, self.number, seq=seq, signal=int(signum)))
            await connection._answer(answer, REQUEST_TIMEOUT_S, "signal")
        except AgentUnavailable as exc:
            raise KillFailed(f"could not signal {self.record.pid}: {exc.reason}") from None

    async def sample(self) -> TreeSample | None:
        """What its tree uses, added up by the agent in the box (for a box whose /proc is not ours)."""
        connection = self.connection
        if connection.same_pids or not connection.alive or not self.leader:
            return None
        fields = await self._ask(protocol.SAMPLE, protocol.SAMPLED, "sample")
        return None if fields is None else TreeSample.of(fields)

    async def wants_input(self) -> InputWanted | None:
        if not self.connection.alive or not self.leader or self.has_exited:
            return None
        fields = await self._ask(protocol.ASK_INPUT, protocol.INPUT_STATE, "say whether it waits for input")
        wanted = None if fields is None else fields.get("wanted")
        return wanted if wanted in ("input", "secret") else None  # anything else the box says means nothing

    async def _ask(self, kind: int, answer_kind: int, what: str) -> dict[str, Any] | None:
        """Ask the agent ``kind`` about this process and wait (bounded) for its ``answer_kind``: its
        fields, or None once the agent is gone."""
        connection = self.connection
        seq = connection.next_seq()
        answer = connection._expect(answer_kind, self.number, seq)
        try:
            await connection._send(protocol.message(kind, self.number, seq=seq))
            return await connection._answer(answer, REQUEST_TIMEOUT_S, what)
        except AgentUnavailable:
            return None

    def read_sample(self) -> TreeSample | None:
        root = self.tree_root()
        return None if root is None else TreeSample.of(proc.sample_tree(root.pid, include_root=root.included))

    def read_stopped(self) -> bool | None:
        if not self.connection.same_pids or not self.leader or self.has_exited:
            return None
        if self._state is None:
            self._state = proc.StateReader(self.leader)
        return self._state.stopped()

    async def stopped(self) -> bool | None:
        """Whether it is stopped, as the agent in the box reads its /proc (for a box whose /proc is not ours)."""
        connection = self.connection
        if connection.same_pids or not connection.alive or not self.leader or self.has_exited:
            return None
        stopped = await connection.stopped_channels()
        return None if stopped is None else self.number in stopped

    async def resize(self, cols: int, rows: int) -> None:
        """Resize the process's terminal (its foreground group gets SIGWINCH)."""
        await self.connection._send(protocol.message(protocol.RESIZE, self.number, cols=cols, rows=rows))

    def output_file(self, stream: int) -> str | None:
        return self.files.get(stream)

    async def ports(self) -> list[int] | None:
        if not self.connection.alive or not self.leader or self.has_exited:
            return None
        listening = await self.connection.listening_ports()
        return None if listening is None else listening.get(self.number, [])

    async def port_url(self, port: int) -> str | None:
        connection = self.connection
        if connection.same_network:
            return f"http://127.0.0.1:{port}/"
        forward = self._forwards.get(port)
        if forward is None:
            # A listener on this machine's loopback, each connection carried by the agent to the port in
            # the box: opened at the first listing, closed with the process.

            async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                if not connection.alive or self.has_exited:
                    writer.close()
                    return
                try:
                    await connection.forward(port, reader, writer)
                except AgentUnavailable:
                    writer.close()

            try:
                forward = await asyncio.start_server(carry, "127.0.0.1", 0)
            except OSError as exc:
                logger.warning("could not forward port %d of %s: %s", port, self.record.pid, exc)
                return None
            self._forwards[port] = forward
            logger.info(
                "%s: port %d forwarded from 127.0.0.1:%d", self.record.pid, port, forward.sockets[0].getsockname()[1]
            )
        return f"http://127.0.0.1:{forward.sockets[0].getsockname()[1]}/"

    async def connect_port(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        connection = self.connection
        if not connection.alive or self.has_exited:
            return None
        if connection.same_network:
            try:
                return await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:  # a server on ::1 only (localhost resolving there first)
                return await asyncio.open_connection("::1", port)
        # One end of a socket pair is carried by the agent to the port in the box, the other is the caller's.
        ours, carried = socket.socketpair()
        try:
            reader, writer = await asyncio.open_connection(sock=carried)
        except BaseException:
            ours.close()
            carried.close()
            raise
        try:
            await connection.forward(port, reader, writer)
        except AgentUnavailable:
            writer.close()
            ours.close()
            return None
        return await asyncio.open_connection(sock=ours)

    async def probe(self, port: int, path: str | None, timeout_s: float) -> tuple[bool, str] | None:
        connection = self.connection
        if not connection.alive:
            return None
        seq = connection.next_seq()
        answer = connection._expect(protocol.PROBED, self.number, seq)
        request = protocol.message(protocol.PROBE, self.number, seq=seq, port=port, path=path, timeout_s=timeout_s)
        try:
            await connection._send(request)
            fields = await connection._answer(answer, REQUEST_TIMEOUT_S + timeout_s, "probe a port")
        except AgentUnavailable:
            return None
        if fields.get("ok") is True:
            return True, f"HTTP {fields['status']}" if isinstance(fields.get("status"), int) else "accepts connections"
        if isinstance(fields.get("status"), int):
            return False, f"answered HTTP {fields['status']}"
        return False, str(fields.get("error"))[:32]

    async def read_file(self, stream: int, offset: int, size: int) -> bytes | None:
        connection = self.connection
        if stream not in self.files or not connection.alive or offset < self.bases[stream]:
            return None
        offset -= self.bases[stream]
        data = b""
        while len(data) < size:  # in reads of at most FILE_READ_MAX, until the file ends
            asked = min(size - len(data), FILE_READ_MAX)
            seq = connection.next_seq()
            answer = connection._expect(protocol.FILE_BYTES, self.number, seq)
            request = protocol.message(
                protocol.READ_FILE, self.number, seq=seq, stream=stream, offset=offset + len(data), size=asked
            )
            try:
                await connection._send(request)
                got: bytes = (await connection._answer(answer, REQUEST_TIMEOUT_S, "read an output file"))["data"]
            except AgentUnavailable:
                return None
            data += got[:asked]
            if len(got) < asked:
                break
        return data

    def hand_over(self) -> None:
        self.files = {}  # the next process of this channel makes its own, in place of these
        self.close()

    def close(self) -> None:
        self._close_forwards()
        self.detach()
        if self._state is not None:
            self._state.close()
        if self.files and self.connection.alive:  # the files go with the record
            self.files = {}
            forget = protocol.frame(protocol.FORGET_FILES, self.number)
            self.connection.send_later(forget)

    def _close_forwards(self) -> None:
        """Stop forwarding to its ports: it has ended (connections already carried end with their ends)."""
        for forward in self._forwards.values():
            forward.close()
        self._forwards.clear()


class _Tunnel:
    """One connection a process in the box made to the proxy port, joined to a connection to the proxy.

    Each direction has a window of protocol.TUNNEL_WINDOW bytes: the agent sends no more until the
    server acknowledges what it wrote on, and the server likewise, so a tunnel holds at most that much
    at either end however fast or slow its two sides are.
    """

    def __init__(self, connection: AgentConnection, channel: int, connect: ProxyConnector) -> None:
        self._connection = connection
        self._incoming: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._queued = 0
        self._window = protocol.TUNNEL_WINDOW
        self._room = asyncio.Event()
        self._room.set()
        self.channel = channel
        self.close_sent = False
        self.agent_closed = False
        self._done = False  # the connection to the proxy is over: what the process sends is dropped
        self._task = asyncio.get_running_loop().create_task(self._run(connect))

    def received(self, data: bytes | None) -> None:
        """Bytes from the process (None: it sends no more). Raises ProtocolError for bytes beyond the
        window, or after the agent closed its side."""
        if self.agent_closed:
            raise protocol.ProtocolError(f"tunnel {self.channel} was closed by the agent already")
        if data is None:
            self.agent_closed = True
        else:
            self._queued += len(data)
            if self._queued > protocol.TUNNEL_WINDOW:
                raise protocol.ProtocolError(f"tunnel {self.channel} overran its window")
            if self._done:
                self._queued -= len(data)  # nobody will write it on; not acknowledged either
                return
        self._incoming.put_nowait(data)

    def acknowledged(self, count: int) -> None:
        """The agent wrote ``count`` more bytes to the process. Raises ProtocolError for more than was sent."""
        if self._window + count > protocol.TUNNEL_WINDOW:
            raise protocol.ProtocolError(f"tunnel {self.channel} acknowledged more than was sent")
        self._window += count
        self._room.set()

    def cancel(self) -> None:
        self._task.cancel()

    async def _run(self, connect: ProxyConnector) -> None:
        writer = None
        try:
            reader, writer = await connect()
            pumps = [
                asyncio.ensure_future(self._to_process(reader, writer)),
                asyncio.ensure_future(self._from_process(writer)),
            ]
            try:
                await asyncio.gather(*pumps)
            finally:
                for pump in pumps:
                    pump.cancel()
        except OSError as exc:  # the proxy refused or dropped the connection
            logger.debug("tunnel %d: %s", self.channel, exc)
        except AgentUnavailable:
            pass  # the agent is gone, and the process's end with it
        finally:
            self._done = True
            if writer is not None:
                writer.close()
            if not self.agent_closed and self._connection.alive:
                # Its end here is gone for good: the agent drops the process's end too.
                self.close_sent = True
                with contextlib.suppress(AgentUnavailable):
                    reset = protocol.frame(protocol.TUNNEL_CLOSE, self.channel, protocol.TUNNEL_RESET)
                    await self._connection._send(reset)
            await self._close_towards_process()

    async def _close_towards_process(self) -> None:
        if not self.close_sent and self._connection.alive:
            self.close_sent = True
            with contextlib.suppress(AgentUnavailable):
                await self._connection._send(protocol.frame(protocol.TUNNEL_CLOSE, self.channel))
            self._connection._forget_tunnel_if_done(self)

    async def _to_process(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await self._room.wait()
            data = await reader.read(min(self._window, 64 * 1024))
            if not data:
                if _hung_up(writer):  # closed, not only shut for writing: it takes nothing more either
                    raise ConnectionResetError("its end of the connection is closed")
                await self._close_towards_process()  # the proxy is done; the process may still send
                return
            self._window -= len(data)
            if self._window <= 0:
                self._room.clear()
            await self._connection._send(protocol.frame(protocol.TUNNEL_DATA, self.channel, data))

    async def _from_process(self, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await self._incoming.get()
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            self._queued -= len(data)
            ack = protocol.COUNT.pack(len(data))
            await self._connection._send(protocol.frame(protocol.TUNNEL_ACK, self.channel, ack))


def _hung_up(writer: asyncio.StreamWriter) -> bool:
    """Whether the peer of the socket under ``writer`` closed it entirely (a Unix socket pair says so; a
    TCP peer's close shows at the next write instead)."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(events & select.POLLHUP for _, events in poller.poll(0))
