"""The seccomp program builder: every supported architecture assembles, others are refused.

What the filter blocks is proved from inside a real sandbox in test_sandbox_attacks.py; this covers
the architectures that machine is not.
"""

from __future__ import annotations

import struct

import pytest

from process_mcp import seccomp


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_each_supported_architecture_assembles_a_program_that_checks_its_own_arch_first(machine: str) -> None:
    program = seccomp.build_filter(machine)
    assert len(program) % 8 == 0
    instructions = [struct.unpack("<HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    arch, _ = seccomp._TABLES[machine]
    assert instructions[0] == (0x20, 0, 0, 4)  # load the arch
    assert (instructions[1][0], instructions[1][3]) == (0x15, arch)  # compare with this one's
    assert instructions[2] == (0x06, 0, 0, 0x80000000)  # any other: kill the process
    compared = {k for code, _, _, k in instructions if code == 0x15}
    _, numbers = seccomp._TABLES[machine]
    assert {numbers[name] for name in seccomp.DENIED if name in numbers} <= compared


def test_an_architecture_without_a_table_is_refused() -> None:
    with pytest.raises(seccomp.SeccompUnsupported, match="riscv64"):
        seccomp.build_filter("riscv64")
