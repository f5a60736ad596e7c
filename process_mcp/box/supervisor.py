"""Starting processes in a box: the zygote, the supervisors it forks, and what they do to a process tree.

Part of what is shipped into a box with the agent (standard library only, Python 3.8 syntax). Each
process runs under a supervisor of its own that is a child subreaper (PR_SET_CHILD_SUBREAPER), so
whatever the process starts stays in the supervisor's tree even when it double-forks, calls setsid or
clears its environment. Supervisors are forked ahead of need by a small zygote (so the agent itself never
forks mid-spawn) and start their command with posix_spawn, or, where the agent is root and told a user,
in a child that drops to that user (``RUN_AS``) just before the command starts. Every supervisor holds the
read end of a lifeline pipe whose write end only the agent holds: when the agent dies, however it dies,
each supervisor kills its tree and exits. Signals go to every process in a tree, found through ``proc``.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import resource
import select
import signal
import socket
import struct
from typing import Any

try:
    from . import confine, proc
except ImportError:  # in the box: the loader registered these under these names first
    import process_mcp_box_confine as confine  # type: ignore[import-not-found,no-redef]
    import process_mcp_box_proc as proc  # type: ignore[import-not-found,no-redef]

KILL_ROUNDS = 100
"""Rounds of walking /proc and killing, each catching what forked during the one before."""
PR_SET_CHILD_SUBREAPER = 36
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
MSG_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
SHELL = "/bin/sh"
_prctl: Any = None
RUN_AS: tuple[int, int] | None = None
"""The uid and gid every command runs as, when the agent is root and drops to them (None: commands run
as the agent does). Set once at the start; the zygote and supervisors inherit it."""
PRLIMIT = "/usr/bin/prlimit"
"""Sets a confined process's RLIMIT_NPROC as it starts (util-linux; the host sandbox shows /usr)."""
CGROUPS: list[int] = []
"""In a box with cgroups, a descriptor of the box's own group in each cgroup hierarchy (the server's):
each process's supervisor joins the group the server made for it below them (``confine.join_cgroup``),
and stays there once the process's tree is gone, for a later process the server puts there."""
TAKEN = confine.Taken()
"""What this supervisor has taken on itself for the processes of a box it started (forked spares start
with nothing taken)."""


def prctl(option: int, value: int) -> int | None:
    """prctl(2) through the C library, or None where it cannot be called. The agent finds it once; its
    zygote and supervisors inherit it (finding it costs a supervisor 0.3 ms of CPU)."""
    global _prctl
    try:
        if _prctl is None:
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        return int(_prctl(option, value, 0, 0, 0))
    except (ImportError, OSError, AttributeError):
        return None


def set_subreaper() -> bool:
    """Make orphaned descendants of this process its children instead of init's; say whether it worked."""
    return prctl(PR_SET_CHILD_SUBREAPER, 1) == 0


def set_undumpable() -> bool:
    """Make this process (and what it forks, until an exec) not dumpable, so that processes of its
    user cannot ptrace it or open its descriptors through /proc; say whether it is. A credential
    change (see as_processes_user) sets the flag back to the system's default, so it is set again
    after each."""
    prctl(PR_SET_DUMPABLE, 0)
    return prctl(PR_GET_DUMPABLE, 0) == 0


def resolve_user(spec: str) -> tuple[int, int]:
    """The uid and gid ``spec`` names as Docker reads a user: ``uid``, ``uid:gid``, ``name`` or
    ``name:group``; a user's gid, when not given, is its primary group (0 for a uid the box's passwd
    does not list). Raises KeyError for a name the box does not know."""
    import grp
    import pwd

    user, _, group = spec.partition(":")
    if user.isdigit():
        uid = int(user)
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = 0
    else:
        entry = pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    if group:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    return uid, gid


@contextlib.contextmanager
def as_processes_user() -> Any:
    """Read /proc with the effective uid and gid of the processes (a root agent without
    CAP_SYS_PTRACE may not read another user's /proc/PID/io); the real and saved ids stay root, so
    nothing the processes do reaches the agent meanwhile."""
    if RUN_AS is None:
        yield
        return
    euid, egid = os.geteuid(), os.getegid()
    try:
        os.setegid(RUN_AS[1])
        os.seteuid(RUN_AS[0])
    except OSError:  # cannot (no CAP_SETGID): read as root, without what /proc/PID/io says
        with contextlib.suppress(OSError):
            os.setegid(egid)
        yield
        return
    try:
        yield
    finally:
        os.seteuid(euid)
        os.setegid(egid)
        set_undumpable()


