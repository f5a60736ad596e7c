"""The smallest use of the library: run one command on the host and print what it said."""

import anyio

from process_mcp import HostExecutor, ProcessMcpConfig, SpawnOptions


async def main() -> None:
    executor = HostExecutor(ProcessMcpConfig(mode="host"))
    try:
        result = await executor.spawn(SpawnOptions(command='echo "Hello World"'))
        print(f"{result.pid}: {result.status}, exit code {result.exit_code}")
        print(result.stdout, end="")
    finally:
        await executor.cleanup()


if __name__ == "__main__":
    anyio.run(main)
