"""dvc.yaml's deps cover the code each stage runs, and its data paths are the stage contract's.

A stage's code deps are package folders (and the few core files it needs), so a new module in
a package is a dep without anyone listing it. What the stage's command runs is computed here,
by AST, from dltrain/cli.py: its module-level imports, the imports of the cli functions that
every command goes through (run, main, build_parser, ...) and those of the stage's own handler
and the cli functions it calls; then, over the dltrain package, every import of every module
reached (function-level and `if TYPE_CHECKING:` ones included, relative ones resolved, `from
pkg import module` taken as the module), the packages whose __init__ an import runs, and the
modules named by a string: a dotted name (Ray's worker_process_setup_hook) or a sibling file
(the MLflow model's python_model=<file>). A module of that closure that no dep covers (the same
file, or a folder holding it) fails the test, naming the module and the stage.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dltrain.paths import ModelFiles, Workspace

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dltrain"
CLI = f"{PACKAGE}.cli"


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package by its __init__.py)."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _package_of(name: str) -> str:
    """The package a module's relative imports start from."""
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def _parents(name: str) -> Iterator[str]:
    """`name` and the packages whose __init__ importing it runs."""
    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        yield ".".join(parts[:end])


def _defines(name: str, attr: str) -> bool:
    tree = ast.parse(MODULES[name].read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == attr:
                return True
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == attr for t in targets):
                return True
    return False


def _references(name: str, node: ast.AST) -> set[str]:
    """The package's modules that the code under `node`, in module `name`, imports or names."""
    found: set[str] = set()
    package = _package_of(name)
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            found.update(a.name for a in sub.names if a.name in MODULES)
        elif isinstance(sub, ast.ImportFrom):
            if sub.level:
                base = package.rsplit(".", sub.level - 1)[0] if sub.level > 1 else package
                base = f"{base}.{sub.module}" if sub.module else base
            else:
                base = sub.module or ""
            if base in MODULES:
                found.add(base)
            found.update(f"{base}.{a.name}" for a in sub.names if f"{base}.{a.name}" in MODULES)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            text = sub.value
            if text in MODULES:
                found.add(text)
            elif text.rpartition(".")[0] in MODULES and text.rpartition(".")[2].isidentifier() \
                    and _defines(text.rpartition(".")[0], text.rpartition(".")[2]):
                found.add(text.rpartition(".")[0])  # "dltrain.train.rayenv.quiet_worker"
            elif text.endswith(".py") and f"{package}.{text[:-3]}" in MODULES:
                found.add(f"{package}.{text[:-3]}")  # a sibling loaded by its file
    return found


