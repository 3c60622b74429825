"""The package's import graph points one way: no module imports from a layer above its own.

Layers, lowest first: the base modules (``errors``, ``config``, ``config_checks``,
``conversion``, ``noise``, ``paths``, ``progress``, ``version``), then ``inputs``, ``engine``,
``store``, ``cluster``, ``job``, ``tools``, and on top the entry modules (``cli``,
``composition``, ``api``, ``launcher``, ``hydra_compat``, ``__init__``, ``__main__``). A module
may import its own layer (the same subpackage, or another base or top module) and any layer
below. Every import counts: module level, inside functions, under ``TYPE_CHECKING``, relative, and
``importlib.import_module`` / ``__import__`` of a literal (or f-string) ``batchgen.`` name. Every
module must sit in a layer, so a new top-level module or subpackage has to be placed here. No
import cycle either, inside a layer or across: the modules form a graph without loops (imports
inside functions included).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "batchgen"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

BASE = (
    "errors",
    "config",
    "config_checks",
    "conversion",
    "noise",
    "paths",
    "progress",
    "version",
)
SUBPACKAGES = ("inputs", "engine", "store", "cluster", "job", "tools")
TOP = ("cli", "composition", "api", "launcher", "hydra_compat", "__init__", "__main__")
# Layer name -> rank; a module may import only ranks <= its own.
RANKS = {"base": 0, **{name: rank for rank, name in enumerate(SUBPACKAGES, 1)}, "top": 7}


@dataclass(frozen=True)
class Import:
    """One import of a ``batchgen`` module found in a source file."""

    module: str  # the importing module, dotted
    imported: str  # the imported module, dotted (the longest known module the name starts with)
    line: int


def module_name(path: Path, root: Path = ROOT) -> str:
    """``batchgen/store/writer.py`` -> ``batchgen.store.writer``; a package's ``__init__.py``
    is the package itself (``batchgen/__init__.py`` -> ``batchgen``, a top module)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to, or None when it has not been placed."""
    parts = module.split(".")[1:]
    if not parts:  # the package itself, i.e. batchgen/__init__.py
        return "top"
    if parts[0] in SUBPACKAGES:
        return parts[0]
    if len(parts) == 1 and parts[0] in BASE:
        return "base"
    if len(parts) == 1 and parts[0] in TOP:
        return "top"
    return None


def _known(name: str, modules: set[str]) -> str:
    """The longest prefix of ``name`` that is a module of the package (at least the package)."""
    parts = name.split(".")
    while len(parts) > 1 and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def _literal_prefix(node: ast.expr) -> str | None:
    """The string an import call names: a literal, or the literal start of an f-string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value.rstrip(".")
    return None


def imports_of(source: str, module: str, modules: set[str], *, is_package: bool) -> list[Import]:
    """Every import of a ``batchgen`` module in ``source``, the source of ``module``."""
    found: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]

    def add(name: str, line: int) -> None:
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            found.append(Import(module, _known(name, modules), line))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                # `from batchgen.store import layout` imports a module; `from batchgen.config
                # import JobConfig` imports a name from one.
                full = f"{base}.{alias.name}"
                add(full if full in modules else base, node.lineno)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                target = _literal_prefix(node.args[0])
                if target:
                    add(target, node.lineno)
    return found


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every Python module under ``root``."""
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def violations(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    """One line per import of a higher layer: ``module -> imported (layer a -> layer b) at
    FILE:LINE``."""
    names = set(modules)
    lines = []
    for module, path in modules.items():
        source = path.read_text(encoding="utf-8")
        for imp in imports_of(source, module, names, is_package=path.name == "__init__.py"):
            src, dst = layer_of(imp.module), layer_of(imp.imported)
            if src is None or dst is None:
                continue  # reported by test_every_module_has_a_layer
            if RANKS[dst] > RANKS[src]:
                where = f"{path.relative_to(root.parent)}:{imp.line}"
                lines.append(
                    f"{imp.module} -> {imp.imported} (layer {src} -> layer {dst}) at {where}"
                )
    return lines


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (every form ``imports_of`` finds)."""
    names = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        source = path.read_text(encoding="utf-8")
        for imp in imports_of(source, module, names, is_package=path.name == "__init__.py"):
            if imp.imported != module:
                graph[module].add(imp.imported)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module, each sorted:
    every module in one imports every other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_cycle():
    found = cycles(import_graph(package_modules()))
    assert not found, "modules that import each other:\n" + "\n".join(map(" <-> ".join, found))


