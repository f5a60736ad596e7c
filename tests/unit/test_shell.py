"""Which command lines run without a wrapping shell (``exec``): a single simple command only."""

from __future__ import annotations

import pytest

from process_mcp.core.shell import exec_form


@pytest.mark.parametrize(
    "command",
    [
        "python3 -m http.server 8000",
        "npm run dev",
        "./build.sh --fast > build.log 2>&1",
        "grep 'a|b; c' notes.txt",
        '  git log --format="%an & %s"',
        "/usr/bin/env node app.js",
    ],
)
def test_a_single_simple_command_replaces_the_shell(command: str) -> None:
    assert exec_form(command) == "exec " + command.lstrip()


@pytest.mark.parametrize(
    "command",
    [
        "make; make install",
        "make && make install",
        "yes | head -3",
        "sleep 30 &",
        "(cd src && make)",
        "FOO=1 ./run",
        "cd /tmp",
        "export A=1",
        "echo hi",
        "read answer",
        "for f in *; do wc -l $f; done",
        "cat <<EOF\nhello\nEOF",
        "echo `date`",
        "ls $(pwd)",
        "echo 'unclosed",
        "",
        "-a name curl -o /tmp/p http://example.com",  # exec's own option, not a program
        "make ;>done.flag",
        "make &&>ok",
        "coproc cat",
        "\fls",
    ],
)
def test_anything_else_runs_under_the_shell_as_written(command: str) -> None:
    assert exec_form(command) == command
