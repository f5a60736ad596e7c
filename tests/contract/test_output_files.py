"""Each output stream kept whole in a file in the box (``outputFile``), read by the box's own commands
and paged back by the server where its buffer dropped it; and what a process of the box can do to it."""

from __future__ import annotations

import hashlib
import posixpath
import re

import pytest

from process_mcp import ProcessExecutor, SpawnOptions
from process_mcp.config import Limits
from process_mcp.core.models import SINCE_MAX_BYTES

from ..helpers import backend_config, backends, configured_executor, executor_for

pytestmark = pytest.mark.anyio

LINES = 300_000
"""``seq 1 LINES`` prints about 2 MB: more than a stream's buffer (PROCESS_OUTPUT_BUFFER_BYTES) keeps."""
WHOLE = "".join(f"{n}\n" for n in range(1, LINES + 1))
AGENT_DIRECTORY = re.compile(r"/tmp/process-mcp-[0-9]+-[0-9]+")
"""Where an agent keeps its processes' output files: its pid and start time."""


def in_agent_directory(path: str | None, name: str) -> bool:
    return (
        path is not None
        and AGENT_DIRECTORY.fullmatch(posixpath.dirname(path)) is not None
        and path.endswith(f"/{name}")
    )


@pytest.fixture(params=backends("output_files"))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_the_whole_output_is_in_a_file_in_the_box_that_its_commands_read(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command=f"seq 1 {LINES}; echo oops >&2"))
    assert in_agent_directory(result.output_file, f"{result.pid}.out"), result.output_file
    assert in_agent_directory(result.stderr_file, f"{result.pid}.err"), result.stderr_file
    assert f"or read {result.output_file}" in result.stdout  # the reply's marker says where the rest is
    read = await executor.spawn(
        SpawnOptions(command=f"md5sum < {result.output_file}; wc -l < {result.output_file}; cat {result.stderr_file}")
    )
    assert read.stdout.split() == [hashlib.md5(WHOLE.encode()).hexdigest(), "-", str(LINES), "oops"]
    listed = await executor.get_output(result.pid)
    assert (listed.output_file, listed.stderr_file) == (result.output_file, result.stderr_file)


async def test_a_stream_that_printed_nothing_has_no_file(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="echo only-out"))
    assert in_agent_directory(result.output_file, f"{result.pid}.out"), result.output_file
    assert result.stderr_file is None
    assert result.output_file is not None
    listed = await executor.spawn(SpawnOptions(command=f"ls {posixpath.dirname(result.output_file)}/{result.pid}.*"))
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
    assert in_agent_directory(result.output_file, f"{result.pid}.out"), result.output_file
    assert result.stderr_file is None
    read = await executor.spawn(SpawnOptions(command=f"tr '\\r' R < {result.output_file}"))
    assert read.stdout == "oneR\ntwoR\n"  # as the terminal wrote it


async def test_a_files_size_is_bounded_by_the_spawns_output_limit_and_the_rest_is_paged_from_memory(
    request: pytest.FixtureRequest, backend: str, workdir: str
) -> None:
    async with configured_executor(request, backend, workdir, limits=Limits(output_file_mb=1)) as executor:
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
        held_from = len(whole) - executor.config.limits.output_buffer_bytes
        assert after.dropped == held_from - page.cursor
        assert whole[held_from:].startswith(after.stdout.split("\n", 1)[0])


async def test_the_files_go_with_the_processes_record(
    request: pytest.FixtureRequest, backend: str, workdir: str
) -> None:
    async with configured_executor(request, backend, workdir, limits=Limits(keep_terminated=1)) as executor:
        first = await executor.spawn(SpawnOptions(command="echo out; echo err >&2"))
        files = f"{first.output_file} {first.stderr_file}"
        assert (await executor.spawn(SpawnOptions(command=f"cat {files}"))).stdout == "out\nerr\n"
        await executor.spawn(SpawnOptions(command="true"))  # the first record goes: one finished is kept
        gone = await executor.spawn(SpawnOptions(command=f"ls {files} 2>&1 | grep -c 'No such file'"))
        assert gone.stdout == "2\n"


# A process of the box runs as the user the files belong to. What it may do to them spoils only its own
# view of its own output; what the agent does with the names must not reach anything else.


