"""The command policy: which programs a spawn's shell line may run, checked before it runs.

A command is a shell line, so it is parsed as one (tree-sitter's bash grammar), and the program of
every simple command is checked: in pipelines, lists, subshells, functions, command and process
substitutions, here-documents, multi-line and backslash-continued input, however it is quoted or
escaped, given by path, or started through a launcher (``env``, ``nice``, ``timeout``, ``xargs``,
``find -exec``, ``sh -c``, ...). What cannot be known before the line runs (a program named by a
variable or a substitution, a pattern, ``eval`` of something computed) is refused while a policy is
set. The policy is a guard rail against honest mistakes; the sandbox is the security boundary: an
allowed interpreter (``python3``, ``sh`` without ``-c``, ``make``) runs whatever code it is given.

tree-sitter's error recovery costs more than linear time (16 KiB of a malformed pipeline take
seconds, 2.9 MB froze the server for 15 s), cannot be stopped once started, and holds the GIL, so a
worker thread would not keep the event loop free: what bounds it is the size of what is parsed. A
command is checked only up to MAX_CHECKED_BYTES, where the worst lines found take ~0.2 s.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import tree_sitter_bash
from tree_sitter import Language, Node, Parser

from ..errors import InvalidInput, PolicyDenied

MAX_CHECKED_BYTES = 4 * 1024
"""Longest command checked against a policy (a longer one is refused while a policy is set): the worst
malformed lines of this size take the parser ~0.2 s, twice the size four times as long."""

MAX_DEPTH = 8
"""Deepest nesting of shell strings (``sh -c "sh -c '...'"``, ``eval``) followed; deeper is refused."""

SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "yash", "posh", "busybox-sh"})

SAFE_BUILTINS = frozenset(
    {":", "true", "false", "cd", "pwd", "echo", "printf", "test", "[", "read", "export", "unset", "set",
     "shift", "exit", "return", "break", "continue", "local", "wait", "umask", "ulimit", "getopts",
     "type", "hash", "times", "readonly", "declare", "typeset", "let", "jobs", "fg", "bg", "kill"}
)  # fmt: skip
"""Builtins that run no program; allowed without being listed (a deny pattern still applies)."""

TRANSPARENT_BUILTINS = frozenset({"command", "exec", "builtin", "coproc"})
"""Builtins that run the command after them; allowed without being listed, the command they run is checked."""

SHELL_STRING_BUILTINS = frozenset({"eval", "trap", "alias"})
"""Builtins whose arguments are shell code, checked as such."""

SOURCING = frozenset({"source", "."})
"""Builtins that run a file's code in the shell: like an interpreter given code."""


@dataclass(frozen=True)
class _Launcher:
    """How a program that runs another finds it: options that take a value, option that takes a shell
    string, and positional arguments between its options and the command."""

    valued: frozenset[str] = frozenset()
    strings: frozenset[str] = frozenset()
    positionals: int = 0
    joins_rest: bool = False  # the rest of the arguments is one shell line (watch)


def _l(valued: str = "", strings: str = "", positionals: int = 0, joins_rest: bool = False) -> _Launcher:
    return _Launcher(frozenset(valued.split()), frozenset(strings.split()), positionals, joins_rest)


LAUNCHERS: dict[str, _Launcher] = {
    "env": _l("-u --unset -C --chdir", "-S --split-string"),
    "nice": _l("-n --adjustment"),
    "ionice": _l("-c --class -n --classdata -p --pid -P --pgid -u --uid"),
    "nohup": _l(),
    "setsid": _l(),
    "stdbuf": _l("-i -o -e --input --output --error"),
    "timeout": _l("-s --signal -k --kill-after", positionals=1),
    "time": _l("-f --format -o --output"),
    "chrt": _l("-T --sched-runtime -P --sched-period -D --sched-deadline", positionals=1),
    "taskset": _l(positionals=1),
    "sudo": _l(
        "-u --user -g --group -h --host -p --prompt -C --close-from -D --chdir -R --chroot "
        "-T --command-timeout -r --role -t --type -U --other-user"
    ),
    "doas": _l("-u -C"),
    "command": _l(),
    "exec": _l("-a"),
    "builtin": _l(),
    "coproc": _l(),
    "strace": _l("-e -o -p -s -u -E -a -b -I -O -S -P -X"),
    "ltrace": _l("-e -o -p -s -u -a -A -D -F -n -l -x -L"),
    "valgrind": _l(),
    "unshare": _l("-S --setuid -G --setgid -R --root -w --wd --propagation --setgroups --map-user --map-group"),
    "nsenter": _l("-t --target -S --setuid -G --setgid -r --root -w --wd"),
    "chroot": _l("--userspec --groups", positionals=1),
    "runuser": _l("-u --user -g --group -G --supp-group -s --shell -w --whitelist-environment", "-c --command"),
    "su": _l("-g --group -G --supp-group -s --shell -w --whitelist-environment", "-c --command", positionals=1),
    "flock": _l("-w --timeout -E --conflict-exit-code", "-c --command", positionals=1),
    "script": _l("-E --echo -I --log-in -O --log-out -B --log-io -T --log-timing -m --logging-format", "-c --command"),
    "watch": _l("-n --interval -d --differences -q --equexit -s --shotsfile", joins_rest=True),
    "prlimit": _l("-p --pid"),
    "setpriv": _l(),
    "systemd-run": _l(
        "-u --unit -p --property -E --setenv -M --machine --uid --gid --nice -d --working-directory "
        "--slice --description -H --host"
    ),
    "xvfb-run": _l("-n --server-num -s --server-args -f --auth-file -e --error-file -p --xauth-protocol"),
    "torsocks": _l("-u -p -a -P"),
    "proxychains": _l("-f"),
    "proxychains4": _l("-f"),
    "catchsegv": _l(),
    "firejail": _l(),
    "parallel": _l("-j --jobs -S --sshlogin --joblog -a --arg-file -d --delimiter -I --tmpdir --results"),
}


