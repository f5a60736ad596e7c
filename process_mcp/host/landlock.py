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
import platform

from ..box import confine

LANDLOCK_SCOPE_ABI = 6
"""First Landlock ABI with scopes (abstract Unix sockets and signals)."""
_CREATE_RULESET_VERSION = 1


def abi_version() -> int:
    """The running kernel's Landlock ABI, or 0 where Landlock is missing or disabled."""
    if platform.system() != "Linux":
        return 0
    version = confine.c_library().syscall(
        confine.SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION)
    )
    return max(int(version), 0)


def restrict_scopes() -> None:
    """Put the calling thread in a new Landlock domain scoping abstract Unix sockets and signals (the
    same call that confines a process of a box, ``box.confine``).

    Raises OSError when the kernel refuses; the sandbox then fails rather than run unscoped.
    """
    confine.no_new_privileges()
    confine.scope_signals_and_sockets()
