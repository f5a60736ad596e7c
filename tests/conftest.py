"""Shared fixtures: a real executor per backend, and bounded waits on real conditions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from process_mcp import HostExecutor, ProcessExecutor, ProcessMcpConfig
from process_mcp.config import Defaults, Limits


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def host_config(workdir: Path, **limits: int) -> ProcessMcpConfig:
    return ProcessMcpConfig(mode="host", defaults=Defaults(workdir=str(workdir)), limits=Limits(**limits))


@pytest.fixture(params=["host"])
async def executor(request: pytest.FixtureRequest, workdir: Path) -> AsyncIterator[ProcessExecutor]:
    """A started executor of each backend; every process it started is ended afterwards."""
    ex: ProcessExecutor = HostExecutor(host_config(workdir))
    await ex.start()
    try:
        yield ex
    finally:
        await ex.cleanup()
