"""What confines the processes of a long-lived box: the mounts its agent makes for all of them, and what
each takes on (its supervisor, just before it starts it).

A box lives across many spawns, so what must be read-only in it can change while it lives: ``git init
repo`` in one call makes ``repo/.git`` that the next call must not be able to write. The box's agent
keeps CAP_SYS_ADMIN over the box's own namespaces (and nothing else: the box's user namespace is its
own, nested, and its mounts from bwrap are locked). It takes a mount namespace of its own at start,
which every process of the box shares, and before each spawn makes the paths the server names
read-only (or hides them) there, as they are at that moment (``protect``): a protection added for a
later spawn holds for the processes that run already, so none of them keeps a weaker view that a later
one could drive it to use. Each process's supervisor then joins the process's cgroup (unless it is
there already, kept from the box's last process) and gives up everything before it starts the
command (``apply``): every capability (bounding, ambient, effective,
permitted, inheritable), new privileges, a Landlock domain of its own (so neither it nor its process
can trace or reach through /proc the agent, its zygote, the box's init or another process's tree;
and, with scopes, cannot signal them), and the sandbox's seccomp filter (no mounts, no new
namespaces). A process can so reach at most its own supervisor (by a signal: it is not dumpable), and
end its own supervision with it.

The plan comes from the server with the spawn (``SPAWN``'s ``confine`` field): ``readonly`` paths,
``hidden`` paths each with the empty file or directory that covers it, ``pinned`` directories (bound
onto themselves so they cannot be renamed), ``seccomp`` (the filter's BPF program, base64) and
``scopes`` (whether the Landlock domain scopes signals and abstract sockets), and the process's
bounds: ``cgroup`` (the group below the box's own it joins first, where the box has cgroups) and
``nproc`` (the processes of its user in the box past which it cannot fork, where the kernel counts
them: the rest is kept for other spawns; set by ``prlimit`` as the command starts, so its supervisor
can still start it). A path the box shows as a symbolic link is refused, not followed: a mount follows links,
and a protection must hold the name it
names. Shipped into the box with the agent: standard library only, and syntax Python 3.8 parses."""

from __future__ import annotations

import base64
import ctypes
import errno
import os
import re
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
PR_SET_DUMPABLE = 4
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
SYS_MOUNT_SETATTR = 442
SYS_OPENAT2 = 437
RESOLVE_NO_SYMLINKS = 0x04
AT_FDCWD = -100
MOUNT_ATTR_RDONLY = 1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1
LANDLOCK_SCOPE_SIGNAL = 2
LANDLOCK_ACCESS_FS_MAKE_BLOCK = 1 << 11
O_PATH = getattr(os, "O_PATH", 0o10000000)
OOM_SCORE_ADJ = 500
"""A box's processes are what the OOM killer ends first, before the agent and supervisors that report
them (a process whose memory is not its own, a memfd or /dev/shm, would otherwise leave the agent the
largest in its box)."""

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


def own_namespace() -> None:
    """Take a mount namespace of the agent's own, with its mounts private: the box's mounts from bwrap
    belong to the user namespace outside, so this one is where the agent may mount, and every process it
    starts shares it (see ``protect``)."""
    libc = c_library()
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making the mounts private")


def protect(plan: dict[str, Any], made: dict[str, tuple[str, int]]) -> None:
    """Make the box's mounts what ``plan`` says now, in the agent's namespace (``own_namespace``), which
    every process of the box shares, so a protection holds for the processes that run already too: each
    ``readonly`` path bound read-only onto itself with all below it, each ``hidden`` one ([path,
    stand-in]) covered by its stand-in, each ``pinned`` directory bound onto itself (a mount point cannot
    be renamed), outermost first. ``made`` (path -> kind, "readonly", "hidden" or "pinned", and the
    mount's id) is what the agent made for earlier plans, kept up to date here. A mount of it that this
    plan no longer makes read-only (the nearest existing ancestor of a denied path, once that path
    exists; a directory that can be listed again) is made writable again, after the new protections
    are in place and without unmounting anything, so nothing below it is exposed on the way; hidden
    paths stay hidden. A mount is the agent's to change only while its path shows the very mount the
    agent made (its id): one moved there from elsewhere is never made writable. Raises ConfineError; a
    protection made before the one that failed stays."""
    wanted = {path: ("readonly", path) for path in plan.get("readonly") or []}
    wanted.update({path: ("hidden", stand_in) for path, stand_in in plan.get("hidden") or []})
    for path in plan.get("pinned") or []:
        wanted.setdefault(path, ("pinned", path))
    if not wanted and not made:
        return
    mounted = mount_points()

    def ours(target: str) -> bool:
        return target in made and target in mounted and mounted[target][0] == made[target][1]

    for target in sorted(wanted, key=lambda path: (path.count("/"), path)):
        kind, source = wanted[target]
        read_only = kind != "pinned"
        if ours(target) and (made[target][0] == kind or "hidden" not in (made[target][0], kind)):
            if mounted[target][1] != read_only:  # an earlier pin now read-only, or the other way round
                set_read_only(target, read_only, made[target][1])
            made[target] = (kind, made[target][1])
            continue
        if target in mounted and target not in made and kind != "hidden" and mounted[target][1] >= read_only:
            continue  # the box's own mount (a read-only path of the view), as strict as needed
        mount_id = _bind(source, target, read_only=read_only)
        if mount_id is not None:
            made[target] = (kind, mount_id)
    held = [path for path, (kind, _) in wanted.items() if kind != "pinned"]
    for target, (kind, mount_id) in list(made.items()):
        if target in wanted:
            continue
        if not ours(target):
            del made[target]  # gone, or moved: whatever that path shows now is not the agent's to change
        elif kind != "hidden" and not any(target == path or target.startswith(path + "/") for path in held):
            if mounted[target][1]:
                set_read_only(target, False, mount_id)
            made[target] = ("pinned", mount_id)


