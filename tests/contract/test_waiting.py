"""Waiting for output, reading incrementally, one call per turn: every backend, real processes."""

from __future__ import annotations

import pytest

from process_mcp import InvalidInput, ProcessExecutor, SpawnOptions, SpawnResult, StdinResult

from ..helpers import BACKENDS, backends, wait_for_output

pytestmark = pytest.mark.anyio

LONG_MS = 10_000  # a bound that is never reached when the behaviour is right
IDLE_REPL_MS = 2500  # longer than a REPL takes to start in the 1-CPU container on a loaded machine


async def test_spawn_returns_when_the_pattern_appears_and_the_process_keeps_running(executor: ProcessExecutor) -> None:
    result = await executor.spawn(
        SpawnOptions(
            command='echo starting; sleep 0.3; echo "Local: http://localhost:5173"; sleep 30',
            wait_for=r"Local:.*http",
            timeout_ms=LONG_MS,
        )
    )
    assert (result.wait_result, result.status) == ("matched", "running")
    assert result.stdout == "starting\nLocal: http://localhost:5173\n"
    assert result.cursor == len(result.stdout)


async def test_a_pattern_that_never_appears_times_out_and_says_so(executor: ProcessExecutor) -> None:
    result = await executor.spawn(
        SpawnOptions(command="echo nothing useful; sleep 30", wait_for="READY", timeout_ms=300)
    )
    assert (result.wait_result, result.status, result.stdout) == ("timeout", "running", "nothing useful\n")


async def test_an_exit_before_the_pattern_ends_the_wait_with_the_exit_code(executor: ProcessExecutor) -> None:
    result = await executor.spawn(
        SpawnOptions(command="echo failing >&2; exit 3", wait_for="READY", timeout_ms=LONG_MS)
    )
    assert (result.wait_result, result.status, result.exit_code) == ("exited", "terminated", 3)
    assert result.stderr == "failing\n"


async def test_the_pattern_is_also_matched_on_stderr(executor: ProcessExecutor) -> None:
    result = await executor.spawn(
        SpawnOptions(
            command="sleep 0.2; echo 'listening on 8080' >&2; sleep 30", wait_for=r"listening", timeout_ms=LONG_MS
        )
    )
    assert result.wait_result == "matched"


async def test_idle_detects_a_repl_waiting_for_input(executor: ProcessExecutor, backend: str) -> None:
    result = await executor.spawn(
        SpawnOptions(command="python3 -q", tty=True, idle_ms=IDLE_REPL_MS, timeout_ms=LONG_MS)
    )
    # Where the backend can tell a read of the terminal, that ends the wait before the silence does.
    expected = "input" if BACKENDS[backend].input_wanted else "idle"
    assert (result.wait_result, result.status) == (expected, "running")
    assert result.stdout.endswith(">>>")


async def test_stdin_with_a_wait_returns_the_answer_in_the_same_call(executor: ProcessExecutor, backend: str) -> None:
    started = await executor.spawn(SpawnOptions(command="python3 -q", tty=True, wait_for=">>> ", timeout_ms=LONG_MS))
    assert started.wait_result == "matched"
    reply = await executor.stdin(started.pid, "6 * 7\r", wait_for=r">>> $", wait_ms=LONG_MS)
    assert reply.wait_result == "matched"
    assert reply.stdout == "6 * 7\n42\n>>> "
    pipe = await executor.spawn(SpawnOptions(command="while read x; do echo got:$x; done", background=True))
    answer = await executor.stdin(pipe.pid, "one\\n", idle_ms=300, wait_ms=LONG_MS)
    # It reads again once it answered: said at once where the backend can tell, else after the silence.
    expected = "input" if BACKENDS[backend].input_wanted else "idle"
    assert (answer.wait_result, answer.stdout, answer.stderr) == (expected, "got:one\n", "")
    plain = await executor.stdin(pipe.pid, "two\\n")
    assert (plain.stdout, plain.wait_result) == (None, None)


