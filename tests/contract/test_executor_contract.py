"""Behaviour every backend promises, run against real processes and real terminals."""

from __future__ import annotations

import re

import anyio
import pytest

from process_mcp import (
    OUTPUT_TRUNCATE,
    InvalidInput,
    InvalidSignal,
    ProcessExecutor,
    ProcessNotFound,
    ProcessTerminated,
    SpawnOptions,
    StdinFailed,
)
from process_mcp.core.environment import DEFAULTS, PIPE_DEFAULTS

from ..helpers import (
    POLL_S,
    WAIT_S,
    backends,
    sleep_argument,
    sleepers,
    wait_for_exit,
    wait_for_output,
    wait_until_gone,
)

pytestmark = pytest.mark.anyio

STOPPED_WAIT_MS = 500
"""How long a stopped process is given to answer (a running one answers in milliseconds)."""
STOP_ATTEMPTS = 4
"""Each a fresh race between a stop and the shell's fork of its command."""


async def test_echo_returns_stdout_and_exit_code_zero(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="echo hello"))
    assert result.status == "terminated"
    assert result.exit_code == 0
    assert result.stdout == "hello\n"
    assert result.stderr == ""
    assert result.pid.startswith(f"{executor.prefix}-")


async def test_non_zero_exit_code_is_a_result_not_an_error(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="echo oops >&2; exit 7"))
    assert (result.status, result.exit_code, result.signal) == ("terminated", 7, None)
    assert result.stderr == "oops\n"


async def test_env_is_set_over_the_inherited_environment(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command='echo "$GREETING:$PATH"', env={"GREETING": "hi"}))
    greeting, path = result.stdout.strip().split(":", 1)
    assert greeting == "hi"
    assert "/bin" in path


async def test_pythons_output_in_a_pipe_reaches_wait_for_while_it_runs(executor: ProcessExecutor) -> None:
    # Python block-buffers a pipe: without PYTHONUNBUFFERED (a default the request may change) "ready"
    # would wait in its buffer for the whole sleep, and the wait would run out.
    server = "python3 -c \"import time; print('ready'); time.sleep(30)\""
    ready = await executor.spawn(SpawnOptions(command=server, wait_for="ready", timeout_ms=int(WAIT_S * 1000)))
    # Unbuffered, print writes "ready" and its newline apart: the match may come between the two.
    assert (ready.wait_result, ready.status, ready.stdout.rstrip("\n")) == ("matched", "running", "ready")
    await executor.kill(ready.pid, "KILL")
    told = await executor.spawn(SpawnOptions(command='echo "[$PYTHONUNBUFFERED]"', env={"PYTHONUNBUFFERED": ""}))
    assert told.stdout == "[]\n"


async def test_nothing_waits_for_a_human_by_default_and_a_request_may_say_otherwise(executor: ProcessExecutor) -> None:
    # Pagers would hold git log and man, git and apt would ask; pipes are read by a model, not a screen.
    show = "; ".join(f'echo "{name}=${{{name}-unset}}"' for name in (*DEFAULTS, "TERM", "NO_COLOR"))
    piped = await executor.spawn(SpawnOptions(command=show))
    assert piped.stdout.splitlines() == [f"{name}={value}" for name, value in {**DEFAULTS, **PIPE_DEFAULTS}.items()]
    terminal = await executor.spawn(SpawnOptions(command=show, tty=True))
    lines = [line.strip() for line in terminal.stdout.splitlines() if "=" in line]
    assert lines == [f"{name}={value}" for name, value in DEFAULTS.items()] + ["TERM=xterm-256color", "NO_COLOR=unset"]
    asked = await executor.spawn(SpawnOptions(command=show, env={"PAGER": "less", "TERM": "vt100", "NO_COLOR": ""}))
    assert "PAGER=less" in asked.stdout.splitlines()
    assert "TERM=vt100" in asked.stdout.splitlines()
    assert "NO_COLOR=" in asked.stdout.splitlines()


