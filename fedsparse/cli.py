"""``fedsparse``: validate, run and compare scenarios.

    fedsparse validate FILE [--set KEY=VALUE ...] [--unset KEY ...]
    fedsparse run FILE [--set KEY=VALUE ...] [--unset KEY ...] [--summary out.json]
                       [--deployment DIR | --superlink HOST:PORT [--root-certificates CA]]
    fedsparse run --resume RUN_DIR [--set run.rounds=N]
    fedsparse compare A.toml B.toml ... [--sweep KEY=[V1, V2]] [--experiment NAME] [--out DIR]
    fedsparse sync RUN_DIR
    fedsparse ls [FOLDER | --experiment NAME]
    fedsparse show RUN_DIR|RUN_ID
    fedsparse report RUN_DIR|RUN_ID ... | --experiment NAME [--out DIR] [--target ACC]
    fedsparse deploy init|up|status|down|add-node|remove-node|register|service ...
    fedsparse --version          (``fedsparse`` alone, or ``python -m fedsparse``: the help)

Exit codes: 0 done, 1 the federation failed (or too many of its rounds did not count),
2 invalid input or a run folder in use, 128 + N stopped by signal N (130 Ctrl-C,
143 SIGTERM), saying how to resume.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from fedsparse.checkpoint import finished_round
from fedsparse.experiments import (
    Interrupted,
    compare,
    new_run_dir,
    refuse_unplaceable,
    run_scenario,
)
from fedsparse.resume import plan_resume
from fedsparse.run_lock import RunDirBusy, hold
from fedsparse.runtime_env import splits_dir
from fedsparse.scenario import Scenario, ScenarioError, ScenarioNote, load_scenario

EXIT_INVALID, EXIT_FAILED = 2, 1

EPILOG = """\
Outputs: each run writes a run folder, runs/<name>-<time>-<id>/ (--run-dir to choose it):
scenario.toml (the resolved scenario), metrics.csv (a row per round), clients.jsonl and
clients.csv (a row per client and round), checkpoint.npz (after every round; --resume
continues from it), model.safetensors and mlflow_model/ (the final model; a LoRA run:
adapter/), plots/, summary.json, system_metrics.jsonl, flower.log (Flower's and Ray's
output) and, in simulation, client-state/ (each client's own state); and one MLflow run,
which receives all of it. MLflow's store is sqlite:///./mlflow.db with artifacts in
./mlruns unless MLFLOW_TRACKING_URI is set; browse it with `mlflow ui --backend-store-uri
sqlite:///mlflow.db`. `fedsparse ls`, `show` and `report` read runs back without running
them.
"""


def version() -> str:
    """fedsparse's version and those of the libraries a run's results depend on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    import fedsparse

    def of(package: str) -> str:
        try:
            return installed(package)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{p} {of(p)}" for p in ("flwr", "torch", "ray", "mlflow"))
    return f"fedsparse {fedsparse.__version__} ({libraries}; Python {sys.version.split()[0]})"


class _Version(argparse.Action):
    """``--version``, looked up only when asked for (not on every command's start)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(version())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsparse", description="Federated and continual sparse learning on Flower.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version,
                        help="print the versions of fedsparse, Flower, torch, Ray and MLflow")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="override one scenario key, e.g. --set client.lr=0.01 "
                            "(value parsed as TOML; repeatable)")
        p.add_argument("--unset", dest="unset", action="append", default=[], metavar="KEY",
                       help="remove one key of the scenario file before validation, so that "
                            "its default applies, e.g. --unset data.alpha (repeatable)")

    p = commands.add_parser("validate", help="check a scenario file and print it resolved",
                            description="Validate a scenario file (and overrides) without "
                                        "running it; print the resolved scenario.")
    p.add_argument("file", type=Path, help="scenario TOML file")
    overrides(p)
    p.add_argument("--quiet", action="store_true", help="print nothing when valid")

    p = commands.add_parser("run", help="run one scenario as a Flower federation",
                            description="Run a scenario: Ray simulation on this machine by "
                                        "default, or an existing SuperLink with --superlink.",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("file", type=Path, nargs="?", metavar="FILE", help="scenario TOML file")
    what.add_argument("--resume", type=Path, metavar="RUN_DIR",
                      help="continue a run from its last checkpoint (same MLflow run)")
    overrides(p)
    p.add_argument("--summary", type=Path, metavar="JSON",
                   help="write the final metrics as a flat JSON object")
    p.add_argument("--run-dir", type=Path, help="output folder (default runs/<name>-<time>)")
    _deployment_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-round lines")
    _output_args(p)

    p = commands.add_parser("compare", help="run scenarios into one MLflow experiment + report",
                            description="Run several scenarios one after the other into one "
                                        "MLflow experiment and write a comparison report "
                                        "(tables of final metrics and of the scenario keys "
                                        "that differ, overlaid plots of accuracy, loss and "
                                        "federated accuracy).")
    p.add_argument("files", type=Path, nargs="+", help="scenario TOML files")
    overrides(p)
    p.add_argument("--sweep", dest="sweeps", action="append", default=[],
                   metavar="KEY=[V1, V2, ...]",
                   help="run each file once per value of KEY (a TOML array), e.g. --sweep "
                        "'client.lr=[0.1, 0.01]'; several --sweep run every combination, "
                        "while --set gives one value to every run")
    p.add_argument("--experiment", help="MLflow experiment (default compare-<time>)")
    p.add_argument("--out", type=Path, help="report folder (default reports/<experiment>)")
    p.add_argument("--target", type=float, metavar="ACC",
                   help="report the rounds each run needs to reach this centralised "
                        "accuracy and draw it on the accuracy plots")
    p.add_argument("--reference", metavar="LABEL",
                   help="report each run's uplink reduction against this run (its label: "
                        "the scenario's name, with what tells it apart where names repeat)")
    _deployment_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _output_args(p)

    p = commands.add_parser("sync", help="push to MLflow what a run folder holds and it lacks",
                            description="Push to a run's MLflow run everything its run folder "
                                        "holds that MLflow has not received (rounds tracked "
                                        "while MLflow was unreachable, the final artifacts "
                                        "and status), exactly once. A run that stopped "
                                        "before it finished is marked KILLED.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder")

    from fedsparse.deploy.cli import add_commands
    from fedsparse.tracking import browse

    browse.add_commands(commands)
    add_commands(commands)
    return parser


def _output_args(p: argparse.ArgumentParser) -> None:
    from fedsparse.flower_log import LEVELS

    p.add_argument("--no-system-metrics", action="store_true",
                   help="do not sample the machine's CPU, memory, disk and network into the "
                        "MLflow run (its System metrics tab; every 10 s by default)")
    p.add_argument("-v", dest="log_level", action="store_const", const="INFO", default="",
                   help="also print Flower's and Ray's log (flower.log) on the terminal: "
                        "the same as --log-level INFO")
    p.add_argument("--log-level", dest="log_level", type=str.upper, choices=LEVELS,
                   default="", help="print the lines of Flower's and Ray's log at or above "
                                    "this level on the terminal (DEBUG also turns on "
                                    "Flower's debug logging); they always go to flower.log")


def _deployment_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("deployment (default: Ray simulation on this machine)")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--deployment", type=Path, metavar="DIR",
                       help="submit to the federation of a `fedsparse deploy` folder (on its "
                            "SuperLink host: its Control API listens on 127.0.0.1); the run "
                            "folder is DIR/runs/<name>-<time>, results go to its MLflow")
    where.add_argument("--superlink", metavar="HOST:PORT", default="",
                       help="submit to this running SuperLink instead of simulating (its "
                            "Control API: for a `fedsparse deploy` federation, the SuperLink "
                            "host's 127.0.0.1:8010, e.g. through an SSH tunnel)")
    group.add_argument("--root-certificates", type=Path, metavar="CA_PEM",
                       help="CA certificate of a TLS SuperLink (default: insecure transport)")
    group.add_argument("--tracking-uri", default="",
                       help="MLflow tracking URI as the ServerApp must reach it (default: "
                            "MLFLOW_TRACKING_URI or ./mlflow.db in simulation; the "
                            "ServerApp's own MLFLOW_TRACKING_URI in deployment)")


def _load_checked(args: argparse.Namespace, store: Path | None = None) -> Scenario:
    """``args.file`` validated with its overrides, and its data split checked (and kept in
    ``store`` for the processes of the run: ``fedsparse/data/split_store.py``)."""
    from fedsparse.data.partition import check_partition  # loads torch: not for --help

    scenario = load_scenario(args.file, args.overrides, args.unset)
    if store is not None:  # a run: refused before its split is kept
        refuse_unplaceable(scenario, args.superlink)
    check_partition(scenario.data, scenario.seed, str(args.file), store)
    return scenario


def _validate(args: argparse.Namespace) -> int:
    scenario = _load_checked(args)
    if not args.quiet:
        print(f"# {args.file}: valid (fingerprint {scenario.fingerprint()})")
        print(scenario.to_toml(), end="")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.resume:  # planned under the folder's lock: a run in use is refused first
        with hold(args.resume) if args.resume.is_dir() else nullcontext():
            resume = plan_resume(args.resume, args.overrides, args.unset)
        if resume.finished:
            print(f"fedsparse: {args.resume} has finished all {resume.checkpoint.round} "
                  f"rounds; nothing to do (raise run.rounds with --set to go further)",
                  file=sys.stderr)
            return 0
        scenario, run_dir = resume.scenario, args.resume
    else:
        nodes = deployment_target(args)
        store = splits_dir(Path.cwd())
        scenario = _load_checked(args, store)
        if nodes is not None and scenario.data.num_clients != nodes:
            warnings.warn(f"data.num_clients = {nodes}, one client per partition the nodes "
                          f"of {args.deployment} serve (the scenario said "
                          f"{scenario.data.num_clients})",
                          ScenarioNote, stacklevel=1)
            args.overrides.append(f"data.num_clients={nodes}")
            scenario = _load_checked(args, store)
        run_dir = args.run_dir or new_run_dir(scenario, args.deployment)
    if args.resume:
        deployment_target(args)
    summary = run_scenario(scenario, run_dir=run_dir, quiet=args.quiet, log_level=args.log_level,
                           command_line=args.command_line,
                           system_metrics=not args.no_system_metrics,
                           superlink=args.superlink,
                           root_certificates=args.root_certificates,
                           tracking_uri=args.tracking_uri, resume=bool(args.resume))
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2))
    print(_finished(scenario.name, summary, args.quiet))
    if summary.get("failure"):
        print(f"fedsparse: the run failed: {summary['failure']}; see {summary['run_dir']}"
              f"/clients.csv for why each reply was dropped", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _finished(name: str, summary: dict[str, Any], quiet: bool) -> str:
    """A finished run as the terminal shows it (``fedsparse/tracking/terminal.py``)."""
    from fedsparse.tracking.mirror import tracked_at
    from fedsparse.tracking.terminal import one_line, table

    if quiet:
        return one_line(name, summary)
    # a deployed run's folder may be on the SuperLink's host: then it says nothing here
    return table(name, summary, tracked_at(Path(summary["run_dir"])))


def deployment_target(args: argparse.Namespace) -> int | None:
    """Point ``args`` at the SuperLink of ``args.deployment`` (its Control address and CA);
    the number of partitions its nodes serve (None without ``--deployment``)."""
    if not args.deployment:
        return None
    from fedsparse.deploy.manifest import Manifest
    from fedsparse.deploy.programs import CA

    args.deployment = args.deployment.resolve()
    manifest = Manifest.load(args.deployment)
    args.superlink = manifest.control_address
    args.root_certificates = None if manifest.insecure else args.deployment / CA
    return manifest.num_partitions


def _compare(args: argparse.Namespace) -> int:
    if args.deployment:  # its parent MLflow run and report would be local, its runs remote
        raise ScenarioError("--deployment", [
            "compare runs on a simulation or one --superlink; with a deployment, run each "
            "scenario with `fedsparse run FILE --deployment DIR` and compare them in its "
            "MLflow"])
    result = compare(args.files, overrides=args.overrides, unset=args.unset, sweeps=args.sweeps,
                     experiment=args.experiment or "",
                     out=args.out, quiet=args.quiet, log_level=args.log_level,
                     command_line=args.command_line, superlink=args.superlink,
                     system_metrics=not args.no_system_metrics,
                     root_certificates=args.root_certificates, tracking_uri=args.tracking_uri,
                     target=args.target, reference=args.reference or "")
    print(f"report: {result.report} (MLflow experiment {result.experiment!r}, "
          f"parent run {result.parent_run_id})")
    print(result.report.read_text())
    failed = {label: s["failure"] for label, s in result.summaries.items() if s.get("failure")}
    for label, failure in failed.items():
        print(f"fedsparse: run {label} failed: {failure}", file=sys.stderr)
    return EXIT_FAILED if failed else 0


def _sync(args: argparse.Namespace) -> int:
    from fedsparse.tracking.mirror import TRACKING_FILE, sync

    if not (args.run_dir / TRACKING_FILE).is_file():
        raise ScenarioError(str(args.run_dir), [f"not a run folder: no {TRACKING_FILE}"])
    with hold(args.run_dir):  # a run that goes on pushes by itself; KILLED would be wrong
        try:
            record, pushed = sync(args.run_dir, status="KILLED")
        except Exception as err:  # MLflow away or refusing: say so, nothing is lost
            print(f"fedsparse: MLflow did not take the run ({type(err).__name__}: {err}); "
                  f"the run folder still holds everything", file=sys.stderr)
            return EXIT_FAILED
    print(f"fedsparse: {args.run_dir}: MLflow run {record.mlflow_run_id} at "
          f"{record.tracking_uri or 'the default store'} is up to date ({pushed} rounds "
          f"pushed now, status {record.status})")
    return 0


@contextmanager
def _notes_to_stderr() -> Iterator[None]:
    """Print every :class:`ScenarioNote` as ``fedsparse: note: ...`` (other warnings as usual)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", ScenarioNote)
        show = warnings.showwarning

        def show_note(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, ScenarioNote):
                print(f"fedsparse: note: {message}", file=sys.stderr)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = show_note
        yield


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted`: the run in progress is stopped (its
    processes, then its MLflow status) and the CLI says how to resume it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, interrupt)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupted_message(err: Interrupted) -> str:
    """Where an interrupted command left its run, and the command that resumes it."""
    if err.run_dir is None:
        return "fedsparse: interrupted"
    if err.superlink:
        return f"fedsparse: interrupted; the run goes on at the SuperLink {err.superlink}"
    finished = finished_round(err.run_dir)
    if finished is None:
        return (f"fedsparse: interrupted before round 1 finished; nothing to resume in "
                f"{err.run_dir}")
    return (f"fedsparse: interrupted after round {finished}; resume with: "
            f"fedsparse run --resume {shlex.quote(str(err.run_dir))}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["fedsparse", *(sys.argv[1:] if argv is None else argv)])
    if args.command is None:
        parser.print_help()
        return 0
    from fedsparse.deploy.cli import main as deploy
    from fedsparse.deploy.manifest import DeploymentError
    from fedsparse.tracking import browse
    from fedsparse.tracking.runs import RunNotFound

    handlers = {"validate": _validate, "run": _run, "compare": _compare, "sync": _sync,
                "ls": browse.ls, "show": browse.show, "report": browse.report, "deploy": deploy}
    try:
        with _signals_interrupt(), _notes_to_stderr():
            return handlers[args.command](args)
    except (ScenarioError, RunDirBusy, DeploymentError, RunNotFound) as err:
        print(f"fedsparse: {err}", file=sys.stderr)
        return EXIT_INVALID
    except Interrupted as err:
        print(interrupted_message(err), file=sys.stderr)
        return err.exit_code
    except Exception as err:
        from fedsparse.launch import LaunchError

        if isinstance(err, LaunchError):
            print(f"fedsparse: {err}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
