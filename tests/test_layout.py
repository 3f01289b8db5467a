"""The shape of the code: modules small, no import cycles, examples a screen or two long."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "aiopinned"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The aiopinned modules ``path`` imports, TYPE_CHECKING imports included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("aiopinned")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, *([base] if base else [])])
            if base.startswith("aiopinned"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles_among_aiopinned_modules() -> None:
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    graph = {m: {d for d in deps if not m.startswith(d + ".") and d != "aiopinned"}
             for m, deps in graph.items() if m != "aiopinned"}  # fmt: skip
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path, m, d])}")
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize(
    ("pattern", "limit"),
    # (examples: 180 since the server's request path became functions that its Ray Serve twin
    # reuses, 186 since it brings up a pinned tier while serving (its plumbing in _tier.py);
    # HTTP plumbing stays in examples/_http.py; the pool 470 since it serves a device, an
    # argument and a property, and its hit paths inline the free list's commonest cases; 510
    # since a freed block may be held for a captured CUDA graph (_graphs.py does the holding),
    # a closing pool waits until no pin can start, and stats() from a thread runs on the loop;
    # 550 since segments: a block granted to a waiter is no longer idle, a carved block is
    # unpinned with the last of its segment, segment_bytes, and start_reserve)
    [("aiopinned/_pool.py", 550), ("aiopinned/**/*.py", 300), ("examples/[!_]*.py", 186)],
)
def test_modules_stay_small(pattern: str, limit: int) -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.glob(pattern)}
    if pattern == "aiopinned/**/*.py":
        sizes.pop("aiopinned/_pool.py")
    assert sizes and max(sizes.values()) <= limit, sizes