def closure(roots: set[str]) -> set[str]:
    """Every module that importing `roots` can run, with the packages above each. The cli
    module is not followed: what one command runs of it is command_roots'."""
    seen: set[str] = set()
    todo = [p for r in roots for p in _parents(r)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name == CLI:
            continue
        for ref in _references(name, ast.parse(MODULES[name].read_text())):
            todo.extend(p for p in _parents(ref) if p not in seen)
    return seen


def _cli_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def _handlers(functions: dict[str, ast.FunctionDef]) -> tuple[dict[str, str], set[str]]:
    """Stage command -> the cli function that handles it, from build_parser's (name, function,
    help) list; and every command's handler, those given to set_defaults(func=...) too."""
    stages, every = {}, set()
    for node in ast.walk(ast.Module(body=list(functions.values()), type_ignores=[])):
        if isinstance(node, ast.Tuple) and len(node.elts) >= 2 \
                and isinstance(node.elts[0], ast.Constant) and isinstance(node.elts[1], ast.Name):
            stages[node.elts[0].value] = node.elts[1].id
        elif isinstance(node, ast.keyword) and node.arg == "func" \
                and isinstance(node.value, ast.Name):
            every.add(node.value.id)
    return stages, every | set(stages.values())


def _reachable(functions: dict[str, ast.FunctionDef], start: str, skip: set[str]) -> set[str]:
    """The cli functions `start` names, transitively, not entering those in `skip`."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name in skip:
            continue
        seen.add(name)
        todo.extend(n.id for n in ast.walk(functions[name])
                    if isinstance(n, ast.Name) and n.id in functions)
    return seen


def command_roots(command: str) -> set[str]:
    """The modules `dltrain <command>` imports itself: cli's module-level imports, and those
    of the cli functions the command runs."""
    tree = ast.parse(MODULES[CLI].read_text())
    functions = _cli_functions(tree)
    stages, every = _handlers(functions)
    assert command in stages, f"dltrain/cli.py has no handler for `dltrain {command}`"
    others = every - {stages[command]}
    ran = _reachable(functions, "run", others) | _reachable(functions, stages[command], set())
    module_level = ast.Module(body=[n for n in tree.body if not isinstance(n, ast.FunctionDef)],
                              type_ignores=[])
    roots = {CLI} | _references(CLI, module_level)
    for name in ran:
        roots |= _references(CLI, functions[name])
    return roots


def _stage_command(stage: dict) -> str:
    words = stage["cmd"].split()
    assert words[0] == "dltrain" and len(words) >= 2, f"not a dltrain command: {stage['cmd']}"
    return words[1]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


STAGES = _stages()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deps_cover_the_stage_commands_code(name: str) -> None:
    stage = STAGES[name]
    deps = [str(d) for d in stage.get("deps", [])]
    modules = closure(command_roots(_stage_command(stage)))
    missing = sorted(str(MODULES[m].relative_to(ROOT)) for m in modules
                     if not _covered(str(MODULES[m].relative_to(ROOT)), deps))
    assert not missing, (f"stage {name!r} (`{stage['cmd']}`) runs code no dep covers: "
                         + ", ".join(missing) + "; add its package folder (a core module: "
                         "its file) to the stage's deps in dvc.yaml")


def _paths(stage: dict, *keys: str) -> Iterator[str]:
    for key in keys:
        for entry in stage.get(key, []):
            yield next(iter(entry)) if isinstance(entry, dict) else str(entry)


OUTPUTS = "outs", "metrics", "plots"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_dep_exists(name: str) -> None:
    """A dep that names nothing (a module that moved) covers nothing. A stage's output is
    exempt: a fresh checkout has none."""
    made = {path for stage in STAGES.values() for path in _paths(stage, *OUTPUTS)}
    missing = [d for d in _paths(STAGES[name], "deps") if d not in made and not (ROOT / d).exists()]
    assert not missing, f"stage {name!r}: deps that do not exist: {missing}"


def _data_paths() -> Iterator[tuple[str, str]]:
    for name, stage in STAGES.items():
        for path in _paths(stage, "deps", *OUTPUTS):
            if not path.startswith(f"{PACKAGE}/"):
                yield name, path


def test_data_paths_are_the_workspaces() -> None:
    """Every file or folder dvc.yaml tracks is one that dltrain.paths names."""
    ws = Workspace(ROOT)
    r = ws.reports
    named = {ws.source_fingerprint_path, ws.raw_dir, ws.processed_dir, ws.model_path,
             ws.model_card_path, r.training, r.metrics, r.per_class, r.confusion_csv,
             r.confusion_png, r.misclassified_png, r.curves_png, r.registration}
    named = {str(p.relative_to(ROOT)) for p in named}
    stray = [(name, path) for name, path in _data_paths() if path not in named]
    assert not stray, f"dvc.yaml paths that dltrain.paths does not name: {stray}"
    assert ModelFiles(ROOT / "models").card == ws.model_card_path


def test_closure_follows_every_kind_of_reference() -> None:
    """The closure sees a lazy import, a TYPE_CHECKING one, `from pkg import module`, a
    relative one, a dotted name in a string and a sibling loaded by its file name."""
    train = closure(command_roots("train"))
    assert "dltrain.train.stage" in train  # imported inside cmd_train
    assert "dltrain.train.rayenv" in train
    assert "dltrain.paths" in train and "dltrain.config" in train  # via cli._load
    assert "dltrain.train.loop" in train  # the Ray workers' loop
    register = closure(command_roots("register"))
    assert "dltrain.registry.pyfunc_model" in register  # python_model=<its file>
    assert "dltrain.evaluate.stage" in register
    assert "dltrain.train.stage" not in closure(command_roots("preprocess"))


def test_references_resolve_relative_and_type_checking_imports() -> None:
    source = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "from . import weights\n"
        "from ..data import idx\n"
        "if TYPE_CHECKING:\n"
        "    from dltrain.registry.gate import Candidate\n"
        "def f():\n"
        "    import dltrain.train.loop\n")
    found = _references("dltrain.model.mlp", source)
    assert {"dltrain.model.weights", "dltrain.data.idx", "dltrain.registry.gate",
            "dltrain.train.loop"} <= found