def test_cycle_check_sees_a_cycle_inside_a_layer(tmp_path):
    files = {
        "__init__.py": "",
        "cli.py": "def main():\n    from batchgen import api\n",  # inside a function
        "api.py": "from batchgen.cli import main\n",
        "config.py": "from batchgen import errors\n",
        "errors.py": "",
    }
    root = tmp_path / PACKAGE
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert cycles(import_graph(package_modules(root))) == [["batchgen.api", "batchgen.cli"]]


def test_every_module_has_a_layer():
    modules = package_modules()
    assert len(modules) > 30, f"found only {sorted(modules)} under {ROOT}"
    unplaced = sorted(name for name in modules if layer_of(name) is None)
    assert not unplaced, (
        f"modules in no layer (add them to BASE, SUBPACKAGES or TOP in {Path(__file__).name}): "
        f"{unplaced}"
    )


def test_no_module_imports_a_higher_layer():
    modules = package_modules()
    found = violations(modules)
    assert not found, "imports from a higher layer:\n" + "\n".join(found)


def test_scan_sees_the_real_graph():
    # Guards the scanner against silently finding nothing: known imports of the current tree,
    # one per import form, including one inside a function.
    modules = package_modules()
    names = set(modules)
    seen = {
        (imp.module, imp.imported)
        for name, path in modules.items()
        for imp in imports_of(
            path.read_text(encoding="utf-8"), name, names, is_package=path.name == "__init__.py"
        )
    }
    assert ("batchgen.job.prepare", "batchgen.cluster.lock") in seen  # from pkg.mod import name
    assert ("batchgen.job.prepare", "batchgen.store.layout") in seen  # from pkg import mod
    assert ("batchgen", "batchgen.api") in seen  # from batchgen import mod, in a function
    assert ("batchgen.cli", "batchgen.tools") in seen  # import_module(f"batchgen.tools.{...}")


def test_checker_reports_every_import_form(tmp_path):
    # A fake package with one upward import of each kind: the checker must report all of them
    # in the promised format, and accept same-layer and downward imports.
    files = {
        "__init__.py": "",
        "errors.py": "from batchgen.config import X\n",  # base -> base: fine
        "config.py": (
            "import batchgen.tools.status\n"
            "def f():\n"
            "    from batchgen import api\n"
            "    from batchgen.engine import static\n"
            "    import importlib\n"
            "    importlib.import_module('batchgen.cluster.claims')\n"
        ),
        "api.py": "from batchgen.tools.status import collect\n",  # top -> tools: fine
        "inputs/__init__.py": "from . import dataset\n",  # same subpackage: fine
        "inputs/dataset.py": "from ..store.writer import temp_path\nfrom ..errors import E\n",
        "engine/__init__.py": "",
        "engine/static.py": "from batchgen.inputs.dataset import Rows\n",  # 2 -> 1: fine
        "store/__init__.py": "",
        "store/writer.py": "",
        "cluster/__init__.py": "",
        "cluster/claims.py": "",
        "tools/__init__.py": "",
        "tools/status.py": "from batchgen.cluster.claims import ClaimStore\n",  # 5 -> 4: fine
    }
    root = tmp_path / PACKAGE
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    found = violations(package_modules(root), root)
    assert sorted(found) == [
        "batchgen.config -> batchgen.api (layer base -> layer top) at batchgen/config.py:3",
        "batchgen.config -> batchgen.cluster.claims (layer base -> layer cluster) at "
        "batchgen/config.py:6",
        "batchgen.config -> batchgen.engine.static (layer base -> layer engine) at "
        "batchgen/config.py:4",
        "batchgen.config -> batchgen.tools.status (layer base -> layer tools) at "
        "batchgen/config.py:1",
        "batchgen.inputs.dataset -> batchgen.store.writer (layer inputs -> layer store) at "
        "batchgen/inputs/dataset.py:1",
    ]
    assert layer_of("batchgen.newmodule") is None
    assert layer_of("batchgen.newpkg.mod") is None
