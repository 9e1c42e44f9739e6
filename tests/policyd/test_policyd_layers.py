"""policyd's layers, read from its source: no import cycles, no module importing a layer above
its own, and dbus-fast only in bus/ and main (no daemons, no root; nothing is imported).

The layers, lowest first (docs/architecture.md, "Module map of policyd"):
leaves (names, errors, modes, logfmt, validate, claims, audit, brokerclient, policygate, the
policy engine) < xenstore < exports < requests < bus < main.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import policyd

SRC = Path(policyd.__file__).resolve().parent
LEAVES = {
    "names",
    "errors",
    "modes",
    "logfmt",
    "validate",
    "claims",
    "audit",
    "brokerclient",
    "policygate",
    "policy",
}
LAYERS = {"xenstore": 1, "exports": 2, "requests": 3, "bus": 4, "main": 5}
DBUS_LAYERS = {"bus", "main"}


def module_name(path: Path) -> str:
    parts = ["policyd", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The layer of a policyd module; None for the package itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    if parts[1] in LEAVES:
        return 0
    return LAYERS[parts[1]]


def imports_of(module: str) -> set[str]:
    """Every module (policyd's or not) the module imports, anywhere in it (also under
    TYPE_CHECKING: an annotation that names a higher layer is a dependency too)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            # `from policyd import errors` imports the module policyd.errors
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return found


def policyd_imports(module: str) -> set[str]:
    return {name for name in imports_of(module) if name in MODULES and name != module}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)  # KeyError names a module outside every layer


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_higher_layer(module: str) -> None:
    own = layer_of(module)
    if own is None:
        return
    above = {
        name
        for name in policyd_imports(module)
        if (layer := layer_of(name)) is not None and layer > own
    }
    assert above == set(), f"{module} (layer {own}) imports from above: {sorted(above)}"


def test_no_import_cycles() -> None:
    graph = {module: policyd_imports(module) for module in MODULES}
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            cycle = [*stack[stack.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in sorted(graph[module]):
            # a package's own __init__ importing its modules is how a package exports them;
            # a module importing its package's __init__ back would be a cycle and is caught
            visit(imported, [*stack, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_bus_and_main_import_dbus_fast(module: str) -> None:
    uses_dbus = any(name.split(".")[0] == "dbus_fast" for name in imports_of(module))
    parts = module.split(".")
    if uses_dbus:
        assert len(parts) > 1 and parts[1] in DBUS_LAYERS, f"{module} imports dbus_fast"


def test_module_map_in_the_docs_matches_the_tree() -> None:
    """docs/architecture.md has one row per leaf and subpackage, naming each of its modules."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
    section = doc.read_text().split("## Module map of policyd", 1)[1].split("\n## ", 1)[0]
    rows = {
        cells[2].strip("` /"): cells[3]
        for line in section.splitlines()
        if line.startswith("| ") and len(cells := [c.strip() for c in line.split("|")]) > 3
    }
    top = {name.split(".")[1] for name in MODULES if name != "policyd"}
    assert top <= rows.keys(), sorted(top - rows.keys())
    headings = {"module", "---"}
    assert rows.keys() - headings <= top, sorted(rows.keys() - top - headings)
    for name in MODULES:
        parts = name.split(".")
        if len(parts) == 3 and parts[1] != "policy":  # the engine's own modules: docs/policy.md
            assert f"`{parts[2]}`" in rows[parts[1]], f"{name} is missing from the module map"