@pytest.mark.parametrize("backend", backends("exact_exits"))
async def test_a_simple_commands_signals_and_exit_are_its_own_not_a_wrapping_shells(executor: ProcessExecutor) -> None:
    suicide = "python3 -c 'import os, signal; os.kill(os.getpid(), signal.SIGTERM)'"
    own = await executor.spawn(SpawnOptions(command=suicide))
    assert (own.signal, own.exit_code) == ("SIGTERM", 128 + 15), own
    under_a_shell = await executor.spawn(SpawnOptions(command=f"true; {suicide}"))
    assert (under_a_shell.signal, under_a_shell.exit_code) == (None, 128 + 15), under_a_shell  # the shell's exit
    handler = (
        "python3 -c 'import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
        'print("ready", flush=True); time.sleep(60)\''
    )
    served = await executor.spawn(SpawnOptions(command=handler, wait_for="ready", timeout_ms=int(WAIT_S * 1000)))
    await executor.kill(served.pid, "TERM")
    await wait_for_exit(executor, served.pid)
    ended = await executor.get_process(served.pid)
    assert (ended.exit_code, ended.signal) == (0, None), ended  # its handler's exit, not a shell killed by TERM


async def test_cwd_defaults_to_the_workdir_and_can_be_chosen(executor: ProcessExecutor, workdir: str) -> None:
    assert (await executor.spawn(SpawnOptions(command="mkdir sub"))).exit_code == 0
    assert (await executor.spawn(SpawnOptions(command="pwd"))).stdout.strip() == workdir
    assert (await executor.spawn(SpawnOptions(command="pwd", cwd=f"{workdir}/sub"))).stdout.strip() == f"{workdir}/sub"
    relative = await executor.spawn(SpawnOptions(command="pwd", cwd="sub"))
    assert relative.stdout.strip() == f"{workdir}/sub"


async def test_a_process_still_running_at_the_timeout_keeps_running(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="echo started; sleep 30", timeout_ms=300))
    assert result.status == "running"
    assert result.exit_code is None
    assert result.stdout == "started\n"
    assert (await executor.get_process(result.pid)).status == "running"


async def test_exit_is_reported_while_a_background_child_still_holds_the_output(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="sleep 30 & echo parent done; exit 3", timeout_ms=10_000))
    assert (result.status, result.exit_code, result.signal) == ("terminated", 3, None)
    assert result.stdout == "parent done\n"
    assert (await executor.get_process(result.pid)).status == "terminated"


@pytest.mark.parametrize("holder", ["", "sleep 1 & "], ids=["alone", "child-holds-output"])
async def test_a_burst_written_just_before_the_exit_is_all_in_the_reply(executor: ProcessExecutor, holder: str) -> None:
    size = 3_000_000  # more than a pipe holds, so the last of it is written just before the exit
    result = await executor.spawn(SpawnOptions(command=f"{holder}head -c {size} /dev/zero | tr '\\0' x; echo TAIL-OK"))
    assert (result.status, result.exit_code) == ("terminated", 0)
    assert result.stdout.endswith("xTAIL-OK\n")
    assert result.cursor == size + len("TAIL-OK\n")


async def test_background_returns_at_once_and_output_arrives_later(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="read line; echo got:$line", background=True))
    assert result.status == "running"
    await executor.stdin(result.pid, "ping\\n")
    await wait_for_output(executor, result.pid, "got:ping")
    await wait_for_exit(executor, result.pid)
    assert (await executor.get_process(result.pid)).exit_code == 0


async def test_stdin_reaches_a_non_tty_process_through_its_pipe(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="head -n 2", background=True))
    sent = await executor.stdin(result.pid, "one\\ntwo\\n")
    assert sent.bytes_sent == 8
    await wait_for_exit(executor, result.pid)
    assert (await executor.get_output(result.pid)).stdout == "one\ntwo\n"


