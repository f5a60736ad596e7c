"""The sandbox's seccomp filter, held to a list written down here, not read from ``process_mcp.host.seccomp``.

Every call the filter must refuse is named below with its number on each architecture the filter has
a table for, and what the filter must answer. Three proofs:

- the assembled program, run by a small interpreter of classic BPF, gives each call its answer on
  both architectures (the one this machine is not is proved nowhere else);
- from inside a real sandbox (a C program compiled here, started by a sandboxed HostExecutor), each
  call fails with EPERM, ``clone3`` with ENOSYS, and a call of another ABI kills the process;
- a sandbox without capabilities gets EPERM from the kernel for many of these calls anyway (mount,
  reboot, init_module), so the same probe runs again under the same program with only the errno it
  returns changed (``FILTER_MARK``): each refusal is then seen to come from the filter itself.
"""

from __future__ import annotations

import errno
import functools
import platform
import shutil
import signal
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import anyio.to_thread
import pytest

from process_mcp import HostExecutor, SpawnOptions
from process_mcp.config import SandboxConfig
from process_mcp.host import seccomp

from ..helpers import WAIT_S, cannot_run_here, host_config, run_boxed

pytestmark = pytest.mark.anyio

MACHINES = ("x86_64", "aarch64")
DENIED: dict[str, tuple[int, int | None]] = {
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "move_mount": (429, 429),
    "open_tree": (428, 428),
    "open_tree_attr": (467, 467),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "setns": (308, 268),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "acct": (163, 89),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "syslog": (103, 116),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "clock_adjtime": (305, 266),
    "adjtimex": (159, 171),
    "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264),
    "iopl": (172, None),
    "ioperm": (173, None),
    "quotactl": (179, 60),
    "quotactl_fd": (443, 443),
    "lookup_dcookie": (212, 18),
    "vhangup": (153, 58),
    "uselib": (134, None),
}
"""Every call the filter refuses with EPERM whatever its arguments: (x86_64, aarch64) numbers, from the
kernel's tables; None where the architecture has no such call."""
IOCTL, CLONE, UNSHARE, GETPID = (16, 29), (56, 220), (272, 97), (39, 172)
CLONE3 = 435
"""Refused with ENOSYS (its flags are behind a pointer), so C libraries fall back to clone."""
TERMINAL_INJECTION = {"TIOCSTI": 0x5412, "TIOCLINUX": 0x541C}
"""ioctl requests refused with EPERM, compared on their low 32 bits as the kernel does."""
TIOCGWINSZ = 0x5413
NAMESPACES = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    "CLONE_NEWTIME": 0x00000080,
}
"""Flags of clone and unshare refused with EPERM: each makes a namespace."""
CLONE_FILES = 0x00000400
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
OTHER_ABIS = {"x86_64": (0x40000003,), "aarch64": (0x40000028,)}  # i386, 32-bit ARM: killed
X32_BIT = 0x40000000
"""Set in an x86_64 call number, it selects the x32 ABI: killed."""
KILL_PROCESS, ALLOW, ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
FILTER_MARK = 4000
"""An errno no kernel call returns, put in place of the filter's EPERM to tell its refusals apart."""
ALL_ONES = ",".join(["-1"] * 6)
"""Arguments for each refused call: invalid for every one, so a call the filter let through fails harmlessly."""
PROBE_C = r"""
/* Makes the system calls named on its command line (label:number:args) and prints what each returned. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int i = 1; i < argc; i++) {
        char *label = strtok(argv[i], ":");
        long nr = strtol(strtok(NULL, ":"), NULL, 0);
        unsigned long a[6] = {0};
        char *word;
        for (int j = 0; j < 6 && (word = strtok(NULL, ",")) != NULL; j++)
            a[j] = strtoul(word, NULL, 0);
        long ret;
        if (strcmp(label, "i386") == 0) {
#ifdef __x86_64__
            __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr) : "memory");
            printf("i386 %ld 0\n", ret);
#endif
            continue;
        }
        errno = 0;
        ret = syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
        if (strncmp(label, "clone", 5) == 0 && ret == 0)
            _exit(0); /* a clone the filter let through: this is the child */
        if (strncmp(label, "clone", 5) == 0 && ret > 0)
            waitpid(ret, NULL, 0);
        printf("%s %ld %d\n", label, ret < 0 ? -1L : ret, ret < 0 ? errno : 0);
    }
    return 0;
}
"""


