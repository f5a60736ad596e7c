"""The audit log: a record for every tool call and every process end, written off the request path,
rotated by size, and loud (or refusing) when the disk is full. Real servers, real files, a real tmpfs."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from process_mcp import ProcessMcpServer, create_process_mcp
from process_mcp.config import AuditConfig

from ..helpers import WAIT_S, call, cannot_run_here, error, host_config

pytestmark = pytest.mark.anyio


def records(path: Path) -> list[dict[str, Any]]:
    """Every record of the log and its rotated files, oldest first; each line must be a whole record."""
    files = [*sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:])), path]
    return [json.loads(line) for file in files if file.exists() for line in file.read_text().splitlines()]


def audited(workdir: Path, log: Path, **settings: Any) -> Any:
    config = host_config(workdir)
    config.audit = AuditConfig(path=str(log), **settings)
    return config


@pytest.fixture
async def client(workdir: Path, tmp_path: Path) -> AsyncIterator[tuple[Client, Path, ProcessMcpServer]]:
    log = tmp_path / "audit.jsonl"
    mcp = await create_process_mcp(audited(workdir, log))
    async with mcp, Client(mcp.server, read_timeout_seconds=WAIT_S) as connected:
        yield connected, log, mcp


async def test_every_tool_call_is_recorded_with_its_outcome_and_secrets_redacted(
    client: tuple[Client, Path, ProcessMcpServer],
) -> None:
    connected, log, mcp = client
    started = await call(connected, "spawn", {"command": "cat", "env": {"TOKEN": "hunter2"}, "background": True})
    await call(connected, "stdin", {"id": started["pid"], "input": "the password\\n", "waitFor": "word"})
    await call(connected, "stdout", {"id": started["pid"], "lines": 5})
    await call(connected, "ps", {})
    await call(connected, "kill", {"id": started["pid"]})
    assert "process_not_found" in await error(connected, "stdout", {"id": "host-99"})
    await mcp.cleanup()
    calls = [r for r in records(log) if r["event"] == "call"]
    assert [(r["tool"], r["outcome"], r["pid"]) for r in calls] == [
        ("spawn", "ok", "host-1"),
        ("stdin", "ok", "host-1"),
        ("stdout", "ok", "host-1"),
        ("ps", "ok", None),
        ("kill", "ok", "host-1"),
        ("stdout", "process_not_found", "host-99"),
    ]
    assert calls[0]["arguments"] == {"command": "cat", "env": {"TOKEN": "<7 chars>"}, "background": True}
    assert calls[1]["arguments"]["input"] == "<14 chars>"
    text = log.read_text()
    assert "hunter2" not in text
    assert "password" not in text
    assert all(r["principal"] is None and r["durationMs"] >= 0 and r["time"].endswith("Z") for r in calls)


async def test_redaction_can_be_turned_off(workdir: Path, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    async with await create_process_mcp(audited(workdir, log, redact=False)) as mcp, Client(mcp.server) as connected:
        await call(connected, "spawn", {"command": "true", "env": {"TOKEN": "hunter2"}})
    [spawned] = [r for r in records(log) if r["event"] == "call"]
    assert spawned["arguments"]["env"] == {"TOKEN": "hunter2"}


async def test_each_way_a_process_ends_is_recorded(workdir: Path, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    config = audited(workdir, log)
    config.limits.max_lifetime_s = 1.0
    async with await create_process_mcp(config) as mcp, Client(mcp.server, read_timeout_seconds=WAIT_S) as connected:
        await call(connected, "spawn", {"command": "echo hi; exit 4"})
        killed = await call(connected, "spawn", {"command": "sleep 30", "background": True})
        await call(connected, "kill", {"id": killed["pid"]})
        await call(connected, "spawn", {"command": "sleep 30", "timeoutMs": 5000})  # ended at its lifetime
        await call(connected, "spawn", {"command": "sleep 30", "background": True})  # running at shutdown
    ends = {r["pid"]: r for r in records(log) if r["event"] == "end"}
    assert [(r["endedBy"], r["exitCode"], r["signal"]) for r in ends.values()] == [
        ("exit", 4, None),
        ("kill", 143, "SIGTERM"),
        ("lifetime", 143, "SIGTERM"),
        ("shutdown", 143, "SIGTERM"),
    ]
    assert ends["host-1"]["outputBytes"] == 3
    assert ends["host-1"]["command"] == "echo hi; exit 4"


async def test_fifty_concurrent_calls_leave_fifty_whole_records(
    client: tuple[Client, Path, ProcessMcpServer],
) -> None:
    connected, log, mcp = client
    async with anyio.create_task_group() as tasks:
        for i in range(50):
            tasks.start_soon(call, connected, "spawn", {"command": f"echo {i}"})
    await mcp.cleanup()
    lines = log.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # a torn line would not parse
    spawns = [r for r in parsed if r["event"] == "call"]
    assert len(spawns) == 50
    assert sorted(r["arguments"]["command"] for r in spawns) == sorted(f"echo {i}" for i in range(50))
    assert len([r for r in parsed if r["event"] == "end"]) == 50


async def test_the_log_rotates_by_size_and_keeps_so_many_files(workdir: Path, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    async with (
        await create_process_mcp(audited(workdir, log, max_bytes=4096, keep=2)) as mcp,
        Client(mcp.server) as connected,
    ):
        for _ in range(60):
            await call(connected, "ps", {})
    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("audit.jsonl"))
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 4096
        assert all(json.loads(line)["tool"] == "ps" for line in (tmp_path / name).read_text().splitlines())
    assert oct(log.stat().st_mode & 0o777) == "0o600"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    if os.getuid() != 0:
        cannot_run_here("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


async def test_a_full_disk_is_logged_loudly_and_the_server_keeps_serving(
    workdir: Path, tiny_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tiny_disk / "audit.jsonl"
    filler = tiny_disk / "filler"
    filler.write_bytes(b"x" * 12 * 1024)
    async with await create_process_mcp(audited(workdir, log)) as mcp, Client(mcp.server) as connected:
        audit = mcp.spaces.audit
        assert audit is not None
        with anyio.fail_after(WAIT_S):
            while audit.healthy:
                await call(connected, "spawn", {"command": "echo " + "y" * 200})
        assert audit.lost > 0
        assert any("AUDIT: cannot write the audit log" in r.message for r in caplog.records)
        assert (await call(connected, "spawn", {"command": "echo still serving"}))["stdout"] == "still serving\n"
    for line in log.read_text().splitlines():
        json.loads(line)  # what was written is whole


async def test_with_the_audit_required_calls_are_refused_while_it_cannot_be_written(
    workdir: Path, tiny_disk: Path
) -> None:
    log = tiny_disk / "audit.jsonl"
    filler = tiny_disk / "filler"
    filler.write_bytes(b"x" * 12 * 1024)
    async with await create_process_mcp(audited(workdir, log, required=True)) as mcp, Client(mcp.server) as connected:
        audit = mcp.spaces.audit
        assert audit is not None
        with anyio.fail_after(WAIT_S):
            while audit.healthy:
                await connected.call_tool("ps", {})
        refused = await error(connected, "spawn", {"command": "echo unaudited"})
        assert refused.startswith("audit_unavailable: ")
        filler.unlink()  # space again: the next records are written and calls are served
        with anyio.fail_after(WAIT_S):
            while not audit.healthy:
                audit.write({"event": "probe"})
                await anyio.sleep(0.05)
        assert (await call(connected, "spawn", {"command": "echo audited"}))["stdout"] == "audited\n"


async def test_a_process_end_records_its_peak_memory(
    client: tuple[Client, Path, ProcessMcpServer],
) -> None:
    connected, log, mcp = client
    sandbox = mcp.executor.backend._sandbox  # type: ignore[attr-defined]
    if sandbox is None or sandbox.cgroups is None:
        cannot_run_here("the exact peak needs per-sandbox cgroups (a root server where the kernel allows them)")
    grab = "python3 -c \"b = bytearray(100 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])\""
    assert (await call(connected, "spawn", {"command": grab, "timeoutMs": 20000}))["exitCode"] == 0
    await call(connected, "spawn", {"command": "true"})
    await mcp.cleanup()
    ends = [r for r in records(log) if r["event"] == "end"]
    assert ends[0]["peakRssBytes"] >= 100 * 1024 * 1024
    assert ends[1]["peakRssBytes"] < 50 * 1024 * 1024  # a reused cgroup starts from nothing


async def test_every_port_reached_from_outside_the_box_is_recorded(workdir: Path, tmp_path: Path) -> None:
    """A box without a network of its own: ps gives its server's port a forward, and the log says so."""
    log = tmp_path / "audit.jsonl"
    config = audited(workdir, log)
    config.sandbox = config.sandbox.model_copy(update={"allowed_domains": []})
    async with await create_process_mcp(config) as mcp, Client(mcp.server, read_timeout_seconds=WAIT_S) as connected:
        served = await call(
            connected,
            "spawn",
            {
                "command": "exec python3 -m http.server 8000 --bind 127.0.0.1",
                "ready": {"port": 8000},
                "timeoutMs": 30000,
            },
        )
        assert served["ready"] is True
        for _ in range(2):  # listed twice: one forward, recorded once
            [row] = (await call(connected, "ps", {}))["processes"]
        [port] = row["ports"]
        await mcp.cleanup()
    forwards = [r for r in records(log) if r["event"] == "forward"]
    assert forwards == [{**forwards[0], "principal": None, "pid": "host-1", "port": 8000, "url": port["url"]}], forwards
    assert port["url"] != "http://127.0.0.1:8000/"  # the box's own port 8000, not this machine's
