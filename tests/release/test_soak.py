"""A short soak (the full one is `python bench/soak.py`): descriptors and memory stay flat."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import anyio
import pytest

pytestmark = pytest.mark.anyio

SOAK = Path(__file__).parents[2] / "bench" / "soak.py"


@pytest.mark.parametrize("mode", ["host", "host-unsandboxed"])
async def test_sequential_spawns_leak_no_descriptors_and_little_memory(mode: str) -> None:
    with anyio.fail_after(120):
        result = await anyio.run_process([sys.executable, str(SOAK), "--spawns", "600", "--mode", mode], check=False)
    assert result.returncode == 0, result.stderr.decode()
    summary = result.stdout.decode().strip().splitlines()[-1]
    found = re.search(r"descriptors ([+-]\d+), memory ([+-][\d.]+) MiB", summary)
    assert found, summary
    assert int(found[1]) <= 0, summary
    assert float(found[2]) < 8, summary