async def test_since_returns_only_what_came_after_the_cursor(executor: ProcessExecutor) -> None:
    started = await executor.spawn(SpawnOptions(command="while read x; do echo got:$x; done", background=True))
    first = await executor.stdin(started.pid, "one\\n", wait_for="got:one", wait_ms=LONG_MS)
    assert first.cursor == len("got:one\n")
    await executor.stdin(started.pid, "two\\n", wait_for="got:two", wait_ms=LONG_MS)
    later = await executor.get_output(started.pid, since=first.cursor)
    assert (later.stdout, later.dropped, later.cursor) == ("got:two\n", 0, len("got:one\ngot:two\n"))
    nothing_new = await executor.get_output(started.pid, since=later.cursor)
    assert (nothing_new.stdout, nothing_new.dropped) == ("", 0)


async def test_since_says_how_much_is_no_longer_available(executor: ProcessExecutor) -> None:
    result = await executor.spawn(
        SpawnOptions(command="head -c 2000000 /dev/zero | tr '\\0' x; echo; echo END", timeout_ms=LONG_MS)
    )
    assert (result.status, result.cursor) == ("terminated", 2_000_005)
    output = await executor.get_output(result.pid, since=0)
    assert output.stdout.endswith("x\nEND\n")
    assert output.dropped == 2_000_005 - len(output.stdout)
    assert output.dropped >= 2_000_005 - 64 * 1024


async def test_raw_returns_the_stream_as_text_where_the_screen_shows_the_result(executor: ProcessExecutor) -> None:
    result = await executor.spawn(
        SpawnOptions(command="printf 'abc\\rX\\n\\033[31mred\\033[0m\\n'", tty=True, timeout_ms=LONG_MS)
    )
    assert result.stdout == "Xbc\nred"
    raw = await executor.get_output(result.pid, raw=True)
    assert raw.stdout == "abcX\nred"
    since = await executor.get_output(result.pid, since=0)
    assert since.stdout == "abcX\nred\n"


async def test_until_exit_waits_for_the_exit_code_and_the_final_output(executor: ProcessExecutor) -> None:
    started = await executor.spawn(SpawnOptions(command="sleep 0.3; echo done; exit 4", background=True))
    result = await executor.get_output(started.pid, until_exit=True, wait_ms=LONG_MS)
    assert (result.wait_result, result.status, result.exit_code, result.stdout) == ("exited", "terminated", 4, "done\n")


async def test_wait_ms_alone_returns_at_the_first_new_output(executor: ProcessExecutor) -> None:
    started = await executor.spawn(SpawnOptions(command="echo early; sleep 0.3; echo late; sleep 30", background=True))
    await wait_for_output(executor, started.pid, "early")
    result = await executor.get_output(started.pid, wait_ms=LONG_MS)
    assert result.wait_result == "output"  # no pattern was given, so nothing "matched"
    assert "late" in result.stdout
    assert (await executor.get_output(started.pid, wait_ms=200)).wait_result == "timeout"


async def test_the_wait_is_capped_by_the_maximum_timeout(executor: ProcessExecutor) -> None:
    executor.config.defaults.max_timeout_ms = 300
    started = await executor.spawn(SpawnOptions(command="sleep 30", background=True))
    assert (await executor.get_output(started.pid, wait_for="never", wait_ms=3_600_000)).wait_result == "timeout"


async def test_bad_waits_are_clear_errors(executor: ProcessExecutor) -> None:
    started = await executor.spawn(SpawnOptions(command="sleep 30", background=True))
    with pytest.raises(InvalidInput, match="not a valid regular expression"):
        await executor.get_output(started.pid, wait_for="(unclosed")
    with pytest.raises(InvalidInput, match="idleMs must be more than 0"):
        await executor.stdin(started.pid, "x", idle_ms=0)
    with pytest.raises(InvalidInput, match="since must be 0 or more"):
        await executor.get_output(started.pid, since=-1)
    with pytest.raises(InvalidInput, match="not a valid regular expression"):
        await executor.spawn(SpawnOptions(command="echo never runs", wait_for="[z-a]"))
    assert len(await executor.list_processes()) == 1  # the bad spawn started nothing


