"""The package's structure: no import cycle between its modules, and `blinddiff --help` without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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
    assert graph["metrics"] >= {"perceptual"} and graph["cli"]  # the parse sees lazy imports too
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
