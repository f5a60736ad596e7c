"""What a process in a long-lived box is confined to, applied in its own child just before it runs.

A box lives across many spawns, so what must be read-only in it can change while it lives: ``git init
repo`` in one call makes ``repo/.git`` that the next call must not be able to write. The box's agent
keeps CAP_SYS_ADMIN over the box's own mount namespace (and nothing else: the box's user namespace
is its own, nested, and its mounts from bwrap are locked), and each process is started in a child that
takes a mount namespace of its own, makes the paths the server names read-only (or hides them) as they
are at that moment, and then gives up everything before the command runs: every capability (bounding,
ambient, effective, permitted, inheritable), new privileges, a Landlock domain of its own that scopes
signals and abstract Unix sockets (so nothing it starts can signal the agent, its zygote or its
supervisors, which stay outside that domain), and the sandbox's seccomp filter (no mounts, no new
namespaces).

The plan comes from the server with the spawn (``SPAWN``'s ``confine`` field): ``readonly`` paths,
``hidden`` paths each with the empty file or directory that covers it, ``pinned`` directories (bound
onto themselves so they cannot be renamed), ``seccomp`` (the filter's BPF
program, base64) and ``scopes`` (whether to take the Landlock domain). A path the box shows as a
symbolic link is refused, not followed: a mount follows links, and a protection must hold the name it
names. Shipped into the box with the agent: standard library only, and syntax Python 3.8 parses.
"""

from __future__ import annotations

import base64
import ctypes
import os
import stat
import struct
from typing import Any

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# landlock_create_ruleset, landlock_restrict_self: the same numbers on every architecture.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1
LANDLOCK_SCOPE_SIGNAL = 2
O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc: Any = None


class _RulesetAttr(ctypes.Structure):
    """struct landlock_ruleset_attr."""

    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _SockFprog(ctypes.Structure):
    """struct sock_fprog: a classic BPF program's length in instructions, and where it is."""

    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


class ConfineError(OSError):
    """A protection could not be applied: the command must not run."""


def c_library() -> Any:
    """The C library, loaded at its first use in each process."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> int:
    if result < 0:
        number = ctypes.get_errno()
        raise ConfineError(number, f"{what}: {os.strerror(number)}")
    return result


def own_mounts(plan: dict[str, Any]) -> None:
    """The first half of ``plan``, which needs the capabilities the second gives up: a mount namespace of
    its own (its mounts reach no other process of the box), with each ``readonly`` path bound read-only
    onto itself, each ``hidden`` one ([path, stand-in]) covered by its stand-in, and each ``pinned``
    directory bound onto itself (a mount point cannot be renamed), outermost first so no mount covers
    another. Raises ConfineError."""
    mounts = [(path, path, True) for path in plan.get("readonly") or []]
    mounts += [(stand_in, path, True) for path, stand_in in plan.get("hidden") or []]
    mounts += [(path, path, False) for path in plan.get("pinned") or []]
    if not mounts:
        return
    libc = c_library()
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making the mounts private")
    for source, target, read_only in sorted(mounts, key=lambda mount: (mount[1].count("/"), mount[1])):
        _bind(source, target, read_only=read_only)


def give_up(plan: dict[str, Any]) -> None:
    """The second half of ``plan``, in order: every capability, new privileges, a Landlock domain of its
    own with ``scopes``, the ``seccomp`` filter. Raises ConfineError at the first that cannot be applied."""
    drop_capabilities()
    no_new_privileges()
    if plan.get("scopes"):
        scope_signals_and_sockets()
    if plan.get("seccomp"):
        load_seccomp(base64.b64decode(plan["seccomp"]))


def _bind(source: str, target: str, *, read_only: bool) -> None:
    """Bind ``source`` onto ``target``, both opened without following a symbolic link and mounted by
    descriptor, so neither name can be swapped for a link between the look and the mount."""
    fds = []
    try:
        for path in (source, target):
            fd = os.open(path, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            fds.append(fd)
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise ConfineError(0, f"{path} is a symbolic link, which a protection cannot hold")
        names = [f"/proc/self/fd/{fd}".encode() for fd in fds]
        libc = c_library()
        # Recursive: a mount with mounts of the box below (locked, in its nested user namespace) may be
        # bound only with them, and they stay as they are.
        _check(libc.mount(names[0], names[1], None, MS_BIND | MS_REC, None), f"binding {target}")
        if read_only:
            # The descriptor opened before the bind is of what lies under it: the name is opened again
            # (the new mount), and must still be what was bound.
            bound = os.open(target, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            fds.append(bound)
            was, now = os.fstat(fds[0]), os.fstat(bound)
            if (was.st_dev, was.st_ino) != (now.st_dev, now.st_ino):
                raise ConfineError(0, f"{target} changed while it was being protected")
            # A remount must keep the flags the mount below has (nosuid, nodev, noexec): where the box's
            # user namespace is nested, they are locked, and a remount that drops one is refused.
            flags = os.fstatvfs(bound).f_flag
            kept = (
                (MS_NOSUID if flags & os.ST_NOSUID else 0)
                | (MS_NODEV if flags & os.ST_NODEV else 0)
                | (MS_NOEXEC if flags & os.ST_NOEXEC else 0)
            )
            _check(
                libc.mount(
                    None, f"/proc/self/fd/{bound}".encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY | kept, None
                ),
                f"making {target} read-only",
            )
    except FileNotFoundError:
        pass  # gone since the server looked: nothing there to protect (its parent still holds)
    except OSError as exc:
        if isinstance(exc, ConfineError):
            raise
        raise ConfineError(exc.errno or 0, f"{target}: {exc.strerror or exc}") from None
    finally:
        for fd in fds:
            os.close(fd)


def drop_capabilities() -> None:
    """Give up every capability for good: out of the bounding and ambient sets first, then out of the
    effective, permitted and inheritable ones (so no exec can bring one back)."""
    libc = c_library()
    with open("/proc/sys/kernel/cap_last_cap") as last:
        top = int(last.read())
    _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clearing the ambient capabilities")
    for capability in range(top + 1):
        if libc.prctl(PR_CAPBSET_READ, capability, 0, 0, 0) > 0:  # dropping needs CAP_SETPCAP: the box has it
            _check(libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0), f"dropping capability {capability}")
    header = struct.pack("Ii", LINUX_CAPABILITY_VERSION_3, 0)
    data = bytes(24)  # two (effective, permitted, inheritable) triples of 32 bits, all empty
    _check(libc.capset(header, data), "capset")


def no_new_privileges() -> None:
    """Set no_new_privs: no exec may grant privileges again (set-user-ID, file capabilities)."""
    _check(c_library().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def scope_signals_and_sockets() -> None:
    """Take a Landlock domain of its own that scopes signals and abstract Unix sockets: what runs in it
    can signal only processes in it (or nested in it), so not the agent or its supervisors."""
    libc = c_library()

    attr = _RulesetAttr(0, 0, LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL)
    fd = _check(
        libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), 0),
        "landlock_create_ruleset",
    )
    try:
        _check(libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, fd, 0), "landlock_restrict_self")
    finally:
        os.close(fd)


def load_seccomp(program: bytes) -> None:
    """Install the classic BPF ``program`` (8-byte instructions) as a seccomp filter on this process."""
    if not program or len(program) % 8:
        raise ConfineError(0, "the seccomp program is empty or not whole instructions")
    buffer = ctypes.create_string_buffer(program, len(program))

    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    _check(c_library().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")
