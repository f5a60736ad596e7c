from __future__ import annotations

import signal

import pytest

from process_mcp import InvalidSignal
from process_mcp.core.signals import parse_signal, signal_name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("SIGTERM", signal.SIGTERM),
        ("TERM", signal.SIGTERM),
        ("sigkill", signal.SIGKILL),
        (" int ", signal.SIGINT),
        ("HUP", signal.SIGHUP),
        ("QUIT", signal.SIGQUIT),
        ("USR1", signal.SIGUSR1),
        ("USR2", signal.SIGUSR2),
        ("STOP", signal.SIGSTOP),
        ("CONT", signal.SIGCONT),
        ("9", signal.SIGKILL),
    ],
)
def test_signal_names_are_accepted_in_every_usual_spelling(name: str, expected: signal.Signals) -> None:
    assert parse_signal(name) == expected


@pytest.mark.parametrize("name", ["", "SIG", "NOPE", "SIG_DFL", "SIG_IGN", "999", "-1", "TERM;rm"])
def test_unknown_signals_are_refused_with_examples(name: str) -> None:
    with pytest.raises(InvalidSignal, match=r"unknown signal .*TERM, KILL, INT"):
        parse_signal(name)


def test_signal_numbers_get_their_names() -> None:
    assert signal_name(15) == "SIGTERM"
    assert signal_name(200) == "SIG200"