def signal_tree(root: int, signum: int, group: int = 0) -> int:
    """Send ``signum`` to every process below ``root``; return how many it reached.

    With ``group`` (the leader's process group), the group gets it first with one killpg, which the
    kernel makes atomic against forks in progress: a child forked while the tree is being listed would
    otherwise miss it (and a stopped shell's child would go on running). The walk then reaches only
    what left the group (setsid, setpgid), so nothing gets the signal twice.
    """
    sent = 0
    if group:
        try:
            os.killpg(group, signum)
            sent += 1
        except OSError:
            group = 0  # the group is gone: whatever is left is reached one by one
    for pid in proc.descendants(root):
        try:
            if group and os.getpgid(pid) == group:
                continue
            os.kill(pid, signum)
            sent += 1
        except OSError:
            pass
    return sent


def kill_tree(root: int, reap: bool = False) -> None:
    """SIGKILL everything below ``root`` until nothing is left (bounded); with ``reap``, reap the
    children that die, so a subreaper's orphans do not linger as zombies."""
    for _ in range(KILL_ROUNDS):
        if reap:
            reap_children()
        if not signal_tree(root, signal.SIGKILL):
            return
        select.select([], [], [], 0.005)  # let the kernel finish the deaths before the next walk


def reap_children() -> tuple[list[tuple[int, int]], bool]:
    """Reap every child that has exited; return their (pid, status), and whether children remain."""
    reaped: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped, False
        if pid == 0:
            return reaped, True
        reaped.append((pid, status))


def exit_fields(status: int) -> dict[str, int]:
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"code": os.WEXITSTATUS(status)}


def close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):  # the descriptor listdir itself used is closed already
                os.close(fd)


def _noop(signum: int, frame: Any) -> None:
    """A SIGCHLD handler: set so the wake-up descriptor is written (SIG_IGN would reap for us)."""