async def test_eof_ends_a_pipes_input_so_the_reader_finishes_and_more_input_is_refused(
    executor: ProcessExecutor,
) -> None:
    counted = await executor.spawn(SpawnOptions(command="wc -l; echo counted", background=True))
    await executor.stdin(counted.pid, "a\\nb\\n")
    ended = await executor.stdin(counted.pid, "c\\n", eof=True, wait_for="counted")
    assert (ended.wait_result, (ended.stdout or "").split()) == ("matched", ["3", "counted"]), ended
    # Nothing but the end: a reader whose input is empty; and the end of a partial last line.
    for text, expected in (("", "[]"), ("no newline", "[no newline]")):
        saved = await executor.spawn(
            SpawnOptions(command='cat > saved; echo "[$(cat saved)]"; sleep 30', background=True)
        )
        await executor.stdin(saved.pid, text, eof=True)
        await wait_for_output(executor, saved.pid, re.escape(expected))
        with pytest.raises(StdinFailed, match="input is closed"):
            await executor.stdin(saved.pid, "more", eof=True)
        await executor.kill(saved.pid, "KILL")


async def test_eof_on_a_terminal_types_its_end_of_file_ending_a_partial_line_first(executor: ProcessExecutor) -> None:
    for text, expected in (("whole\\r", "[whole]"), ("partial", "[partial]"), ("", "[]")):
        saved = await executor.spawn(
            SpawnOptions(command='cat > saved; echo "[$(cat saved)]"; sleep 30', tty=True, background=True)
        )
        await executor.stdin(saved.pid, text, eof=True)
        await wait_for_output(executor, saved.pid, re.escape(expected))
        again = await executor.stdin(saved.pid, "still a terminal\\r")  # a terminal stays open
        assert again.bytes_sent == 17
        await executor.kill(saved.pid, "KILL")


async def test_a_literal_backslash_reaches_the_process(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="head -c 4 | od -An -tx1", background=True))
    await executor.stdin(result.pid, "a\\\\b\\n")
    await wait_for_exit(executor, result.pid)
    assert (await executor.get_output(result.pid)).stdout.split() == ["61", "5c", "62", "0a"]


async def test_a_python_repl_over_a_tty_sees_a_terminal(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="python3 -q", tty=True, background=True))
    await wait_for_output(executor, result.pid, r">>>\s*$")
    await executor.stdin(result.pid, "import sys; print('isatty', sys.stdin.isatty(), sys.stdout.isatty())\\r")
    screen = await wait_for_output(executor, result.pid, r"isatty \w+ \w+")
    assert "isatty True True" in screen
    await executor.stdin(result.pid, "exit()\\r")
    await wait_for_exit(executor, result.pid)
    assert (await executor.get_process(result.pid)).exit_code == 0


async def test_ctrl_c_typed_into_a_tty_raises_sigint_in_the_foreground_program(executor: ProcessExecutor) -> None:
    script = (
        "import signal,time; signal.signal(signal.SIGINT, lambda *a: print('got SIGINT', flush=True)); "
        "print('ready', flush=True); time.sleep(30)"
    )
    result = await executor.spawn(SpawnOptions(command=f'python3 -c "{script}"', tty=True, background=True))
    await wait_for_output(executor, result.pid, "ready")
    await executor.stdin(result.pid, "\\x03")
    await wait_for_output(executor, result.pid, "got SIGINT")


async def test_ctrl_c_ends_a_foreground_command_with_sigint(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="echo ready; exec sleep 30", tty=True, background=True))
    await wait_for_output(executor, result.pid, "ready")
    await executor.stdin(result.pid, "\\x03")
    await wait_for_exit(executor, result.pid)
    info = await executor.get_process(result.pid)
    assert (info.signal, info.exit_code) == ("SIGINT", 130)


async def test_the_terminal_is_120_by_30(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="stty size; tput cols 2>/dev/null || true", tty=True))
    assert result.stdout.splitlines()[0] == "30 120"


async def test_carriage_returns_overwrite_the_line_on_the_rendered_screen(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="printf 'progress 10%%\\rprogress 99%%\\rdone\\n'", tty=True))
    assert result.stdout.splitlines()[0] == "doneress 99%"


async def test_a_tty_screen_shows_cursor_movement_not_escape_codes(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command=r"printf 'aaaa\033[2Dbb\033[31mX\033[0m\n'", tty=True))
    assert result.stdout == "aabbX"


