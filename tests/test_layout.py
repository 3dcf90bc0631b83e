"""The house's rules, read from the source: imports flow cli -> retrieval -> index, index/ needs only numpy and
faiss, infer/ never imports train/, and no two modules import each other, directly or through others."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved), at any depth of the file."""
    mod = _module(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}  # `from . import x` may name a module
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for d in ("retrieval", "index") for p in (ROOT / d).rglob("*.py")]
    mods = {_module(p): p for p in files}
    graph = {}
    for m, p in mods.items():
        graph[m] = {i for i in _imports(p) if i in mods and i != m}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    # package __init__ files re-export their children: an edge parent -> child is not a circle's half
    edges = {m: {i for i in deps if not i.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_layers_import_one_way():
    for m, deps in _graph().items():
        if m.startswith("index"):
            assert not any(d.startswith("retrieval") for d in deps), m
        if m.startswith("retrieval.infer") or m.startswith("retrieval.serve"):
            assert not any(d.startswith("retrieval.train") for d in deps), m
        if m.startswith("retrieval.serve"):
            assert "retrieval.infer.pipeline.distributed" not in deps, m
    index_files = list((ROOT / "index").rglob("*.py"))
    outside = {i.split(".")[0] for p in index_files for i in _imports(p)} - {"index"} - set(sys.stdlib_module_names)
    assert outside <= {"numpy", "faiss"}, outside
    assert not any("cli" == d for deps in _graph().values() for d in deps)


def test_the_cycle_finder_finds_a_hand_made_cycle(tmp_path, monkeypatch):
    """The checker itself: two files importing each other are reported."""
    pkg = tmp_path / "retrieval"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("from . import a\nx = 1\n")
    (tmp_path / "index").mkdir()
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    try:
        test_the_import_graph_has_no_cycle()
    except AssertionError as e:
        assert "retrieval.a" in str(e) and "retrieval.b" in str(e)
    else:
        raise AssertionError("a cycle went unnoticed")
