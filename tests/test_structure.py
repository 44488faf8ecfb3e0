"""The package's structure: no import circle (the graph of mechscope modules importing mechscope modules, at
the top of a file or inside a function alike, is acyclic; shared model facts live in the leaf
mechscope.catalog), commands write their CSV files through runs.write_csv (atomic), and one padding helper
(tasks.padded) builds every right-padded batch."""
import ast
from pathlib import Path

import mechscope

ROOT = Path(mechscope.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the mechscope modules it imports} (`from mechscope import x` imports mechscope.x when x is one;
    importing a package's module does not count as importing the package's __init__)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name and e != "mechscope"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules that import each other (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_mechscope():
    graph = import_graph()
    assert "mechscope.catalog" in graph and graph["mechscope.models"]
    assert cycles(graph) == []


def _trees():
    return {_module(p): ast.parse(p.read_text()) for p in ROOT.rglob("*.py")}


def test_commands_write_csv_files_through_runs():
    """No command opens a CSV writer of its own (runs.write_csv writes atomically: no half-written table)."""
    own = []
    for name, tree in _trees().items():
        if not name.startswith("mechscope.commands."):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "csv" \
                    and node.attr in ("writer", "DictWriter"):
                own.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "write_text" \
                    and ".csv" in ast.unparse(node.func.value):
                own.append(f"{name}:{node.lineno}")
    assert own == []


def test_one_padding_helper():
    """Only tasks.padded builds a padded batch: no other function is named after padding, none fills a tensor
    with a pad id (patching.pair_batch did, probing.right_padded was a second helper)."""
    found = []
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and "pad" in node.name:
                found.append(f"{name}.{node.name}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.full" and len(node.args) > 1 \
                    and "pad" in ast.unparse(node.args[1]):
                found.append(f"{name} torch.full")
    assert found == ["mechscope.tasks.padded"]


def test_padding_is_each_rows_last_token():
    import torch

    from mechscope import tasks

    tokens, lengths = tasks.padded(None, [torch.tensor([1, 5, 7]), torch.tensor([1, 9])])
    assert tokens.tolist() == [[1, 5, 7], [1, 9, 9]] and lengths.tolist() == [3, 2]


def test_intervals_come_from_stats_only():
    """Statistics in one place (issue 17): no module but stats.py computes an interval of its own (validate-circuit
    and sae-eval took percentile-bootstrap quantiles, whose coverage falls short at small n)."""
    import re

    own = [f"{path.relative_to(ROOT)}:{i}" for path in sorted(ROOT.rglob("*.py")) if path.name != "stats.py"
           for i, line in enumerate(path.read_text().splitlines(), 1)
           if re.search(r"quantile\(\s*0?\.(025|975)|percentile", line) and not line.lstrip().startswith("#")]
    assert not own, own
