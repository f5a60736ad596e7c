"""The agent run on this machine, for host processes that run without the sandbox.

The same agent as in a container, started with this interpreter and spoken to over two pipes. It gives
unsandboxed processes what the sandbox's PID namespace gives sandboxed ones: whatever a process starts
stays in its supervisor's tree (``setsid``, ``env -i``, double forks included), so ``kill`` and shutdown
reach all of it, and when the server dies, however it dies, the agent sees its input end and kills
every tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Awaitable, Callable

import anyio.to_thread

from .client import AGENT_NAME, BOOTSTRAP, AgentConnection, AgentUnavailable, Channel, bootstrap_payload

Boxing = Callable[[list[str]], tuple[list[str], list[int]]]
"""Turns the agent's command line into one that starts it in a box: that line, and the descriptors it
must inherit (closed here once it started)."""

Starter = Callable[[Callable[[], "subprocess.Popen[bytes]"]], Awaitable["subprocess.Popen[bytes]"]]
"""Runs the agent's start (a call that starts it and returns its process) where it must run."""

AGENT_EXIT_S = 5.0
"""Bound on waiting for the local agent to exit once its stream is closed."""


class _Pipes(Channel):
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self._process = process
        self._in = process.stdout.fileno()
        self._out = process.stdin.fileno()
        os.set_blocking(self._in, False)
        os.set_blocking(self._out, False)

    @property
    def read_fd(self) -> int:
        return self._in

    @property
    def write_fd(self) -> int:
        return self._out

    def receive(self) -> list[bytes] | None:
        try:
            data = os.read(self._in, 1024 * 1024)
        except BlockingIOError:
            return None
        if not data:
            raise EOFError
        return [data]

    def send(self, data: memoryview) -> int:
        return os.write(self._out, data)

    def close(self) -> None:
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                stream.close()


class LocalAgent:
    """The agent process and the connection to it."""

    def __init__(self, process: subprocess.Popen[bytes], connection: AgentConnection) -> None:
        self.process = process
        self.connection = connection

    @classmethod
    async def start(cls, name: str, box: Boxing | None = None, start_in: Starter | None = None) -> LocalAgent:
        """Start the agent as a child of this process, in a session of its own (a Ctrl-C meant for the
        server does not reach it: the server ends its processes in order); in the box ``box`` makes for
        its command line, if given, as the box's agent (``--box``: every process it starts must come
        with a plan to confine it; its processes have pids of the box's own). ``start_in`` runs the
        start (default: here), for a thread whose restrictions the agent must inherit. Raises
        AgentUnavailable."""
        argv = [sys.executable, "-I", "-S", "-c", BOOTSTRAP, AGENT_NAME]

        def popen() -> subprocess.Popen[bytes]:
            line, fds = (argv, []) if box is None else box([*argv, "--box"])
            try:
                return subprocess.Popen(
                    line,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env={},
                    cwd="/",
                    start_new_session=True,
                    pass_fds=fds,
                )
            except OSError as exc:
                raise AgentUnavailable(f"cannot start {line[0]}: {exc.strerror or exc}") from None
            finally:
                for fd in fds:
                    os.close(fd)

        process = popen() if start_in is None else await start_in(popen)
        connection = AgentConnection(_Pipes(process), name)
        connection.same_pids = box is None
        connection.same_network = box is None
        agent = cls(process, connection)
        try:
            await agent.connection.connect(bootstrap_payload())
        except BaseException:
            await agent.stop()
            raise
        return agent

    async def stop(self) -> None:
        """End every process the agent started, and the agent."""
        await self.connection.shutdown()
        try:
            await anyio.to_thread.run_sync(self.process.wait, AGENT_EXIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await anyio.to_thread.run_sync(self.process.wait)