async def test_long_output_keeps_its_head_and_its_tail_whole_lines_and_says_what_is_left_out(
    executor: ProcessExecutor,
) -> None:
    result = await executor.spawn(SpawnOptions(command="seq 1 20000"))
    head, rest = result.stdout.split("\n[...", 1)
    marker, tail = rest.split("\n", 1)
    shown = head.split("\n") + tail.split("\n")[:-1]
    assert head.split("\n")[0] == "1"  # the first line, whole
    assert tail.endswith("19999\n20000\n")
    assert tail.split("\n")[0].isdigit()  # the tail starts at a line
    assert len(result.stdout) <= OUTPUT_TRUNCATE + 200
    left_out = 20000 - len(shown)
    assert f"{left_out} lines" in marker, marker
    first_left = int(head.split("\n")[-1]) + 1
    assert f"since: {len(head) + 1}" in marker  # where the first line left out starts
    page = await executor.get_output(result.pid, since=len(head) + 1, max_bytes=30)
    assert page.stdout.split("\n")[0] == str(first_left)


async def test_paging_with_max_bytes_walks_the_whole_output_in_whole_lines(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="seq 1 3000"))
    pages: list[str] = []
    cursor = 0
    while True:
        page = await executor.get_output(result.pid, since=cursor, max_bytes=1000)
        if not page.stdout:
            break
        assert page.stdout.endswith("\n"), page.stdout[-20:]
        assert len(page.stdout) <= 1000
        assert page.dropped == 0
        pages.append(page.stdout)
        cursor = page.cursor
    assert "".join(pages) == "".join(f"{n}\n" for n in range(1, 3001))
    middle = await executor.get_output(result.pid, since=5, max_bytes=6)  # inside "3\n": from its line
    assert middle.stdout == "3\n4\n5\n"
    # A line longer than a page is paged through from the cursor on: paging always moves forward.
    long = await executor.spawn(
        SpawnOptions(command="printf 'a\\n'; head -c 5000 /dev/zero | tr '\\0' x; echo; echo z")
    )
    walked: list[str] = []
    cursor = 0
    for _ in range(20):
        page = await executor.get_output(long.pid, since=cursor, max_bytes=1000)
        if page.cursor == cursor:
            break
        walked.append(page.stdout)
        cursor = page.cursor
    assert "".join(walked) == "a\n" + "x" * 5000 + "\nz\n"
    later = await executor.get_output(long.pid, since=3000, max_bytes=500)
    assert later.cursor == 3500


async def test_pipe_output_is_cleaned_of_escapes_and_redraws_unless_raw(executor: ProcessExecutor) -> None:
    printed = r"printf '\033[31mred\033[0m\n10%%\r50%%\r100%%\ndone\n'"
    result = await executor.spawn(SpawnOptions(command=printed))
    assert result.stdout == "red\n100%\ndone\n"
    assert (await executor.get_output(result.pid)).stdout == "red\n100%\ndone\n"
    raw = await executor.get_output(result.pid, raw=True)
    assert raw.stdout == "\x1b[31mred\x1b[0m\n10%\r50%\r100%\ndone\n"


async def test_stdout_returns_exactly_the_last_n_lines(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="seq 1 10"))
    assert (await executor.get_output(result.pid, 3)).stdout == "8\n9\n10\n"
    assert (await executor.get_output(result.pid, 1)).stdout == "10\n"
    unterminated = await executor.spawn(SpawnOptions(command="printf 'a\\nb\\nc'"))
    assert (await executor.get_output(unterminated.pid, 2)).stdout == "b\nc"


async def test_stdout_of_a_tty_process_has_scrollback_and_screen(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="seq 1 100", tty=True))
    # 30 rows: 29 numbers and the empty row the cursor ended on, which is trimmed.
    assert result.stdout.splitlines() == [str(n) for n in range(72, 101)]
    output = await executor.get_output(result.pid, 50)
    assert output.stdout.splitlines() == [str(n) for n in range(51, 101)]
    assert output.stderr == ""


async def test_utf8_characters_survive_being_split_across_writes(executor: ProcessExecutor) -> None:
    # 'é' is two bytes; the first leaves before the second, a moment apart.
    command = "printf 'caf\\303'; sleep 0.2; printf '\\251!\\n'"
    assert (await executor.spawn(SpawnOptions(command=command))).stdout == "café!\n"


