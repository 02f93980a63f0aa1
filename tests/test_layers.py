"""The package's layers: a module imports only from its own layer or the layers below it, and
never a private name of another module.

From the bottom: width arithmetic and plain utilities; the parts (models, data, objectives,
sampling, optim and what converts or measures a model); the methods; the engine that runs
them; the config schema and checkpoints; the builders that turn a config into objects; the
frozen teacher; evaluation; the loop and the command lines. Imports are read from the source
(``ast``), deferred ones inside functions included, as ``tests/test_imports.py`` reads them
for cycles.
"""
import ast
import os

import pytest

from tests.helpers import REPO

PACKAGE = os.path.join(REPO, "us3l_jax")

# Lowest first. An entry names a module or a package (all its modules); a module takes the
# layer of the longest entry that names it or a package above it. ``us3l_jax`` is its
# ``__init__`` alone.
ROOT = "us3l_jax"
LAYERS = (
    ("base", (ROOT, "us3l_jax.slim", "us3l_jax.fileio", "us3l_jax.errors", "us3l_jax.mesh",
              "us3l_jax.cli", "us3l_jax.workdir_lock", "us3l_jax.eval_names",
              "us3l_jax.paper", "us3l_jax.paths", "us3l_jax.workdir_lease")),
    ("parts", ("us3l_jax.models", "us3l_jax.data", "us3l_jax.objectives", "us3l_jax.sampling",
               "us3l_jax.optim", "us3l_jax.keyqueue", "us3l_jax.profile",
               "us3l_jax.torch_layout", "us3l_jax.calibration")),
    ("methods", ("us3l_jax.methods",)),
    ("engine", ("us3l_jax.engine",)),
    ("schema and storage", ("us3l_jax.config", "us3l_jax.recipes", "us3l_jax.checkpointing",
                            "us3l_jax.metrics")),
    ("builders", ("us3l_jax.build",)),
    ("teacher", ("us3l_jax.teacher",)),
    ("evaluation", ("us3l_jax.evaluate",)),
    ("loop and command lines", ("us3l_jax.pretrain", "us3l_jax.export", "us3l_jax.main",
                                "us3l_jax.import_official")),
)

# Imports against the order that today's code still has, each with the work that removes it.
# An entry that no longer occurs fails the test too, so the list only shrinks.
KNOWN_EXCEPTIONS = {
    # Validation still builds the objects it checks (model, method, sampler, views,
    # optimizer); registries of names are to replace that (issue 21, item 3). The evaluation
    # names already come from us3l_jax.eval_names.
    ("us3l_jax.config", "us3l_jax.build"),
}


def _modules() -> dict[str, str]:
    """us3l_jax module name -> source path."""
    out = {}
    for d, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    best = None
    for rank, (_, entries) in enumerate(LAYERS):
        for e in entries:
            names_it = module == e or (e != ROOT and module.startswith(e + "."))
            if names_it and (best is None or len(e) > len(best[1])):
                best = rank, e
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


class _Reader(ast.NodeVisitor):
    """The us3l_jax modules a file imports, and its uses of their private names."""

    def __init__(self, name: str):
        self.name = name
        self.imported: set[str] = set()
        self.bound: dict[str, str] = {}  # local name -> us3l_jax module it stands for
        self.private: list[str] = []

    def visit_Import(self, node):
        for a in node.names:
            if a.name in MODULES:
                self.imported.add(a.name)
                # ``import a.b`` binds ``a``; ``import a.b as c`` binds ``c`` to a.b.
                local = a.asname or a.name.split(".")[0]
                self.bound[local] = a.name if a.asname else local

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:  # relative: resolved against this module's package
            package = self.name if MODULES[self.name].endswith("__init__.py") else \
                self.name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        if base not in MODULES:
            return
        self.imported.add(base)
        for a in node.names:
            full = f"{base}.{a.name}"
            if full in MODULES:  # a module
                self.imported.add(full)
                self.bound[a.asname or a.name] = full
            elif _is_private(a.name):
                self.private.append(f"from {base} import {a.name} (line {node.lineno})")

    def visit_Attribute(self, node):
        chain, value = [node.attr], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in self.bound:
            module = self.bound[value.id]
            for attr in reversed(chain):
                if f"{module}.{attr}" in MODULES:
                    module = f"{module}.{attr}"
                    continue
                if _is_private(attr):
                    self.private.append(f"{module}.{attr} (line {node.lineno})")
                break
            return  # the chain is read; its inner attributes need no second visit
        self.generic_visit(node)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _read(name: str) -> _Reader:
    reader = _Reader(name)
    with open(MODULES[name]) as f:
        reader.visit(ast.parse(f.read()))
    return reader


def _dependencies(name: str, imported: set[str]) -> set[str]:
    """What importing ``imported`` runs: each module and the packages above it (``a.b.c``
    runs ``a.b`` first), leaving out this module itself and its own packages."""
    deps = set()
    for target in imported:
        parts = target.split(".")
        for k in range(1, len(parts) + 1):
            dep = ".".join(parts[:k])
            if dep in MODULES and dep != name and not name.startswith(dep + "."):
                deps.add(dep)
    return deps


def _upward_imports() -> set[tuple[str, str]]:
    return {(name, dep) for name in MODULES
            for dep in _dependencies(name, _read(name).imported)
            if _layer(dep) > _layer(name)}


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)
    entries = [e for _, es in LAYERS for e in es]
    assert len(entries) == len(set(entries))
    assert not [e for e in entries if e not in MODULES], "a LAYERS entry names no module"


def test_imports_follow_the_layers():
    found = _upward_imports()
    new = sorted(found - KNOWN_EXCEPTIONS)
    names = [n for n, _ in LAYERS]
    assert not new, "imports from a higher layer:\n" + "\n".join(
        f"  {a} ({names[_layer(a)]}) imports {b} ({names[_layer(b)]})" for a, b in new)
    gone = sorted(KNOWN_EXCEPTIONS - found)
    assert not gone, f"fixed, so remove from KNOWN_EXCEPTIONS: {gone}"


def test_the_check_sees_upward_imports():
    """The reader finds imports of every form, deferred ones included."""
    reader = _Reader("us3l_jax.slim")
    reader.visit(ast.parse("import us3l_jax.build as b\n"
                           "def f():\n    from us3l_jax.evaluate import sweep\n"))
    assert _dependencies("us3l_jax.slim", reader.imported) == {
        "us3l_jax.build", "us3l_jax.evaluate", "us3l_jax.evaluate.sweep"}
    assert _layer("us3l_jax.slim") < _layer("us3l_jax.build") < _layer("us3l_jax.main")
    with pytest.raises(AssertionError, match="in no layer"):
        _layer("us3l_jax.unplaced")  # a new module must be placed


def test_no_module_uses_a_private_name_of_another():
    found = [f"{name}: {use}" for name in sorted(MODULES) for use in _read(name).private]
    assert not found, "private names used across modules:\n  " + "\n  ".join(found)


def test_the_check_sees_private_names():
    reader = _Reader("us3l_jax.pretrain")
    reader.visit(ast.parse("from us3l_jax import build, engine as e\n"
                           "from us3l_jax.engine.engine import _hidden\n"
                           "import us3l_jax.engine.engine\n"
                           "build._model_kwargs(c)\ne.engine._x\nus3l_jax.engine.engine._y\n"
                           "build.model(c).__class__\n"))
    assert [p.split(" (")[0] for p in reader.private] == [
        "from us3l_jax.engine.engine import _hidden", "us3l_jax.build._model_kwargs",
        "us3l_jax.engine.engine._x", "us3l_jax.engine.engine._y"]