XARGS = _l(
    "-I -L -n -P -d -E -s -a --arg-file --delimiter --max-args --max-procs --replace --max-lines --eof --max-chars"
)


class CommandPolicy:
    """``allow`` and ``deny``: executable names or globs (a pattern with ``/`` is matched against the
    path as written). With ``allow``, every program must match it; with ``deny``, none may."""

    def __init__(self, allow: Sequence[str] = (), deny: Sequence[str] = ()) -> None:
        self.allow = list(allow)
        self.deny = list(deny)
        self._language = Language(tree_sitter_bash.language()) if self.active else None

    @property
    def active(self) -> bool:
        return bool(self.allow or self.deny)

    def check(self, command: str) -> None:
        """Raise PolicyDenied, naming the program and the setting, if ``command`` may not run; InvalidInput if
        it is longer than MAX_CHECKED_BYTES."""
        if not self.active:
            return
        size = len(command.encode("utf-8", "surrogateescape"))
        if size > MAX_CHECKED_BYTES:
            raise InvalidInput(
                f"the command is {size} bytes, and with a command policy set ({self._settings()}) a command may be "
                f"at most {MAX_CHECKED_BYTES} bytes, so that it can be checked; write long text into a file over "
                "several commands, or run a script file"
            )
        try:
            self._check_source(command, 0, frozenset())
        except PolicyDenied as exc:
            if "PROCESS_COMMAND_" in exc.message:
                raise
            raise PolicyDenied(f"{exc.message} ({self._settings()} is set)") from None

    def _check_source(self, source: str, depth: int, functions: frozenset[str]) -> None:
        if depth > MAX_DEPTH:
            raise PolicyDenied(f"shell code nested more than {MAX_DEPTH} levels deep cannot be checked")
        assert self._language is not None
        parser = Parser(self._language)
        tree = parser.parse(_join_continuations(source).encode("utf-8", "surrogateescape"))
        root = tree.root_node
        if root.has_error:
            raise PolicyDenied(
                f"{_short(source)!r} is not a complete shell command line, so the policy cannot tell what it "
                "runs; fix its quoting"
            )
        nodes = list(_walk(root))
        functions = functions | _defined_names(nodes)
        for node in nodes:
            if node.type == "command":
                self._check_command(node, depth, functions)
            elif node.type == "heredoc_body":
                # The grammar leaves backquotes in a here-document as text, where the shell runs them.
                for inner in _backquoted(_text(node)):
                    self._check_source(inner, depth + 1, functions)

    def _check_command(self, node: Node, depth: int, functions: frozenset[str]) -> None:
        name = node.child_by_field_name("name")
        if name is None:  # only assignments and redirections
            return
        argv = [_static(name)] + [_static(arg) for arg in node.children_by_field_name("argument")]
        self._check_argv(argv, _text(node), depth, functions)

    def _check_argv(self, argv: list[str | None], where: str, depth: int, functions: frozenset[str]) -> None:
        program = argv[0]
        if program is None:
            raise PolicyDenied(
                f"the program of {_short(where)!r} is computed when it runs (a variable, a substitution or a "
                f"pattern), so {self._settings()} cannot check it; name the program literally"
            )
        base = os.path.basename(program) or program
        for pattern in self.deny:
            if _matches(pattern, program, base):
                raise PolicyDenied(f"{base!r} matches {pattern!r} in PROCESS_COMMAND_DENY (in {_short(where)!r})")
        args = argv[1:]
        if base in functions and "/" not in program:
            return  # a function of the same line, whose body is checked where it is defined
        if base in SHELL_STRING_BUILTINS:
            self._check_shell_string_builtin(base, args, where, depth, functions)
            return
        if base in SAFE_BUILTINS:
            return
        listed = base in TRANSPARENT_BUILTINS and "/" not in program
        if self.allow and not listed and not any(_matches(pattern, program, base) for pattern in self.allow):
            raise PolicyDenied(
                f"{base!r} is not in PROCESS_COMMAND_ALLOW ({', '.join(self.allow)}), in {_short(where)!r}; "
                "ask the operator to allow it"
            )
        for inner in self._inner_commands(base, args, where):
            if isinstance(inner, str):
                self._check_source(inner, depth + 1, functions)
            else:
                self._check_argv(inner, where, depth + 1, functions)

    def _check_shell_string_builtin(
        self, base: str, args: list[str | None], where: str, depth: int, functions: frozenset[str]
    ) -> None:
        if any(arg is None for arg in args):
            raise PolicyDenied(f"{base} of computed code ({_short(where)!r}) cannot be checked; write it out")
        words = [arg for arg in args if arg is not None]
        if base == "eval":
            self._check_source(" ".join(words), depth + 1, functions)
        elif base == "trap" and words and words[0] not in ("-", "-l", "-p"):
            self._check_source(words[0], depth + 1, functions)
        elif base == "alias":
            for word in words:
                if "=" in word:
                    self._check_source(word.split("=", 1)[1], depth + 1, functions)

    def _inner_commands(self, base: str, args: list[str | None], where: str) -> Iterator[list[str | None] | str]:
        """The commands a program runs itself: argv lists, or shell lines (strings) to parse."""
        if base in SOURCING:
            return  # allowed by name above: its file's code is the operator's to vouch for, as an interpreter's
        if base in SHELLS:
            yield from _shell_string(args, where)
        elif base == "busybox" and args:
            yield args
        elif base == "xargs":
            yield _after_options(args, XARGS) or ["echo"]
        elif base == "find":
            yield from _find_exec(args)
        elif base == "git":
            yield from _git_aliases(args)
        elif base in LAUNCHERS:
            launcher = LAUNCHERS[base]
            strings = _option_strings(args, launcher, where)
            yield from strings
            rest = _after_options(args, launcher)
            if base == "env":
                rest = _skip_assignments(rest)
            if launcher.joins_rest and rest:
                if any(arg is None for arg in rest):
                    raise PolicyDenied(f"{base} of computed code ({_short(where)!r}) cannot be checked")
                yield " ".join(arg for arg in rest if arg is not None)
            elif rest:
                yield rest

    def _settings(self) -> str:
        return " and ".join(
            name
            for name, value in (("PROCESS_COMMAND_ALLOW", self.allow), ("PROCESS_COMMAND_DENY", self.deny))
            if value
        )