async def test_kill_ends_the_whole_process_tree(executor: ProcessExecutor) -> None:
    arg = sleep_argument()
    result = await executor.spawn(SpawnOptions(command=f"sleep {arg} & sleep {arg} & wait", background=True))
    children = await sleepers(arg, 2)  # found on this machine's /proc, whichever box they run in
    killed = await executor.kill(result.pid)
    assert (killed.sent, killed.status, killed.signal, killed.exit_code) == ("SIGTERM", "terminated", "SIGTERM", 143)
    for child in children:
        await wait_until_gone(child)


@pytest.mark.parametrize("name", ["SIGKILL", "KILL", "kill", "9"])
async def test_kill_accepts_signal_names_with_or_without_prefix(executor: ProcessExecutor, name: str) -> None:
    result = await executor.spawn(SpawnOptions(command="sleep 30", background=True))
    killed = await executor.kill(result.pid, name)
    assert (killed.sent, killed.signal, killed.exit_code) == ("SIGKILL", "SIGKILL", 137)


@pytest.mark.parametrize("attempt", range(STOP_ATTEMPTS))
async def test_stop_halts_the_process_and_continue_resumes_it(executor: ProcessExecutor, attempt: int) -> None:
    # Stopped at once: the shell may be forking cat right then, and the fork must not escape the stop.
    result = await executor.spawn(SpawnOptions(command="cat", background=True))
    assert (await executor.kill(result.pid, "STOP")).status == "running"
    # Stopped, cat cannot echo its input; this wait gives up, where a running cat answers at once.
    halted = await executor.stdin(result.pid, "while stopped\n", wait_for="while stopped", wait_ms=STOPPED_WAIT_MS)
    assert halted.wait_result == "timeout"
    assert (await executor.kill(result.pid, "SIGCONT")).status == "running"
    await wait_for_output(executor, result.pid, "while stopped")


@pytest.mark.parametrize("attempt", range(STOP_ATTEMPTS))
async def test_a_stopped_process_reads_as_stopped_until_it_is_continued(
    executor: ProcessExecutor, attempt: int
) -> None:
    # Stopped at once: the shell may be starting sleep right then, waiting in vfork on a child that stopped.
    result = await executor.spawn(SpawnOptions(command="sleep 600", background=True))
    stopped = await executor.kill(result.pid, "SIGSTOP")
    assert (stopped.status, stopped.stopped) == ("running", True)
    rows = {p.pid: p for p in await executor.list_processes()}
    assert (rows[result.pid].status, rows[result.pid].stopped) == ("running", True)
    assert (await executor.get_process(result.pid)).stopped is True
    # A wait on it ends at its bound, and says why nothing came.
    waited = await executor.get_output(result.pid, until_exit=True, wait_ms=STOPPED_WAIT_MS)
    assert (waited.wait_result, waited.status, waited.stopped) == ("timeout", "running", True)
    resumed = await executor.kill(result.pid, "SIGCONT")
    assert (resumed.status, resumed.stopped) == ("running", None)
    assert (await executor.get_process(result.pid)).stopped is None
    assert (await executor.kill(result.pid, "KILL")).stopped is None


async def test_a_process_that_stops_itself_reads_as_stopped(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="echo before; kill -STOP $$; echo after", background=True))
    with anyio.fail_after(WAIT_S):  # it stops when the shell gets there
        while True:
            if (await executor.get_process(result.pid)).stopped:
                break
            await anyio.sleep(POLL_S)
    listed = {p.pid: p for p in await executor.list_processes()}[result.pid]
    assert (listed.status, listed.stopped, (await executor.get_output(result.pid)).stdout) == (
        "running",
        True,
        "before\n",
    )
    await executor.kill(result.pid, "CONT")
    await wait_for_exit(executor, result.pid)
    finished = await executor.get_process(result.pid)
    assert (finished.exit_code, finished.stopped, (await executor.get_output(result.pid)).stdout) == (
        0,
        None,
        "before\nafter\n",
    )