def _run_filter(program: bytes, nr: int, arch: int, *args: int) -> int:
    """What ``program`` answers for a call, as the kernel runs it (the instructions seccomp.py emits)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *[*args, 0, 0, 0, 0, 0, 0][:6])
    code_at = [struct.unpack_from("<HBBI", program, offset) for offset in range(0, len(program), 8)]
    pc = accumulator = 0
    while True:
        code, if_true, if_false, k = code_at[pc]
        if code == 0x20:  # load a word of the call's data
            accumulator, pc = int.from_bytes(data[k : k + 4], "little"), pc + 1
        elif code in (0x15, 0x35, 0x45):  # jump if equal, greater or equal, any bit set
            taken = {0x15: accumulator == k, 0x35: accumulator >= k, 0x45: bool(accumulator & k)}[code]
            pc += 1 + (if_true if taken else if_false)
        elif code == 0x06:
            return int(k)
        else:
            raise AssertionError(f"instruction {code:#x} at {pc} is not one this interpreter knows")


@pytest.mark.parametrize("machine", MACHINES)
def test_the_program_gives_every_pinned_call_its_answer_on_each_architecture(machine: str) -> None:
    column = MACHINES.index(machine)
    program = seccomp.build_filter(machine)
    own = AUDIT_ARCH[machine]

    def answer(nr: int, *args: int) -> int:
        return _run_filter(program, nr, own, *args)

    numbers = {name: nr for name, pair in DENIED.items() if (nr := pair[column]) is not None}
    assert {name: hex(answer(nr)) for name, nr in numbers.items() if answer(nr) != ERRNO | errno.EPERM} == {}
    for name, request in TERMINAL_INJECTION.items():
        for high in (0, 1 << 32, 0xFFFFFFFF << 32):
            assert answer(IOCTL[column], 0, request | high) == ERRNO | errno.EPERM, (name, hex(high))
    assert answer(IOCTL[column], 0, TIOCGWINSZ) == ALLOW
    for name, flag in NAMESPACES.items():
        assert answer(CLONE[column], flag | signal.SIGCHLD) == ERRNO | errno.EPERM, name
        assert answer(UNSHARE[column], flag) == ERRNO | errno.EPERM, name
    assert answer(CLONE[column], signal.SIGCHLD) == ALLOW  # fork
    assert answer(UNSHARE[column], CLONE_FILES) == ALLOW
    assert answer(CLONE3) == ERRNO | errno.ENOSYS
    assert answer(GETPID[column]) == ALLOW
    for other in OTHER_ABIS[machine]:
        assert _run_filter(program, GETPID[column], other) == KILL_PROCESS
    if machine == "x86_64":
        assert answer(X32_BIT | GETPID[column]) == KILL_PROCESS


def test_an_architecture_without_a_table_is_refused() -> None:
    with pytest.raises(seccomp.SeccompUnsupported, match="riscv64"):
        seccomp.build_filter("riscv64")


# From inside a real sandbox.


@pytest.fixture
def column() -> int:
    if platform.machine() not in MACHINES:
        cannot_run_here(f"the seccomp probes: no pinned call numbers for {platform.machine()}")
    return MACHINES.index(platform.machine())


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The workspace, with the probe compiled into it (the sandbox shows the workspace)."""
    compiler = shutil.which("cc")
    assert compiler is not None, "the seccomp probes need a C compiler (Debian's gcc)"
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "probe.c").write_text(PROBE_C)
    subprocess.run([compiler, "-O0", "-o", str(work / "probe"), str(tmp_path / "probe.c")], check=True)
    return work


@pytest.fixture
async def host(work: Path) -> AsyncIterator[HostExecutor]:
    executor = HostExecutor(host_config(work, sandbox=SandboxConfig(required=True)))
    await executor.start()
    assert executor.sandboxed
    try:
        yield executor
    finally:
        await executor.cleanup()


def _probes(column: int) -> list[str]:
    """Every pinned rule as a probe argument, labelled with what it tries."""
    probes = [f"{name}:{numbers[column]}:{ALL_ONES}" for name, numbers in DENIED.items() if numbers[column]]
    for name, request in TERMINAL_INJECTION.items():
        probes += [f"{name}:{IOCTL[column]}:-1,{request}", f"{name}-high:{IOCTL[column]}:-1,{request | 1 << 32}"]
    for name, flag in NAMESPACES.items():
        probes += [f"unshare-{name}:{UNSHARE[column]}:{flag}", f"clone-{name}:{CLONE[column]}:{flag | signal.SIGCHLD}"]
    return probes


