"""What a child's environment is made of: the server's basic variables, the operator's, the defaults that
keep it from waiting for a human, and the request's on top."""

from __future__ import annotations

from process_mcp.core.environment import DEFAULTS, PIPE_DEFAULTS, child_environment

SERVER = {"PATH": "/bin", "TERM": "xterm-kitty", "COLORTERM": "truecolor", "PAGER": "most", "API_KEY": "secret"}


def test_a_pipe_gets_a_dumb_terminal_and_no_colour_unless_the_operator_passes_the_servers_through() -> None:
    plain = child_environment(SERVER, [], {})
    assert {name: plain[name] for name in (*DEFAULTS, *PIPE_DEFAULTS)} == {**DEFAULTS, **PIPE_DEFAULTS}
    assert "COLORTERM" not in plain
    assert "API_KEY" not in plain
    passed = child_environment(SERVER, ["TERM", "COLORTERM", "PAGER"], {})
    assert (passed["TERM"], passed["COLORTERM"], passed["PAGER"]) == ("xterm-kitty", "truecolor", "most")


def test_a_terminal_keeps_the_servers_screen_variables_and_the_request_wins_over_everything() -> None:
    terminal = child_environment(SERVER, [], {}, tty=True, TERM="xterm-256color")
    assert (terminal["TERM"], terminal["COLORTERM"], terminal["PAGER"]) == ("xterm-256color", "truecolor", "cat")
    assert "NO_COLOR" not in terminal
    asked = child_environment(SERVER, ["PAGER"], {"PAGER": "less", "NO_COLOR": ""})
    assert (asked["PAGER"], asked["NO_COLOR"]) == ("less", "")
