"""The package's structure: no import cycle among `sam3d_hf/` modules (imports inside functions included), each module
imports on its own, and docs/design.md's layout section names every module."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sam3d_hf"
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))


def imported_modules(module: str) -> set[str]:
    """The package modules `module` imports anywhere in its source (`from .x import`, `from . import x`,
    `import sam3d_hf.x`, `from sam3d_hf.x import`); `__init__` stands for the package itself. Docstrings and
    strings are not imports."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.level == 0 and (node.module or "").split(".")[0] == "sam3d_hf"):
                path = (node.module or "").removeprefix("sam3d_hf").lstrip(".") if node.level == 0 else node.module
                if path:
                    found.add(path.split(".")[0])
                else:  # `from . import x`: x is a module, or a name of the package's __init__
                    found |= {a.name if a.name in MODULES else "__init__" for a in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "sam3d_hf":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    found.discard(module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return [*path[path.index(successor) :], successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert imported_modules("demo") >= {"training", "evaluation", "files"}  # function-level imports count


def test_no_import_cycle_among_the_package_modules():
    graph = {module: imported_modules(module) for module in MODULES}
    unknown = {m: sorted(targets - set(MODULES)) for m, targets in graph.items() if targets - set(MODULES)}
    assert not unknown, f"imports of modules that do not exist: {unknown}"
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_each_module_imports_on_its_own():
    """In a fresh interpreter, each module is imported after the package's modules were forgotten, so a module that
    works only because another one was imported first is found."""
    script = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'sam3d_hf' or m.startswith('sam3d_hf.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module('sam3d_hf' if name == '__init__' else f'sam3d_hf.{name}')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_the_design_document_describes_every_module():
    design = (PACKAGE.parent / "docs" / "design.md").read_text(encoding="utf-8")
    layout = design.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [m for m in MODULES if f"`{m}.py`" not in layout]
    assert not missing, f"docs/design.md's layout section does not describe {missing}"