def _allowed(column: int) -> list[str]:
    """Calls next to the refused ones that must reach the kernel: the filter is no blanket refusal."""
    return [
        f"getpid:{GETPID[column]}",
        f"winsize:{IOCTL[column]}:-1,{TIOCGWINSZ}",  # another ioctl: EBADF, from the kernel
        f"unshare-files:{UNSHARE[column]}:{CLONE_FILES}",
        f"clone-fork:{CLONE[column]}:{int(signal.SIGCHLD)}",
    ]


def _answers(output: str) -> dict[str, tuple[int, int]]:
    """label -> (return value, errno), from the probe's output."""
    found = {}
    for line in output.splitlines():
        label, ret, number = line.split()
        found[label] = (int(ret), int(number))
    return found


def _check_allowed(answers: dict[str, tuple[int, int]]) -> None:
    assert answers["getpid"][0] > 0
    assert answers["winsize"] == (-1, errno.EBADF)
    assert answers["unshare-files"] == (0, 0)
    assert answers["clone-fork"][0] > 0


async def test_every_pinned_call_fails_with_eperm_inside_the_sandbox(host: HostExecutor, column: int) -> None:
    probes = [*_probes(column), f"clone3:{CLONE3}", *_allowed(column)]
    result = await host.spawn(SpawnOptions(command=f"ulimit -c 0; ./probe {' '.join(probes)}", timeout_ms=20_000))
    assert (result.sandboxed, result.exit_code) == (True, 0), result
    answers = _answers(result.stdout)
    refused = {label.split(":")[0] for label in _probes(column)}
    assert {label: answers.get(label) for label in refused if answers.get(label) != (-1, errno.EPERM)} == {}
    assert answers["clone3"] == (-1, errno.ENOSYS)
    _check_allowed(answers)


def _marked(program: bytes) -> bytes:
    """``program`` answering FILTER_MARK wherever it answers EPERM; every decision it makes is unchanged."""
    out = bytearray(program)
    changed = 0
    for offset in range(0, len(out), 8):
        code, if_true, if_false, k = struct.unpack_from("<HBBI", out, offset)
        if code == 0x06 and k == ERRNO | errno.EPERM:
            struct.pack_into("<HBBI", out, offset, code, if_true, if_false, ERRNO | FILTER_MARK)
            changed += 1
    assert changed, "the program never answers EPERM"
    return bytes(out)


async def test_each_refusal_comes_from_the_filter_not_from_missing_privileges(
    host: HostExecutor, column: int, work: Path, tmp_path: Path
) -> None:
    sandbox = host.backend._sandbox
    assert sandbox is not None
    probes = [*_probes(column), *_allowed(column)]
    home = tmp_path / "home"
    home.mkdir()
    done = await run_boxed(
        sandbox,
        f"ulimit -c 0; ./probe {' '.join(probes)}",
        str(work),
        str(home),
        program=_marked(seccomp.build_filter()),
    )
    assert done.code == 0, done.stderr
    answers = _answers(done.stdout)
    refused = {label.split(":")[0] for label in _probes(column)}
    assert {label: answers.get(label) for label in refused if answers.get(label) != (-1, FILTER_MARK)} == {}
    _check_allowed(answers)


@pytest.mark.parametrize("abi", ["x32", "i386"])
async def test_a_call_through_another_abi_kills_the_process(
    host: HostExecutor, column: int, work: Path, abi: str
) -> None:
    if column != 0:
        cannot_run_here("the other ABIs probed here are x86_64's")
    probes = f"before:{GETPID[0]} {'x32:' + str(X32_BIT | GETPID[0]) if abi == 'x32' else 'i386:20'} after:{GETPID[0]}"
    # Outside the sandbox the same call is harmless (ENOSYS, or i386's getpid): the kill is the filter's.
    outside = await anyio.to_thread.run_sync(
        functools.partial(
            subprocess.run, [str(work / "probe"), *probes.split()], capture_output=True, text=True, timeout=WAIT_S
        )
    )
    if abi == "i386" and outside.returncode == -signal.SIGSEGV:
        cannot_run_here("this kernel runs no 32-bit x86 calls (no IA32 emulation), so there is none to refuse")
    assert outside.returncode == 0, outside
    assert "after" in outside.stdout
    result = await host.spawn(SpawnOptions(command=f"ulimit -c 0; exec ./probe {probes}"))
    assert result.signal == "SIGSYS", result
    assert "before" in result.stdout
    assert "after" not in result.stdout
