"""The box's command line, compared with the one written down (golden/sandbox_command_lines.txt).

These run anywhere, also where bwrap cannot make a namespace: they build the command line that starts a
box and never run it. The view of the machine's own system directories (which differ from machine to
machine) is shown as one placeholder; everything the configuration and the request decide is compared
argument by argument. After an intended change, rewrite the file with UPDATE_GOLDEN=1 and read the diff.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from process_mcp.config import SandboxConfig
from process_mcp.host.sandbox import BOX_HOME, Sandbox, Tools

GOLDEN = Path(__file__).parent / "golden" / "sandbox_command_lines.txt"
TOOLS = Tools(bwrap="/usr/bin/bwrap", prlimit="/usr/bin/prlimit")

CASES: dict[str, tuple[dict[str, object], tuple[int, int]]] = {
    "default: no network, protected names left to each spawn's plan": ({}, (1024, 4096 << 20)),
    "a domain list: its own network namespace, the proxy served by the agent": (
        {"allowed_domains": ["example.com"]},
        (1024, 4096 << 20),
    ),
    "the host's network (*)": ({"allowed_domains": ["*"]}, (1024, 4096 << 20)),
    "bounds fitted under the server's": ({}, (64, 128 << 20)),
    "deny rules and .git allowed": (
        {"deny_read": ["secrets.txt"], "deny_write": ["notes"], "allow_protected": [".git"]},
        (1024, 4096 << 20),
    ),
}


def command_line(tmp_path: Path, settings: dict[str, object], bounds: tuple[int, int]) -> str:
    workspace, state, home = tmp_path / "workspace", tmp_path / "state", tmp_path / "home"
    for directory in (workspace / ".git", workspace / "notes", state / "empty-dir", home):
        directory.mkdir(parents=True)
    for file in (workspace / ".bashrc", workspace / "secrets.txt", state / "empty"):
        file.touch()
    sandbox = Sandbox(
        SandboxConfig(**settings), TOOLS, workspace=str(workspace), home=str(tmp_path / "user"), state_dir=str(state)
    )
    launch = sandbox.box(str(home), [sys.executable, "-I", "-S", "-c", "BOOTSTRAP", "process-mcp-agent"], bounds)
    try:
        shown = [_named(arg, launch.pass_fds) for arg in launch.argv]
    finally:
        for fd in launch.pass_fds:
            os.close(fd)
    text = _without_the_machines_view(shown, str(tmp_path))
    text = text.replace(str(workspace), "$WORKSPACE").replace(str(state), "$STATE").replace(str(home), "$HOME")
    text = text.replace(str(tmp_path), "$TMP")
    return text.replace(os.path.realpath(sys.executable), "$PYTHON")


def _named(arg: str, fds: tuple[int, ...]) -> str:
    """A descriptor handed to bwrap, as the path it holds."""
    if arg.isdigit() and int(arg) in fds:
        return f"<{os.readlink(f'/proc/self/fd/{arg}')}>"
    return arg


def _without_the_machines_view(args: list[str], ours: str) -> str:
    """The arguments one option to a line; the mounts of the machine's own directories (those onto no path
    under ``ours``, the test's workspace and the server's state: the system view, what is hidden in it,
    the server's interpreter) as one line."""
    lines: list[str] = []
    i = 0
    view_shown = False
    while i < len(args):
        arg = args[i]
        if arg in ("--ro-bind-fd", "--bind-fd", "--symlink") and i + 2 < len(args):
            if ours not in args[i + 2] and args[i + 2] != BOX_HOME:
                if not view_shown:
                    lines.append("<the machine's system directories, read-only, and what root alone may read hidden>")
                    view_shown = True
                i += 3
                continue
            lines.append(" ".join(args[i : i + 3]))
            i += 3
        elif arg.startswith("--") and arg != "--":
            group = [arg]
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                group.append(args[i])
                i += 1
            lines.append(" ".join(group))
        else:
            lines.append(arg)
            i += 1
    return "\n".join(lines)


def _golden() -> dict[str, str]:
    sections: dict[str, str] = {}
    if GOLDEN.exists():
        for block in GOLDEN.read_text().split("\n\n## ")[1:]:
            title, _, body = block.partition("\n")
            sections[title] = body.strip("\n")
    return sections


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_sandboxs_command_line_is_the_one_written_down(case: str, tmp_path: Path) -> None:
    settings, bounds = CASES[case]
    got = command_line(tmp_path, settings, bounds)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        sections = {**_golden(), case: got}
        GOLDEN.parent.mkdir(exist_ok=True)
        body = "".join(f"\n\n## {title}\n{text}" for title, text in sorted(sections.items()))
        GOLDEN.write_text("# The box's command lines (tests/host/test_command_line.py writes them)" + body + "\n")
    assert got == _golden().get(case), f"the command line of {case!r} changed; see {GOLDEN.name}"
