"""Landlock scoping for the sandbox: no abstract Unix sockets or signals across the sandbox's edge.

With an open network (``SANDBOX_ALLOWED_DOMAINS=*``) a sandbox shares the host's network namespace,
and with it the abstract Unix socket namespace, which no mount can hide. Landlock's scopes (ABI 6,
Linux 6.12) close that: a process in a scoped domain cannot connect to an abstract socket, or signal a
process, outside its domain. The domain handles no filesystem access, so bwrap, started inside it, can
still build its mounts; the filesystem boundary is bwrap's.

``restrict_scopes`` restricts the calling thread only (Landlock domains are per thread and inherited
by what it forks): the host backend runs it in a dedicated thread that starts every sandboxed process.
"""

from __future__ import annotations

import ctypes
import os
import platform

LANDLOCK_SCOPE_ABI = 6
"""First Landlock ABI with scopes (abstract Unix sockets and signals)."""
_SCOPE_ABSTRACT_UNIX_SOCKET = 1
_SCOPE_SIGNAL = 2
_CREATE_RULESET_VERSION = 1
_PR_SET_NO_NEW_PRIVS = 38
# landlock_create_ruleset, landlock_restrict_self: the same numbers on every architecture.
_SYS_CREATE_RULESET = 444
_SYS_RESTRICT_SELF = 446


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_prctl = _libc.prctl
_ATTR = _RulesetAttr(0, 0, _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL)


def abi_version() -> int:
    """The running kernel's Landlock ABI, or 0 where Landlock is missing or disabled."""
    if platform.system() != "Linux":
        return 0
    version = _syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def restrict_scopes() -> None:
    """Put the calling thread in a new Landlock domain scoping abstract Unix sockets and signals.

    Raises OSError when the kernel refuses; the sandbox then fails rather than run unscoped.
    """
    if _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    fd = _syscall(_SYS_CREATE_RULESET, ctypes.byref(_ATTR), ctypes.c_size_t(ctypes.sizeof(_ATTR)), 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        if _syscall(_SYS_RESTRICT_SELF, fd, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(fd)
