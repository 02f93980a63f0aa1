"""The package's imports form no cycle, deferred ones included: the step, the loop,
checkpointing, the config and evaluation depend on each other in one direction only."""
import ast
import os

from tests.helpers import REPO

PACKAGE = os.path.join(REPO, "us3l_jax")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, modules: set[str]) -> set[str]:
    """us3l_jax modules imported anywhere in the file: a deferred import inside a function
    that only exists to dodge a cycle is still a cycle between concepts."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def test_no_import_cycles():
    paths = [os.path.join(d, f) for d, _, fs in os.walk(PACKAGE) for f in fs
             if f.endswith(".py")]
    modules = {_module_name(p) for p in paths}
    graph = {}
    for p in paths:
        name = _module_name(p)
        edges = set()
        for target in _imports(p, modules):
            # Importing a.b.c first runs a.b's __init__ (unless a.b is the importer's own
            # package, which is already being imported).
            parts = target.split(".")
            for k in range(2, len(parts) + 1):
                dep = ".".join(parts[:k])
                if dep in modules and dep != name and not name.startswith(dep + "."):
                    edges.add(dep)
        graph[name] = edges
    assert "us3l_jax.fileio" in graph["us3l_jax.checkpointing"]  # the check sees real edges
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
