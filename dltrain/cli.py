"""The `dltrain` command: one subcommand per stage, each a thin shell around its module.

Heavy libraries (torch, ray, mlflow) are imported inside the commands that use them, so that
`dltrain --help` stays fast. Errors that dltrain raises on purpose (DltrainError) print one
line naming the cause and exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from pathlib import Path
from typing import Any

from dltrain.errors import DltrainError
from dltrain.paths import Workspace


def _load(args: argparse.Namespace):
    from dltrain.config import load_params, parse_override

    ws = Workspace.at(args.workspace)
    params_path = Path(args.params) if args.params else ws.params_path
    overrides = dict(parse_override(o) for o in args.set)
    return ws, load_params(params_path, overrides)


def _limits(params: Any) -> Any:
    """The bounds on fetching one file of the data (data.download_timeout_s, max_file_bytes)."""
    from dltrain.data.download import Limits

    return Limits(params.data.download_timeout_s, params.data.max_file_bytes)


def cmd_check(args: argparse.Namespace) -> None:
    from dltrain.data.freshness import check

    ws, params = _load(args)
    # The stat cache lives in DVC's .dvc/tmp: never create .dvc where there is none (that
    # would make the directory look like a DVC repo); without it, a local source is hashed.
    stat_cache = ws.source_stat_cache_path if (ws.root / ".dvc").is_dir() else None
    check(params.data.dataset, params.data.source, ws.source_fingerprint_path,
          stat_cache_path=stat_cache, limits=_limits(params))


def cmd_download(args: argparse.Namespace) -> None:
    from dltrain.atomic import read_json
    from dltrain.data.download import download

    ws, params = _load(args)
    try:  # what the freshness check found at the source: lets unchanged files be kept
        fingerprint = read_json(ws.source_fingerprint_path)
    except (OSError, ValueError):
        fingerprint = None
    download(params.data.dataset, params.data.source, ws.raw_dir, fingerprint=fingerprint,
             limits=_limits(params))


def cmd_preprocess(args: argparse.Namespace) -> None:
    from dltrain.data.preprocess import preprocess

    ws, params = _load(args)
    preprocess(ws.raw_dir, ws.processed_dir, dataset=params.data.dataset,
               val_fraction=params.data.val_fraction, seed=params.data.seed)


def cmd_train(args: argparse.Namespace) -> None:
    from dltrain.train.stage import train

    ws, params = _load(args)
    try:
        train(params, ws, resume=args.resume, reload=lambda: _load(args)[1])
    except SystemExit as exc:
        # Ray's own handler ends a driver signalled outside the training itself with
        # SystemExit (ray.init's for SIGTERM; while it trains, dltrain.train.stage handles
        # SIGINT and SIGTERM), with status 0 or 1 and no message; by now train() has shut its
        # local Ray down. An interruption, never a success.
        raise KeyboardInterrupt from exc


def cmd_evaluate(args: argparse.Namespace) -> None:
    from dltrain.evaluate.stage import evaluate

    ws, params = _load(args)
    evaluate(ws.model_path, ws.processed_dir, ws.reports_dir,
             batch_size=params.evaluate.batch_size)


def cmd_register(args: argparse.Namespace) -> None:
    from dltrain.registry.register import register

    ws, params = _load(args)
    register(ws, params, if_champion_unloadable=args.if_champion_unloadable)


def cmd_registry_history(args: argparse.Namespace) -> None:
    from dltrain.registry.commands import show_history

    ws, params = _load(args)
    show_history(ws, params, as_json=args.json)


def cmd_registry_rollback(args: argparse.Namespace) -> None:
    from dltrain.registry.commands import rollback

    ws, params = _load(args)
    rollback(ws, params, to=args.to, reason=args.reason)


def cmd_registry_relocate(args: argparse.Namespace) -> None:
    from dltrain.registry.commands import relocate

    ws, params = _load(args)
    relocate(ws, params)


def cmd_predict(args: argparse.Namespace) -> None:
    from dltrain.registry.predict import predict_command

    predict_command(args.model, [Path(p) for p in args.inputs], as_json=args.json,
                    tracking_uri=args.tracking_uri, workspace=Path(args.workspace))


def cmd_tune(args: argparse.Namespace) -> None:
    from dltrain.tune.apply import apply_best, load_report

    ws, params = _load(args)
    if args.apply_only:
        report = load_report(ws.tune_report_path)
    else:
        from dltrain.tune.sweep import tune

        report = tune(params, ws)
    if args.apply or args.apply_only:
        params_path = Path(args.params) if args.params else ws.params_path
        for line in apply_best(params_path, report) or ["params.yaml has the best values "
                                                        "already"]:
            print(line)


def _report(path: Path) -> dict[str, Any]:
    """A JSON report as a mapping; empty if it is missing or unreadable."""
    from dltrain.atomic import read_json

    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def summary_lines(ws: Workspace, since: float | None = None) -> list[str]:
    """What `make run` ends with: the test accuracy, the registry's outcome and where to look
    next; one line if no stage wrote a report at or after `since` (a Unix time)."""
    metrics, reg = _report(ws.metrics_path), _report(ws.registration_path)
    acc = metrics.get("accuracy")
    accuracy = (f"test accuracy {acc:.4f}" if isinstance(acc, (int, float)) else
                f"no test accuracy yet ({ws.metrics_path.relative_to(ws.root)} is missing)")
    version = (f"{reg.get('model_name')} version {reg['version']}"
               + (f" ({', '.join(reg['aliases'])})" if reg.get("aliases") else "")
               if reg.get("version") is not None else "no registered version")
    reports = (ws.training_report_path, ws.metrics_path, ws.registration_path)
    if since is not None and not any(p.is_file() and p.stat().st_mtime >= since for p in reports):
        return [f"dltrain: nothing changed, every stage is up to date: {accuracy}; {version}"]
    what = ("registered a new version" if reg.get("new_version") else
            "already registered" if reg.get("registered") else "not registered")
    return [f"dltrain: {accuracy}",
            f"  registry: {what}: {version}" + (f"; {reg['reason']}" if reg.get("reason") else "")
            if reg else "  registry: no registration yet (the register stage did not run)",
            "  next: dvc metrics show           the test figures",
            "        make mlflow-ui             the runs and model versions",
            "        dltrain predict IMAGE.png  classify with the trained model"]


def cmd_summary(args: argparse.Namespace) -> None:
    print("\n".join(summary_lines(Workspace.at(args.workspace), args.since)))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", default=".", metavar="DIR",
                        help="the pipeline's root directory (default: the current directory)")
    parser.add_argument("--params", default=None, metavar="PATH",
                        help="the params file (default: WORKSPACE/params.yaml)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one param for this run, e.g. -S train.epochs=3")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dltrain")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _add_registry(sub: Any) -> None:
    """`dltrain registry history|rollback|relocate`: the alias history kept in the registry,
    and the embedded store of a workspace that moved."""
    p = sub.add_parser("registry", help="the model registry: alias history, rollback, relocate",
                       description="The model registry's alias history, rollback, and the "
                                   "relocation of a moved workspace's embedded store.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    h = actions.add_parser("history", help="every move of champion and challenger",
                           description="Every move of champion and challenger, oldest first.")
    _common(h)
    h.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    h.set_defaults(func=cmd_registry_history)
    r = actions.add_parser("rollback", help="move champion back to an earlier version",
                           description="Move champion back (default: to the champion the "
                                       "current one replaced, as the history records it, so "
                                       "a second rollback undoes the first) and record the "
                                       "move.")
    _common(r)
    r.add_argument("--to", type=int, default=None, metavar="VERSION",
                   help="the version to make champion")
    r.add_argument("--reason", default=None, help="why, recorded in the history")
    r.set_defaults(func=cmd_registry_rollback)
    m = actions.add_parser("relocate", help="point a moved or copied workspace's registry at "
                                            "the artifacts beside it",
                           description="After the workspace was moved or copied: rewrite the "
                                       "artifact locations the embedded MLflow store records "
                                       "(absolute paths) to this workspace's mlruns/artifacts.")
    _common(m)
    m.set_defaults(func=cmd_registry_relocate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dltrain",
        description="MLP-on-MNIST as a training pipeline: "
                    "download -> preprocess -> train -> evaluate -> register.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stages: list[tuple[str, Any, str]] = [
        ("check", cmd_check, "fingerprint the data source into data/source.json (no download)"),
        ("download", cmd_download, "fetch the four IDX files into data/raw (verified)"),
        ("preprocess", cmd_preprocess, "parse IDX, split train/val, write data/processed"),
        ("train", cmd_train, "train the MLP with Ray Train (data-parallel) into models/"),
        ("evaluate", cmd_evaluate, "test-set metrics and plots into reports/"),
        ("register", cmd_register, "log the run and register the model in MLflow"),
    ]
    for name, func, help_text in stages:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p)
        p.set_defaults(func=func)
        if name == "train":
            p.add_argument("--resume", choices=["auto", "never"], default="auto",
                           help="auto: continue an interrupted run of the same params from "
                                "its latest checkpoint; never: always start clean")
        if name == "register":
            p.add_argument("--if-champion-unloadable", choices=["fail", "promote"],
                           default="fail",
                           help="when the champion cannot be re-scored on the current test "
                                "set: fail (default, nothing registered) or promote the new "
                                "model over it, recorded in the alias history")
    _add_registry(sub)
    help_text = "hyperparameter search on Ray Tune over params.yaml's tune: section"
    p = sub.add_parser(
        "tune", help=help_text,
        description=help_text + ": trials train concurrently on the Ray train.ray_address "
        "names, the scheduler stops poor ones early, MLflow gets a parent run and a child run "
        "per trial, reports/tune.json the trials and the best config. A re-run resumes an "
        "interrupted sweep; a changed space starts a new one. Nothing is registered: apply the "
        "winner to params.yaml, then `dvc repro`.")
    _common(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--apply", action="store_true",
                     help="after the sweep, write the best config into params.yaml")
    how.add_argument("--apply-only", action="store_true",
                     help="write reports/tune.json's best config into params.yaml, no sweep")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("predict", help="classify PNG images or an IDX file with a model",
                       description="Classify PNG images or an IDX file with a model.")
    p.add_argument("-C", "--workspace", default=".", metavar="DIR",
                   help="the workspace whose model and registry to use, as `git -C` names a "
                        "repository from elsewhere (default: the current directory); "
                        "--model paths and inputs stay relative to the current directory")
    p.add_argument("--model", default=None,
                   help="a weights file (its card beside it) or "
                        "models:/<name>@<alias> (default: "
                        f"WORKSPACE/{Workspace(Path()).model_path})")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI for models:/ references "
                        "(default: MLFLOW_TRACKING_URI, else the workspace's embedded SQLite "
                        "store)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG images or an IDX file")
    p.set_defaults(func=cmd_predict)
    help_text = "the last pipeline run's outcome: test accuracy, registry, where to look next"
    p = sub.add_parser("summary", help=help_text, description=help_text)
    p.add_argument("--workspace", default=".", metavar="DIR",
                   help="the pipeline's root directory (default: the current directory)")
    p.add_argument("--since", type=float, default=None, metavar="UNIX_TIME",
                   help="when the run started: if no stage wrote a report since, say that "
                        "nothing changed, in one line")
    p.set_defaults(func=cmd_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DltrainError as exc:
        print(f"dltrain {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"dltrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`dltrain predict ... | head -3`): stop quietly, as Unix tools
        # do, with the status a shell gives a command that SIGPIPE ended (128 + 13). Output
        # still buffered for the closed pipe goes to /dev/null, not into a second error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    return 0


def run() -> None:
    """The `dltrain` command: main(), then a quick exit.

    Once a stage has imported torch, the interpreter's own teardown (freeing every module and
    native library) takes a noticeable part of a stage's time (BENCHMARKS.md, "Figures behind
    choices in the code"), paid by each stage of every pipeline run for nothing. So the first
    atexit handler registered is one that ends the process: atexit runs handlers last
    registered first, so every handler that a library registers during the command (Ray's and
    MLflow's shutdown, logging's flush) still runs before it; only the teardown is skipped.
    Outputs are never left to it: every file is written, synced and renamed by dltrain.atomic
    before a stage returns."""
    code: int | str | None = 1  # what an uncaught exception (a bug) exits with

    def exit_without_teardown() -> None:
        # logging's own atexit handler is skipped if logging was imported before this one was
        # registered: not by `dltrain` or `python -m dltrain`, but maybe by an embedder.
        logging = sys.modules.get("logging")
        if logging is not None:
            logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: `dltrain predict ... | head`
                pass
        # sys.exit's own rule: None is 0, a message is 1.
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)

    atexit.register(exit_without_teardown)
    try:
        code = main()
    except SystemExit as exc:  # argparse's: 2 for a usage error, 0 for --help
        code = exc.code
    sys.exit(code)


if __name__ == "__main__":
    run()