def mount_points() -> dict[str, tuple[int, bool]]:
    """Each mount point this process sees: the id of the mount on top there, and whether it is read-only."""
    found = {}
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table:
            fields = line.split(b" ")
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            found[os.fsdecode(point)] = (int(fields[0]), b"ro" in fields[5].split(b","))
    return found


def mount_id(fd: int) -> int:
    """The id of the mount descriptor ``fd`` is on (as /proc/self/mountinfo numbers mounts)."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
        for line in info:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise ConfineError(0, "the kernel does not say which mount a descriptor is on")


class Taken:
    """What a supervisor has taken on itself for good across the processes it starts: what it gave up
    (the ``seccomp`` filter and ``scopes`` of the plan it gave up for), the descriptor of its
    ``oom_score_adj`` (see ``oom_standing``) and the ``cgroup`` it is in (None: the box's own). A
    supervisor starts one process at a time, each once the tree before it is gone, and what it gave up
    stays given up: a later plan of the same box finds it done, and the supervisor needs no fork for its
    next process. It stays in its last process's group, which the server hands to a later process of
    the box with it in: on cgroup v1 a move between groups after a quiet moment waits milliseconds."""

    def __init__(self) -> None:
        self.given_up: tuple[str, bool] | None = None
        self.standing: int | None = None
        self.cgroup: str | None = None


def apply(plan: dict[str, Any], groups: list[int], taken: Taken) -> int:
    """All of ``plan`` that a process's supervisor takes on itself before it starts the process, in order:
    the process's ``cgroup`` (below ``groups``), then what it gives up (``give_up``), unless ``taken``
    says it gave that up already (or it is in that group already). Returns a descriptor of its
    ``oom_score_adj`` (see ``oom_standing``), kept in ``taken``. Raises ConfineError."""
    if plan.get("cgroup") and plan["cgroup"] != taken.cgroup:
        taken.cgroup = None  # until it is in every hierarchy's
        join_cgroup(plan["cgroup"], groups)
        taken.cgroup = plan["cgroup"]
    if taken.standing is None:
        taken.standing = oom_standing()  # before any Landlock domain (see there)
    wanted = (str(plan.get("seccomp") or ""), bool(plan.get("scopes")))
    if taken.given_up != wanted:
        give_up(plan)  # a different plan stacks (a filter and a domain more): never less than before
        taken.given_up = wanted
    return taken.standing


def _move_into(groups: list[int], procs: str) -> None:
    """Write this process into the ``procs`` file below each of ``groups`` (descriptors of directories)."""
    for group in groups:
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC, dir_fd=group)
        try:
            os.write(fd, b"0")  # 0: the writer
        finally:
            os.close(fd)


def oom_standing() -> int:
    """A descriptor of this process's ``oom_score_adj``, through which it raises it to OOM_SCORE_ADJ while
    it starts its process (which keeps that) and takes 0 again (no lower than it had: no privilege
    needed), so the OOM killer ends the box's processes before the agent and supervisors that report
    them. Its /proc files are root's while it is not dumpable (the agent's supervisors are not): it is
    so only for the open, before it takes a Landlock domain, when no confined process may trace it."""
    libc = c_library()
    _check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    try:
        return os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
    finally:
        _check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def join_cgroup(name: str, groups: list[int]) -> None:
    """Move this process into the group ``name`` below each of ``groups`` (descriptors of the box's own
    groups): the server made it, with this process's bounds. Raises ConfineError."""
    if not groups:
        raise ConfineError(0, f"the box holds no cgroups to put the process in {name}")
    if not name.isalnum():
        raise ConfineError(0, f"{name!r} is not the name of a group of this box")
    _move_into(groups, name + "/cgroup.procs")


def give_up(plan: dict[str, Any]) -> None:
    """What a process gives up before it runs, in order: every capability, new privileges, a Landlock
    domain of its own (which scopes signals and abstract Unix sockets with ``scopes``), the ``seccomp``
    filter. Raises ConfineError at the first that cannot be applied."""
    drop_capabilities()
    no_new_privileges()
    landlock_domain(scoped=bool(plan.get("scopes")))
    if plan.get("seccomp"):
        load_seccomp(base64.b64decode(plan["seccomp"]))


