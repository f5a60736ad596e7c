"""The sandbox's seccomp filter: a classic BPF program, built here and handed to bwrap (``--seccomp``).

It is a deny list on top of what the namespaces already remove. Denied calls fail with EPERM, so
programs see an ordinary permission error:

- new mounts and mount changes (``mount``, ``umount2``, the new mount API): a sandbox must not change
  its own filesystem view, even where a capability slipped through;
- kernel keyrings (``keyctl``, ``add_key``, ``request_key``): they are shared with the host user;
- ``ioctl`` with TIOCSTI or TIOCLINUX, which push input into a terminal (CVE-2017-5226,
  CVE-2023-28100); only the low 32 bits of the request are compared, as the kernel does, so a
  request with high bits set cannot slip past (CVE-2019-10063);
- new namespaces through ``clone``/``unshare`` flags and ``setns``; ``clone3`` gets ENOSYS, since
  its flags are behind a pointer, and C libraries then fall back to ``clone``;
- io_uring, whose operations bypass syscall filtering;
- changing another process's limits, priority, CPUs, scheduling or I/O priority (``prlimit64`` with a
  pid and new limits, ``setpriority``, ``ioprio_set``, ``sched_setaffinity``, ``sched_setscheduler``,
  ``sched_setparam``, ``sched_setattr`` for anything but the caller itself): a process shares its user
  with the box's agent, zygote and supervisors and with the box's other processes, so the kernel's own
  check (the same user) would let it lower their limits or starve them;
- what only an administrator needs: modules, kexec, bpf, perf events, userfaultfd, swap, reboot,
  clocks, accounting, quotas, file handles (``open_by_handle_at``), port I/O.

Calls from another architecture (32-bit x86 on a 64-bit kernel, or the x32 ABI) kill the process:
their numbers differ, and a filter for one table is no filter for another.
"""

from __future__ import annotations

import errno
import platform
import struct

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000

# Offsets in struct seccomp_data: int nr; u32 arch; u64 ip; u64 args[6] (little-endian low words).
_NR, _ARCH, _ARG0, _ARG1, _ARG2, _ARG2_HIGH = 0, 4, 16, 24, 32, 36
PRIO_PROCESS = 0
IOPRIO_WHO_PROCESS = 1
ONLY_ITSELF = ("sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr")
"""Calls allowed only with pid 0, the caller (a thread's own id is refused too: the filter cannot know it)."""

_X32_BIT = 0x40000000
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
_NEW_NAMESPACES = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
    | 0x00000080  # CLONE_NEWTIME
)

DENIED = (
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "open_tree_attr",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "keyctl",
    "add_key",
    "request_key",
    "setns",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "acct",
    "swapon",
    "swapoff",
    "reboot",
    "syslog",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "open_by_handle_at",
    "name_to_handle_at",
    "iopl",
    "ioperm",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "vhangup",
    "uselib",
)
"""Calls that fail with EPERM whatever their arguments."""

# Calls added since Linux 5.1 have one number on every architecture (424 and up).
_UNIFIED = {
    "clone3": 435,
    "move_mount": 429,
    "open_tree": 428,
    "open_tree_attr": 467,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "quotactl_fd": 443,
}
# Syscall numbers per machine (from the kernel's unistd tables); a name missing from a table does not
# exist on that architecture.
_TABLES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (
        0xC000003E,  # AUDIT_ARCH_X86_64
        {
            "ioctl": 16,
            "clone": 56,
            "prlimit64": 302,
            "setpriority": 141,
            "ioprio_set": 251,
            "sched_setaffinity": 203,
            "sched_setscheduler": 144,
            "sched_setparam": 142,
            "sched_setattr": 314,
            "unshare": 272,
            "mount": 165,
            "umount2": 166,
            "pivot_root": 155,
            "keyctl": 250,
            "add_key": 248,
            "request_key": 249,
            "setns": 308,
            "kexec_load": 246,
            "kexec_file_load": 320,
            "init_module": 175,
            "finit_module": 313,
            "delete_module": 176,
            "bpf": 321,
            "perf_event_open": 298,
            "userfaultfd": 323,
            "acct": 163,
            "swapon": 167,
            "swapoff": 168,
            "reboot": 169,
            "syslog": 103,
            "settimeofday": 164,
            "clock_settime": 227,
            "clock_adjtime": 305,
            "adjtimex": 159,
            "open_by_handle_at": 304,
            "name_to_handle_at": 303,
            "iopl": 172,
            "ioperm": 173,
            "quotactl": 179,
            "lookup_dcookie": 212,
            "vhangup": 153,
            "uselib": 134,
            **_UNIFIED,
        },
    ),
    "aarch64": (
        0xC00000B7,  # AUDIT_ARCH_AARCH64
        {
            "ioctl": 29,
            "clone": 220,
            "prlimit64": 261,
            "setpriority": 140,
            "ioprio_set": 30,
            "sched_setaffinity": 122,
            "sched_setscheduler": 119,
            "sched_setparam": 118,
            "sched_setattr": 274,
            "unshare": 97,
            "mount": 40,
            "umount2": 39,
            "pivot_root": 41,
            "keyctl": 219,
            "add_key": 217,
            "request_key": 218,
            "setns": 268,
            "kexec_load": 104,
            "kexec_file_load": 294,
            "init_module": 105,
            "finit_module": 273,
            "delete_module": 106,
            "bpf": 280,
            "perf_event_open": 241,
            "userfaultfd": 282,
            "acct": 89,
            "swapon": 224,
            "swapoff": 225,
            "reboot": 142,
            "syslog": 116,
            "settimeofday": 170,
            "clock_settime": 112,
            "clock_adjtime": 266,
            "adjtimex": 171,
            "open_by_handle_at": 265,
            "name_to_handle_at": 264,
            "quotactl": 60,
            "lookup_dcookie": 18,
            "vhangup": 58,
            **_UNIFIED,
        },
    ),
}


