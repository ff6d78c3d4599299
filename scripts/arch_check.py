"""The map of src/flowhand kept true: what docs/architecture.md says against what the code does.

    .venv/bin/python scripts/arch_check.py [--json]

Reads every module under src/flowhand (with `ast`, importing nothing) and docs/architecture.md's
tables, and reports:

* modules missing from the map, and rows of the map naming no module;
* imports a module's "may call" column does not allow (the import contracts: the column is the
  contract, so the map and the build cannot disagree);
* the size rules: no module over 400 lines, no class over 300, no function over 45, ruff's C901
  complexity at most 10 (ruff from the same environment), no import cycle;
* the figures: the largest module, class and function, the highest complexity.

Known offenders are listed in `ALLOWED` below, each with a note: the list only shrinks. Exits 1
when something outside it breaks a rule (or an entry of it no longer does: delete the entry).
tests/test_architecture.py runs the same checks in the test suite.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
PACKAGE = "flowhand"
ARCHITECTURE = REPO / "docs" / "architecture.md"

MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 45
MAX_COMPLEXITY = 10

#: Known offenders of the size rules while the refactoring of issue 21 goes on: rule -> place ->
#: why it is still there. Remove an entry when its place is fixed (the check says when).
ALLOWED: dict[str, dict[str, str]] = {
    "function_lines": {},
    "complexity": {},
    "module_lines": {},
    "class_lines": {},
}


@dataclass
class Module:
    """One module of the package: where it is, its size, and what it imports of the package."""

    name: str  # dotted, without the package: "worker.claimer", "backends" (an __init__)
    rel: str  # the path under src/flowhand: "worker/claimer.py"
    tree: ast.Module
    lines: int
    imports: set[str] = field(default_factory=set)  # dotted names of package modules


def module_name(rel: str) -> str:
    return rel[:-3].replace("/", ".").removesuffix(".__init__").removesuffix("__init__")


def read_modules(root: Path = SRC / PACKAGE) -> dict[str, Module]:
    """Every module of the package by dotted name, with the package modules it imports."""
    found: dict[str, Module] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        text = path.read_text()
        found[module_name(rel)] = Module(module_name(rel), rel, ast.parse(text), text.count("\n"))
    for module in found.values():
        owners = {_owner(name, found) for name in _imported(module)}
        module.imports = {o for o in owners if o is not None and o != module.name}
    return found


def _imported(module: Module) -> Iterable[str]:
    """Dotted names (without the package) this module imports of the package."""
    is_init = module.rel.endswith("__init__.py")
    package = module.name if is_init else module.name.rpartition(".")[0]
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    yield alias.name.removeprefix(PACKAGE + ".")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            elif node.module and (node.module + ".").startswith(PACKAGE + "."):
                base = node.module.removeprefix(PACKAGE).lstrip(".")
            else:
                continue
            for alias in node.names:  # `from pkg import module` imports the module
                yield f"{base}.{alias.name}".lstrip(".")


def _owner(name: str, modules: dict[str, Module]) -> str | None:
    """The module that defines `name` (the longest dotted prefix that is a module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


# -- the size rules -------------------------------------------------------------------------------


def sizes(modules: dict[str, Module]) -> dict[str, dict[str, int]]:
    """Lines per module, class and function: rule -> place -> size."""
    out: dict[str, dict[str, int]] = {"module_lines": {}, "class_lines": {}, "function_lines": {}}
    for module in modules.values():
        out["module_lines"][module.rel] = module.lines
        for qualname, node in _definitions(module.tree):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            kind = "class_lines" if isinstance(node, ast.ClassDef) else "function_lines"
            out[kind][f"{module.rel}:{qualname}"] = size
    return out


Definition = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def _definitions(tree: ast.AST, prefix: str = "") -> Iterable[tuple[str, Definition]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            qualname = f"{prefix}{node.name}"
            yield qualname, node
            yield from _definitions(node, qualname + ".")
        else:
            yield from _definitions(node, prefix)


def complexity(root: Path = SRC / PACKAGE) -> dict[str, int]:
    """ruff's C901 (McCabe) complexity of every function: place -> value."""
    ruff = Path(sys.executable).parent / "ruff"
    command = str(ruff) if ruff.exists() else shutil.which("ruff")
    if command is None:
        raise RuntimeError("ruff not found: install flowhand's test extras (.venv)")
    out = subprocess.run(
        [command, "check", "--isolated", "--select", "C901", "--output-format", "json",
         "--config", "lint.mccabe.max-complexity = 0", str(root)],
        capture_output=True, text=True, check=False)
    found: dict[str, int] = {}
    modules = {m.rel: m for m in read_modules(root).values()}
    for item in json.loads(out.stdout or "[]"):
        rel = Path(item["filename"]).resolve().relative_to(root.resolve()).as_posix()
        value = int(item["message"].rsplit("(", 1)[1].split(" ", 1)[0])  # "... (12 > 10)"
        line = item["location"]["row"]
        found[f"{rel}:{_function_at(modules[rel].tree, line)}"] = value
    return found


def _function_at(tree: ast.AST, line: int) -> str:
    for qualname, node in _definitions(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.lineno == line:
            return qualname
    return f"line {line}"


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Import cycles between the package's modules (strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(modules[v].imports):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return found


def over_limits(modules: dict[str, Module]) -> dict[str, dict[str, int]]:
    """Every place over its size limit: rule -> place -> size."""
    limits = {"module_lines": MAX_MODULE_LINES, "class_lines": MAX_CLASS_LINES,
              "function_lines": MAX_FUNCTION_LINES}
    out = {rule: {place: size for place, size in found.items() if size > limits[rule]}
           for rule, found in sizes(modules).items()}
    out["complexity"] = {place: value for place, value in complexity().items()
                         if value > MAX_COMPLEXITY}
    return out


# -- the map --------------------------------------------------------------------------------------


@dataclass
class Row:
    """One row of a module table: the modules it names and its "may call" column."""

    package: str  # "worker"; "" for the top level
    modules: list[str]  # dotted names
    may_call: list[str]  # as written, resolved by `resolve`
    line: int


@dataclass
class Map:
    """docs/architecture.md as data."""

    rows: list[Row]
    everyone: list[str]  # what every module may call without a mention
    layers: list[tuple[str, list[str]]]  # top to bottom: name, the modules or packages in it


_HEADING = re.compile(r"^##\s+`([\w/]+)/`")
_EVERYONE = "Every module may call "
_CODE = re.compile(r"`([^`]+)`")


def read_map(path: Path = ARCHITECTURE) -> Map:
    """The module tables (| module | owns | may call |), each under its package's heading, the
    layer table (| layer | modules |) and the line saying what every module may call."""
    found = Map([], [], [])
    package, section = "", ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("## "):
            section = line
            heading = _HEADING.match(line)
            package = heading.group(1).replace("/", ".") if heading else ""
        elif line.startswith(_EVERYONE):
            found.everyone = _CODE.findall(line)
        elif line.startswith("|") and not line.startswith(("| module |", "| layer |", "|---")):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if section.startswith("## Layers") and len(cells) == 2:
                found.layers.append((cells[0], _CODE.findall(cells[1])))
            elif len(cells) == 3 and _CODE.findall(cells[0]):
                names = [_dotted(package, code) for code in _CODE.findall(cells[0])]
                found.rows.append(Row(package, names, _may_call_names(cells[2]), number))
    return found


def _dotted(package: str, path: str) -> str:
    name = module_name(path if path.endswith(".py") else path.strip("/") + ".py")
    return ".".join(p for p in (package, name) if p)


def _may_call_names(cell: str) -> list[str]:
    """`states, history (reads), api` -> the names; `—` (nothing) -> none."""
    cell = re.sub(r"\([^)]*\)", "", cell)
    return [n.strip().strip("`") for n in cell.split(",") if n.strip() not in ("", "—", "-")]


def resolve(package: str, name: str, modules: dict[str, Module]) -> set[str] | None:
    """The modules a name stands for: a module of `package` (relative, with slashes), else of
    the top level; a package stands for all its modules. None when it names nothing."""
    dotted = name.replace("/", ".").removesuffix(".py")
    for candidate in ([f"{package}.{dotted}"] if package else []) + [dotted]:
        hits = {m for m in modules if m == candidate or m.startswith(candidate + ".")}
        if hits:
            return hits
    return None


def map_problems(modules: dict[str, Module], found: Map) -> list[str]:
    """Modules on no row, rows naming no module, names that resolve to nothing, and imports a
    row's "may call" does not allow."""
    out: list[str] = []
    row_of: dict[str, Row] = {}
    for row in found.rows:
        for dotted in row.modules:
            if dotted not in modules:
                out.append(f"docs/architecture.md:{row.line}: {dotted}: no such module")
            row_of[dotted] = row
    everyone = _resolve_all("", found.everyone, 0, modules, out)
    for name, module in sorted(modules.items()):
        mapped = row_of.get(name)
        if mapped is None:
            if _needs_row(module):
                out.append(f"{module.rel}: missing from docs/architecture.md")
            continue
        permitted = everyone | _resolve_all(mapped.package, mapped.may_call, mapped.line,
                                            modules, out)
        for target in sorted(module.imports - permitted - _parents(name)):
            out.append(f"{module.rel} imports {_path(target)}, which its 'may call' "
                       f"(docs/architecture.md:{mapped.line}) does not allow")
    return sorted(set(out), key=out.index)


def _resolve_all(package: str, names: list[str], line: int, modules: dict[str, Module],
                 out: list[str]) -> set[str]:
    permitted: set[str] = set()
    for name in names:
        hits = resolve(package, name, modules)
        if hits is None:
            out.append(f"docs/architecture.md:{line}: {name!r} names no module or package")
        permitted |= hits or set()
    return permitted


def _parents(name: str) -> set[str]:
    """The __init__ modules of a module's own packages (importing through them needs no line)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _path(name: str) -> str:
    return name.replace(".", "/")


def _needs_row(module: Module) -> bool:
    """Every module but `__main__` and an `__init__` that only re-exports (docstring, imports,
    `__all__`)."""
    if module.rel.endswith("__main__.py"):
        return False
    if not module.rel.endswith("__init__.py"):
        return True
    return any(not isinstance(n, ast.Import | ast.ImportFrom | ast.Expr) and not _is_all(n)
               for n in module.tree.body)


def _is_all(node: ast.stmt) -> bool:
    return isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["__all__"]


def layer_problems(modules: dict[str, Module], found: Map) -> list[str]:
    """Modules in no layer, and imports of a layer above one's own."""
    level: dict[str, int] = {}
    for index, (_, names) in enumerate(found.layers):
        for written in names:
            for dotted in resolve("", written, modules) or set():
                level.setdefault(dotted, index)
    out = [f"{m.rel}: in no layer of docs/architecture.md" for n, m in sorted(modules.items())
           if n and n not in level]
    for name, module in sorted(modules.items()):
        for target in sorted(module.imports):
            if name in level and target in level and level[target] < level[name]:
                out.append(f"{module.rel} ({found.layers[level[name]][0]}) imports "
                           f"{_path(target)} ({found.layers[level[target]][0]}), a layer above")
    return out


def may_call_cell(module: Module, package: str, everyone: set[str]) -> str:
    """What a row's "may call" column should say for this module, from its imports."""
    inside = sorted(_path(t.removeprefix(package + ".")) for t in module.imports - everyone
                    if package and t.startswith(package + "."))
    outside = sorted(_path(t) for t in module.imports - everyone
                     if not (package and t.startswith(package + ".")))
    return ", ".join(inside + outside) or "—"


# -- the command line -----------------------------------------------------------------------------


def figures(modules: dict[str, Module]) -> dict[str, object]:
    """The largest module, class and function, and the most complex function."""
    found = {**sizes(modules), "complexity": complexity()}
    return {f"largest_{rule}": max(places.items(), key=lambda kv: kv[1], default=("", 0))
            for rule, places in found.items()}


def size_problems(over: dict[str, dict[str, int]]) -> list[str]:
    """Size rules broken outside ALLOWED, and entries of ALLOWED that no longer break one
    (`over`: from `over_limits`)."""
    out: list[str] = []
    for rule, found in over.items():
        known = ALLOWED.get(rule, {})
        out += [f"{place}: {rule} {size} over the limit" for place, size in found.items()
                if place not in known]
        out += [f"{place}: no longer over the {rule} limit: remove it from ALLOWED in "
                "scripts/arch_check.py" for place in known if place not in found]
    return out


def print_may_call(modules: dict[str, Module], found: Map) -> None:
    """The "may call" column as the imports would have it, a line per module of the map."""
    everyone = set().union(*(resolve("", n, modules) or set() for n in found.everyone))
    for row in found.rows:
        for name in row.modules:
            if name in modules:
                cell = may_call_cell(modules[name], row.package, everyone)
                print(f"{modules[name].rel}: {cell}")


def main(argv: list[str]) -> int:
    modules = read_modules()
    found = read_map()
    if "--may-call" in argv:
        print_may_call(modules, found)
        return 0
    problems = map_problems(modules, found) + layer_problems(modules, found)
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(modules)]
    problems += size_problems(over_limits(modules))
    report = {**figures(modules), "problems": problems,
              "allowed": {rule: sorted(places) for rule, places in ALLOWED.items() if places}}
    if "--json" in argv:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {json.dumps(value, indent=1)}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