def _bind(source: str, target: str, *, read_only: bool) -> int | None:
    """Bind ``source`` onto ``target``, both opened without following a symbolic link anywhere on the way
    and mounted by descriptor, so neither name can be swapped for a link between the look and the mount;
    the new mount's id, or None when ``target`` is gone."""
    fds = []
    try:
        for path in (source, target):
            fds.append(open_without_links(path))
        names = [f"/proc/self/fd/{fd}".encode() for fd in fds]
        libc = c_library()
        # Recursive: a mount with mounts of the box below (locked, in its nested user namespace) may be
        # bound only with them, and they stay as they are.
        _check(libc.mount(names[0], names[1], None, MS_BIND | MS_REC, None), f"binding {target}")
        # The descriptor opened before the bind is of what lies under it: the name is opened again (the
        # new mount), and must still be what was bound.
        bound = open_without_links(target)
        fds.append(bound)
        was, now = os.fstat(fds[0]), os.fstat(bound)
        if (was.st_dev, was.st_ino) != (now.st_dev, now.st_ino):
            raise ConfineError(0, f"{target} changed while it was being protected")
        if read_only:
            read_only_all(bound, target)
        return mount_id(bound)
    except FileNotFoundError:
        return None  # gone since the server looked: nothing there to protect (its parent still holds)
    except OSError as exc:
        if isinstance(exc, ConfineError):
            raise
        raise ConfineError(exc.errno or 0, f"{target}: {exc.strerror or exc}") from None
    finally:
        for fd in fds:
            os.close(fd)


def open_without_links(path: str) -> int:
    """An O_PATH descriptor of ``path``, opened through no symbolic link on the way (openat2 with
    RESOLVE_NO_SYMLINKS; before Linux 5.6, the last component alone is checked). Raises ConfineError
    for a link, OSError otherwise (FileNotFoundError for a name that is gone)."""
    how = struct.pack("QQQ", O_PATH | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS)
    fd = c_library().syscall(SYS_OPENAT2, AT_FDCWD, os.fsencode(path), how, ctypes.c_size_t(len(how)))
    if fd < 0:
        number = ctypes.get_errno()
        if number == errno.ELOOP:
            raise ConfineError(number, f"{path} is or passes through a symbolic link, which a protection cannot hold")
        if number != errno.ENOSYS:
            raise OSError(number, os.strerror(number), path)
        fd = os.open(path, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfineError(0, f"{path} is a symbolic link, which a protection cannot hold")
    return int(fd)


def read_only_all(fd: int, target: str) -> None:
    """Make the mount at ``fd`` read-only with every mount below it (an earlier pin inside it too)."""
    _set_attributes(fd, target, read_only=True, recursive=True)


def set_read_only(target: str, read_only: bool, expected: int) -> None:
    """Make the mount at ``target`` read-only with every mount below it, or that mount alone writable,
    if it is still the mount ``expected`` (its id); raises ConfineError otherwise."""
    fd = open_without_links(target)
    try:
        if mount_id(fd) != expected:
            raise ConfineError(0, f"{target} is no longer the mount that protected it")
        _set_attributes(fd, target, read_only=read_only, recursive=read_only)
    finally:
        os.close(fd)


def _set_attributes(fd: int, target: str, *, read_only: bool, recursive: bool) -> None:
    """mount_setattr, or where the kernel has none (before Linux 5.12), a remount of that mount alone that
    keeps the flags it has (nosuid, nodev, noexec: where the box's user namespace is nested they are
    locked, and a remount that drops one is refused)."""
    libc = c_library()
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY if read_only else 0, 0 if read_only else MOUNT_ATTR_RDONLY, 0, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    result = libc.syscall(SYS_MOUNT_SETATTR, fd, b"", flags, attr, ctypes.c_size_t(len(attr)))
    what = f"making {target} {'read-only' if read_only else 'writable'}"
    if result == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:
        _check(result, what)
    held = os.fstatvfs(fd).f_flag
    kept = (
        (MS_NOSUID if held & os.ST_NOSUID else 0)
        | (MS_NODEV if held & os.ST_NODEV else 0)
        | (MS_NOEXEC if held & os.ST_NOEXEC else 0)
        | (MS_RDONLY if read_only else 0)
    )
    _check(libc.mount(None, f"/proc/self/fd/{fd}".encode(), None, MS_BIND | MS_REMOUNT | kept, None), what)


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
    landlock_domain(scoped=True)


def landlock_domain(*, scoped: bool) -> None:
    """Take a Landlock domain of its own. Any domain keeps what runs in it from tracing, or opening through
    /proc (``/proc/PID/root``, ``/proc/PID/fd``), a process outside it: the agent, the box's init, every
    other process of the box, each in a domain of its own. ``scoped`` adds signals and abstract Unix
    sockets (Linux 6.12); without it the domain handles making block devices alone, which nothing in a
    box may do anyway."""
    libc = c_library()
    if scoped:
        attr = _RulesetAttr(0, 0, LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL)
    else:
        attr = _RulesetAttr(LANDLOCK_ACCESS_FS_MAKE_BLOCK, 0, 0)
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
