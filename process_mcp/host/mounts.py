"""What the sandbox asks bwrap to mount, given as descriptors of host paths opened without following links.

bwrap resolves a mount's source path on the host when it mounts it, following every symbolic link on
the way. Inside a writable root the links are the agent's to make, so a source given by name can be
turned, before or during a spawn, into the host's root, ``/usr`` or another principal's workspace:
``.bashrc -> ../../../..`` in the workspace made ``/`` the sandbox's root (Flatpak's CVE-2024-42472 is
the same pattern). So every host path a sandbox mounts is opened here, one component at a time from
``/`` with ``O_NOFOLLOW``, and handed to bwrap as a descriptor (``--bind-fd``, ``--ro-bind-fd``): the
mount is of exactly what was checked, and bwrap fails the sandbox if what it mounted is not that
descriptor's inode. A path with a link anywhere on it is refused (``LinkInPath``), never followed.

Where a mount lands (its destination) is resolved by bwrap inside the sandbox. A link there can only
move a mount of the checked source within the sandbox's own view, never bring in a host path; the
limits of that are in SECURITY.md.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

_OPEN_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class LinkInPath(Exception):
    """``path`` cannot be mounted safely: ``link``, one of its components (or itself), is a symbolic link."""

    def __init__(self, path: str, link: str) -> None:
        super().__init__(f"{link} is a symbolic link")
        self.path = path
        self.link = link


class PathOpener:
    """Opens host paths for one spawn without following links, sharing the descriptors of common parents.

    ``open`` returns an ``O_PATH`` descriptor that stays valid until ``close``; ``mount_fd`` returns one
    of the caller's own, for bwrap, which closes each after its mount. Not thread-safe: one per spawn.
    """

    def __init__(self) -> None:
        self._open: dict[str, int] = {}
        self._modes: dict[str, int] = {}

    def open(self, path: str) -> int:
        """An ``O_PATH`` descriptor of absolute, normalised ``path``. Raises LinkInPath when a component
        is a symbolic link, FileNotFoundError or NotADirectoryError when the path is not there."""
        if path in self._open:
            return self._open[path]
        if not os.path.isabs(path) or os.path.normpath(path) != path:
            raise ValueError(f"not an absolute, normalised path: {path!r}")
        missing = []
        parent = path
        while parent not in self._open and parent != "/":
            missing.append(parent)
            parent = os.path.dirname(parent)
        if parent == "/" and "/" not in self._open:
            root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self._open["/"], self._modes["/"] = root, os.fstat(root).st_mode
        for component in reversed(missing):
            fd = os.open(os.path.basename(component), _OPEN_FLAGS, dir_fd=self._open[os.path.dirname(component)])
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                os.close(fd)
                raise LinkInPath(path, component)
            self._open[component] = fd
            self._modes[component] = mode
        return self._open[path]

    def mode(self, path: str) -> int:
        """The file type and mode of ``path``, opened as ``open`` does."""
        self.open(path)
        return self._modes[path]

    def is_dir(self, path: str) -> bool:
        return stat.S_ISDIR(self.mode(path))

    def mount_fd(self, path: str) -> int:
        """A new descriptor of ``path`` (opened as ``open`` does) for bwrap to mount and close."""
        return os.dup(self.open(path))

    def nearest_existing(self, path: str) -> str:
        """The deepest ancestor of ``path`` (or ``path``) that exists, opened. Raises LinkInPath when a link
        is met on the way."""
        candidate = path
        while True:
            try:
                self.open(candidate)
                return candidate
            except (FileNotFoundError, NotADirectoryError):
                candidate = os.path.dirname(candidate)

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()
        self._modes.clear()


class MountArgs:
    """bwrap arguments that mount host paths by descriptor, and the descriptors it must inherit."""

    def __init__(self, opener: PathOpener) -> None:
        self.opener = opener
        self.args: list[str] = []
        self.fds: list[int] = []

    def bind(self, path: str, dest: str | None = None, *, writable: bool = False) -> None:
        """Mount host ``path`` at ``dest`` (the same path by default), read-only unless ``writable``."""
        fd = self.opener.mount_fd(path)
        self.fds.append(fd)
        self.args += ["--bind-fd" if writable else "--ro-bind-fd", str(fd), dest or path]

    def add(self, args: Iterable[str]) -> None:
        """Arguments that mount nothing from the host (tmpfs, proc, dev, symlinks)."""
        self.args += args

    def close(self) -> None:
        """Close what bwrap did not get (on failure, or in this process once bwrap started)."""
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
