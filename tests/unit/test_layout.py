"""The package's shape: no import cycles, and dependencies that run one way.

service -> core <- {host, docker} -> box -> core; policy depends on neither backend; core knows no backend,
no service and no box; the in-box agent imports nothing of the package but its protocol. Every import
counts, also one made inside a function or for type checking only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import process_mcp
from process_mcp.box.client import SHIPPED

PACKAGE = Path(process_mcp.__file__).resolve().parent

ALLOWED = {
    "core": {"core", "config", "errors", "version", "policy"},
    "policy": {"policy", "config", "errors"},
    "box": {"box", "core", "config", "errors"},
    "host": {"host", "core", "box", "policy", "config", "errors"},
    "docker": {"docker", "core", "box", "policy", "config", "errors"},
    "service": {"service", "core", "policy", "config", "errors", "version", "backends"},
}
"""What each part may import (its first level under the package); the root modules are the library's front."""

ROOT_MODULES = {
    "process_mcp.errors": set(),
    "process_mcp.version": set(),
    "process_mcp.config": {"errors", "core"},
    "process_mcp.backends": {"errors", "config", "core"},
}
"""The library's front, at the package's root, and what each may import: the backend map names each mode's
executor as a string and imports it only when asked for one."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            named = {f"{target}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= named or ({target} & MODULES.keys())
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} & MODULES.keys()
    return found - {name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else parts[-1]


def test_no_module_of_the_package_imports_itself_through_others() -> None:
    cycles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == 1:
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_what_it_may(part: str) -> None:
    wrong = []
    for module, imported in sorted(GRAPH.items()):
        if _part(module) != part or module == "process_mcp":
            continue
        for target in sorted(imported):
            if _part(target) not in ALLOWED[part] and target != "process_mcp":
                wrong.append(f"{module} -> {target}")
    assert wrong == []


@pytest.mark.parametrize("module", sorted(ROOT_MODULES))
def test_the_root_modules_import_only_the_front_and_core(module: str) -> None:
    assert {_part(target) for target in GRAPH[module]} <= ROOT_MODULES[module]


def test_what_is_shipped_into_a_box_needs_only_the_standard_library_and_each_other() -> None:
    shipped = {f"process_mcp.box.{name.removesuffix('.py')}" for name, _ in SHIPPED}
    for name in shipped:
        assert GRAPH[name] <= shipped | {"process_mcp.box"}, name