async def test_a_link_planted_where_the_next_file_goes_is_not_followed(executor: ProcessExecutor) -> None:
    planter = await executor.spawn(SpawnOptions(command="echo kept > victim; pwd"))
    assert planter.output_file is not None
    prefix, number = planter.pid.rsplit("-", 1)
    victim = f"{planter.stdout.strip()}/victim"
    link = f"{posixpath.dirname(planter.output_file)}/{prefix}-{int(number) + 2}.out"
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
    async with configured_executor(request, backend, workdir, limits=Limits(keep_terminated=1)) as executor:
        first = await executor.spawn(SpawnOptions(command="echo out"))
        swap = f"mv {first.output_file} {first.output_file}.moved && echo theirs > {first.output_file}"
        await executor.spawn(SpawnOptions(command=swap))  # the first record goes at the next spawn
        after = await executor.spawn(
            SpawnOptions(command=f"cat {first.output_file} {first.output_file}.moved; rm {first.output_file}*")
        )
        assert after.stdout == "theirs\nout\n"  # its own file stayed; the agent's, under a name it was not given, too


async def test_a_process_cutting_its_file_short_while_it_floods_spoils_only_its_own_bytes(
    executor: ProcessExecutor,
) -> None:
    """The agent sends output from the file it spliced it into: a file cut short under it must not cut
    the frame that promised those bytes, or the stream to the server would be read from mid-frame (the
    box suite's test of the agent cuts it under a waiting frame every time; this one, through a backend,
    as often as a process can)."""
    first = await executor.spawn(SpawnOptions(command="echo first"))
    assert first.output_file is not None
    prefix, number = first.pid.rsplit("-", 1)
    own = f"{posixpath.dirname(first.output_file)}/{prefix}-{int(number) + 1}.out"
    lines = 1_000_000
    flood = f"seq 1 {lines} & while kill -0 $! 2>/dev/null; do : > {own} 2>/dev/null; done; wait"
    result = await executor.spawn(SpawnOptions(command=flood, timeout_ms=60000))
    assert (result.pid, result.ended_by, result.exit_code) == (f"{prefix}-{int(number) + 1}", "exit", 0)
    assert result.cursor == len("".join(f"{n}\n" for n in range(1, lines + 1)))  # every byte came, in its frame
    again = await executor.spawn(SpawnOptions(command="echo still-served"))
    assert again.stdout == "still-served\n"


async def test_the_directory_of_an_agent_that_is_gone_is_removed_and_a_live_ones_is_kept(
    request: pytest.FixtureRequest, backend: str, workdir: str
) -> None:
    config = backend_config(request, backend, workdir)
    live = executor_for(config)
    await live.start()
    try:
        kept = await live.spawn(SpawnOptions(command="echo kept"))
        assert kept.output_file is not None
        # As an agent killed before it could clean up leaves it (4194304 is past any pid the kernel gives).
        dead = "/tmp/process-mcp-4194304-1"
        await live.spawn(SpawnOptions(command=f"mkdir -p {dead} && echo old > {dead}/host-1.out"))
        other = executor_for(config)
        await other.start()
        try:
            await other.spawn(SpawnOptions(command="echo made"))  # its first file: it sweeps first
            after = await live.spawn(
                SpawnOptions(command=f"ls -d {dead} 2>&1 | grep -c 'No such'; cat {kept.output_file}")
            )
            if backend != "host":  # (each box has a /tmp of its own: the other box never saw either)
                assert after.stdout == "1\nkept\n"
        finally:
            await other.cleanup()
            await live.spawn(SpawnOptions(command=f"rm -rf {dead}"))  # if it was left
    finally:
        await live.cleanup()


async def test_the_files_together_take_at_most_a_quarter_of_the_boxs_tmp(
    request: pytest.FixtureRequest, workdir: str
) -> None:
    config = backend_config(request, "host", workdir)
    sandbox = config.sandbox.model_copy(update={"tmp_size_mb": 8})
    executor = executor_for(config.model_copy(update={"sandbox": sandbox}))
    await executor.start()
    try:
        result = await executor.spawn(SpawnOptions(command=f"seq 1 {2 * LINES}"))
        room = await executor.spawn(
            SpawnOptions(command=f"wc -c < {result.output_file}; head -c 5000000 /dev/zero > /tmp/mine && echo room")
        )
        assert room.stdout == f"{2 * 1024 * 1024}\nroom\n"  # 8 MiB / 4; the rest is the processes'
    finally:
        await executor.cleanup()
