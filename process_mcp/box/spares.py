"""The agent's spare supervisors: forked ahead of need by the zygote, or kept once their process is done,
so that a spawn hands its process to a supervisor that is already there instead of waiting for a fork.

The zygote (``supervisor.zygote``) forks a spare for each byte it reads from its socket and sends back
the spare's pid and order socket. A supervisor whose process's tree is gone comes back here, unless it
set limits on itself. Shipped into the box with the agent: standard library only, and syntax Python 3.8
parses.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import selectors
import signal
import socket
import struct
import time
from typing import Any

try:
    from . import supervisor
except ImportError:  # in the box: the loader registered it under this name first
    import process_mcp_box_supervisor as supervisor  # type: ignore[import-not-found,no-redef]

SPARES = 2
"""Supervisors kept forked ahead of need, so a spawn does not wait for a fork."""
REPLACE_SPARE_S = 0.02
"""How long a taken spare may wait to be replaced while the process that took it still runs. A fork in
the zygote while a spawn is under way takes a core from it (on two cores, 0.5-1 ms of a 2.5 ms
`spawn true`), so the replacement is asked for once that process's tree is gone (when its supervisor,
freed, usually comes back instead), at the latest this long after it was taken, or at once when no
spare is left."""
SPARE_WAIT_S = 1.0
"""How long a spawn that finds no spare ready waits for the one the zygote is forking, before forking
one in the agent itself."""


class Spares:
    """The zygote and the supervisors waiting for a process. ``lifeline`` is the read end of a pipe the
    agent holds open while it lives: every supervisor ends when it closes."""

    def __init__(self, selector: selectors.BaseSelector, lifeline: int) -> None:
        self.selector = selector
        self.lifeline = lifeline
        # (pid, order socket, the cgroup it is in: None for the box's own), the one to take next last
        self.ready: list[tuple[int, socket.socket, str | None]] = []
        self.asked = 0  # spares asked of the zygote and not yet received
        self.replace_at: float | None = None  # when to ask for the spares taken, if nothing asks sooner
        self.zygote: socket.socket | None = None
        self.zygote_pid = 0

    def start(self) -> None:
        """Fork the zygote and ask it for SPARES spares."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            supervisor.zygote(theirs, self.lifeline)
        self.zygote_pid = pid
        theirs.close()
        ours.setblocking(False)
        self.zygote = ours
        self.selector.register(ours, selectors.EVENT_READ, self._on_zygote)
        self.ask()

    def pids(self) -> set[int]:
        """The zygote's pid and every spare's."""
        return {self.zygote_pid, *(pid for pid, _, _ in self.ready)}

    def ask(self) -> None:
        """Ask the zygote for the spares missing (those taken, less those on their way)."""
        self.replace_at = None
        missing = SPARES - len(self.ready) - self.asked
        if missing > 0 and self.zygote is not None:
            with contextlib.suppress(OSError):  # full or gone: asked again at the next spawn
                self.asked += self.zygote.send(b"s" * missing)

    def order(
        self, spec: dict[str, Any], env: dict[str, str], fds: list[int], cgroup: str | None = None
    ) -> tuple[int, socket.socket]:
        """Hand a process to a spare supervisor, the one in ``cgroup`` (the process's) if one waits
        there; return its pid and its order socket."""
        for attempt in (1, 2):
            pid, order = self._take(cgroup)
            cgroup = None  # a second attempt takes any
            try:
                order.setblocking(True)
                supervisor.send_order(order, spec, env, fds)
                return pid, order
            except OSError:
                order.close()
                if attempt == 2:
                    raise
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)  # it died or went astray: use another
        raise AssertionError("unreachable")

    def keep(self, pid: int, order: socket.socket, cgroup: str | None = None) -> None:
        """Keep the supervisor ``pid``, done with its process (in ``cgroup``, where it stays), for a next
        one, in place of the spare waiting longest when SPARES wait (closing its order socket ends it):
        a fresh one before any kept in a group (the server puts its next processes in those)."""
        self.ready.append((pid, order, cgroup))
        if len(self.ready) > SPARES:
            self.ready.pop(0)[1].close()

    def _on_zygote(self, fd: int, events: int) -> None:
        assert self.zygote is not None
        item = array.array("i")
        try:
            data, ancillary, _, _ = self.zygote.recvmsg(
                4, socket.CMSG_SPACE(item.itemsize), supervisor.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return
        except OSError:
            data, ancillary = b"", []
        if not data:  # gone: spares are forked in the agent from now on
            self.selector.unregister(self.zygote)
            self.zygote.close()
            self.zygote = None
            return
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                item.frombytes(payload[: len(payload) - len(payload) % item.itemsize])
        self.asked -= 1
        # Fresh spares go first in line, so the supervisors freed last (whose pages are the warmest) are
        # taken first and the fresh ones are the ones let go when too many wait.
        self.ready.insert(0, (struct.unpack(">I", data)[0], socket.socket(fileno=item[0]), None))

    def _take(self, cgroup: str | None) -> tuple[int, socket.socket]:
        """A spare supervisor: the one kept in ``cgroup``, else a ready one (for a process in a group,
        the one kept longest in another group before a fresh one: the server names the groups of kept
        supervisors first, so one it did not name holds a group it cannot give now, which the move
        empties), else the next the zygote forks (a burst of spawns, or the first spawn right after the
        start), else, with the zygote gone, one forked here."""
        if not self.ready:
            self.ask()
            deadline = time.monotonic() + SPARE_WAIT_S
            while not self.ready and self.zygote is not None and self.asked:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.zygote], [], [], left)[0]:
                    break
                self._on_zygote(self.zygote.fileno(), selectors.EVENT_READ)
        if not self.ready:
            return supervisor.fork_spare(self.lifeline)
        groups = [group for _, _, group in self.ready]
        elsewhere = [at for at, group in enumerate(groups) if group is not None]
        if cgroup is not None and cgroup in groups:
            index = groups.index(cgroup)
        elif cgroup is not None and elsewhere:
            index = elsewhere[0]
        else:
            index = len(groups) - 1  # the one freed last: its pages are the warmest
        pid, order, _ = self.ready.pop(index)
        if not self.ready:
            self.ask()
        elif self.replace_at is None:
            self.replace_at = time.monotonic() + REPLACE_SPARE_S
        return pid, order