async def test_a_scripted_repl_session_takes_one_call_per_step(executor: ProcessExecutor) -> None:
    prompt = r">>> $"
    steps: list[SpawnResult | StdinResult] = [
        await executor.spawn(SpawnOptions(command="python3 -q", tty=True, wait_for=prompt, timeout_ms=LONG_MS))
    ]
    pid = steps[0].pid
    for line in ("x = 6", "y = x * 7", "print(y)", "1 / 0"):
        steps.append(await executor.stdin(pid, f"{line}\r", wait_for=prompt, wait_ms=LONG_MS))
    steps.append(await executor.stdin(pid, "exit()\r", wait_ms=LONG_MS, idle_ms=5_000))
    assert [step.wait_result for step in steps] == ["matched"] * 5 + ["exited"]
    assert steps[3].stdout == "print(y)\n42\n>>> "
    assert "ZeroDivisionError: division by zero" in (steps[4].stdout or "")
    assert (steps[-1].status, steps[-1].exit_code) == ("terminated", 0)


@pytest.mark.parametrize("backend", backends("input_wanted"))
async def test_a_read_of_stdin_ends_a_spawns_wait_at_once_and_the_answer_goes_on(executor: ProcessExecutor) -> None:
    # Without it the spawn would wait its whole timeout: a prompt looks like any other quiet.
    asked = await executor.spawn(SpawnOptions(command="echo 'name?'; read name; echo hello $name", timeout_ms=60_000))
    assert (asked.wait_result, asked.status, asked.secret, asked.stdout) == ("input", "running", None, "name?\n")
    answered = await executor.stdin(asked.pid, "ada\\n", wait_for="hello", wait_ms=LONG_MS)
    assert (answered.wait_result, answered.stdout) == ("matched", "hello ada\n")
    # Reading something else (a pipe of its own, a sleep) is not waiting for input.
    busy = await executor.spawn(SpawnOptions(command="sleep 1 | cat; echo done", timeout_ms=LONG_MS))
    assert (busy.wait_result, busy.status, busy.stdout) == (None, "terminated", "done\n")
    # Input that ended: a read returns at once, so nothing waits.
    ended = await executor.spawn(SpawnOptions(command="cat; echo ended", background=True))
    await executor.stdin(ended.pid, "", eof=True)
    finished = await executor.get_output(ended.pid, until_exit=True, wait_ms=int(LONG_MS))
    assert (finished.wait_result, finished.stdout) == ("exited", "ended\n")


@pytest.mark.parametrize("backend", backends("input_wanted"))
async def test_a_prompt_on_a_terminal_is_input_and_one_without_echo_is_a_secret(executor: ProcessExecutor) -> None:
    shown = await executor.spawn(SpawnOptions(command="python3 -c 'input(\"name? \")'", tty=True, timeout_ms=60_000))
    assert (shown.wait_result, shown.secret) == ("input", None), shown
    # getpass reads /dev/tty with echo off, as ssh and sudo do.
    hidden = 'python3 -c \'import getpass; print("got", len(getpass.getpass("Password: ")))\''
    prompted = await executor.spawn(SpawnOptions(command=hidden, tty=True, timeout_ms=60_000))
    assert (prompted.wait_result, prompted.secret, prompted.status) == ("input", True, "running"), prompted
    typed = await executor.stdin(prompted.pid, "hunter2\\r", wait_for=r"got \d", wait_ms=LONG_MS)
    assert typed.stdout is not None
    assert "got 7" in typed.stdout
    assert "hunter2" not in typed.stdout
    # A full-screen wait without a prompt line (echo off, not line by line) is input, not a secret.
    keys = "python3 -c 'import tty, sys; tty.setraw(0); sys.stdin.read(1)'"
    raw = await executor.spawn(SpawnOptions(command=keys, tty=True, timeout_ms=60_000))
    assert (raw.wait_result, raw.secret) == ("input", None), raw


@pytest.mark.parametrize("backend", backends("input_wanted"))
async def test_stdout_waiting_on_a_process_ends_when_it_asks_for_input(executor: ProcessExecutor) -> None:
    started = await executor.spawn(
        SpawnOptions(command="sleep 0.5; echo 'continue? [y/N]'; read answer", background=True)
    )
    waited = await executor.get_output(started.pid, until_exit=True, wait_ms=60_000)
    assert (waited.wait_result, waited.stdout) == ("input", "continue? [y/N]\n")