def _matches(pattern: str, program: str, base: str) -> bool:
    return fnmatch.fnmatchcase(program if "/" in pattern else base, pattern)


def _after_options(args: list[str | None], launcher: _Launcher) -> list[str | None]:
    """The command (with its arguments) after a launcher's options and positional arguments."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg is None:
            break
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        option = arg.split("=", 1)[0]
        takes_value = option in launcher.valued or option in launcher.strings
        # A flag, an option with its value attached (-n5, --signal=KILL), or one followed by its value.
        i += 2 if takes_value and "=" not in arg else 1
    return args[i + launcher.positionals :] if i + launcher.positionals <= len(args) else []


def _option_strings(args: list[str | None], launcher: _Launcher, where: str) -> list[str]:
    """Shell lines given to a launcher's string options (su -c, flock -c, env -S)."""
    found = []
    for i, arg in enumerate(args):
        if arg is None:
            continue
        if arg == "--" or not arg.startswith("-"):
            break
        option, _, attached = arg.partition("=")
        if option in launcher.strings:
            value = attached if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            if value is None:
                raise PolicyDenied(f"the code given to {option} in {_short(where)!r} is computed; write it out")
            found.append(value)
    return found


def _skip_assignments(args: list[str | None]) -> list[str | None]:
    i = 0
    while i < len(args) and args[i] is not None and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", args[i] or ""):
        i += 1
    return args[i:]


