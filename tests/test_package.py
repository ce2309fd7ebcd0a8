"""The package's structure: no import cycle between its modules, `blinddiff --help` without torch, and every
module's public names declared in an `__all__` that no other module reaches past."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import blinddiff

PACKAGE = Path(blinddiff.__file__).parent


def module_name(path: Path) -> str:
    """``evaluation/runner.py`` → ``evaluation.runner``; a subpackage's ``__init__.py`` is the subpackage."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def internal_imports() -> dict[str, set[str]]:
    """Module → the package modules it imports, at the top or inside functions (lazy imports count too).

    Subpackages count module by module; importing ``a.b`` from outside ``a`` also runs ``a/__init__.py``."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        package = module.split(".") if path.name == "__init__.py" and module != "__init__" else module.split(".")[:-1]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
                targets = [".".join(base)] + [".".join(base + [alias.name]) for alias in node.names]
                for target in (t for t in targets if t in paths):  # and the packages it is in
                    parts = target.split(".")
                    imported.update(name for name in (".".join(parts[:n]) for n in range(1, len(parts) + 1))
                                    if name in paths and not f"{module}.".startswith(f"{name}."))
        graph[module] = imported - {module}
    return graph


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = internal_imports()
    assert graph["cli"] and graph["metrics.kernel"] >= {"degradation", "metrics.fidelity"}  # lazy, `..`, `.` imports
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "open":
            raise AssertionError("import cycle: " + " → ".join(path[path.index(module):] + [module]))
        if state.get(module) == "done":
            return
        state[module] = "open"
        for dependency in sorted(graph[module] - {"__init__"}):  # `from . import __version__` is the package
            visit(dependency, path + [module])
        state[module] = "done"
        order.append(module)

    for module in sorted(graph):
        visit(module, [])
    assert len(order) == len(graph)


def test_the_command_line_help_imports_no_torch() -> None:
    code = "import sys; from blinddiff.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def package_modules() -> list[str]:
    """The package and every module and subpackage in it, found on disk (a new module is covered unlisted)."""
    return ["blinddiff", *(info.name for info in pkgutil.walk_packages(blinddiff.__path__, "blinddiff."))]


@pytest.mark.parametrize("name", package_modules())
def test_every_module_declares_its_public_names_in_all(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, (list, tuple)), f"{name} has no __all__: list the names others import from it"
    assert len(set(exported)) == len(exported), f"{name}.__all__ names some entries twice"
    assert [entry for entry in exported if not hasattr(module, entry)] == [], f"{name}.__all__ names what it lacks"
    private = [entry for entry in exported if is_private(entry)]
    assert private == [], f"{name}.__all__ exports private names"


def test_no_module_imports_a_private_name_of_another() -> None:
    """`from .x import _name` across modules: the name is part of x's API (make it public) or lives in the wrong
    module (move it); dunders such as `__version__` are the package's own."""
    reached = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("blinddiff")):
                reached += [f"{path.relative_to(PACKAGE)}: {alias.name}" for alias in node.names
                            if is_private(alias.name)]
    assert reached == []


def test_the_former_perceptual_module_still_gives_the_metric_networks() -> None:
    import blinddiff.metrics.perceptual as home
    import blinddiff.perceptual as former

    assert {"LPIPS", "DISTS", "load_perceptual"} <= set(former.__all__)
    assert all(getattr(former, name) is getattr(home, name) for name in former.__all__)


def test_the_module_map_names_every_module() -> None:
    """The package docstring is the map a reader starts from: a new module missing from it fails here."""
    top_level = {info.name for info in pkgutil.iter_modules(blinddiff.__path__)}
    assert sorted(name for name in top_level if f"`{name}`" not in blinddiff.__doc__) == []