def wake_on_sigchld() -> int:
    """A descriptor that becomes readable at every SIGCHLD."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, _noop)
    return wake_r


def drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def rehearse(wake: int) -> None:
    """Run, in a spare, the Python a start takes (an order decoded, the reports, a reap), before the
    order comes. A forked process copies each page it first writes to, and Python writes to every
    object it touches (reference counts): these faults are then taken while the spare waits, not while
    a process starts (0.3-0.5 ms of a spawn on two cores)."""
    spec = {"command": "true", "cwd": "/", "env": {}, "inherit": True, "tty": False, "rlimits": {}}
    order = json.loads(json.dumps({"spec": spec, "env": {"PATH": SHELL}}))
    for name, (soft, hard) in (order["spec"].get("rlimits") or {"cpu": (0, 0)}).items():
        LIMITS.get(name, (soft, hard))
    struct.unpack(">I", struct.pack(">I", 0))
    array.array("i").frombytes(bytes(8))
    (json.dumps({"started": 0}) + "\n").encode()
    (json.dumps(exit_fields(0)) + "\n").encode()
    reap_children()
    select.select([wake], [], [], 0)
    drain(wake)


def spare(order: socket.socket, lifeline: int) -> None:
    """In a supervisor forked ahead of need: get ready (no descriptors of the agent's, a subreaper),
    wait for the order to start a process (its spec, environment and descriptors), supervise it, and
    once its whole tree is gone wait for the next order: the agent keeps a few of them, which start a
    process without a fork. Ends when the agent closes the order socket or dies. Never returns."""
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)  # 0 and 1 were the agent's stream: never touch them here
        os.dup2(devnull, 1)
        close_all_but({0, 1, 2, order.fileno(), lifeline, *CGROUPS})
        set_subreaper()
        wake = wake_on_sigchld()
        rehearse(wake)
        while True:
            if lifeline in select.select([order.fileno(), lifeline], [], [])[0] and not os.read(lifeline, 1):
                os._exit(0)  # the agent is gone
            received = receive_order(order)
            if received is None:
                os._exit(0)  # the agent keeps enough supervisors
            spec, env, fds = received
            if not supervise(spec, env, (fds[0], fds[1], fds[2]), fds[3], lifeline, wake):
                os._exit(0)
    finally:
        os._exit(1)


def zygote(control: socket.socket, lifeline: int) -> None:
    """In a small process forked once at the agent's start: fork spare supervisors when the agent asks
    (one byte each) and hand each back (its pid, and the agent's end of its order socket). Forking
    here, not in the agent, keeps the agent's loop free of the fork and of the copy-on-write faults
    that follow one. Not a subreaper: what a supervisor that was killed leaves falls to the agent,
    which tells it from its own children and ends it. Never returns."""
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        close_all_but({0, 1, 2, control.fileno(), lifeline, *CGROUPS})
        wake = wake_on_sigchld()
        while True:
            ready = select.select([control.fileno(), lifeline, wake], [], [])[0]
            if lifeline in ready and not os.read(lifeline, 1):
                os._exit(0)  # the agent is gone; each supervisor sees that too and ends its tree
            if wake in ready:
                drain(wake)
                reap_children()  # supervisors that finished
            if control.fileno() in ready:
                wanted = control.recv(64)
                if not wanted:
                    os._exit(0)
                for _ in wanted:
                    pid, order = fork_spare(lifeline, control)
                    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [order.fileno()]).tobytes())]
                    control.sendmsg([struct.pack(">I", pid)], rights)
                    order.close()
    finally:
        os._exit(1)


def fork_spare(lifeline: int, *close: socket.socket) -> tuple[int, socket.socket]:
    """Fork a spare supervisor; return its pid and the end of its order socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        raise
    if pid == 0:
        ours.close()
        for sock in close:
            sock.close()
        spare(theirs, lifeline)
    theirs.close()
    return pid, ours


def send_order(order: socket.socket, spec: dict[str, Any], env: dict[str, str], fds: list[int]) -> None:
    body = json.dumps({"spec": spec, "env": env}).encode()
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    order.sendmsg([struct.pack(">I", len(body))], rights)
    order.sendall(body)


def receive_order(order: socket.socket) -> tuple[dict[str, Any], dict[str, str], list[int]] | None:
    """The next order on ``order``: the spec, the environment and the descriptors; None once the agent
    has closed it."""
    item = array.array("i")
    header, ancillary, _, _ = order.recvmsg(4, socket.CMSG_SPACE(8 * item.itemsize), MSG_CMSG_CLOEXEC)
    if not header:
        return None
    for level, kind, data in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            item.frombytes(data[: len(data) - len(data) % item.itemsize])
    fds = list(item)
    if len(fds) != 4:  # stdin, stdout, stderr and the status: fewer came (a limit on descriptors)
        os._exit(1)  # its status never comes: the agent reports the process lost
    for fd in fds:
        os.set_inheritable(fd, False)  # only what posix_spawn dup2s reaches the command
    while len(header) < 4:
        chunk = order.recv(4 - len(header))
        if not chunk:
            os._exit(1)
        header += chunk
    size = struct.unpack(">I", header)[0]
    body = b""
    while len(body) < size:
        chunk = order.recv(size - len(body))
        if not chunk:
            os._exit(1)
        body += chunk
    order_fields = json.loads(body)
    return order_fields["spec"], order_fields["env"], fds


LIMITS = {"cpu": resource.RLIMIT_CPU, "data": resource.RLIMIT_DATA}


def supervise(
    spec: dict[str, Any], env: dict[str, str], stdio: tuple[int, int, int], status: int, lifeline: int, wake: int
) -> bool:
    """Start the command, report its start and its exit on ``status`` (JSON lines), reap whatever its
    tree leaves, and kill the tree if ``lifeline`` ends. Return once the tree is gone, with ``status``
    closed (which tells the agent so): True if this supervisor may start another process (it set no
    limits on itself)."""

    def report(**fields: Any) -> None:
        os.write(status, (json.dumps(fields) + "\n").encode())

    if RUN_AS is None:
        try:
            os.chdir(spec["cwd"])  # the supervisor's own directory is what the command starts in
        except OSError as exc:
            report(error="nocwd", message=str(exc))
            os._exit(0)
    try:
        for name, (soft, hard) in (spec.get("rlimits") or {}).items():
            # Set on the supervisor, inherited by the command: posix_spawn offers no rlimit of its own.
            try:
                resource.setrlimit(LIMITS[name], (soft, hard))
            except ValueError as exc:  # above the hard limit this supervisor has
                raise StartFailed("limits", f"its {name} limit cannot be set: {exc}") from None
        plan = spec.get("confine")
        if plan and RUN_AS is None:
            # In a box this supervisor takes the process's confinement itself, first (a fork of Python
            # costs milliseconds in copied pages; posix_spawn does not): it is then as far from the
            # agent and the rest of the box as its process, which can at most end its own supervisor.
            try:
                standing = confine.apply(plan, CGROUPS, TAKEN)
                prefix = [PRLIMIT, f"--nproc={int(plan['nproc'])}", "--"] if plan.get("nproc") else []
                if prefix and not os.path.exists(PRLIMIT):
                    raise confine.ConfineError(0, f"the box has no {PRLIMIT} to bound the process's processes")
            except OSError as exc:
                report(error="confine", message=str(exc))
                os._exit(0)
            os.write(standing, str(confine.OOM_SCORE_ADJ).encode())  # what the process starts with
            try:
                leader = _start_leader(spec, env, stdio, prefix)
            finally:
                os.write(standing, b"0")
        elif RUN_AS is None:
            leader = _start_leader(spec, env, stdio)
        else:
            leader = _start_in_child(spec, env, stdio, RUN_AS)
    except StartFailed as exc:
        report(error=exc.error, message=exc.message)
        os._exit(0)
    except OSError as exc:
        report(error="exec", message=f"{SHELL}: {exc.strerror or exc}")
        os._exit(0)
    for fd in set(stdio):
        os.close(fd)
    report(started=leader)
    while True:
        reaped, children_left = reap_children()
        said = [exit_fields(code) for pid, code in reaped if pid == leader]
        reusable = not spec.get("rlimits")  # it stays in the process's group (``confine.Taken``)
        if not children_left:  # a subreaper with no children has no descendants left
            os.chdir("/")  # hold no directory of the process's
            said.append({"done": True, "reusable": reusable})  # a status that ends without it: it was killed
        if said:
            # One write for an exit that ended the tree: the agent reads that this supervisor is free in
            # the same read as the exit, and says so to the server before a next spawn can come.
            os.write(status, "".join(json.dumps(fields) + "\n" for fields in said).encode())
        if not children_left:
            os.close(status)
            return reusable
        ready = select.select([lifeline, wake], [], [])[0]
        if lifeline in ready and not os.read(lifeline, 1):
            kill_tree(os.getpid(), reap=True)  # the agent is gone: nobody can drive this tree
            os._exit(0)
        drain(wake)


def _start_leader(
    spec: dict[str, Any], env: dict[str, str], stdio: tuple[int, int, int], prefix: list[str] | None = None
) -> int:
    """Start ``/bin/sh -c command`` in a session of its own on ``stdio`` (posix_spawn: no second fork of
    Python), through ``prefix`` (a program that execs the rest) if given. A terminal is opened by name
    after setsid, which makes it the controlling terminal."""
    if spec.get("tty"):
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.ttyname(stdio[0]), os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]
    else:
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
    argv = [*(prefix or []), SHELL, "-c", spec["command"]]
    return os.posix_spawn(
        argv[0],
        argv,
        env,
        file_actions=actions,
        setsid=True,
        setsigmask=(),
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # Python ignores them, and exec keeps ignored signals
    )


class StartFailed(Exception):
    """A command could not be started: ``error`` is "nocwd", "exec" or "limits", as STARTED says."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


def _start_in_child(
    spec: dict[str, Any], env: dict[str, str], stdio: tuple[int, int, int], user: tuple[int, int] | None
) -> int:
    """Start ``/bin/sh -c command`` in a session of its own on ``stdio`` from a fork that, before it
    execs, drops to ``user`` (uid, gid; no supplementary groups) for good, from a root supervisor. The
    supervisor keeps what the command gives up, so nothing the command does can signal or trace it. The
    directory is entered last, so one the user may not enter is "nocwd" as it would be without the
    agent. Raises StartFailed once the child has said why it could not exec."""
    errors_r, errors_w = os.pipe()  # close-on-exec: an exec that works closes it, and says nothing
    pid = os.fork()
    if pid == 0:
        step = "exec"
        try:
            os.close(errors_r)
            os.setsid()
            if spec.get("tty"):
                terminal = os.open(os.ttyname(stdio[0]), os.O_RDWR)  # after setsid: the controlling terminal
                if user is not None:
                    os.fchown(terminal, user[0], -1)  # the user's, as a login gives it
                for target in (0, 1, 2):
                    os.dup2(terminal, target)
            else:
                for target, fd in enumerate(stdio):
                    os.dup2(fd, target)
            if user is not None:
                step = "exec"
                uid, gid = user
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            step = "nocwd"
            os.chdir(spec["cwd"])
            step = "exec"
            for signum in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them, and exec keeps ignored signals
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.execve(SHELL, [SHELL, "-c", spec["command"]], env)
        except OSError as exc:
            message = str(exc) if step != "exec" else f"{SHELL}: {exc.strerror or exc}"
            with contextlib.suppress(OSError):
                os.write(errors_w, json.dumps({"error": step, "message": message}).encode())
        finally:
            os._exit(127)
    os.close(errors_w)
    said = b""
    try:
        while True:
            chunk = os.read(errors_r, 4096)
            if not chunk:
                break
            said += chunk
    finally:
        os.close(errors_r)
    if said:
        os.waitpid(pid, 0)
        failure = json.loads(said)
        raise StartFailed(failure["error"], failure["message"])
    return pid
