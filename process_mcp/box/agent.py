"""The agent in the box: starts and drives processes for the server over one byte stream.

The server starts it with the stream on its stdin and stdout (in Docker, one exec running
``python3 -I -S -c <bootstrap> process-mcp-agent``, which reads this module and those it imports from
the stream) and then speaks ``protocol`` to it. It runs with whatever Python the box has: standard
library only, and syntax Python 3.8 parses. This module is the loop, the stream to the server and the
processes' input and output; the rest is split by job: ``supervisor`` (what runs in a supervisor),
``spares`` (supervisors kept ready), ``tunnels`` (connections to the server's egress proxy) and ``proc``
(the /proc walk).

Each process runs under a supervisor of its own, forked ahead of need by a zygote (``spares``):
once a process's whole tree is gone, its supervisor may run the next process (unless it set limits on
itself), so a start then costs no fork at all. The agent is a subreaper too, so the tree of a supervisor
that was killed falls to the agent, which kills what is left when its stream ends or the server asks it
to shut down. Trees are read from /proc by ``proc``, the same code the server uses on its own machine.

A process's exit goes to the server only after every byte its outputs held when its supervisor reported
the exit (all it wrote, and all its children that ended before it wrote): the server takes an exit to mean
its output has come. A pipe says how much it holds; a terminal is read until it is empty, or until
TERMINAL_HOLD bytes were taken. While the stream to the server is full, the exit waits with them.

Output is read only while the stream to the server has room (and less than OUT_HIGH bytes wait for
it): a flood then blocks its process as a full pipe would, and neither the agent nor the server grows.
Where Python has os.splice and the stream is a pipe, a flood moves from the process's pipe to the
stream in the kernel, behind a frame header sized with FIONREAD. Each wake-up reads one bounded chunk
per ready process, so a chatty process cannot starve another, and the agent reads the stream from the
server whatever its processes do.

Nothing a process does may reach the agent, its zygote or its supervisors, which are what keep the
server's view of every process true. They are not dumpable (PR_SET_DUMPABLE 0, set by the bootstrap before it
reads anything): a process of the same user can neither trace them nor open their
descriptors through /proc (their stream to the server, their stderr). Where the agent runs as root and
is told a user (the container the server made), each command runs as that user, dropped to it in a
child of its supervisor just before the command starts: its processes cannot signal them either. Where
the agent runs as the processes' own user, they can (see SECURITY.md).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import os
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import termios
import time
from typing import Any

try:
    from . import confine, outfiles, probes, proc, protocol, spares, supervisor, tunnels
except ImportError:  # in the box: the loader registered these under these names first
    import process_mcp_box_confine as confine  # type: ignore[import-not-found,no-redef]
    import process_mcp_box_outfiles as outfiles  # type: ignore[import-not-found,no-redef]
    import process_mcp_box_probes as probes  # type: ignore[import-not-found,no-redef]
    import process_mcp_box_proc as proc  # type: ignore[import-not-found,no-redef]
    import process_mcp_box_protocol as protocol  # type: ignore[import-not-found,no-redef]
    import process_mcp_box_spares as spares  # type: ignore[import-not-found,no-redef]
    import process_mcp_box_supervisor as supervisor  # type: ignore[import-not-found,no-redef]
    import process_mcp_box_tunnels as tunnels  # type: ignore[import-not-found,no-redef]

READ_CHUNK = 1024 * 1024
"""Bytes read from one process per wake-up (a whole output pipe, see PIPE_SIZE)."""
WRITE_CHUNK = 1024 * 1024
"""Bytes written to the stream per call."""
PIPE_SIZE = 1024 * 1024
"""Capacity asked for output pipes and the stream (Linux's default limit for unprivileged users): a
flood then costs a wake-up per megabyte, not per 64 KiB."""
F_SETPIPE_SZ = 1031
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
DEFAULT_PIPE_SIZE = 64 * 1024
STREAM_RETRY_S = 0.001
"""How long output waits before the next write once the stream was full and the server took part of
it. Waking at each bit of room instead (the engine's relay reads 32 KiB at a time) cost the agent
twenty thousand wake-ups, and the box a second of CPU, per 500 MB."""
OUT_HIGH = 2 * 1024 * 1024
"""Output waiting to go to the server above which the agent stops reading processes."""
INPUT_MAX = 1024 * 1024
"""Input waiting for one process that does not read, above which more input is refused."""
TERMINAL_HOLD = 256 * 1024
"""Bytes of a terminal read after its process's exit, ahead of the exit, when no read finds it empty first
(something the process left keeps writing to it): many times what a terminal holds (about 20 KiB, in its
line discipline and the pseudo-terminal's buffers), which a terminal cannot count as a pipe can."""
FLUSH_TIMEOUT_S = 5.0
"""How long the agent tries to write its last frames before exiting."""
ORPHANS_WAIT_S = 1.0
"""How long the agent waits for a killed supervisor's children to become its own before it ends them (the
kernel hands them over just after the supervisor's descriptors close, which is how the agent learns of it)."""


CONTROLLING_TERMINAL = os.makedev(5, 0)
"""/dev/tty: a process's own terminal, whichever it is (a process of the terminal's foreground group
reading it reads that terminal)."""


def available(fd: int) -> int:
    """Bytes waiting in the pipe ``fd``."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]  # type: ignore[no-any-return]
    except OSError:
        return 0


def grow_pipe(fd: int) -> None:
    """Ask for a PIPE_SIZE pipe; where that is refused (not a pipe, a lower limit) keep what there is."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)


class Process:
    """The agent's view of one process: its supervisor, descriptors and pending input."""

    def __init__(
        self, channel: int, supervisor: int, status: int, outputs: dict[int, int], input_fd: int, tty: bool
    ) -> None:
        self.channel = channel
        self.supervisor = supervisor
        self.status = status  # JSON lines from the supervisor; closed when it exits
        self.status_buffer = b""
        self.outputs = outputs  # descriptor -> stream number (1 stdout, 2 stderr)
        self.input_fd = input_fd
        self.tty = tty  # then input_fd is a descriptor of the terminal's master side
        self.pending = bytearray()
        self.queued = 0  # bytes of input accepted so far
        self.written = 0  # bytes of input written so far
        self.acks: collections.deque[tuple[int, int]] = collections.deque()  # (seq, queued at its end)
        self.last_input = b""  # the last byte of input taken (a terminal's EOF ends a partial line first)
        self.ending_input = False  # its stdin pipe closes once what is queued is written
        self.input_id = (0, 0)  # (0, its terminal's device number), or its stdin pipe's (device, inode)
        self.exited = False  # its supervisor reported the command's exit
        self.exit_report: dict[str, Any] | None = None  # that exit, until the output ahead of it is sent
        self.owed: dict[int, int] = {}  # output descriptor -> bytes still to send ahead of the exit
        self.leader = 0  # the command's pid, also its process group's, once its supervisor has started it
        self.grown: set[int] = set()  # output pipes already enlarged
        self.order: socket.socket | None = None  # to its supervisor, until the supervisor is done with it
        self.reusable = False  # its supervisor may start another process once this one's tree is gone
        self.done = False  # its supervisor said its tree is gone (or that nothing started)
        self.cgroup: str | None = None  # the group its supervisor joined (the plan's), where it stays

    @property
    def tree_gone(self) -> bool:
        """Its supervisor said its tree is gone, or ended: from then on the supervisor may be running
        another process's tree, which nothing asked of this one may reach."""
        return self.done or self.status < 0

    @property
    def finished(self) -> bool:
        return self.status < 0 and not self.outputs


class Agent:
    """The agent's loop: frames from the server, output from processes, exits from supervisors."""

    def __init__(self, stream_in: int = 0, stream_out: int = 1, *, box: bool = False) -> None:
        """``box``: the agent of a long-lived box (``confine``), which confines every process it starts."""
        self.stream_in = stream_in
        self.stream_out = stream_out
        self.selector = selectors.DefaultSelector()
        self.decoder = protocol.Decoder()
        self.children: dict[int, list[int]] | None = None
        self.out = bytearray()
        self.writing = False  # output waits for room in the stream
        self.write_at: float | None = None  # when to try writing it again
        self.watching_stream = False  # the stream is watched for room (the server took nothing last time)
        self.reading_output = True
        self.processes: dict[int, Process] = {}
        self.owner: dict[int, Process] = {}  # each process's descriptors
        self.tunnels = tunnels.Tunnels(self.selector, self.send, lambda: self.reading_output)
        self.probes = probes.Probes(
            self.selector,
            lambda channel, seq, fields: self.send(protocol.message(protocol.PROBED, channel, seq=seq, **fields)),
        )
        self.running = True
        self.lifeline_r, self.lifeline_w = os.pipe()
        # The frame on the stream still owes bytes: (pipe, count, -1) spliced from a pipe, or (file, count,
        # offset) sent from an output file (what the pipe held went there first).
        self.splicing: tuple[int, int, int] | None = None
        self.files: dict[int, dict[int, outfiles.OutputFile]] = {}  # channel -> stream -> its output file
        self.to_keep: dict[int, tuple[dict[int, str], int]] = {}  # channel -> the files still to make, their room
        self.outfiles = outfiles.Files(f"{os.getpid()}-{start_time()}", supervisor.as_processes_user)
        self.can_splice = hasattr(os, "splice") and stat.S_ISFIFO(os.fstat(stream_out).st_mode)
        self.spares = spares.Spares(self.selector, self.lifeline_r)
        self.subreaper = supervisor.set_subreaper()
        self.undumpable = supervisor.set_undumpable()  # before the zygote: it and every supervisor inherit it
        for fd in (stream_in, stream_out):
            os.set_blocking(fd, False)
        grow_pipe(stream_out)
        self.selector.register(stream_in, selectors.EVENT_READ, self._on_stream)
        self.selector.register(supervisor.wake_on_sigchld(), selectors.EVENT_READ, self._on_sigchld)
        self.box = box
        self.made: dict[str, tuple[str, int]] = {}  # the mounts made for the plans so far (``confine.protect``)
        if box:
            confine.own_namespace()  # before the zygote: it and every process share this namespace
        self.spares.start()

    def run(self) -> int:
        self.send(
            protocol.message(
                protocol.HELLO,
                0,
                version=protocol.VERSION,
                pid=os.getpid(),
                started=start_time(),
                python="%d.%d.%d" % sys.version_info[:3],  # noqa: UP031
                subreaper=self.subreaper,
                undumpable=self.undumpable,
                user=list(supervisor.RUN_AS) if supervisor.RUN_AS is not None else None,
            )
        )
        while self.running:
            timers = [at for at in (self.spares.replace_at, self.write_at, self.probes.next_deadline) if at is not None]
            events = self.selector.select(max(0.0, min(timers) - time.monotonic()) if timers else None)
            for key, mask in events:
                # Handling one event can close a descriptor that is later in the same batch.
                current = self.selector.get_map().get(key.fd)
                if current is not None and self.running:
                    current.data(key.fd, mask)
            now = time.monotonic()
            if self.write_at is not None and now >= self.write_at and self.running:
                self._write_out()
            if self.spares.replace_at is not None and now >= self.spares.replace_at:
                self.spares.ask()
            if self.probes.running:
                self.probes.expire(now)
        return 0

    # The stream to the server.

    def send(self, data: bytes, payload: bytes = b"") -> None:
        """Queue ``data`` and then ``payload`` for the server (two parts, so a frame's header and its
        output need not be joined); written at once when nothing waits before them."""
        if not self.out and not self.writing:
            try:  # the common case: straight from the read buffer to the stream, no copy
                written = os.writev(self.stream_out, [data, payload] if payload else [data])
            except BlockingIOError:
                written = 0
            except OSError:  # the server is gone
                self._stop()
                return
            if written >= len(data):
                payload, data = payload[written - len(data) :], b""
            else:
                data = data[written:]
            if not data and not payload:
                return
        self.out += data
        self.out += payload
        if not self.writing:
            self._write_out()
        if self.reading_output and len(self.out) >= OUT_HIGH:
            self._pause_output(True)

    def _write_out(self, fd: int = -1, events: int = 0) -> None:
        """Write what waits for the stream. While the stream is full, output is not read (it waits in
        the processes' pipes, to be spliced), and the next try comes STREAM_RETRY_S later, or, when
        the server took nothing, once the stream has room."""
        owed = self._owed()
        try:
            if self.splicing is not None:
                self._continue_splice()
            while self.out and self.splicing is None:
                with memoryview(self.out) as view:
                    written = os.write(self.stream_out, view[:WRITE_CHUNK])
                del self.out[:written]
        except BlockingIOError:
            pass
        except OSError:  # the server is gone
            self.out.clear()
            self.splicing = None
            self._stop()
            return
        left = self._owed()
        self.writing = left > 0
        self.write_at = time.monotonic() + STREAM_RETRY_S if 0 < left < owed else None
        watch = self.writing and self.write_at is None
        if watch != self.watching_stream:
            if watch:
                self.selector.register(self.stream_out, selectors.EVENT_WRITE, self._write_out)
            else:
                self.selector.unregister(self.stream_out)
            self.watching_stream = watch
        if self.reading_output == self.writing:
            self._pause_output(self.writing)

    def _owed(self) -> int:
        """Bytes waiting to go to the server."""
        return len(self.out) + (self.splicing[1] if self.splicing is not None else 0)

    def _splice_output(self, process: Process, fd: int, kind: int, size: int) -> None:
        """Send ``size`` bytes waiting in the pipe ``fd`` as one frame, moved by the kernel from that
        pipe to the stream (splice) without passing through the agent: a flood then costs the agent
        almost nothing, which matters in a box with a CPU limit. With an output file that has room, they
        are moved into it first and sent from there (sendfile)."""
        kept = self._file(process.channel, 1 if kind == protocol.STDOUT else 2, make=False)
        moved = kept.take(fd, size) if kept is not None else 0
        size = moved or size
        header = protocol.HEADER.pack(kind, process.channel, size)
        try:
            written = os.write(self.stream_out, header)
        except BlockingIOError:
            written = 0
        if written < len(header):  # no room even for the header: read the payload the usual way
            # The agent is this pipe's only reader: it holds ``size`` bytes, unless they went to the file.
            data = kept.read_exactly(kept.size - moved, moved) if kept is not None and moved else os.read(fd, size)
            self.send(header[written:], data)
            self._took(process, fd, len(data))
            return
        self.splicing = (kept.fd, size, kept.size - moved) if kept is not None and moved else (fd, size, -1)
        self._write_out()
        self._took(process, fd, size)  # promised to the frame on the stream: whatever is sent next follows them

    def _continue_splice(self) -> None:
        assert self.splicing is not None
        fd, left, offset = self.splicing
        try:
            while left:
                if offset >= 0:
                    try:
                        moved = os.sendfile(self.stream_out, fd, offset, left)
                    except (BlockingIOError, BrokenPipeError, ConnectionError):
                        raise  # the stream is full, or the server is gone
                    except OSError:  # the file failed (not the stream): what it owes goes from memory
                        moved = 0
                    offset += moved
                    if not moved:  # or a process of the box cut the file short: the frame still gets its bytes
                        self.out[0:0] = self._owed_by_file(fd, left, offset)
                        left = 0
                        break
                else:
                    moved = os.splice(fd, self.stream_out, left, flags=SPLICE_FLAGS)
                    if not moved:
                        raise OSError(f"output pipe {fd} ended inside a frame")  # cannot be: only the agent reads it
                left -= moved
        finally:
            self.splicing = (fd, left, offset) if left else None

    def _list_ports(self, seq: int) -> None:
        """The ports each process's tree listens on (read as the processes' user, whose fds they are)."""
        ports: dict[str, list[int]] = {}
        with supervisor.as_processes_user():
            sockets = proc.listening_sockets()
            if sockets:
                children = proc.process_children()
                for process in self.processes.values():
                    if not process.tree_gone:
                        found = proc.listening_ports(proc.descendants(process.supervisor, children), sockets)
                        if found:
                            ports[str(process.channel)] = found
        self.send(protocol.message(protocol.PORTS, 0, seq=seq, ports=ports))

    def _owed_by_file(self, fd: int, left: int, offset: int) -> bytes:
        """The ``left`` bytes from ``offset`` of the output file ``fd`` that a frame on the stream owes."""
        for kept in outfiles.each(self.files):
            if kept.fd == fd:
                return kept.read_exactly(offset, left)
        return bytes(left)

    def _file(self, channel: int, stream: int, *, make: bool = True) -> outfiles.OutputFile | None:
        """The output file of the process on ``channel``'s ``stream``, while it has room; with ``make``,
        made (and told to the server, ahead of the output) at the stream's first output, so a process
        that prints nothing costs no file."""
        streams = self.files.get(channel)
        kept = streams.get(stream) if streams is not None else None
        if kept is None and make and channel in self.to_keep:
            paths, room = self.to_keep[channel]
            path = paths.pop(stream, None)
            if not paths:
                del self.to_keep[channel]
            if path is not None:
                kept = self.outfiles.make(path, room)
            if kept is not None:
                self.files.setdefault(channel, {})[stream] = kept
                self.send(protocol.message(protocol.OUTPUT_FILE, channel, stream=stream, path=kept.path))
        return kept if kept is not None and kept.room > 0 else None

    def _pause_output(self, pause: bool) -> None:
        self.reading_output = not pause
        self.tunnels.rewatch()
        for process in self.processes.values():
            for fd in process.outputs:
                if pause:
                    self.selector.unregister(fd)
                else:
                    self.selector.register(fd, selectors.EVENT_READ, self._on_output)

    def _on_stream(self, fd: int, events: int) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._stop()  # the server is gone: nobody may drive these processes any more
            return
        self.children = None  # the samples asked in one read (a ps asks for all at once) share one
        for kind, channel, payload in self.decoder.feed(data):
            self._handle(kind, channel, payload)

    def _handle(self, kind: int, channel: int, payload: bytes) -> None:
        if kind == protocol.SPAWN:
            self._spawn(channel, protocol.fields(payload))
        elif kind == protocol.INPUT:
            self._input(channel, struct.unpack(">I", payload[:4])[0], payload[4:])
        elif kind == protocol.END_INPUT:
            self._end_input(channel, int(protocol.fields(payload)["seq"]))
        elif kind == protocol.ASK_INPUT:
            process = self.processes.get(channel)
            wanted = None
            if process is not None and process.leader and not process.exited and not process.pending:
                with supervisor.as_processes_user():
                    wanted = self._wants_input(process)
                if wanted is not None and self.reading_output:
                    # What it printed before it came to wait (a prompt) goes ahead of the answer; a poll first
                    # pushes a terminal's buffers to where a read finds them.
                    for fd in list(process.outputs):
                        select.select([fd], [], [], 0)
                        while fd in process.outputs and len(self.out) < OUT_HIGH and self._read_output(process, fd):
                            pass
            self.send(
                protocol.message(protocol.INPUT_STATE, channel, seq=protocol.fields(payload)["seq"], wanted=wanted)
            )
        elif kind == protocol.SIGNAL:
            request = protocol.fields(payload)
            process = self.processes.get(channel)
            signum = int(request["signal"])
            # Its group by id only while the leader lives: after that, the id could be another's.
            group = 0 if process is None or process.exited else process.leader
            # Once its tree is gone, its supervisor may be running another process's.
            sent = (
                0 if process is None or process.tree_gone else supervisor.signal_tree(process.supervisor, signum, group)
            )
            if sent and process is not None:
                # A process may stop its own supervisor (in a box they share a domain): it would then
                # never reap what the signal ends, nor report it.
                with contextlib.suppress(OSError):
                    os.kill(process.supervisor, signal.SIGCONT)
            self.send(protocol.message(protocol.SIGNALLED, channel, seq=request["seq"], sent=sent))
        elif kind == protocol.SAMPLE:
            request = protocol.fields(payload)
            process = self.processes.get(channel)
            if process is not None and self.children is None:
                self.children = proc.process_children()
            sample: dict[str, Any] = {}
            if process is not None and not process.tree_gone and self.children is not None:
                with supervisor.as_processes_user():
                    sample = proc.sample_tree(process.supervisor, self.children) or {}
            self.send(protocol.message(protocol.SAMPLED, channel, seq=request["seq"], **sample))
        elif kind == protocol.ASK_STOPPED:
            running = [p for p in self.processes.values() if p.leader and not p.exited]
            stopped = [process for process in running if proc.is_stopped(process.leader)]
            for process in stopped if self.reading_output else ():
                for fd in list(process.outputs):  # what it wrote before it stopped goes ahead of the answer
                    self._read_output(process, fd)
            channels = [process.channel for process in stopped]
            self.send(protocol.message(protocol.STOPPED, 0, seq=protocol.fields(payload)["seq"], stopped=channels))
        elif kind == protocol.RESIZE:
            process = self.processes.get(channel)
            if process is not None and process.tty and process.input_fd >= 0:
                size = protocol.fields(payload)
                winsize = struct.pack("HHHH", size["rows"], size["cols"], 0, 0)
                with contextlib.suppress(OSError):  # the kernel sends SIGWINCH to the terminal's foreground group
                    fcntl.ioctl(process.input_fd, termios.TIOCSWINSZ, winsize)
        elif kind == protocol.SHUTDOWN:
            self._stop()
        elif kind == protocol.READ_FILE:
            self._read_file(channel, protocol.fields(payload))
        elif kind == protocol.FORGET_FILES:
            self._forget_files(channel)
        elif kind == protocol.LIST_PORTS:
            self._list_ports(int(protocol.fields(payload)["seq"]))
        elif kind == protocol.FORWARD:
            if channel < protocol.FORWARD_BASE:
                raise protocol.ProtocolError(f"a forward on channel {channel}, below FORWARD_BASE")
            self.tunnels.forward(channel, int(protocol.fields(payload)["port"]))
        elif kind == protocol.PROBE:
            request = protocol.fields(payload)
            path = request.get("path")
            timeout_s = min(float(request.get("timeout_s") or 1.0), 30.0)
            self.probes.start(channel, int(request["seq"]), int(request["port"]), path and str(path), timeout_s)
        elif kind == protocol.PROXY:
            self.tunnels.listen(int(protocol.fields(payload)["port"]))
        elif kind in (protocol.TUNNEL_DATA, protocol.TUNNEL_ACK, protocol.TUNNEL_CLOSE):
            self.tunnels.handle(kind, channel, payload)
        else:
            raise protocol.ProtocolError(f"unknown frame kind {kind}")

    def _stop(self) -> None:
        """End every process (supervisors and whatever fell to the agent), say BYE, and leave the loop."""
        if not self.running:
            return
        self.running = False
        os.close(self.lifeline_w)
        supervisor.kill_tree(os.getpid(), reap=True)
        if self.splicing is not None:  # the frame on the stream still owes bytes: they go first
            fd, left, offset = self.splicing
            self.splicing = None
            with contextlib.suppress(OSError):
                self.out[0:0] = os.read(fd, left) if offset < 0 else self._owed_by_file(fd, left, offset)
        for kept in outfiles.each(self.files):
            with supervisor.as_processes_user():
                kept.remove()
        self.files.clear()
        self.to_keep.clear()
        self.outfiles.close()
        self.probes.close()
        for process in self.processes.values():  # exits still waiting for output that can no longer come
            process.owed.clear()
            if process.exit_report is not None:
                self.out += protocol.message(protocol.EXITED, process.channel, **process.exit_report)
        self.out += protocol.frame(protocol.BYE, 0)
        remaining = FLUSH_TIMEOUT_S
        while self.out and remaining > 0:
            try:
                written = os.write(self.stream_out, self.out[:READ_CHUNK])
                del self.out[:written]
            except BlockingIOError:
                select.select([], [self.stream_out], [], 0.1)
                remaining -= 0.1
            except OSError:
                break

    # Processes.

    def _spawn(self, channel: int, spec: dict[str, Any]) -> None:
        if self.box:
            # A process started without a plan would keep the agent's capabilities over the box.
            plan = spec.get("confine")
            try:
                if not plan:
                    raise confine.ConfineError(0, "a process of a box must come with a plan to confine it")
                confine.protect(plan, self.made)
            except OSError as exc:
                self.send(protocol.message(protocol.STARTED, channel, error="confine", message=str(exc)))
                return
        env = dict(os.environ) if spec.get("inherit", True) else {}
        env.update(spec.get("env") or {})
        opened: list[int] = []
        try:
            if spec.get("tty"):
                master, slave = os.openpty()
                opened += [master, slave]
                size = struct.pack("HHHH", spec.get("rows", 24), spec.get("cols", 80), 0, 0)
                fcntl.ioctl(master, termios.TIOCSWINSZ, size)
                stdio = (slave, slave, slave)
                outputs = {master: 1}
                input_fd = os.dup(master)  # its own descriptor, so reading and writing are watched apart
                opened.append(input_fd)
            else:
                in_r, input_fd = os.pipe()
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                opened += [in_r, input_fd, out_r, out_w, err_r, err_w]
                stdio = (in_r, out_w, err_w)
                outputs = {out_r: 1, err_r: 2}
            found = os.fstat(stdio[0])
            input_id = (0, found.st_rdev) if spec.get("tty") else (found.st_dev, found.st_ino)
            status_r, status_w = os.pipe()
            opened += [status_r, status_w]
            cgroup = (spec.get("confine") or {}).get("cgroup") or None
            supervisor_pid, order = self.spares.order(spec, env, [*stdio, status_w], cgroup)
        except OSError as exc:
            for fd in opened:
                os.close(fd)
            self.send(protocol.message(protocol.STARTED, channel, error="spawn", message=str(exc)))
            return
        for fd in {*stdio, status_w}:
            os.close(fd)
        process = Process(channel, supervisor_pid, status_r, outputs, input_fd, bool(spec.get("tty")))
        self._forget_files(channel)  # a channel the server reuses starts anew
        room = int(spec.get("file_room") or 0)
        paths = {
            int(name): str(path) for name, path in (spec.get("files") or {}).items() if int(name) in outputs.values()
        }
        if paths and room > 0:
            self.to_keep[channel] = (paths, room)
        process.input_id = input_id
        process.order = order
        process.cgroup = cgroup
        # A supervisor cannot raise its limits again; the confinement it took for a process of the box
        # is the same for the next (``confine.Taken``).
        process.reusable = not spec.get("rlimits")
        self.processes[channel] = process
        for fd in (*outputs, input_fd, status_r):
            self.owner[fd] = process
        for fd in (*outputs, input_fd, status_r):
            os.set_blocking(fd, False)
        self.selector.register(status_r, selectors.EVENT_READ, self._on_status)
        if self.reading_output:
            for fd in outputs:
                self.selector.register(fd, selectors.EVENT_READ, self._on_output)

    def _forget_files(self, channel: int) -> None:
        self.to_keep.pop(channel, None)
        for kept in self.files.pop(channel, {}).values():
            if self.splicing is not None and self.splicing[0] == kept.fd:  # the frame still owes its bytes
                _, left, offset = self.splicing
                self.splicing = None
                self.out[0:0] = kept.read_exactly(offset, left)
            with supervisor.as_processes_user():
                kept.remove()

    def _read_file(self, channel: int, request: dict[str, Any]) -> None:
        streams = self.files.get(channel) or {}
        kept = streams.get(int(request["stream"]))
        size = min(int(request["size"]), protocol.MAX_PAYLOAD - protocol.COUNT.size)
        data = kept.read(int(request["offset"]), size) if kept is not None else b""
        header = protocol.HEADER.pack(protocol.FILE_BYTES, channel, protocol.COUNT.size + len(data))
        self.send(header + protocol.COUNT.pack(request["seq"]), data)

    def _release(self, process: Process) -> None:
        """The supervisor of ``process`` is done, its tree gone (it said so, or closed its status): keep
        it for a next process if it may start one (in place of the spare waiting longest, when SPARES wait), else
        close its order socket, which ends it. One kept in the process's cgroup is said to the server
        (KEPT), which then puts a later process there, started by it without a move."""
        order, process.order = process.order, None
        if order is None:
            return
        if not (process.reusable and self.running):
            order.close()
            return
        self.spares.keep(process.supervisor, order, process.cgroup)
        if process.cgroup is not None:
            self.send(protocol.message(protocol.KEPT, 0, cgroup=process.cgroup))

    def _close(self, fd: int) -> None:
        del self.owner[fd]
        os.close(fd)

    def _on_output(self, fd: int, events: int) -> None:
        process = self.owner.get(fd)
        if process is not None and fd in process.outputs:
            self._read_output(process, fd)

    def _read_output(self, process: Process, fd: int) -> bool:
        """Read one chunk and send it on; return False once nothing more is there right now."""
        if self.splicing is not None and self.splicing[0] == fd and self.splicing[2] < 0:
            return False  # its bytes are promised to the frame being spliced: nothing else may read them
        stream = process.outputs[fd]
        kind = protocol.STDOUT if stream == 1 else protocol.STDERR
        if self.can_splice and not process.tty and not self.out and not self.writing:
            waiting = available(fd)
            if waiting:
                self._file(process.channel, stream)  # its first output makes its file
            if waiting and not self.out:  # (else the file's announcement waits: what follows goes after it)
                self._grow_if_full(process, fd, waiting)
                self._splice_output(process, fd, kind, min(waiting, READ_CHUNK))
                return True
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            self._took(process, fd, None)  # empty: whatever it held at the exit is on its way
            return False
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: every holder of the terminal's other side closed it
                sys.stderr.write(f"process-mcp agent: reading {process.channel}: {exc}\n")
            data = b""
        if not data:
            del process.outputs[fd]
            if self.reading_output:
                self.selector.unregister(fd)
            self._close(fd)
            self._took(process, fd, None)
            self.send(protocol.frame(protocol.CLOSED, process.channel, str(stream).encode()))
            self._forget_if_finished(process)
            return False
        self._grow_if_full(process, fd, len(data))
        kept = self._file(process.channel, stream)
        if kept is not None:
            kept.write(data)
        self.send(protocol.HEADER.pack(kind, process.channel, len(data)), data)
        self._took(process, fd, len(data))
        return True

    def _took(self, process: Process, fd: int, count: int | None) -> None:
        """Note that ``count`` more bytes of the output ``fd`` (None: all it holds) are on their way to the
        server, ahead of anything sent after; once all the process's outputs held at its exit are, send
        the exit."""
        if process.exit_report is None or fd not in process.owed:
            return
        left = 0 if count is None else process.owed[fd] - count
        if left > 0:
            process.owed[fd] = left
            return
        del process.owed[fd]
        self._exit_if_owed_nothing(process)

    def _exit_if_owed_nothing(self, process: Process) -> None:
        if process.exit_report is not None and not process.owed:
            report, process.exit_report = process.exit_report, None
            self.send(protocol.message(protocol.EXITED, process.channel, **report))

    @staticmethod
    def _grow_if_full(process: Process, fd: int, waiting: int) -> None:
        if waiting >= DEFAULT_PIPE_SIZE and fd not in process.grown and not process.tty:
            process.grown.add(fd)
            grow_pipe(fd)  # a full pipe: a flood, which a larger pipe serves with fewer wake-ups

    def _on_status(self, fd: int, events: int) -> None:
        process = self.owner[fd]
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        lines = (process.status_buffer + data).split(b"\n")
        process.status_buffer = lines.pop()
        reports = [json.loads(line) for line in lines]
        # A supervisor that is done with the exit it reports (one write) is kept, and KEPT said, ahead of
        # the EXITED: a server told the exit may ask for the next process at once, in that group.
        for report in sorted(reports, key=lambda report: "done" not in report):
            self._on_supervisor_report(process, report)
        if not data:  # the supervisor closed it: its whole tree is gone, or the supervisor was killed
            self.selector.unregister(fd)
            self._close(fd)
            process.status = -1
            if not process.done:  # killed (by the process's own user, or the kernel's OOM killer)
                process.reusable = False
                self._end_orphans(process.supervisor)
            if not process.exited:  # nothing reports the command's exit: it was ended with its supervisor
                process.exited = True
                self.send(protocol.message(protocol.EXITED, process.channel, lost=True))
            self._release(process)
            self.spares.ask()  # the spawn is over: a fork now takes a core from nothing of it
            self._forget_if_finished(process)

    def _on_supervisor_report(self, process: Process, report: dict[str, Any]) -> None:
        if "started" in report:
            process.leader = int(report["started"])
            self.send(protocol.message(protocol.STARTED, process.channel, pid=report["started"]))
        elif "done" in report:
            process.done = True
            process.reusable = process.reusable and bool(report.get("reusable"))  # else it exits now
            # Kept at once, before its status ends: it closes that and then waits for an order, and a
            # spawn that comes in between finds it (and its group, which the server then hands out).
            self._release(process)
        elif "error" in report:
            process.exited = True
            process.done = True  # nothing started
            process.reusable = False  # it exits
            self.send(protocol.message(protocol.STARTED, process.channel, **report))
        else:
            # The exit waits for every byte its outputs hold now: what it (and what it started that has
            # ended) wrote. Bytes that a frame on the stream has promised are ahead of it already.
            process.exited = True
            process.exit_report = report
            for fd in process.outputs:
                held = self._held(process, fd)
                if held > 0:
                    process.owed[fd] = held
            # What there is room for goes now; the rest as the stream makes room, the exit after it.
            for fd in list(process.owed):
                while fd in process.owed and len(self.out) < OUT_HIGH and self._read_output(process, fd):
                    pass
            self._exit_if_owed_nothing(process)

    def _held(self, process: Process, fd: int) -> int:
        """Bytes the output ``fd`` holds that no frame on the stream has promised yet; for a terminal,
        TERMINAL_HOLD unless it is empty (a poll pushes its flip buffers to its line discipline before
        it says so), as it cannot say how much its flip buffers hold."""
        if process.tty:
            return TERMINAL_HOLD if select.select([fd], [], [], 0)[0] else 0
        splicing = self.splicing
        promised = splicing[1] if splicing is not None and splicing[0] == fd and splicing[2] < 0 else 0
        return available(fd) - promised

    def _end_orphans(self, killed: int) -> None:
        """Kill what the supervisor ``killed`` left: its orphans fall to the agent (a subreaper; the
        zygote is not one), out of every supervisor's tree. The agent's own children are the zygote and the
        supervisors it knows (their orphans fall to it too when the zygote is killed); any other is such an
        orphan, and is killed with everything below it, in rounds that catch what forks meanwhile.

        A dying process closes its descriptors (the status pipe's end that told the agent) before the
        kernel hands its children to the agent, so the walk waits, at most ORPHANS_WAIT_S, until the
        supervisor is a zombie or gone: then its children are the agent's."""
        deadline = time.monotonic() + ORPHANS_WAIT_S
        while proc.process_state(killed) not in (None, b"Z", b"X") and time.monotonic() < deadline:
            select.select([], [], [], 0.001)
        me = os.getpid()
        for _ in range(supervisor.KILL_ROUNDS):
            children = proc.process_children()
            keep = {*self.spares.pids(), *(p.supervisor for p in self.processes.values())}
            orphans = [pid for pid in children.get(me, ()) if pid not in keep]
            if not orphans:
                return
            for orphan in orphans:
                for pid in [orphan, *proc.descendants(orphan, children)]:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            supervisor.reap_children()
            select.select([], [], [], 0.005)  # let the kernel finish the deaths before the next walk

    def _forget_if_finished(self, process: Process) -> None:
        if not process.finished:
            return
        if self.processes.get(process.channel) is process:  # (not when a restart took its channel already)
            del self.processes[process.channel]
            self.to_keep.pop(process.channel, None)  # a stream that printed nothing has no file to make
        if process.input_fd >= 0:
            if process.pending:
                self.selector.unregister(process.input_fd)
            self._close(process.input_fd)
            process.input_fd = -1
        self._fail_input(process, "the process has ended")

    def _input(self, channel: int, seq: int, data: bytes) -> None:
        process = self.processes.get(channel)
        if process is None or process.input_fd < 0:
            self.send(protocol.message(protocol.WRITTEN, channel, seq=seq, error="its input is closed"))
            return
        if len(process.pending) + len(data) > INPUT_MAX:
            error = f"it is not reading its input ({len(process.pending)} bytes still wait)"
            self.send(protocol.message(protocol.WRITTEN, channel, seq=seq, error=error))
            return
        if data:
            process.last_input = data[-1:]
        waiting = bool(process.pending)
        process.pending += data
        process.queued += len(data)
        process.acks.append((seq, process.queued))
        if not waiting:
            self._write_input(process.input_fd, selectors.EVENT_WRITE, registered=False)

    def _write_input(self, fd: int, events: int, registered: bool = True) -> None:
        process = self.owner[fd]
        try:
            while process.pending:
                written = os.write(fd, process.pending[:READ_CHUNK])
                del process.pending[:written]
                process.written += written
        except BlockingIOError:
            pass
        except OSError as exc:
            if registered:
                self.selector.unregister(fd)
            self._fail_input(process, exc.strerror or str(exc))
            return
        while process.acks and process.acks[0][1] <= process.written:
            self.send(protocol.message(protocol.WRITTEN, process.channel, seq=process.acks.popleft()[0]))
        if process.ending_input and not process.pending:
            if registered:
                self.selector.unregister(fd)
            self._close(fd)  # the process reads the end of its input
            process.input_fd = -1
            process.ending_input = False
        elif process.pending and not registered:
            self.selector.register(fd, selectors.EVENT_WRITE, self._write_input)
        elif not process.pending and registered:
            self.selector.unregister(fd)

    def _wants_input(self, process: Process) -> str | None:
        """ "input" if a process of its tree sleeps reading its input (on a terminal: a process of the
        terminal's foreground group), "secret" if that terminal reads a line without echo; else None."""
        if process.input_fd < 0 or process.tree_gone:
            return None  # its input has ended (a read returns at once), or nothing is left to read it
        tree = proc.task_descendants(process.supervisor)
        attributes = None
        if process.tty:
            try:
                foreground = os.tcgetpgrp(process.input_fd)
                attributes = termios.tcgetattr(process.input_fd)
            except (OSError, termios.error):
                return None
            tree = [pid for pid in tree if proc.process_group(pid) == foreground]

            def is_input(found: os.stat_result) -> bool:  # the terminal, or /dev/tty (getpass, ssh, sudo)
                return stat.S_ISCHR(found.st_mode) and found.st_rdev in (process.input_id[1], CONTROLLING_TERMINAL)
        else:

            def is_input(found: os.stat_result) -> bool:
                return stat.S_ISFIFO(found.st_mode) and (found.st_dev, found.st_ino) == process.input_id

        unreadable = False
        reading = False
        budget = [proc.INPUT_LOOKS]
        for pid in tree:
            if budget[0] <= 0:
                break
            try:
                if proc.reads_from(pid, is_input, budget):
                    reading = True
                    break
            except proc.Unreadable:
                unreadable = True  # a set-user-ID program (sudo): only its terminal can tell
        secret = attributes is not None and not attributes[3] & termios.ECHO and bool(attributes[3] & termios.ICANON)
        if secret and (reading or unreadable):
            return "secret"
        return "input" if reading else None

    def _end_input(self, channel: int, seq: int) -> None:
        process = self.processes.get(channel)
        if process is None or process.input_fd < 0 or process.ending_input:
            self.send(protocol.message(protocol.WRITTEN, channel, seq=seq, error="its input is closed"))
            return
        if process.tty:  # a terminal stays open: its line discipline turns the character into an end of file
            try:
                eof = termios.tcgetattr(process.input_fd)[6][termios.VEOF]
            except (OSError, termios.error):
                eof = b"\x04"
            eof = bytes([eof]) if isinstance(eof, int) else eof
            self._input(channel, seq, eof * (1 if process.last_input in (b"", b"\n", b"\r") else 2))
            process.last_input = b""
            return
        process.ending_input = True
        process.acks.append((seq, process.queued))
        if not process.pending:
            self._write_input(process.input_fd, selectors.EVENT_WRITE, registered=False)

    def _fail_input(self, process: Process, error: str) -> None:
        process.pending.clear()
        process.written = process.queued
        while process.acks:
            self.send(protocol.message(protocol.WRITTEN, process.channel, seq=process.acks.popleft()[0], error=error))

    def _on_sigchld(self, fd: int, events: int) -> None:
        supervisor.drain(fd)
        supervisor.reap_children()  # supervisors, and orphans of killed supervisors; exits come from the supervisors


def start_time() -> int:
    """This process's start time in clock ticks since boot, which tells it from a later one with its pid."""
    with open("/proc/self/stat", "rb") as stat:
        return int(stat.read().rsplit(b")", 1)[1].split()[19])


def main(argv: list[str] | None = None) -> int:
    """Run the agent; ``argv`` (the loader gives the command line after the bootstrap and the agent's name)
    may name the user every command runs as, which a root agent drops to (ignored unless the agent is
    root and the user is not), or be ``--box``: the agent of a long-lived box (``confine``), followed
    by ``cgroups=FD,...`` where the box has cgroups (``supervisor.CGROUPS``)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--box"]:
        for arg in args[1:]:
            if not arg.startswith("cgroups="):
                sys.stderr.write("process-mcp agent: the agent of a box runs its processes as its own user\n")
                return 5
            supervisor.CGROUPS = [int(fd) for fd in arg[8:].split(",")]
            for fd in supervisor.CGROUPS:
                os.set_inheritable(fd, False)  # forks keep them; no command's exec does
        return Agent(box=True).run()
    if args and os.geteuid() == 0:
        try:
            user = supervisor.resolve_user(args[0])
        except (KeyError, ValueError):
            sys.stderr.write(f"process-mcp agent: no user {args[0]!r} in this box's passwd and group files\n")
            return 5
        supervisor.RUN_AS = user if user[0] != 0 else None
    return Agent().run()


if __name__ == "__main__":
    sys.exit(main())
