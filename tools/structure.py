"""The package's structure: module sizes, the import graph by layer, and its longest functions.

    python tools/structure.py            # the report
    python tools/structure.py --check    # exit 1 on an import cycle or an import that runs back up

Layers, bottom to top (a module may import its own layer and the ones below, never above):
foundation (errors, io, config) < data < model < training < methods < evaluation < commands.
Imports under ``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "flythinker"
LAYERS = ["foundation", "data", "model", "training", "methods", "evaluation", "commands"]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(("flythinker", *parts)).removesuffix(".__init__")] = path
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    if module == "flythinker.__main__":  # `python -m flythinker`: the CLI's entry point
        return LAYERS.index("commands")
    return LAYERS.index(parts[1]) if len(parts) >= 2 and parts[1] in LAYERS else 0


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package this file imports at run time (anywhere in it, functions included)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking(node):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flythinker"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's members, each once (small graph: a plain search is enough)."""
    found: set[tuple[str, ...]] = set()

    def search(start: str, node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt == start:
                found.add(tuple(sorted(path)))
            elif nxt not in path and nxt > start:
                search(start, nxt, [*path, nxt])

    for module in graph:
        search(module, module, [module])
    return [list(c) for c in sorted(found)]


def main(argv: list[str]) -> int:
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    # A package's __init__ may gather its own modules; importing a package counts as its layer.
    upward = sorted((m, t) for m, targets in graph.items() for t in targets if layer(t) > layer(m))
    found_cycles = [c for c in cycles(graph) if not _package_init_pair(c)]
    if "--check" not in argv:
        total = 0
        for module, path in known.items():
            lines = len(path.read_text().splitlines())
            total += lines
            print(f"{lines:5d}  {LAYERS[layer(module)]:<10}  {module}")
        print(f"{total:5d}  total, {len(known)} modules")
        functions = []
        for module, path in known.items():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    functions.append((node.end_lineno - node.lineno + 1, f"{module}.{node.name}"))
        print("longest functions:", ", ".join(f"{name} ({n})" for n, name in sorted(functions, reverse=True)[:8]))
    print("import cycles:", found_cycles or "none")
    print("imports that run back up:", [f"{a} -> {b}" for a, b in upward] or "none")
    return 1 if found_cycles or upward else 0


def _package_init_pair(cycle: list[str]) -> bool:
    """``pkg`` (its __init__ re-exporting) and ``pkg.mod`` importing a sibling through it."""
    return len(cycle) == 2 and (cycle[1].startswith(cycle[0] + ".") or cycle[0].startswith(cycle[1] + "."))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
