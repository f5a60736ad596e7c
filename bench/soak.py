"""Soak: many sequential spawns; descriptors and memory must stay flat.

    python bench/soak.py [--spawns 10000] [--mode host|host-unsandboxed|docker] [--container NAME]

Prints descriptors and resident memory every so often, and the growth from the first tenth of the
run to the last. Docker mode needs a running container named by --container (DOCKER_USE_EXISTING).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

from process_mcp import DockerExecutor, HostExecutor, ProcessExecutor, ProcessMcpConfig, SpawnOptions
from process_mcp.config import Defaults, DockerConfig, SandboxConfig


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def make_executor(mode: str, container: str | None, workdir: str) -> ProcessExecutor:
    if mode == "docker":
        if not container:
            sys.exit("--container is required in docker mode")
        docker = DockerConfig(container_name=container, use_existing=True)
        return DockerExecutor(ProcessMcpConfig(mode="docker", defaults=Defaults(workdir="/tmp"), docker=docker))
    # The box's home beside the workspace, removed with it, not in the user's state directory.
    homes = os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + "-homes")
    sandbox = SandboxConfig(enabled=mode == "host", required=mode == "host", homes_dir=homes)
    return HostExecutor(ProcessMcpConfig(defaults=Defaults(workdir=workdir), sandbox=sandbox))


async def soak(spawns: int, mode: str, container: str | None) -> dict[str, float]:
    """Run the soak; return the growth of descriptors and memory, and spawns per second."""
    with tempfile.TemporaryDirectory(prefix="process-mcp-soak-") as top:
        workdir = os.path.join(top, "workspace")
        os.mkdir(workdir)
        executor = make_executor(mode, container, workdir)
        await executor.start()
        samples: list[tuple[int, int, int]] = []
        every = max(1, spawns // 20)
        began = time.perf_counter()
        try:
            for n in range(1, spawns + 1):
                result = await executor.spawn(SpawnOptions(command="true"))
                if result.exit_code != 0:
                    raise RuntimeError(f"spawn {n} ended with {result.exit_code}: {result.stderr}")
                if n % every == 0:
                    samples.append((n, descriptors(), rss_kib()))
                    print(f"{n:>7} spawns  {samples[-1][1]:>5} fds  {samples[-1][2] / 1024:>7.1f} MiB", flush=True)
        finally:
            elapsed = time.perf_counter() - began
            await executor.cleanup()
    tenth = max(1, len(samples) // 10)
    first, last = samples[:tenth], samples[-tenth:]
    return {
        "fd_growth": statistics.median(s[1] for s in last) - statistics.median(s[1] for s in first),
        "rss_growth_mib": (statistics.median(s[2] for s in last) - statistics.median(s[2] for s in first)) / 1024,
        "spawns_per_s": spawns / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spawns", type=int, default=10_000)
    parser.add_argument("--mode", choices=["host", "host-unsandboxed", "docker"], default="host")
    parser.add_argument("--container")
    args = parser.parse_args()
    result = anyio.run(soak, args.spawns, args.mode, args.container)
    print(
        f"\n{args.spawns} spawns ({args.mode}): descriptors {result['fd_growth']:+.0f}, "
        f"memory {result['rss_growth_mib']:+.1f} MiB (last tenth vs first), {result['spawns_per_s']:.0f} spawns/s"
    )


if __name__ == "__main__":
    main()
