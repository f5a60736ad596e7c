"""How a command line is handed to /bin/sh: a single simple command replaces the shell (``exec``), so
its signals and exit code are its own and it is the process ``kill`` signals first.

Simple means one command and its arguments, with redirections if any: no ``;``, ``&``, ``|``, ``&&``,
``||``, parentheses or newlines, no variable assignments before it, and a program, not a word of the
shell's own (a builtin such as ``cd`` or ``export``, or a keyword such as ``if``), which ``exec`` could
not run. Anything else runs as written, under the shell.
"""

from __future__ import annotations

import re
import shlex

_SHELL_WORDS = frozenset(
    # Keywords, special builtins and the regular builtins of POSIX sh, dash and bash that exec cannot run.
    " ".join(
        (
            "! { } [[ ]] case do done elif else esac fi for function if in select then time until while",
            ". : break continue eval exec exit export readonly return set shift times trap unset",
            "alias bg cd command false fc fg getopts hash jobs kill local read source true type ulimit umask",
            "unalias wait declare typeset let builtin caller complete compgen dirs disown enable help history",
            "logout mapfile popd printf pushd readarray shopt suspend test echo pwd coproc",
        )
    ).split(" ")
)
"""Words whose meaning is the shell's; ``true``, ``echo``, ``test``, ``printf``, ``kill`` and ``pwd`` exist
as programs too, but the shell's own may differ (``echo -e``), so they stay under the shell."""
_REDIRECTIONS = frozenset({"<", ">", ">>", "<<", "<&", ">&", ">|", "<>", "<<<"})
"""The punctuation a simple command may hold; any other run of ``;&|()<>`` is an operator."""
_PROGRAM = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_./+@%:,=-]*")
"""A program's name: never an option (``exec -a name cmd`` would run ``cmd``)."""


def exec_form(command: str) -> str:
    """``command`` prefixed with ``exec`` when it is a single simple command, else as it is."""
    if "\n" in command or "`" in command:
        return command
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError:  # an unclosed quote: the shell says so itself
        return command
    punctuation = [token for token in tokens if token and all(char in ";&|()<>" for char in token)]
    if not tokens or any(token not in _REDIRECTIONS for token in punctuation):
        return command  # an operator, also glued to a redirection (``make ;>done``)
    if command[: len(command) - len(command.lstrip(" \t"))] != command[: len(command) - len(command.lstrip())]:
        return command  # blanks the shell does not take as blanks (a form feed): as written
    first = command.lstrip(" \t").split(maxsplit=1)[0]
    if "=" in first.split("/")[0] or not _PROGRAM.fullmatch(first) or first in _SHELL_WORDS:
        return command  # an assignment, a redirection or quoting first, or the shell's own word
    return f"exec {command.lstrip(' ' + chr(9))}"
