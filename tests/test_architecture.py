"""The map is part of the build: docs/architecture.md against the code (scripts/arch_check.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts import arch_check
from scripts.arch_check import (
    ALLOWED,
    cycles,
    layer_problems,
    map_problems,
    over_limits,
    read_map,
    read_modules,
    size_problems,
)


@pytest.fixture(scope="module")
def modules() -> dict[str, arch_check.Module]:
    return read_modules()


@pytest.fixture(scope="module")
def over(modules: dict[str, arch_check.Module]) -> dict[str, dict[str, int]]:
    """Every place over a size limit (ruff runs once for the module)."""
    return over_limits(modules)


def test_every_module_is_on_the_map(modules: dict[str, arch_check.Module]) -> None:
    """Every module under src/flowhand has a row in docs/architecture.md, and every row a module."""
    found = [p for p in map_problems(modules, read_map())
             if "missing from" in p or "no such module" in p]
    assert found == []


def test_imports_follow_the_may_call_column(modules: dict[str, arch_check.Module]) -> None:
    """A module imports only what its row's "may call" names (the import contracts)."""
    found = [p for p in map_problems(modules, read_map())
             if "missing from" not in p and "no such module" not in p]
    assert found == []


def test_imports_go_down_the_layers(modules: dict[str, arch_check.Module]) -> None:
    """Every module is in one layer and imports nothing from a layer above its own."""
    assert layer_problems(modules, read_map()) == []


def test_no_import_cycle(modules: dict[str, arch_check.Module]) -> None:
    """No two modules of flowhand import each other, directly or around a loop."""
    assert cycles(modules) == []


def test_size_rules_hold_but_for_the_known_offenders(over: dict[str, dict[str, int]]) -> None:
    """No module over 400 lines, class over 300, function over 45, C901 over 10, outside ALLOWED."""
    assert [p for p in size_problems(over) if "no longer over" not in p] == []


def test_the_allow_list_only_shrinks(over: dict[str, dict[str, int]]) -> None:
    """Each entry of ALLOWED still breaks its rule: a fixed place leaves the list."""
    assert [p for p in size_problems(over) if "no longer over" in p] == []
    assert set(ALLOWED) == set(over)


def test_role_tables_sit_next_to_the_code() -> None:
    """worker/, api/ and backends/ each keep an AGENTS.md naming each of their modules, and only
    those."""
    root = arch_check.SRC / arch_check.PACKAGE
    for package in ("worker", "api", "backends"):
        table = (root / package / "AGENTS.md").read_text()
        names = {p.relative_to(root / package).as_posix()
                 for p in (root / package).rglob("*.py") if p.name != "__init__.py"}
        missing = sorted(n for n in names if f"`{n}`" not in table)
        assert missing == [], f"{package}/AGENTS.md does not name {missing}"
        named = set(re.findall(r"`([\w/]+\.py)`", table)) - {"__init__.py"}
        assert named <= names, f"{package}/AGENTS.md names no such module: {named - names}"


MAP = """\
Every module may call `errors`.

## Layers

| layer | modules |
|---|---|
| top | `top` |
| bottom | `low`, `errors` |

## Modules

| module | owns | may call |
|---|---|---|
| `top.py` | the top | low (reads) |
| `low.py` | the bottom | — |
| `errors.py` | errors | — |
| `gone.py` | nothing any more | — |
"""


def checked(tmp_path: Path, files: dict[str, str]) -> list[str]:
    package = tmp_path / "pkg"
    package.mkdir()
    for name, text in files.items():
        (package / name).write_text(text)
    doc = tmp_path / "architecture.md"
    doc.write_text(MAP)
    modules = read_modules(package)
    found = read_map(doc)
    return map_problems(modules, found) + layer_problems(modules, found) + [
        f"cycle {c}" for c in cycles(modules)]


def test_the_checker_reports_what_breaks_the_map(tmp_path: Path) -> None:
    """A module off the map, a row without a module, an import not allowed, an import up a layer
    and a cycle are each reported; the allowed imports are not."""
    found = checked(tmp_path, {
        "top.py": "from flowhand import low\nfrom flowhand.errors import E\n",
        "low.py": "from flowhand import top\n",
        "errors.py": "class E(Exception): ...\n",
        "extra.py": "from flowhand import errors\n",
    })
    assert sorted(found) == sorted([
        "docs/architecture.md:17: gone: no such module",
        "extra.py: missing from docs/architecture.md",
        "extra.py: in no layer of docs/architecture.md",
        "low.py imports top, which its 'may call' (docs/architecture.md:15) does not allow",
        "low.py (bottom) imports top (top), a layer above",
        "cycle ['low', 'top']",
    ])
