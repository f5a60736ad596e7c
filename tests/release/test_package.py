"""The source distribution: what it declares, what it carries, and that its own tests run from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NEEDED = [
    "LICENSE",
    "README.md",
    "pyproject.toml",
    "verify.sh",
    "Dockerfile.custom",
    "mcp-config-example.json",
    "examples/simple_example.py",
    "examples/library_usage.py",
    "tests/conftest.py",
    "tests/helpers.py",
    "tests/js/package-lock.json",
    "process_mcp/py.typed",
    "process_mcp/box/agent.py",
]
"""What the README refers to, what the tests import, and what the package needs at run time."""
TESTS_FROM_THE_SDIST = [
    f"tests/{name}.py"
    for name in ("unit/test_escapes", "unit/test_buffer", "unit/test_config", "release/test_examples")
]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's sdist, built once for the module's tests."""
    return build_sdist(tmp_path_factory.mktemp("sdist"))


def build_sdist(out: Path) -> Path:
    """The sdist of this checkout's files (those git does not ignore), built from a copy: setuptools
    would also take in whatever an earlier build listed in the checkout's egg-info."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    tree = out / "tree"
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = tree / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(tree)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return next(out.glob("process_mcp-*.tar.gz"))


def test_the_sdist_carries_its_license_what_the_readme_names_and_what_its_tests_need(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        metadata = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO")))
        assert metadata is not None
        info = metadata.read().decode()
    missing = [name for name in NEEDED if name not in names]
    assert not missing
    assert not [name for name in names if "node_modules" in name or "__pycache__" in name]
    assert "License-Expression: ISC" in info
    assert "License-File: LICENSE" in info
    assert "Classifier: Operating System :: POSIX :: Linux" in info


def test_the_sdists_own_tests_pass_when_run_from_it(sdist: Path, tmp_path: Path) -> None:
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    unpacked = next(tmp_path.glob("process_mcp-*/"))
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    where = subprocess.run(
        [sys.executable, "-c", "import process_mcp; print(process_mcp.__file__)"],
        cwd=unpacked,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(unpacked))  # the sdist's package, not this checkout's
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS_FROM_THE_SDIST],
        cwd=unpacked,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
