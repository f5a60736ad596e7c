"""The quick benchmark run (what `python bench/run.py --quick` prints); timings are not judged here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from ..helpers import DEBIAN_IMAGE

if TYPE_CHECKING:
    from docker import DockerClient

pytestmark = pytest.mark.anyio

RUN = Path(__file__).parents[2] / "bench" / "run.py"
FIGURES = [
    "spawn true round trip (host, sandbox off)",
    "spawn true round trip (host, sandbox off) after a 100 ms pause",
    "spawn true round trip (host, sandboxed)",
    "spawn true round trip (host, sandboxed) after a 100 ms pause",
    "first spawn of a new box (host, sandboxed)",
    "non-TTY capture",
    "TTY capture",
    "reading the screen after the TTY flood",
    "ps latency p99 during",
    "ps with 10 live processes",
    "a read of stdin told to a waiting spawn (host, sandboxed)",
    "a read of stdin told to a waiting spawn (host, sandbox off)",
    "server CPU while idle, 10 processes waiting for input",
    "startup: launch to initialize answered",
    "server memory (RSS)",
    "scripted REPL session",
    "spawn reply for 10 MB of output",
    "ps reply with 10 live processes",
    "spawn true round trip over HTTP (host, sandbox off)",
    "ps requests per second over HTTP, 8 concurrent clients",
    "server memory (RSS) over HTTP with principals holding processes (sandboxed)",
    "GET of a box port over the HTTP proxy (box on the server's loopback)",
    "GET of a box port over the HTTP proxy (box with its own network, through the agent)",
    "ps of another principal over HTTP with 270 silent connections open",
    "server memory (RSS) after one principal asks for",
    "ps of another principal over HTTP during that session flood",
    "spawn round trip with command policy and audit log on",
    "ps during a waitFor of ^(a+)+b$ over 28 a's",
    "ps during a TTY printing 64 KiB of DECALN",
    "ps during a 2.9 MB command with a command policy",
    "spawn true round trip (docker, agent)",
    "spawn true round trip (docker, one exec per process)",
    "non-TTY capture of 20 MB (docker, agent)",
    "ps latency p99 in docker mode (agent)",
    "agent memory (RSS) after the floods",
    "agent start-up",
]


async def test_the_quick_benchmark_measures_every_figure(docker_client: DockerClient) -> None:
    with anyio.fail_after(300):
        result = await anyio.run_process(
            [sys.executable, str(RUN), "--quick", "--docker-image", DEBIAN_IMAGE], check=False
        )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    table = result.stdout.decode()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # Each row is the longest figure name it starts with (a docker row starts like its host row).
    assert [max((f for f in FIGURES if row[2:].startswith(f)), key=len) for row in rows] == FIGURES, table
    assert all(row.rstrip().endswith("| - |") for row in rows), "a quick run must not judge timings"
    assert "6 calls" in table
