"""No private names of the big libraries: every name that dltrain, its flows and its infra
scripts take from ray, dvc, prefect, mlflow or torch is public, so an upgrade that keeps the
public API keeps the pipeline working.

The check reads the code with `ast`, so comments and strings do not count, and follows what a
name is bound to: `import torch.distributed as dist` makes `dist._x` torch's private name,
while a local variable named `torch` is the project's own.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("dltrain", "flows", "infra")
LIBRARIES = frozenset({"ray", "dvc", "prefect", "mlflow", "torch"})
HINT = ("use the library's public API; where there is truly none, put it in the one adapter "
        "module with a comment and a version test")

# (path from the repo root, dotted name): the adapter's uses of a private name that has no
# public equivalent, each with a comment there and a test of the library version it was
# written for.
ALLOWED: set[tuple[str, str]] = set()

SCOPE_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp,
               ast.SetComp, ast.DictComp, ast.GeneratorExp)
Target = str | ast.expr | None  # what a name is bound to; see Scope


def is_private(name: str) -> bool:
    """A leading underscore, except a dunder (`__version__`, `__file__`)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_private_library_path(dotted: str | None) -> bool:
    if dotted is None:
        return False
    root, *rest = dotted.split(".")
    return root in LIBRARIES and any(is_private(part) for part in rest)


def _own_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """The nodes evaluated in `node`'s scope: its body, and of a nested scope only the parts
    evaluated outside it (decorators, defaults, annotations, base classes, a comprehension's
    first iterable)."""
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        stack: list[ast.AST] = list(node.body)
    elif isinstance(node, ast.Lambda):
        stack = [node.body]
    else:  # a comprehension
        first, *more = node.generators
        results = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        stack = [first.target, *first.ifs, *more, *results]
    while stack:
        child = stack.pop()
        yield child
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = child.args
            stack += [d for d in a.defaults + a.kw_defaults if d is not None]
            if not isinstance(child, ast.Lambda):
                arguments = a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]
                stack += [x.annotation for x in arguments if x and x.annotation]
                stack += child.decorator_list + ([child.returns] if child.returns else [])
        elif isinstance(child, ast.ClassDef):
            stack += child.decorator_list + child.bases + child.keywords
        elif isinstance(child, SCOPE_NODES):
            stack.append(child.generators[0].iter)
        else:
            stack += ast.iter_child_nodes(child)


class Scope:
    """The names one module, function, class or comprehension binds, each to a list of
    targets: a dotted path (an import), an expression (an alias such as
    `dist = torch.distributed`) or None (anything else: the project's own)."""

    def __init__(self, node: ast.AST, parent: Scope | None) -> None:
        self.node = node
        self.parent = parent
        self.bindings: dict[str, list[Target]] = {}
        self.declared_outside: set[str] = set()  # `global x`, `nonlocal x`
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
                if arg is not None:
                    self.bind(arg.arg, None)
        for child in _own_nodes(node):
            self.record(child)

    def bind(self, name: str, target: Target) -> None:
        self.bindings.setdefault(name, []).append(target)

    def record(self, node: ast.AST) -> None:
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            self.declared_outside.update(node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                self.bind(alias.asname or top, alias.name if alias.asname else top)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                # A relative import is one of the project's own modules.
                self.bind(alias.asname or alias.name,
                          f"{node.module}.{alias.name}" if node.level == 0 else None)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            if isinstance(node.targets[0], ast.Name):
                self.bind(node.targets[0].id, node.value)
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            if isinstance(node.target, ast.Name):
                self.bind(node.target.id, node.value)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            self.bind(node.id, None)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.bind(node.name, None)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            self.bind(node.name, None)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            self.bind(node.rest, None)

    def lookup(self, name: str) -> tuple[Scope, list[Target]] | None:
        """The scope that binds `name` as Python resolves it, and its targets there."""
        scope: Scope | None = self
        while scope is not None:
            # A class body's names are not visible from the functions inside it.
            visible = scope is self or not isinstance(scope.node, ast.ClassDef)
            if visible and name in scope.bindings and name not in scope.declared_outside:
                return scope, scope.bindings[name]
            scope = scope.parent
        return None

    def enclosing_class(self) -> Scope | None:
        scope: Scope | None = self
        while scope is not None and not isinstance(scope.node, ast.ClassDef):
            scope = scope.parent
        return scope


class Resolver:
    """What an expression names as a dotted path (`torch.distributed._x`), or None where it is
    no library's attribute chain (a call's result, a value of the project's own)."""

    def __init__(self) -> None:
        self.resolving: set[int] = set()  # the alias expressions being resolved: no cycles

    def name(self, scope: Scope, name: str) -> str | None:
        found = scope.lookup(name)
        if found is None:
            return None  # a builtin
        owner, targets = found
        paths = [self.target(owner, t) for t in targets]
        # A name bound both to a library and to something else: assume the library.
        tracked = [p for p in paths if p and p.split(".")[0] in LIBRARIES]
        return tracked[0] if tracked else next((p for p in paths if p), None)

    def target(self, scope: Scope, target: Target) -> str | None:
        if not isinstance(target, ast.expr):
            return target
        if id(target) in self.resolving:
            return None
        self.resolving.add(id(target))
        try:
            return self.expr(scope, target)
        finally:
            self.resolving.discard(id(target))

    def expr(self, scope: Scope, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.name(scope, node.id)
        if isinstance(node, ast.Attribute):
            base = self.expr(scope, node.value)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Call):
            return self.call(scope, node)
        return None

    def call(self, scope: Scope, node: ast.Call) -> str | None:
        func = self.expr(scope, node.func)
        builtin = builtin_called(scope, node)
        strings = [a.value if isinstance(a, ast.Constant) and isinstance(a.value, str) else None
                   for a in node.args]
        if (func == "importlib.import_module" or builtin == "__import__") and strings:
            return strings[0]
        if builtin == "getattr" and len(strings) >= 2 and strings[1] is not None:
            base = self.expr(scope, node.args[0])
            return f"{base}.{strings[1]}" if base else None
        if builtin == "super":
            # super() in a subclass of a library class: what it reaches is the library's.
            cls = scope.enclosing_class()
            if cls is not None and cls.parent is not None:
                for base in (self.expr(cls.parent, b) for b in cls.node.bases):
                    if base and base.split(".")[0] in LIBRARIES:
                        return base
        return None


def builtin_called(scope: Scope, node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name) and scope.lookup(node.func.id) is None:
        return node.func.id
    return None


def private_uses(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of each private name of LIBRARIES that `source` imports or reads.

    A chain is reported once, at its last private part (`torch._utils._rebuild_tensor_v2`);
    an import is reported, not each later use of the name it bound."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    resolver = Resolver()
    hits: set[tuple[int, str]] = set()

    def visit(scope: Scope) -> None:
        for node in _own_nodes(scope.node):
            if isinstance(node, SCOPE_NODES):
                visit(Scope(node, scope))
            for dotted in uses(scope, node):
                if is_private_library_path(dotted):
                    hits.add((node.lineno, dotted))

    def uses(scope: Scope, node: ast.AST) -> list[str | None]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            return [f"{node.module}.{alias.name}" for alias in node.names]
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.value is node and is_private(
                parent.attr):
            return []  # the longer chain is the use
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            return [resolver.expr(scope, node)]
        # import_module("ray._private.x"), getattr(torch, "_C"); super() alone reaches nothing.
        if isinstance(node, ast.Call) and builtin_called(scope, node) != "super":
            return [resolver.call(scope, node)]
        return []

    visit(Scope(tree, None))
    return sorted(hits)


def source_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO_ROOT / d).rglob("*.py"))


