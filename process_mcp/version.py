"""The installed package's version, without importing anything else of it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def version_string() -> str:
    """The installed package's version."""
    try:
        return version("process-mcp")
    except PackageNotFoundError:
        return "0+unknown"
