"""The examples in examples/ run as a user would run them, and say what they promise."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

from ..helpers import WAIT_S

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).parents[2] / "examples"


async def run_example(name: str) -> str:
    with anyio.fail_after(WAIT_S * 3):
        result = await anyio.run_process([sys.executable, str(EXAMPLES / name)], check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_the_simple_example_echoes_hello_world() -> None:
    assert await run_example("simple_example.py") == "host-1: terminated, exit code 0\nHello World\n"


async def test_the_library_example_drives_a_repl_a_background_job_and_kill() -> None:
    output = await run_example("library_usage.py")
    assert "[echo] host-1 exit=3 stdout='hello\\n' stderr='oops\\n'" in output
    assert "tty: True 42" in output
    assert "[ps] host-3 running while true; do echo tick; sleep 0.1; done" in output
    assert "[kill] host-3 terminated by SIGTERM" in output


async def test_the_library_example_serving_writes_nothing_but_the_protocol_to_stdout() -> None:
    initialize = (
        '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18",'
        '"capabilities":{},"clientInfo":{"name":"t","version":"1"}}}\n'
    )
    with anyio.fail_after(WAIT_S * 3):
        result = await anyio.run_process(
            [sys.executable, str(EXAMPLES / "library_usage.py"), "--serve"], input=initialize.encode(), check=False
        )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines, "no reply to initialize"
    assert all(line.startswith('{"jsonrpc":"2.0"') for line in lines), lines[:3]
    assert "[kill] host-3 terminated by SIGTERM" in result.stderr.decode()