def _shell_string(args: list[str | None], where: str) -> Iterator[str]:
    """The code of ``sh -c CODE``; a shell without -c reads a script (a file or stdin): an interpreter."""
    for i, arg in enumerate(args):
        if arg is None or arg == "--" or not arg.startswith(("-", "+")):
            return  # a script's name (or computed options): the shell is an interpreter given a file
        if arg.startswith("-") and not arg.startswith("--") and "c" in arg[1:]:
            code = next((a for a in args[i + 1 :] if a is None or not a.startswith(("-", "+"))), "")
            if code is None:
                raise PolicyDenied(f"the shell code in {_short(where)!r} is computed; write it out")
            yield code
            return


def _find_exec(args: list[str | None]) -> Iterator[list[str | None]]:
    for i, arg in enumerate(args):
        if arg in ("-exec", "-execdir", "-ok", "-okdir"):
            command: list[str | None] = []
            for word in args[i + 1 :]:
                if word in (";", "+"):
                    break
                command.append(word)
            if command:
                yield command


def _git_aliases(args: list[str | None]) -> Iterator[str]:
    """``git -c alias.x='!code' x`` runs code with the shell."""
    for i, arg in enumerate(args):
        if arg == "-c" and i + 1 < len(args):
            setting = args[i + 1]
            if setting is None:
                raise PolicyDenied("a git setting given with -c is computed; write it out")
            key, _, value = setting.partition("=")
            if key.lower().startswith("alias.") and value.startswith("!"):
                yield value[1:]


def _static(node: Node) -> str | None:
    """The word's value if the shell would not expand it, else None."""
    kind = node.type
    if kind in ("command_name", "concatenation"):
        parts = [_static(child) for child in node.children]
        known = [part for part in parts if part is not None]
        return "".join(known) if len(known) == len(parts) else None
    if kind == "word":
        return _unquote_word(_text(node))
    if kind == "number":
        return _text(node)
    if kind == "raw_string":
        return _text(node)[1:-1]
    if kind in ("string", "translated_string"):
        contents: list[str] = []
        for child in node.children:
            if child.type == "string_content":
                contents.append(re.sub(r'\\([$`"\\\n])', r"\1", _text(child)))
            elif child.type not in ('"', '$"'):
                return None
        return "".join(contents)
    if kind == "ansi_c_string":
        return _ansi_c(_text(node)[2:-1])
    return None  # expansions, substitutions, arithmetic, anything else computed


def _unquote_word(text: str) -> str | None:
    """An unquoted word's value: escapes removed; None if it has a pattern or braces the shell expands."""
    out = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if text[i] in "*?[{}":
            return None
        out.append(text[i])
        i += 1
    return "".join(out)


def _ansi_c(body: str) -> str:
    simple = {"a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
              "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}  # fmt: skip

    def one(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape[0] in simple:
            return simple[escape[0]]
        if escape[0] in "xuU":
            return chr(int(escape[1:], 16)) if len(escape) > 1 else match.group(0)
        if escape[0] == "c":
            return chr(ord(escape[1]) & 0x1F) if len(escape) > 1 else ""
        return chr(int(escape, 8) & 0xFF)

    return re.sub(r"\\(x[0-9a-fA-F]{1,2}|u[0-9a-fA-F]{1,4}|U[0-9a-fA-F]{1,8}|[0-7]{1,3}|c.|.)", one, body)


def _defined_names(nodes: list[Node]) -> frozenset[str]:
    """Functions and aliases the line (its ``nodes``) defines: calling them runs their bodies, which are checked."""
    names = set()
    for node in nodes:
        name = node.child_by_field_name("name")
        if name is None:
            continue
        if node.type == "function_definition":
            names.add(_text(name))
        elif node.type == "command" and _static(name) == "alias":
            for arg in node.children_by_field_name("argument"):
                value = _static(arg)
                if value is not None and "=" in value:
                    names.add(value.split("=", 1)[0])
    return frozenset(names)


def _walk(node: Node) -> Iterator[Node]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(current.children))


def _text(node: Node) -> str:
    return (node.text or b"").decode("utf-8", "surrogateescape")


def _join_continuations(source: str) -> str:
    """Remove backslash-newline pairs, as the shell does before it splits words (the grammar does not)."""
    if "\\\n" not in source:
        return source
    out = []
    i = 0
    while i < len(source):
        if source[i] == "\\" and i + 1 < len(source):
            if source[i + 1] != "\n":
                out.append(source[i : i + 2])
            i += 2
            continue
        out.append(source[i])
        i += 1
    return "".join(out)


def _backquoted(text: str) -> list[str]:
    return [re.sub(r"\\(.)", r"\1", m.group(1)) for m in re.finditer(r"`((?:[^`\\]|\\.)*)`", text, re.DOTALL)]


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."