async def test_signals_reach_a_trap_in_the_shell(executor: ProcessExecutor) -> None:
    result = await executor.spawn(
        SpawnOptions(command="trap 'echo caught USR1' USR1; echo ready; while :; do sleep 0.05; done", background=True)
    )
    await wait_for_output(executor, result.pid, "ready")
    assert (await executor.kill(result.pid, "USR1")).status == "running"
    await wait_for_output(executor, result.pid, "caught USR1")


async def test_ps_lists_running_and_finished_processes(executor: ProcessExecutor, workdir: str) -> None:
    done = await executor.spawn(SpawnOptions(command="exit 4"))
    live = await executor.spawn(SpawnOptions(command="sleep 30", tty=True, background=True))
    rows = {p.pid: p for p in await executor.list_processes()}
    assert rows[done.pid].status == "terminated"
    assert rows[done.pid].exit_code == 4
    assert rows[live.pid].status == "running"
    assert rows[live.pid].tty is True
    assert rows[live.pid].command == "sleep 30"
    assert rows[live.pid].cwd == workdir
    assert rows[live.pid].created_at.endswith("Z")


async def test_output_of_a_finished_process_stays_readable(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="echo kept"))
    assert (await executor.get_output(result.pid)).stdout == "kept\n"


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"command": ""}, "command is empty"),
        ({"command": "   "}, "command is empty"),
        ({"command": "echo a\0b"}, "NUL byte"),
        ({"command": "true", "env": {"BAD=NAME": "x"}}, "environment variable name"),
        ({"command": "true", "env": {"1ST": "x"}}, "environment variable name"),
        ({"command": "true", "env": {"OK": "a\0b"}}, "NUL byte"),
        ({"command": "true", "cwd": "/definitely/not/here"}, "does not exist"),
        ({"command": "true", "cwd": ""}, "cwd is empty"),
        ({"command": "true", "timeout_ms": -1}, "timeoutMs must be 0 or more"),
    ],
)
async def test_malformed_spawn_requests_get_a_clear_error(
    executor: ProcessExecutor, options: dict[str, object], fragment: str
) -> None:
    with pytest.raises(InvalidInput, match=fragment) as caught:
        await executor.spawn(SpawnOptions(**options))
    assert str(caught.value).startswith("invalid_input: ")


async def test_unknown_ids_get_process_not_found_with_a_hint(executor: ProcessExecutor) -> None:
    for call in (
        executor.get_process("nope-1"),
        executor.get_output("nope-1"),
        executor.stdin("nope-1", "x"),
        executor.kill("nope-1"),
    ):
        with pytest.raises(ProcessNotFound, match="call ps"):
            await call


async def test_input_and_signals_to_a_finished_process_are_refused(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="exit 1"))
    with pytest.raises(ProcessTerminated, match="exit code 1"):
        await executor.stdin(result.pid, "hello")
    with pytest.raises(ProcessTerminated):
        await executor.kill(result.pid)


async def test_bad_escapes_and_signals_are_refused_and_the_process_keeps_running(
    executor: ProcessExecutor,
) -> None:
    result = await executor.spawn(SpawnOptions(command="sleep 30", background=True))
    with pytest.raises(InvalidInput, match="not a valid escape"):
        await executor.stdin(result.pid, "\\q")
    with pytest.raises(InvalidSignal, match="unknown signal 'SIGNOPE'"):
        await executor.kill(result.pid, "SIGNOPE")
    with pytest.raises(InvalidInput, match="at least 1"):
        await executor.get_output(result.pid, 0)
    assert (await executor.get_process(result.pid)).status == "running"


async def test_a_timeout_above_the_maximum_is_clamped(executor: ProcessExecutor) -> None:
    executor.config.defaults.max_timeout_ms = 500
    # Unclamped, the spawn would wait for the sleep to end; clamped, it returns with the process running.
    result = await executor.spawn(SpawnOptions(command="sleep 30", timeout_ms=10**9))
    assert (result.status, result.exit_code) == ("running", None)


async def test_cleanup_ends_running_processes(executor: ProcessExecutor) -> None:
    result = await executor.spawn(SpawnOptions(command="trap '' TERM; sleep 30", background=True))
    await executor.cleanup()
    info = await executor.get_process(result.pid)
    assert info.status == "terminated"
