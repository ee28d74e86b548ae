"""The package's import graph follows DESIGN.md's pipeline: each stage imports only stages below
it, nothing imports the package root, and there is no import cycle.

(import-linter cannot see `normswap.passes`, which ships from the top-level passes/ folder, so
the graph is read here with `ast`.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Bottom to top. Modules on one line are independent of each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("normswap._version", "normswap.errors"),
    ("normswap.options", "normswap.torchutil", "normswap.terminal"),
    ("normswap.source", "normswap.context", "normswap.files"),
    ("normswap.capture",),
    ("normswap.sites",),
    ("normswap.targets",),
    ("normswap.nn",),
    ("normswap.plan",),
    ("normswap.policy",),  # each site's natural target, which the rules' remedies propose
    ("normswap.rules",),
    ("normswap.advise",),
    ("normswap.analysis",),
    ("normswap.passes",),
    ("normswap.postcondition",),
    ("normswap.rewrite",),
    ("normswap.calibration",),
    ("normswap.conversion",),
    ("normswap.export",),
    ("normswap.render",),
    ("normswap.report",),
    ("normswap.linter", "normswap.fix", "normswap.federated"),
    ("normswap.loader",),
    ("normswap.checkpoint", "normswap.config", "normswap.outputs"),
    ("normswap.pipeline", "normswap.pretrained"),
    # the CLI, and the integrations into training libraries (each imports its library itself)
    ("normswap.cli", "normswap.integrations"),
)
ROOT_MODULES = (
    "normswap",
    "normswap.__main__",
    "normswap._entry",
)  # the public API and the entry points sit above everything


def _modules() -> dict[str, Path]:
    found = {}
    for path in (REPO / "normswap").rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (REPO / "passes").glob("*.py"):
        found["normswap.passes" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return found


MODULES = _modules()


def _type_only(tree: ast.Module) -> set[ast.AST]:
    """Nodes inside `if TYPE_CHECKING:` blocks: annotations for the type checker (renderers typed
    against the report above them, say), not imports that run."""
    found: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for statement in node.body:
                found.update(ast.walk(statement))
    return found


def _imports(module: str, path: Path) -> set[str]:
    """normswap modules imported by `module` (anywhere in the file, except type-only imports),
    resolved to module names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    imported = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = _type_only(tree)
    for node in ast.walk(tree):
        if node in type_only:
            continue
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                candidate = f"{base}.{alias.name}"
                imported.add(candidate if candidate in MODULES else base)
    return {name for name in imported if name == "normswap" or name.startswith("normswap.")}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _layer(module: str) -> tuple[int, str]:
    best: tuple[int, str] | None = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    if best is None:
        raise AssertionError(
            f"{module} is in no layer of tests/test_layers.py: add it where it belongs in the pipeline"
        )
    return best


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in ROOT_MODULES))
def test_stages_import_only_stages_below(module: str) -> None:
    layer, prefix = _layer(module)
    for imported in sorted(GRAPH[module]):
        assert imported not in ROOT_MODULES, (
            f"{module} imports the package root; import the module that defines the name"
        )
        other_layer, other_prefix = _layer(imported)
        assert other_layer < layer or other_prefix == prefix, (
            f"{module} ({prefix}) imports {imported} ({other_prefix}), which is not below it"
        )


def test_the_layering_check_sees_real_imports() -> None:
    # the check above is only worth something if imports are really found and resolved
    assert "normswap.targets" in GRAPH["normswap.plan"]
    assert "normswap.targets.base" in GRAPH["normswap.targets.groupnorm"]
    assert "normswap.passes.replace" in GRAPH["normswap.passes.swap_modules"]
    assert "normswap.passes" in GRAPH["normswap.rewrite"]
    assert "normswap.report" not in GRAPH["normswap.render.json"]  # typed against it, under TYPE_CHECKING only


# third-party training libraries: imported only by the integration named after each, so that
# `import normswap` and everything else in it never needs them
INTEGRATED = {"opacus": "normswap.integrations.opacus", "lightning": "normswap.integrations.lightning"}


def _third_party_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "require":
            names.update(
                a.value.split(".")[0] for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)
            )
    return names


@pytest.mark.parametrize("library", sorted(INTEGRATED))
def test_a_training_library_is_imported_only_by_its_integration(library: str) -> None:
    importers = sorted(module for module, path in MODULES.items() if library in _third_party_imports(path))
    assert importers == [INTEGRATED[library]]


def test_no_import_cycle() -> None:
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "active"
        for imported in GRAPH.get(module, ()):
            if imported not in MODULES:
                continue
            if state.get(imported) == "active":
                cycle = [*path[path.index(imported) :], imported] if imported in path else [module, imported]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [module])