def test_no_private_names_of_the_libraries() -> None:
    found = {(path.relative_to(REPO_ROOT).as_posix(), line, dotted)
             for path in source_files()
             for line, dotted in private_uses(path.read_text())}
    hits = sorted(h for h in found if (h[0], h[2]) not in ALLOWED)
    stale = ALLOWED - {(path, dotted) for path, _, dotted in found}
    assert not hits, "\n".join([f"{path}:{line}: {dotted}" for path, line, dotted in hits]
                               + [HINT])
    assert not stale, f"ALLOWED names no longer used, drop them: {sorted(stale)}"


FLAGGED = [
    ("import torch\ntorch._foreach_lerp_(a, b, 0.1)", "torch._foreach_lerp_"),
    ("import torch.distributed as dist\ndist._x", "torch.distributed._x"),
    ("from ray import train\ntrain._internal.utils", "ray.train._internal"),
    ("from ray.train.v2._internal.x import Y", "ray.train.v2._internal.x.Y"),
    ("from torch import _dynamo", "torch._dynamo"),
    ("import ray._private.services", "ray._private.services"),
    ("import ray._private.services as s", "ray._private.services"),
    ("import importlib\nimportlib.import_module('ray._private.node')", "ray._private.node"),
    ("from importlib import import_module\nm = import_module('prefect')\nm._y", "prefect._y"),
    ("import mlflow\ngetattr(mlflow, '_x')", "mlflow._x"),
    ("import torch\ntorch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v2"),
    ("import torch\nd = torch.distributed\nd._w", "torch.distributed._w"),
    ("def f():\n    import dvc.repo\n    return dvc.repo._z", "dvc.repo._z"),
    ("import torch\ndef f():\n    return lambda: [torch._c for _ in ()]", "torch._c"),
    ("from ray.train import DataParallelTrainer\nclass T(DataParallelTrainer):\n"
     "    def run(self):\n        return super()._run()", "ray.train.DataParallelTrainer._run"),
    ("import torch\ngetattr(torch, '_C')._x", "torch._C._x"),
    ("__import__('ray._raylet')", "ray._raylet"),
    ("import torch as t\ndef f(x: t._C.Graph) -> None: ...", "torch._C"),
    # A class body's names are not seen by its methods; `global` reaches the module's name.
    ("import torch\nclass C:\n    torch = None\n    def f(self):\n        return torch._x",
     "torch._x"),
    ("import torch\ndef f():\n    global torch\n    torch = g()\n    torch._x", "torch._x"),
]

NOT_FLAGGED = [
    "import torch\ntorch.nn.Module",
    "import ray\nray.train.report({})",
    "import os\nos._exit(0)",
    "import sys\nsys._getframe()",
    "import torch\ntorch.__version__, torch.__file__",
    "import torch\ndef f(torch):\n    return torch._x",
    "import torch\ndef f():\n    torch = object()\n    return torch._x",
    "torch = object()\ntorch._x",
    "import torch\nclass M(torch.nn.Module):\n    def f(self):\n        return self._x",
    "import importlib\nimportlib.import_module('ray.train')",
    "from . import _helper\nfrom ._private import x",
    "# torch._x in a comment\nimport torch\ns = 'torch._x'",
    "import torch\nt = torch.zeros(1)\nt.add_(1)",
    "import numpy\nnumpy._x",
]


@pytest.mark.parametrize("source,dotted", FLAGGED)
def test_the_check_flags(source: str, dotted: str) -> None:
    assert [d for _, d in private_uses(source)] == [dotted]


@pytest.mark.parametrize("source", NOT_FLAGGED)
def test_the_check_passes(source: str) -> None:
    assert private_uses(source) == []


def test_the_check_names_the_line() -> None:
    assert private_uses("import torch\n\nx = 1\ntorch._C") == [(4, "torch._C")]
