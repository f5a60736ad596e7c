"""The package's front door stays light: importing it, --version and --help load only what they need."""

from __future__ import annotations

import subprocess
import sys

import process_mcp

HEAVY = ("mcp", "docker", "uvicorn", "starlette", "tree_sitter", "prometheus_client", "pyte")


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    return set(done.stdout.split())


def test_importing_the_package_loads_none_of_the_heavy_libraries() -> None:
    loaded = _modules_after("import process_mcp")
    assert not {name for name in loaded if name.split(".")[0] in HEAVY}


def test_version_loads_neither_the_settings_nor_the_mcp_stack() -> None:
    loaded = _modules_after(
        "import sys\nfrom process_mcp.service.cli import parse_arguments\n"
        "try:\n    parse_arguments(['--version'])\nexcept SystemExit:\n    pass"
    )
    assert "process_mcp.config" not in loaded
    assert not {name for name in loaded if name.split(".")[0] in HEAVY}


def test_every_public_name_resolves() -> None:
    for name in process_mcp.__all__:
        assert getattr(process_mcp, name) is not None, name
    assert process_mcp.__version__


def test_help_lists_the_environment_without_loading_the_settings() -> None:
    probe = (
        "import contextlib, io, sys\nfrom process_mcp.service.cli import parse_arguments\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n        parse_arguments(['--help'])\n    except SystemExit:\n        pass\n"
        "assert 'PROCESS_MODE' in out.getvalue() and 'DOCKER_IMAGE' in out.getvalue(), out.getvalue()\n"
        "import sys\nprint(' '.join(sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    loaded = set(done.stdout.split())
    assert "process_mcp.config" not in loaded
    assert not {name for name in loaded if name.split(".")[0] in (*HEAVY, "pydantic", "pydantic_settings")}
