"""The package's structure: no import cycle between its modules, and `blinddiff --help` without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import blinddiff

PACKAGE = Path(blinddiff.__file__).parent


def internal_imports() -> dict[str, set[str]]:
    """Module → the package modules it imports, at the top or inside functions (lazy imports count too)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for module in modules:
        imported = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
                imported.update(name for name in names if name in modules)
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
