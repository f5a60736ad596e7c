"""Benchmarks: the server as a client meets it (JSON-RPC over stdio), each figure beside a raw
baseline measured in the same run, with pass/fail against the targets.

    python bench/run.py            # full run (under a minute)
    python bench/run.py --quick    # seconds; no pass/fail on timings (what CI runs)

Docker rows run when an engine answers and --docker-image names a local image with python3 (a
container is created for the run, hardened as the server makes its own, labelled
process-mcp.bench=true, and removed afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import pty
import secrets
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).parent
READ_CHUNK = 64 * 1024


@dataclass
class Row:
    figure: str
    ours: str
    baseline: str
    target: str
    passed: bool | None  # None: no target, or a quick run


@dataclass
class Settings:
    quick: bool
    spawns: int
    pipe_bytes: int
    tty_bytes: int
    live: int
    startups: int
    ps_calls: int
    flood_bytes: int
    docker_image: str | None
    rows: list[Row] = field(default_factory=list)

    def add(self, figure: str, ours: str, baseline: str, target: str, passed: bool | None) -> None:
        self.rows.append(Row(figure, ours, baseline, target, None if self.quick else passed))
        print(f"  {figure}: {ours} (baseline {baseline})", file=sys.stderr, flush=True)


class StdioServer:
    """A server process driven with raw JSON-RPC lines, as any MCP client over stdio would."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.bytes_received = 0
        self._next_id = 0

    async def start(self) -> float:
        """Launch and initialize; return the seconds from launch to the initialize reply."""
        began = time.perf_counter()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=self.env,
            limit=64 * 1024 * 1024,
        )
        await self.request(
            "initialize",
            {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}},
        )
        elapsed = time.perf_counter() - began
        await self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return elapsed

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        request_id = self._next_id
        await self._send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        assert self.proc is not None
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the server closed its output during {method}")
            self.bytes_received += len(line)
            message = json.loads(line)
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def tool(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        result = await self.request("tools/call", {"name": name, "arguments": arguments})
        if result.get("isError"):
            raise RuntimeError(f"{name} failed: {result['content'][0]['text']}")
        structured: dict[str, Any] = result.get("structuredContent") or {}
        return structured

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()

    def rss_mib(self) -> float:
        assert self.proc is not None
        return rss_mib(self.proc.pid)

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def server(workdir: str, **env: str) -> StdioServer:
    base = {**os.environ, "DEFAULT_WORKDIR": workdir, "MAX_TIMEOUT_MS": "600000", **env}
    return StdioServer([sys.executable, "-m", "process_mcp"], base)


def bare_server() -> StdioServer:
    return StdioServer([sys.executable, str(BENCH / "bare_server.py")], dict(os.environ))


PAUSE_S = 0.1
"""The pause before each call of the paused rows: as an agent calls, not back to back."""


async def timed(action: Callable[[], Awaitable[object]], count: int, pause_s: float = 0.0) -> list[float]:
    """Milliseconds each of ``count`` runs of ``action`` took (each after ``pause_s``, not counted)."""
    times = []
    for _ in range(count):
        if pause_s:
            await asyncio.sleep(pause_s)
        began = time.perf_counter()
        await action()
        times.append((time.perf_counter() - began) * 1000)
    return times


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(value: float) -> str:
    return f"{value:.2f} ms"


# Figures.


async def spawn_round_trip(s: Settings, workdir: str) -> None:
    async def raw_true() -> None:
        proc = await asyncio.create_subprocess_exec("sh", "-c", "true")
        await proc.wait()

    for label, env in (("host, sandbox off", {"SANDBOX_ENABLED": "false"}), ("host, sandboxed", {})):
        srv = server(workdir, PROCESS_KEEP_TERMINATED="5", **env)
        await srv.start()
        try:
            await timed(raw_true, 5)
            await timed(lambda srv=srv: srv.tool("spawn", {"command": "true"}), 5)  # the box starts
            base = await timed(raw_true, s.spawns)
            ours = await timed(lambda srv=srv: srv.tool("spawn", {"command": "true"}), s.spawns)
            # As an agent calls: with a pause before each spawn (the machine idles in between).
            paused = max(10, s.spawns // 5)
            base_paused = await timed(raw_true, paused, PAUSE_S)
            ours_paused = await timed(lambda srv=srv: srv.tool("spawn", {"command": "true"}), paused, PAUSE_S)
        finally:
            await srv.close()
        overhead = statistics.median(ours) - statistics.median(base)
        budget = 1.5 if env else 2.0
        s.add(
            f"spawn true round trip ({label}), median / p95",
            f"{ms(statistics.median(ours))} / {ms(p(ours, 0.95))}",
            f"{ms(statistics.median(base))} / {ms(p(base, 0.95))} (asyncio spawn of sh -c true)",
            f"overhead <= {budget:g} ms",
            overhead <= budget,
        )
        s.add(
            f"spawn true round trip ({label}) after a {PAUSE_S * 1000:g} ms pause, median",
            ms(statistics.median(ours_paused)),
            f"{ms(statistics.median(base_paused))} (asyncio spawn of sh -c true, the same pause)",
            "-",
            None,
        )


async def box_start(s: Settings, workdir: str) -> None:
    """The first spawn of a new box: the box (bwrap, the agent and its zygote) started, then ``true`` in it."""
    from process_mcp import HostExecutor, ProcessMcpConfig, SpawnOptions
    from process_mcp.config import Defaults, SandboxConfig

    sandbox = SandboxConfig(homes_dir=os.environ.get("SANDBOX_HOMES_DIR"))
    executor = HostExecutor(ProcessMcpConfig(defaults=Defaults(workdir=workdir), sandbox=sandbox))
    await executor.start()
    try:
        box = executor.backend._box
        assert box is not None, "the sandbox cannot run here"
        await executor.spawn(SpawnOptions(command="true"))  # the machine's view found once per server
        times = []
        for _ in range(max(5, s.spawns // 10)):
            await box.close()
            began = time.perf_counter()
            await executor.spawn(SpawnOptions(command="true"))
            times.append((time.perf_counter() - began) * 1000)
    finally:
        await executor.cleanup()
    s.add(
        "first spawn of a new box (host, sandboxed), median / p95",
        f"{ms(statistics.median(times))} / {ms(p(times, 0.95))}",
        "-",
        "<= 150 ms",
        statistics.median(times) <= 150,
    )


async def docker_figures(s: Settings, workdir: str) -> None:
    """Docker mode, through the agent and with one exec per process, beside docker-py's own exec, on a
    container made as the server makes its own (hardened, processes as its unprivileged user)."""
    if not s.docker_image:
        s.add("docker rows", "not run", "no --docker-image", "-", None)
        return
    import docker

    from process_mcp.config import DockerConfig
    from process_mcp.docker.engine import container_options

    client = docker.from_env()
    name = f"process-mcp-bench-{secrets.token_hex(4)}"
    options = container_options(DockerConfig(image=s.docker_image, container_name=name), {"process-mcp.bench": "true"})
    options.pop("volumes")
    options.update(user=DockerConfig().user, working_dir="/tmp")
    container = client.containers.run(**options, detach=True)
    try:
        await docker_spawns(s, client, container)
        await docker_capture_and_ps(s, client, container)
        await docker_agent_startup(s, container)
    finally:
        container.remove(force=True)
        client.close()


def docker_server(container: Any, **env: str) -> StdioServer:
    return server("/tmp", PROCESS_MODE="docker", DOCKER_USE_EXISTING="true", DOCKER_CONTAINER=container.name, **env)


async def docker_spawns(s: Settings, client: Any, container: Any) -> None:
    async def raw_exec() -> None:
        def run() -> None:
            exec_id = client.api.exec_create(container.id, ["true"])["Id"]
            client.api.exec_start(exec_id)
            while client.api.exec_inspect(exec_id)["Running"]:
                time.sleep(0.001)

        await asyncio.to_thread(run)

    agent, per_exec = docker_server(container), docker_server(container, DOCKER_AGENT="false")
    await agent.start()
    await per_exec.start()
    try:
        count = max(10, s.spawns // 4)
        await timed(raw_exec, 3)
        base = await timed(raw_exec, count)
        ours = await timed(lambda: agent.tool("spawn", {"command": "true"}), s.spawns)
        execs = await timed(lambda: per_exec.tool("spawn", {"command": "true"}), count)
    finally:
        await agent.close()
        await per_exec.close()
    baseline = f"{ms(statistics.median(base))} / {ms(p(base, 0.95))} (docker-py exec create, start, inspect)"
    ratio = statistics.median(base) / statistics.median(ours)
    s.add(
        "spawn true round trip (docker, agent), median / p95",
        f"{ms(statistics.median(ours))} / {ms(p(ours, 0.95))} ({ratio:.0f}x faster)",
        baseline,
        "<= 5 ms and <= baseline / 10",
        statistics.median(ours) <= 5 and ratio >= 10,
    )
    overhead = statistics.median(execs) - statistics.median(base)
    s.add(
        "spawn true round trip (docker, one exec per process), median / p95",
        f"{ms(statistics.median(execs))} / {ms(p(execs, 0.95))}",
        baseline,
        "overhead <= 10 ms",
        overhead <= 10,
    )


async def raw_exec_mb_s(client: Any, container: Any, size: int) -> float:
    """Reading a raw exec's stream (the engine's frames, undecoded) as fast as it comes."""

    def run() -> float:
        exec_id = client.api.exec_create(container.id, ["sh", "-c", flood_command(size)])["Id"]
        began = time.perf_counter()
        wrapper = client.api.exec_start(exec_id, socket=True)
        sock = getattr(wrapper, "_sock", wrapper)
        while sock.recv(256 * 1024):
            pass
        elapsed = time.perf_counter() - began
        wrapper.close()
        return size / elapsed / 1e6

    return await asyncio.to_thread(run)


CAPTURE_ROUNDS = 3
"""Floods captured in Docker mode, each beside a raw exec's."""


async def docker_capture_and_ps(s: Settings, client: Any, container: Any) -> None:
    srv = docker_server(container)
    await srv.start()
    try:
        # One run of each moves by a third with the machine's load: alternate three, take the medians.
        bases, runs = [], []
        for _ in range(CAPTURE_ROUNDS):
            bases.append(await raw_exec_mb_s(client, container, s.pipe_bytes))
            began = time.perf_counter()
            started = await srv.tool("spawn", {"command": flood_command(s.pipe_bytes), "background": True})
            await srv.tool("stdout", {"id": started["pid"], "untilExit": True, "waitMs": 600000, "lines": 1})
            runs.append(s.pipe_bytes / (time.perf_counter() - began) / 1e6)
        base, ours = statistics.median(bases), statistics.median(runs)
        s.add(
            f"non-TTY capture of {s.pipe_bytes / 1e6:.0f} MB (docker, agent), median of {CAPTURE_ROUNDS}",
            f"{ours:.0f} MB/s ({ours / base:.0%})",
            f"{base:.0f} MB/s (reading a raw exec's stream)",
            ">= 50 % of baseline",
            ours >= 0.5 * base,
        )
        await ps_during_flood(s, srv, "ps latency p99 in docker mode (agent) during a {size:.2g} GB flood")
        rss = agent_rss_mib(container)
    finally:
        await srv.close()
    s.add("agent memory (RSS) after the floods", f"{rss:.1f} MiB", "-", "-", None)


def agent_rss_mib(container: Any) -> float:
    listing = container.top(ps_args="-o pid,rss,args")
    for _pid, rss, command in listing["Processes"]:
        if command.startswith("python3 -I -S -c"):
            return int(rss) / 1024
    raise RuntimeError("no agent in the container")


async def docker_agent_startup(s: Settings, container: Any) -> None:
    """The agent's start-up: a server's start with the agent beside one without it (both start the
    lease and the crash sweep), and the agent's memory when idle."""
    from process_mcp import DockerExecutor, ProcessMcpConfig
    from process_mcp.config import Defaults, DockerConfig

    def executor(agent: bool) -> DockerExecutor:
        docker_config = DockerConfig(container_name=container.name, use_existing=True, agent=agent)
        return DockerExecutor(ProcessMcpConfig(mode="docker", defaults=Defaults(workdir="/tmp"), docker=docker_config))

    async def start(agent: bool) -> float:
        ex = executor(agent)
        began = time.perf_counter()
        await ex.start()
        elapsed = (time.perf_counter() - began) * 1000
        await ex.cleanup()
        return elapsed

    with_agent, without = [], []
    for _ in range(max(3, s.startups)):
        with_agent.append(await start(True))
        without.append(await start(False))
    ex = executor(True)
    await ex.start()
    try:
        rss = await asyncio.to_thread(agent_rss_mib, container)
    finally:
        await ex.cleanup()
    s.add(
        "agent start-up (server start with it, minus without), median / agent RSS idle",
        f"{ms(statistics.median(with_agent) - statistics.median(without))} / {rss:.1f} MiB",
        f"{ms(statistics.median(without))} (server start without the agent)",
        "-",
        None,
    )


def flood_command(size: int) -> str:
    return f"yes 0123456789abcdef | head -c {size}"


async def raw_pipe_mb_s(size: int) -> float:
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec("sh", "-c", flood_command(size), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    while await proc.stdout.read(READ_CHUNK):
        pass
    await proc.wait()
    return size / (time.perf_counter() - began) / 1e6


async def raw_pty_mb_s(size: int) -> float:
    def run() -> float:
        master, slave = pty.openpty()
        began = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.setsid()
            os.dup2(slave, 1)
            os.execvp("sh", ["sh", "-c", flood_command(size)])
        os.close(slave)
        try:
            while os.read(master, READ_CHUNK):
                pass
        except OSError:
            pass  # EIO: the other side closed
        os.waitpid(pid, 0)
        os.close(master)
        return size / (time.perf_counter() - began) / 1e6

    return await asyncio.to_thread(run)


async def capture(s: Settings, workdir: str) -> None:
    srv = server(workdir)
    await srv.start()
    try:
        for tty, size in ((False, s.pipe_bytes), (True, s.tty_bytes)):
            base = await (raw_pty_mb_s(size) if tty else raw_pipe_mb_s(size))
            began = time.perf_counter()
            started = await srv.tool("spawn", {"command": flood_command(size), "tty": tty, "background": True})
            done = await srv.tool("stdout", {"id": started["pid"], "untilExit": True, "waitMs": 600000, "lines": 1})
            ours = size / (time.perf_counter() - began) / 1e6
            assert done["status"] == "terminated", done
            what = "TTY" if tty else "non-TTY"
            s.add(
                f"{what} capture of {size / 1e6:.0f} MB",
                f"{ours:.0f} MB/s ({ours / base:.0%})",
                f"{base:.0f} MB/s (reading the {'PTY' if tty else 'pipe'} directly)",
                ">= 50 % of baseline",
                ours >= 0.5 * base,
            )
            if tty:
                screen = await timed(lambda pid=started["pid"]: srv.tool("stdout", {"id": pid}), 5)
                s.add("reading the screen after the TTY flood, median", ms(statistics.median(screen)), "-", "< 50 ms",
                      statistics.median(screen) < 50)  # fmt: skip
    finally:
        await srv.close()


async def ps_during_flood(s: Settings, srv: StdioServer, figure: str) -> None:
    """ps round trips while a process floods its output, beside ps when idle."""
    idle = await timed(lambda: srv.tool("ps", {}), s.ps_calls)
    flood = await srv.tool("spawn", {"command": flood_command(s.flood_bytes), "background": True})
    during: list[float] = []
    while (await srv.tool("stdout", {"id": flood["pid"], "lines": 1}))["status"] == "running":
        during += await timed(lambda: srv.tool("ps", {}), 10)
    s.add(
        f"{figure.format(size=s.flood_bytes / 1e9)} ({len(during)} calls)",
        ms(p(during, 0.99)),
        f"{ms(p(idle, 0.99))} idle",
        "< 50 ms",
        p(during, 0.99) < 50,
    )


async def ps_latency(s: Settings, workdir: str) -> None:
    srv = server(workdir)
    await srv.start()
    try:
        await ps_during_flood(s, srv, "ps latency p99 during a {size:.1f} GB flood")
        for _ in range(s.live):
            await srv.tool("spawn", {"command": "sleep 600", "background": True})
        live = await timed(lambda: srv.tool("ps", {}), s.ps_calls)
        s.add(f"ps with {s.live} live processes, median", ms(statistics.median(live)), "-", "< 3 ms",
              statistics.median(live) < 3)  # fmt: skip
    finally:
        await srv.close()


async def input_wanted(s: Settings, workdir: str) -> None:
    """How soon a wait tells that the process reads its input, and what telling costs an idle server."""
    prompt = "python3 -c 'import sys, time; print(time.monotonic(), flush=True); sys.stdin.readline()'"
    for label, env in (("host, sandboxed", {}), ("host, sandbox off", {"SANDBOX_ENABLED": "false"})):
        srv = server(workdir, **env)
        await srv.start()
        try:
            delays = []
            for _ in range(max(5, s.spawns // 10)):
                reply = await srv.tool("spawn", {"command": prompt, "timeoutMs": 30000})
                delays.append((time.monotonic() - float(reply["stdout"].split()[0])) * 1000)
                assert reply["waitResult"] == "input", reply
                await srv.tool("kill", {"id": reply["pid"], "signal": "KILL"})
        finally:
            await srv.close()
        s.add(
            f"a read of stdin told to a waiting spawn ({label}), median / p95",
            f"{ms(statistics.median(delays))} / {ms(p(delays, 0.95))}",
            "-",
            "<= 200 ms",
            statistics.median(delays) <= 200,
        )
    srv = server(workdir)
    await srv.start()
    try:
        for _ in range(s.live):
            await srv.tool("spawn", {"command": "cat", "background": True})
        assert srv.proc is not None
        before = cpu_seconds(srv.proc.pid)
        await asyncio.sleep(5)
        idle = (cpu_seconds(srv.proc.pid) - before) / 5 * 100
    finally:
        await srv.close()
    s.add(
        f"server CPU while idle, {s.live} processes waiting for input",
        f"{idle:.2f} %",
        "-",
        "no wakeups (< 0.5 %)",
        idle < 0.5,
    )


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def memory_and_startup(s: Settings, workdir: str) -> None:
    bare_startups, ours_startups = [], []
    for _ in range(s.startups):
        bare = bare_server()
        bare_startups.append(await bare.start())
        await bare.request("tools/list", {})
        bare_rss = bare.rss_mib()
        await bare.close()
        srv = server(workdir)
        ours_startups.append(await srv.start())
        await srv.close()
    s.add(
        "startup: launch to initialize answered, median",
        ms(statistics.median(ours_startups) * 1000),
        f"{ms(statistics.median(bare_startups) * 1000)} (bare MCPServer)",
        "<= bare + 150 ms",
        statistics.median(ours_startups) - statistics.median(bare_startups) <= 0.150,
    )
    srv = server(workdir)
    await srv.start()
    try:
        await srv.tool("ps", {})
        idle = srv.rss_mib()
        for _ in range(s.live):
            await srv.tool("spawn", {"command": "sleep 600", "background": True})
        with_live = srv.rss_mib()
        started = await srv.tool("spawn", {"command": flood_command(s.flood_bytes), "background": True})
        await srv.tool("stdout", {"id": started["pid"], "untilExit": True, "waitMs": 600000, "lines": 1})
        after = srv.rss_mib()
    finally:
        await srv.close()
    s.add(
        "server memory (RSS): idle / with live processes / after the flood",
        f"{idle:.1f} / {with_live:.1f} ({s.live} live) / {after:.1f} MiB ({s.flood_bytes / 1e9:.1f} GB)",
        f"{bare_rss:.1f} MiB (bare MCPServer)",
        "idle <= bare + 15 MiB",
        idle <= bare_rss + 15,
    )


async def repl_session(s: Settings, workdir: str) -> None:
    srv = server(workdir)
    await srv.start()
    try:
        before = srv.bytes_received
        calls = 1
        started = await srv.tool("spawn", {"command": "python3 -q", "tty": True, "waitFor": ">>> $"})
        for line in ("x = 6", "y = x * 7", "print(y)", "1 / 0"):
            await srv.tool("stdin", {"id": started["pid"], "input": f"{line}\\r", "waitFor": ">>> $"})
            calls += 1
        await srv.tool("stdin", {"id": started["pid"], "input": "exit()\\r", "idleMs": 5000, "waitMs": 10000})
        calls += 1
        sent = srv.bytes_received - before
    finally:
        await srv.close()
    s.add("scripted REPL session (start, 4 statements, exit)", f"{calls} calls, {sent} bytes returned", "-", "-", None)


REPLY_OUTPUT_BYTES = 10_000_000
"""Output of the command whose spawn reply is measured: far more than a reply carries."""
PS_REPLY_ORIGINAL_KIB = 11.7
"""What the original server's ps reply took for 50 processes."""


async def reply_sizes(s: Settings, workdir: str) -> None:
    """What a client receives (the JSON-RPC line) for a large output and for a long process list, and
    how much of it is the text the model reads beside the structured content a program reads."""
    srv = server(workdir)
    await srv.start()
    try:
        command = f"head -c {REPLY_OUTPUT_BYTES} /dev/zero | tr '\\0' x"
        before = srv.bytes_received
        big = await srv.request("tools/call", {"name": "spawn", "arguments": {"command": command}})
        spawn_bytes = srv.bytes_received - before
        for _ in range(s.live):
            await srv.tool("spawn", {"command": "sleep 600", "background": True})
        before = srv.bytes_received
        listed = await srv.request("tools/call", {"name": "ps", "arguments": {}})
        ps_bytes = srv.bytes_received - before
    finally:
        await srv.close()
    ps_most = PS_REPLY_ORIGINAL_KIB * s.live / 50
    for figure, result, size, target, passed in (
        (f"spawn reply for {REPLY_OUTPUT_BYTES / 1e6:.0f} MB of output", big, spawn_bytes, "-", None),
        (f"ps reply with {s.live} live processes", listed, ps_bytes, f"<= {ps_most:.1f} KiB (the original's)",
         ps_bytes <= ps_most * 1024),
    ):  # fmt: skip
        text = sum(len(block.get("text", "").encode()) for block in result["content"])
        structured = len(json.dumps(result.get("structuredContent"), separators=(",", ":")).encode())
        s.add(figure, f"{size / 1024:.1f} KiB (text {text / 1024:.1f}, structured {structured / 1024:.1f})",
              "-", target, passed)  # fmt: skip


class HttpServer:
    """A server process on streamable HTTP (a free loopback port), with bearer tokens for ``principals``."""

    def __init__(self, workdir: str, principals: int, **env: str) -> None:
        self.tokens = {f"p{i}": secrets.token_hex(16) for i in range(principals)}
        self._tokens_file = Path(workdir) / f"bench-tokens-{secrets.token_hex(4)}"
        self._env = {
            **os.environ,
            "DEFAULT_WORKDIR": workdir,
            "PROCESS_AUTH_TOKENS_FILE": str(self._tokens_file),
            "MAX_TIMEOUT_MS": "600000",
            **env,
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self) -> None:
        self._tokens_file.write_text("".join(f"{name} {token}\n" for name, token in self.tokens.items()))
        self._tokens_file.chmod(0o600)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "process_mcp", "--transport", "http", "--port", "0",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env=self._env,
        )  # fmt: skip
        assert self.proc.stderr is not None
        while not self.url:
            line = (await asyncio.wait_for(self.proc.stderr.readline(), 30)).decode()
            if not line:
                raise RuntimeError("the HTTP server exited at start")
            if "serving on http://" in line:
                self.url = line.split("serving on ")[1].split()[0]
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        while await self.proc.stderr.read(65536):
            pass

    def rss_mib(self) -> float:
        assert self.proc is not None
        return rss_mib(self.proc.pid)

    async def close(self) -> None:
        self._tokens_file.unlink(missing_ok=True)
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class HttpSession:
    """One client's session, driven with raw JSON-RPC over HTTP (the 2025 handshake), as stdio is above."""

    def __init__(self, http: Any, url: str, token: str) -> None:
        self._http = http
        self._url = url
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        self._next_id = 0

    async def start(self) -> None:
        params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}
        response = await self._http.post(
            self._url, json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}, headers=self._headers
        )
        response.raise_for_status()
        self._headers["Mcp-Session-Id"] = response.headers["mcp-session-id"]
        self._headers["Mcp-Protocol-Version"] = "2025-11-25"
        await self._http.post(
            self._url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=self._headers
        )

    async def tool(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        body = {"jsonrpc": "2.0", "id": self._next_id, "method": "tools/call",
                "params": {"name": name, "arguments": arguments}}  # fmt: skip
        response = await self._http.post(self._url, json=body, headers=self._headers)
        response.raise_for_status()
        for line in response.text.splitlines():
            if line.startswith("data: "):
                message = json.loads(line[6:])
                if message.get("id") == self._next_id:
                    result: dict[str, Any] = message["result"]
                    if result.get("isError"):
                        raise RuntimeError(f"{name} failed: {result['content'][0]['text']}")
                    return result.get("structuredContent") or {}
        raise RuntimeError(f"no answer to {name}: {response.text[:200]}")


async def port_proxy(s: Settings, workdir: str) -> None:
    """A GET of a box's port at the URL ps gives over HTTP, beside a GET of the same server on its own
    port, each on a kept-alive connection: with the box on the server's loopback (the proxy connects to
    the port) and in a box with a network of its own (through the agent's tunnel)."""
    import httpx2

    for label, env, direct in (
        ("box on the server's loopback", {"SANDBOX_ALLOWED_DOMAINS": "*"}, True),
        ("box with its own network, through the agent", {"SANDBOX_ALLOWED_DOMAINS": "example.com"}, False),
    ):
        srv = HttpServer(workdir, 1, **env)
        await srv.start()
        try:
            async with httpx2.AsyncClient(timeout=60) as http:
                session = HttpSession(http, srv.url, srv.tokens["p0"])
                await session.start()
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]
                command = f"exec python3 -m http.server {port} --bind 127.0.0.1"
                served = await session.tool("spawn", {"command": command, "ready": {"port": port}, "timeoutMs": 30000})
                rows = (await session.tool("ps", {}))["processes"]
                url = next(row["ports"][0]["url"] for row in rows if row["pid"] == served["pid"])
                count = max(20, s.spawns)
                proxied = await timed(lambda url=url: http.get(url), count)
                if direct:
                    straight = await timed(lambda port=port: http.get(f"http://127.0.0.1:{port}/"), count)
                    overhead = statistics.median(proxied) - statistics.median(straight)
                    s.add(
                        f"GET of a box port over the HTTP proxy ({label}), median / p95",
                        f"{ms(statistics.median(proxied))} / {ms(p(proxied, 0.95))}",
                        f"{ms(statistics.median(straight))} / {ms(p(straight, 0.95))} (the same server, directly)",
                        "overhead <= 2 ms",
                        overhead <= 2.0,
                    )
                else:
                    s.add(
                        f"GET of a box port over the HTTP proxy ({label}), median / p95",
                        f"{ms(statistics.median(proxied))} / {ms(p(proxied, 0.95))}",
                        "-",
                        "-",
                        None,
                    )
                await session.tool("kill", {"id": served["pid"], "signal": "KILL"})
        finally:
            await srv.close()


async def http_figures(s: Settings, workdir: str) -> None:
    """The HTTP transport beside stdio: a spawn's round trip, ps throughput from 8 clients, and memory
    with many principals holding processes."""
    import httpx2

    stdio = server(workdir, SANDBOX_ENABLED="false", PROCESS_KEEP_TERMINATED="5")
    await stdio.start()
    try:
        await timed(lambda: stdio.tool("spawn", {"command": "true"}), 5)
        over_stdio = await timed(lambda: stdio.tool("spawn", {"command": "true"}), s.spawns)
    finally:
        await stdio.close()
    principals, per_principal = (4, 2) if s.quick else (20, 5)
    srv = HttpServer(workdir, principals, SANDBOX_ENABLED="false", PROCESS_KEEP_TERMINATED="5")
    await srv.start()
    limits = httpx2.Limits(max_connections=64, max_keepalive_connections=64)
    try:
        async with httpx2.AsyncClient(timeout=600, limits=limits) as http:
            first = HttpSession(http, srv.url, srv.tokens["p0"])
            await first.start()
            await timed(lambda: first.tool("spawn", {"command": "true"}), 5)
            over_http = await timed(lambda: first.tool("spawn", {"command": "true"}), s.spawns)
            s.add(
                "spawn true round trip over HTTP (host, sandbox off), median / p95",
                f"{ms(statistics.median(over_http))} / {ms(p(over_http, 0.95))}",
                f"{ms(statistics.median(over_stdio))} / {ms(p(over_stdio, 0.95))} over stdio",
                "-",
                None,
            )
            clients = [HttpSession(http, srv.url, srv.tokens[f"p{i % principals}"]) for i in range(8)]
            for client in clients:
                await client.start()
            calls = s.ps_calls * 5
            began = time.perf_counter()
            await asyncio.gather(*(timed(lambda c=c: c.tool("ps", {}), calls // 8) for c in clients))
            rate = calls // 8 * 8 / (time.perf_counter() - began)
            alone_began = time.perf_counter()
            await timed(lambda: first.tool("ps", {}), calls // 8)
            alone = calls // 8 / (time.perf_counter() - alone_began)
            s.add("ps requests per second over HTTP, 8 concurrent clients", f"{rate:.0f}/s",
                  f"{alone:.0f}/s from one client", "-", None)  # fmt: skip
    finally:
        await srv.close()
    # Memory sandboxed: each principal's processes run in sandboxes, which are processes of their own, so
    # this is what the server itself holds per principal. Several principals need a domain list.
    srv = HttpServer(workdir, principals, PROCESS_KEEP_TERMINATED="5", SANDBOX_ALLOWED_DOMAINS="example.com")
    await srv.start()
    try:
        async with httpx2.AsyncClient(timeout=600, limits=limits) as http:
            first = HttpSession(http, srv.url, srv.tokens["p0"])
            await first.start()
            await first.tool("spawn", {"command": "sleep 600", "background": True})
            idle = srv.rss_mib()
            for i in range(principals):
                session = HttpSession(http, srv.url, srv.tokens[f"p{i}"])
                await session.start()
                for _ in range(per_principal - (i == 0)):
                    await session.tool("spawn", {"command": "sleep 600", "background": True})
            held = srv.rss_mib()
    finally:
        await srv.close()
    s.add(
        "server memory (RSS) over HTTP with principals holding processes (sandboxed)",
        f"{held:.1f} MiB ({principals} principals x {per_principal} processes)",
        f"{idle:.1f} MiB with 1 principal and 1 process",
        "-",
        None,
    )


SILENT_CONNECTIONS = 270
"""Connections that send nothing, as many as a sandboxed process opened to keep every principal out."""


async def http_floods(s: Settings, workdir: str) -> None:
    """Another principal's ps over HTTP while one fills what the server shares: connections that send
    nothing, then MCP sessions opened and never ended (and the memory those sessions hold)."""
    import httpx2

    srv = HttpServer(workdir, 2, SANDBOX_ENABLED="false")
    await srv.start()
    try:
        async with httpx2.AsyncClient(timeout=60) as http:
            other = HttpSession(http, srv.url, srv.tokens["p1"])
            await other.start()
            idle = await timed(lambda: other.tool("ps", {}), s.ps_calls)
            host, port = srv.url.split("//")[1].split("/")[0].rsplit(":", 1)
            silent = [await asyncio.open_connection(host, int(port)) for _ in range(SILENT_CONNECTIONS)]
            during_silent = await timed(lambda: other.tool("ps", {}), s.ps_calls)
            for _, writer in silent:
                writer.close()

            attacker = {"Authorization": f"Bearer {srv.tokens['p0']}", "Accept": "application/json, text/event-stream"}
            client = {"name": "flood", "version": "0"}
            params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": client}
            initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}
            statuses: list[int] = []
            asked = 200 if s.quick else 1000
            before = srv.rss_mib()

            async def flood() -> None:
                for _ in range(asked // 8):
                    statuses.append((await http.post(srv.url, json=initialize, headers=attacker)).status_code)

            flooding = [asyncio.get_running_loop().create_task(flood()) for _ in range(8)]
            during_sessions: list[float] = []
            while not all(task.done() for task in flooding):
                during_sessions += await timed(lambda: other.tool("ps", {}), 1)
            await asyncio.gather(*flooding)
            after = srv.rss_mib()
    finally:
        await srv.close()
    s.add(
        f"ps of another principal over HTTP with {SILENT_CONNECTIONS} silent connections open, median / p99",
        f"{ms(statistics.median(during_silent))} / {ms(p(during_silent, 0.99))}",
        f"{ms(statistics.median(idle))} / {ms(p(idle, 0.99))} idle",
        "-",
        None,
    )
    s.add(
        f"server memory (RSS) after one principal asks for {asked} MCP sessions",
        f"{after:.1f} MiB ({statuses.count(200)} opened, {statuses.count(429)} refused)",
        f"{before:.1f} MiB before",
        "-",
        None,
    )
    s.add(
        f"ps of another principal over HTTP during that session flood, median / p99 ({len(during_sessions)} calls)",
        f"{ms(statistics.median(during_sessions))} / {ms(p(during_sessions, 0.99))}",
        f"{ms(statistics.median(idle))} / {ms(p(idle, 0.99))} idle",
        "-",
        None,
    )


def table(s: Settings) -> str:
    lines = ["| figure | process-mcp | baseline (same run) | target | result |", "|---|---|---|---|---|"]
    for row in s.rows:
        result = "-" if row.passed is None else ("pass" if row.passed else "FAIL")
        lines.append(f"| {row.figure} | {row.ours} | {row.baseline} | {row.target} | {result} |")
    return "\n".join(lines)


def machine() -> str:
    cpus = os.cpu_count()
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    system = platform.freedesktop_os_release().get("PRETTY_NAME", platform.system())
    return f"{system}, Python {platform.python_version()}, {cpus} cores, {memory:.0f} GiB"


async def operator_figures(s: Settings, workdir: str) -> None:
    """What the operator's controls cost a spawn: command policy and audit log on, beside both off,
    measured alternately in one run on the same machine. (Stats are always on and cost ps, not spawn:
    see the ps figures.)"""
    audit = Path(workdir) / f"bench-audit-{secrets.token_hex(4)}.jsonl"
    plain = server(workdir, SANDBOX_ENABLED="false", PROCESS_KEEP_TERMINATED="5")
    guarded = server(
        workdir,
        SANDBOX_ENABLED="false",
        PROCESS_KEEP_TERMINATED="5",
        PROCESS_COMMAND_DENY="rm,shutdown,reboot,curl*",
        PROCESS_AUDIT_LOG=str(audit),
    )
    await plain.start()
    await guarded.start()
    try:
        off: list[float] = []
        on: list[float] = []
        command = {"command": "true | cat && echo $(printf x) > /dev/null"}
        for _ in range(5):
            await plain.tool("spawn", command)
            await guarded.tool("spawn", command)
        for _ in range(s.spawns):
            off += await timed(lambda: plain.tool("spawn", command), 1)
            on += await timed(lambda: guarded.tool("spawn", command), 1)
    finally:
        await plain.close()
        await guarded.close()
        audit.unlink(missing_ok=True)
    # Each guarded spawn runs right after a plain one: the median of those pairs' differences does not
    # move with the machine's load the way a difference of two medians does.
    overhead = statistics.median(b - a for a, b in zip(off, on, strict=True))
    s.add(
        "spawn round trip with command policy and audit log on, median",
        f"{ms(statistics.median(on))} ({overhead:+.2f} ms, median of paired differences)",
        f"{ms(statistics.median(off))} with both off",
        "<= +0.5 ms",
        overhead <= 0.5,
    )


class ConcurrentCalls:
    """Tool calls in flight at once on one stdio server: replies are matched to calls by id."""

    def __init__(self, srv: StdioServer) -> None:
        self.srv = srv
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 1_000_000
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ConcurrentCalls:
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._reader is not None
        self._reader.cancel()

    async def tool(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The call's result (an error result too)."""
        self._next_id += 1
        reply = asyncio.get_running_loop().create_future()
        self._waiting[self._next_id] = reply
        request = {"name": name, "arguments": arguments}
        await self.srv._send({"jsonrpc": "2.0", "id": self._next_id, "method": "tools/call", "params": request})
        result: dict[str, Any] = await reply
        return result

    async def _read(self) -> None:
        assert self.srv.proc is not None
        assert self.srv.proc.stdout is not None
        while line := await self.srv.proc.stdout.readline():
            message = json.loads(line)
            reply = self._waiting.pop(message.get("id"), None)
            if reply is not None:
                reply.set_result(message.get("result") or {"isError": True, "error": message.get("error")})


ATTACKS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "a waitFor of ^(a+)+b$ over 28 a's": ({"command": f"echo {'a' * 28}!; sleep 600", "waitFor": "^(a+)+b$"}, {}),
    "a TTY printing 64 KiB of DECALN": (
        {"command": "printf '\\033#8%.0s' $(seq 21845); echo; echo DONE; sleep 600", "tty": True, "waitFor": "DONE"},
        {},
    ),
    "a 2.9 MB command with a command policy": (
        {"command": "echo " + "a " * 1_450_000},
        {"PROCESS_COMMAND_ALLOW": "echo,sleep,printf,seq"},
    ),
}
"""Calls that each froze the server for 8-17 s before it bounded them, and the settings they need."""


async def ps_during_attacks(s: Settings, workdir: str) -> None:
    """ps round trips while one caller repeats an attack on the event loop, beside ps when idle."""
    for name, (attack, settings) in ATTACKS.items():
        srv = server(workdir, SANDBOX_ENABLED="false", DEFAULT_TIMEOUT_MS="3000", **settings)
        await srv.start()
        try:
            idle = await timed(functools.partial(srv.tool, "ps", {}), s.ps_calls)
            during: list[float] = []
            attacks: list[float] = []
            async with ConcurrentCalls(srv) as calls:
                for _ in range(2 if s.quick else 5):
                    began = time.perf_counter()
                    attacking = asyncio.get_running_loop().create_task(calls.tool("spawn", attack))
                    while not attacking.done():
                        during += await timed(functools.partial(calls.tool, "ps", {}), 1)
                        await asyncio.sleep(0.01)
                    attacks.append(time.perf_counter() - began)
                    result = attacking.result()
                    pid = (result.get("structuredContent") or {}).get("pid")
                    if pid is not None:
                        await calls.tool("kill", {"id": pid, "signal": "KILL"})
        finally:
            await srv.close()
        s.add(
            f"ps during {name}, median / p99 ({len(during)} calls)",
            f"{ms(statistics.median(during))} / {ms(p(during, 0.99))} (the attacking call: "
            f"{statistics.median(attacks):.2f} s)",
            f"{ms(statistics.median(idle))} / {ms(p(idle, 0.99))} idle",
            "p99 < 500 ms",
            p(during, 0.99) < 500,
        )


FIGURE_GROUPS = (
    spawn_round_trip,
    box_start,
    capture,
    ps_latency,
    input_wanted,
    memory_and_startup,
    repl_session,
    reply_sizes,
    http_figures,
    port_proxy,
    http_floods,
    operator_figures,
    ps_during_attacks,
    docker_figures,
)


async def main(s: Settings, only: list[str]) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="process-mcp-bench-") as workdir,
        tempfile.TemporaryDirectory(prefix="process-mcp-bench-homes-") as homes,
    ):
        os.environ["SANDBOX_HOMES_DIR"] = homes  # the boxes' homes go with the run, servers take it
        for figure in FIGURE_GROUPS:
            if only and figure.__name__ not in only:
                continue
            print(f"{figure.__name__} ...", file=sys.stderr, flush=True)
            await figure(s, workdir)
    print(f"\nMachine: {machine()}; {'quick run, timings not judged' if s.quick else 'full run'}\n")
    print(table(s))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="process-mcp benchmarks")
    parser.add_argument("--quick", action="store_true", help="seconds, small sizes, no pass/fail on timings")
    parser.add_argument("--docker-image", help="a local image with python3 for the docker rows")
    parser.add_argument(
        "--only", action="append", default=[], choices=[f.__name__ for f in FIGURE_GROUPS], help="run these groups"
    )
    args = parser.parse_args()
    if args.quick:
        settings = Settings(True, 20, 20_000_000, 5_000_000, 10, 1, 20, 50_000_000, args.docker_image)
    else:
        settings = Settings(False, 200, 500_000_000, 100_000_000, 50, 5, 200, 1_000_000_000, args.docker_image)
    asyncio.run(main(settings, args.only))