class SeccompUnsupported(Exception):
    """This machine's architecture has no syscall table here."""


def build_filter(machine: str | None = None) -> bytes:
    """The compiled program for ``machine`` (this one's by default), as bwrap reads it.

    Raises SeccompUnsupported for an architecture without a table.
    """
    machine = machine or platform.machine()
    if machine not in _TABLES:
        raise SeccompUnsupported(f"no seccomp syscall table for the {machine} architecture")
    arch, numbers = _TABLES[machine]
    program = _Program()
    program.load(_ARCH)
    program.jump_if(_JEQ_K, arch, skip=1)
    program.ret(_RET_KILL_PROCESS)
    program.load(_NR)
    if machine == "x86_64":
        program.jump_if(_JGE_K, _X32_BIT, to="kill")
    program.jump_if(_JEQ_K, numbers["ioctl"], to="ioctl")
    program.jump_if(_JEQ_K, numbers["clone"], to="namespaces")
    program.jump_if(_JEQ_K, numbers["unshare"], to="namespaces")
    program.jump_if(_JEQ_K, numbers["clone3"], to="enosys")
    program.jump_if(_JEQ_K, numbers["prlimit64"], to="prlimit")
    program.jump_if(_JEQ_K, numbers["setpriority"], to="priority")
    program.jump_if(_JEQ_K, numbers["ioprio_set"], to="ioprio")
    for name in ONLY_ITSELF:
        program.jump_if(_JEQ_K, numbers[name], to="itself")
    for name in DENIED:
        if name in numbers:
            program.jump_if(_JEQ_K, numbers[name], to="eperm")
    program.ret(_RET_ALLOW)
    program.label("ioctl")
    program.load(_ARG1)
    program.jump_if(_JEQ_K, TIOCSTI, to="eperm")
    program.jump_if(_JEQ_K, TIOCLINUX, to="eperm")
    program.ret(_RET_ALLOW)
    program.label("namespaces")
    program.load(_ARG0)  # the flags of clone (x86_64, aarch64) and unshare
    program.jump_if(_JSET_K, _NEW_NAMESPACES, to="eperm")
    program.ret(_RET_ALLOW)
    program.label("prlimit")  # prlimit64(pid, resource, new, old): another's limits may only be read
    program.load(_ARG0)
    program.jump_if(_JEQ_K, 0, to="allow")
    program.load(_ARG2)
    program.jump_if(_JEQ_K, 0, skip=1)
    program.ret(_RET_ERRNO | errno.EPERM)
    program.load(_ARG2_HIGH)
    program.jump_if(_JEQ_K, 0, to="allow")
    program.ret(_RET_ERRNO | errno.EPERM)
    program.label("priority")  # setpriority(which, who, prio): its own only
    program.load(_ARG0)
    program.jump_if(_JEQ_K, PRIO_PROCESS, to="itself")
    program.ret(_RET_ERRNO | errno.EPERM)
    program.label("ioprio")  # ioprio_set(which, who, prio): its own only
    program.load(_ARG0)
    program.jump_if(_JEQ_K, IOPRIO_WHO_PROCESS, to="itself")
    program.ret(_RET_ERRNO | errno.EPERM)
    program.label("itself")  # the call's pid (the first argument, or the second after ``which``) is 0
    program.load(_NR)
    program.jump_if(_JEQ_K, numbers["setpriority"], to="second")
    program.jump_if(_JEQ_K, numbers["ioprio_set"], to="second")
    program.load(_ARG0)
    program.jump_if(_JEQ_K, 0, to="allow")
    program.ret(_RET_ERRNO | errno.EPERM)
    program.label("second")
    program.load(_ARG1)
    program.jump_if(_JEQ_K, 0, to="allow")
    program.ret(_RET_ERRNO | errno.EPERM)
    program.label("allow")
    program.ret(_RET_ALLOW)
    program.label("enosys")
    program.ret(_RET_ERRNO | errno.ENOSYS)
    program.label("eperm")
    program.ret(_RET_ERRNO | errno.EPERM)
    program.label("kill")
    program.ret(_RET_KILL_PROCESS)
    return program.assemble()


class _Program:
    """Straight-line BPF with forward jumps to labels, resolved at assembly."""

    def __init__(self) -> None:
        self._code: list[tuple[int, int, int | str, int | str]] = []  # code, k, jump-if-true, jump-if-false
        self._labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self._code.append((_LD_W_ABS, offset, 0, 0))

    def jump_if(self, code: int, k: int, *, to: str | None = None, skip: int = 0) -> None:
        self._code.append((code, k, to if to is not None else skip, 0))

    def ret(self, value: int) -> None:
        self._code.append((_RET_K, value, 0, 0))

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def assemble(self) -> bytes:
        out = bytearray()
        for index, (code, k, true, false) in enumerate(self._code):
            jt = self._labels[true] - index - 1 if isinstance(true, str) else true
            jf = self._labels[false] - index - 1 if isinstance(false, str) else false
            if not (0 <= jt <= 255 and 0 <= jf <= 255):
                raise AssertionError("seccomp program jump out of range")  # a bug here, not an input error
            out += struct.pack("<HBBI", code, jt, jf, k)
        return bytes(out)
