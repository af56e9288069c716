"""The code's shape: transferlab imports sit at the top of modules (the layers in pyproject.toml keep them
acyclic); one inside a function is a deliberate lazy import for start-up time, and says so."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "transferlab"


def _imports_inside_functions(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                if any(name.startswith("transferlab") for name in names):
                    found.add(node.lineno)
    return sorted(found)


def test_imports_inside_functions_are_commented_lazy_imports() -> None:
    undeclared = []
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").split("\n")
        for n in _imports_inside_functions(path):
            # the comment stands on the line, or on the line above the block of imports it starts
            block_start = n
            while block_start > 1 and lines[block_start - 2].strip().startswith(("from transferlab", "import ")):
                block_start -= 1
            if "# lazy:" not in lines[n - 1] and "# lazy:" not in lines[block_start - 2]:
                undeclared.append(f"{path.relative_to(SRC.parent)}:{n}: {lines[n - 1].strip()}")
    assert not undeclared, "move these to the top of the module, or comment why they are lazy:\n" + "\n".join(
        undeclared
    )
