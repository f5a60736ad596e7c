"""Each output stream kept whole in a file in the box (``outputFile``), read by the box's own commands
and paged back by the server where its buffer dropped it; and what a process of the box can do to it."""

from __future__ import annotations

import hashlib

import pytest

from process_mcp import ProcessExecutor, SpawnOptions
from process_mcp.config import Limits
from process_mcp.core.models import SINCE_MAX_BYTES

from ..helpers import backend_config, backends, executor_for

pytestmark = pytest.mark.anyio

LINES = 300_000
"""``seq 1 LINES`` prints about 2 MB: more than a stream's buffer (PROCESS_OUTPUT_BUFFER_BYTES) keeps."""
WHOLE = "".join(f"{n}\n" for n in range(1, LINES + 1))


@pytest.fixture(params=backends("output_files"))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_the_whole_output_is_in_a_file_in_the_box_that_its_commands_read(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command=f"seq 1 {LINES}; echo oops >&2"))
    assert result.output_file == f"/tmp/process-mcp-{result.pid}.out"
    assert result.stderr_file == f"/tmp/process-mcp-{result.pid}.err"
    assert f"or read {result.output_file}" in result.stdout  # the reply's marker says where the rest is
    read = await executor.spawn(
        SpawnOptions(command=f"md5sum < {result.output_file}; wc -l < {result.output_file}; cat {result.stderr_file}")
    )
    assert read.stdout.split() == [hashlib.md5(WHOLE.encode()).hexdigest(), "-", str(LINES), "oops"]
    listed = await executor.get_output(result.pid)
    assert (listed.output_file, listed.stderr_file) == (result.output_file, result.stderr_file)


async def test_a_stream_that_printed_nothing_has_no_file(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="echo only-out"))
    assert result.output_file == f"/tmp/process-mcp-{result.pid}.out"
    assert result.stderr_file is None
    listed = await executor.spawn(SpawnOptions(command=f"ls /tmp/process-mcp-{result.pid}.*"))
    assert listed.stdout == f"{result.output_file}\n"


async def test_paging_from_the_start_reads_back_what_the_buffer_dropped(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command=f"seq 1 {LINES}"))
    assert result.cursor == len(WHOLE)
    pages: list[str] = []
    cursor = 0
    while cursor < result.cursor:
        page = await executor.get_output(result.pid, since=cursor, max_bytes=SINCE_MAX_BYTES)
        assert page.dropped == 0, (cursor, page.dropped)
        assert page.stdout.endswith("\n")
        pages.append(page.stdout)
        cursor = page.cursor
    assert "".join(pages) == WHOLE
    middle = await executor.get_output(result.pid, since=WHOLE.index("\n100000\n") + 3, max_bytes=14)
    assert middle.stdout == "100000\n100001\n"  # from the start of the cursor's line, as in the buffer


async def test_a_terminal_keeps_its_one_stream_in_one_file(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="printf 'one\\ntwo\\n'", tty=True))
    assert result.output_file == f"/tmp/process-mcp-{result.pid}.out"
    assert result.stderr_file is None
    read = await executor.spawn(SpawnOptions(command=f"tr '\\r' R < {result.output_file}"))
    assert read.stdout == "oneR\ntwoR\n"  # as the terminal wrote it


async def test_a_files_size_is_bounded_by_the_spawns_output_limit_and_the_rest_is_paged_from_memory(
    request: pytest.FixtureRequest, backend: str, workdir: str
) -> None:
    config = backend_config(request, backend, workdir)
    executor = executor_for(config.model_copy(update={"limits": Limits(output_file_mb=1)}))
    await executor.start()
    try:
        result = await executor.spawn(SpawnOptions(command=f"seq 1 {2 * LINES}"))  # more than the file and buffer
        whole = "".join(f"{n}\n" for n in range(1, 2 * LINES + 1))
        size = await executor.spawn(SpawnOptions(command=f"wc -c < {result.output_file}"))
        assert size.stdout == f"{1024 * 1024}\n"
        # Past the file and before the buffer: left out, and counted as dropped, once.
        cursor = 1024 * 1024 - 100
        page = await executor.get_output(result.pid, since=cursor, max_bytes=SINCE_MAX_BYTES)
        assert page.dropped == 0
        assert page.cursor <= 1024 * 1024
        after = await executor.get_output(result.pid, since=page.cursor, max_bytes=SINCE_MAX_BYTES)
        held_from = len(whole) - config.limits.output_buffer_bytes
        assert after.dropped == held_from - page.cursor
        assert whole[held_from:].startswith(after.stdout.split("\n", 1)[0])
    finally:
        await executor.cleanup()


async def test_the_files_go_with_the_processes_record(
    request: pytest.FixtureRequest, backend: str, workdir: str
) -> None:
    config = backend_config(request, backend, workdir)
    executor = executor_for(config.model_copy(update={"limits": Limits(keep_terminated=1)}))
    await executor.start()
    try:
        first = await executor.spawn(SpawnOptions(command="echo out; echo err >&2"))
        files = f"{first.output_file} {first.stderr_file}"
        assert (await executor.spawn(SpawnOptions(command=f"cat {files}"))).stdout == "out\nerr\n"
        await executor.spawn(SpawnOptions(command="true"))  # the first record goes: one finished is kept
        gone = await executor.spawn(SpawnOptions(command=f"ls {files} 2>&1 | grep -c 'No such file'"))
        assert gone.stdout == "2\n"
    finally:
        await executor.cleanup()


# A process of the box runs as the user the files belong to. What it may do to them spoils only its own
# view of its own output; what the agent does with the names must not reach anything else.


async def test_a_link_planted_where_the_next_file_goes_is_not_followed(executor: ProcessExecutor) -> None:
    planter = await executor.spawn(SpawnOptions(command="echo kept > victim; pwd"))
    prefix, number = planter.pid.rsplit("-", 1)
    victim = f"{planter.stdout.strip()}/victim"
    link = f"/tmp/process-mcp-{prefix}-{int(number) + 2}.out"
    await executor.spawn(SpawnOptions(command=f"ln -s {victim} {link}"))
    written = await executor.spawn(SpawnOptions(command="echo from-the-process"))
    assert written.pid == f"{prefix}-{int(number) + 2}"
    assert written.output_file is not None
    assert written.output_file.startswith(link[: -len(".out")] + "-")
    check = await executor.spawn(SpawnOptions(command=f"cat {victim} {written.output_file}; rm {link}"))
    assert check.stdout == "kept\nfrom-the-process\n"


async def test_a_file_a_process_swapped_in_for_its_output_file_is_not_removed(
    request: pytest.FixtureRequest, backend: str, workdir: str
) -> None:
    config = backend_config(request, backend, workdir)
    executor = executor_for(config.model_copy(update={"limits": Limits(keep_terminated=1)}))
    await executor.start()
    try:
        first = await executor.spawn(SpawnOptions(command="echo out"))
        swap = f"mv {first.output_file} {first.output_file}.moved && echo theirs > {first.output_file}"
        await executor.spawn(SpawnOptions(command=swap))  # the first record goes at the next spawn
        after = await executor.spawn(
            SpawnOptions(command=f"cat {first.output_file} {first.output_file}.moved; rm {first.output_file}*")
        )
        assert after.stdout == "theirs\nout\n"  # its own file stayed; the agent's, under a name it was not given, too
    finally:
        await executor.cleanup()
