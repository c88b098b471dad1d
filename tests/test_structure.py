"""The code's shape: no import cycle in `dsdistill/` or `monitor/` (counting imports under TYPE_CHECKING
and inside functions, which hide a cycle rather than remove it), and no function or class too long to
read in one sitting. Read from the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"dsdistill": ROOT / "dsdistill", "dsmonitor": ROOT / "monitor"}
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 300


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of ours that `name` imports anywhere in its file (top level, TYPE_CHECKING, functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            t = "dsmonitor" + t[len("monitor") :] if t == "monitor" or t.startswith("monitor.") else t
            # `from pkg import mod` names a module; `from mod import name` names the module alone
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first == last), or [] if there is none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def test_no_import_cycle_counting_type_checking_and_local_imports():
    known = _modules()
    # a package's __init__ that imports nothing is a namespace, not a dependency of its submodules
    graph = {
        n: {m for m in _imports(n, p, known) if not (n.startswith(m + ".") and not _imports(m, known[m], known))}
        for n, p in known.items()
    }
    cycle = _cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def _too_long() -> list[str]:
    out = []
    for path in _modules().values():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                if lines > limit:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines > {limit})")
    return out


def test_no_function_over_80_lines_and_no_class_over_300():
    assert _too_long() == []
