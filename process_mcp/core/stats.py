"""What a process and everything it started use: CPU time, memory, threads, I/O.

Trees are read from /proc where they run, by ``box.proc`` (the one copy of that walk, which the agent
takes into a box): on this machine through a handle's ``read_sample``, in a box by asking its agent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STATS_MAX_AGE_S = 1.0
"""A sample younger than this is reused by ps, so ps with many processes does not walk /proc on every
call; stdout (one process) samples afresh."""


@dataclass(frozen=True)
class TreeSample:
    """What a process tree uses at one moment."""

    processes: int
    threads: int
    cpu_seconds: float
    rss_bytes: int
    read_bytes: int | None
    written_bytes: int | None

    @classmethod
    def of(cls, fields: Mapping[str, Any] | None) -> TreeSample | None:
        """The sample ``box.proc.sample_tree`` (or an agent's SAMPLED frame) gives as fields; None for none."""
        if not fields or not fields.get("processes"):
            return None
        read, written = fields.get("read_bytes"), fields.get("written_bytes")
        return cls(
            processes=int(fields["processes"]),
            threads=int(fields["threads"]),
            cpu_seconds=float(fields["cpu_seconds"]),
            rss_bytes=int(fields["rss_bytes"]),
            read_bytes=None if read is None else int(read),
            written_bytes=None if written is None else int(written),
        )
