"""``fedsparse``: validate, run and compare scenarios.

    fedsparse validate FILE [--set KEY=VALUE ...]
    fedsparse run FILE [--set KEY=VALUE ...] [--summary out.json] [--superlink HOST:PORT]
    fedsparse run --resume RUN_DIR [--set run.rounds=N]
    fedsparse compare A.toml B.toml ... [--experiment NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedsparse.scenario import Scenario, ScenarioError, load_scenario

EXIT_INVALID, EXIT_FAILED = 2, 1

EPILOG = """\
Outputs: each run writes runs/<name>-<time>/ (scenario, checkpoints, per-client CSV,
metrics CSV, plots, flower.log) and one MLflow run. MLflow's store is
sqlite:///./mlflow.db with artifacts in ./mlruns unless MLFLOW_TRACKING_URI is set;
browse it with `mlflow ui --backend-store-uri sqlite:///mlflow.db`.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsparse", description="Federated and continual sparse learning on Flower.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="override one scenario key, e.g. --set client.lr=0.01 "
                            "(value parsed as TOML; repeatable)")

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
    p.add_argument("file", type=Path, nargs="?", help="scenario TOML file")
    overrides(p)
    p.add_argument("--summary", type=Path, metavar="JSON",
                   help="write the final metrics as a flat JSON object")
    p.add_argument("--run-dir", type=Path, help="output folder (default runs/<name>-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue a run from its last checkpoint (same MLflow run)")
    _deployment_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-round lines")

    p = commands.add_parser("compare", help="run scenarios into one MLflow experiment + report",
                            description="Run several scenarios one after the other into one "
                                        "MLflow experiment and write a comparison report "
                                        "(table of final metrics, overlaid accuracy plots).")
    p.add_argument("files", type=Path, nargs="+", help="scenario TOML files")
    overrides(p)
    p.add_argument("--experiment", help="MLflow experiment (default compare-<time>)")
    p.add_argument("--out", type=Path, help="report folder (default reports/<experiment>)")
    _deployment_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _deployment_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("deployment (default: Ray simulation on this machine)")
    group.add_argument("--superlink", metavar="HOST:PORT", default="",
                       help="submit to this running SuperLink instead of simulating")
    group.add_argument("--root-certificates", type=Path, metavar="CA_PEM",
                       help="CA certificate of a TLS SuperLink (default: insecure transport)")
    group.add_argument("--tracking-uri", default="",
                       help="MLflow tracking URI as the ServerApp must reach it (default: "
                            "MLFLOW_TRACKING_URI or ./mlflow.db in simulation; the "
                            "ServerApp's own MLFLOW_TRACKING_URI in deployment)")


def tracking_settings(workdir: Path, uri: str = "", deployment: bool = False) -> dict[str, str]:
    """Where the ServerApp tracks: ``uri`` if given; in deployment, the ServerApp's own
    MLFLOW_TRACKING_URI (""); else MLFLOW_TRACKING_URI or SQLite + ./mlruns in ``workdir``."""
    uri = uri or ("" if deployment else os.environ.get("MLFLOW_TRACKING_URI", ""))
    if uri or deployment:
        return {"tracking-uri": uri, "artifact-location": ""}
    workdir = workdir.resolve()
    return {"tracking-uri": f"sqlite:///{workdir / 'mlflow.db'}",
            "artifact-location": (workdir / "mlruns").as_uri()}


def _run_dir(scenario: Scenario) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{scenario.name}-{stamp}-{secrets.token_hex(2)}"


class Progress:
    """A progress bar over rounds and one short line per round (Flower chatter goes to a log)."""

    def __init__(self, label: str, rounds: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = None if quiet else tqdm(total=rounds, desc=label, unit="round",
                                           dynamic_ncols=True)
        if self.bar is not None:
            self.bar.set_postfix_str("starting SuperLink, Ray and the clients")

    def __call__(self, event: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self.bar is None:
            return
        kind = event["event"]
        if kind == "start":
            self.bar.set_postfix_str("")
            self.bar.update(event["first_round"] - 1 - self.bar.n)
        elif kind == "round":
            self.bar.update(1)
            tqdm.write(format_round(event["round"], event["rounds"], event["metrics"]))
        elif kind in ("done", "error"):
            self.bar.close()


def format_round(server_round: int, rounds: int, m: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        return format(m[key], fmt) if key in m else "  -   "

    width = len(str(rounds))
    return (f"round {server_round:>{width}}/{rounds}  acc {num('accuracy', '.4f')}  "
            f"loss {num('loss', '.4f')}  fed acc {num('fed_accuracy_weighted', '.4f')}  "
            f"up {m.get('uplink_bytes', 0) / 1e6:7.2f} MB  "
            f"down {m.get('downlink_bytes', 0) / 1e6:7.2f} MB  {m['round_s']:5.1f} s")


def run_scenario(scenario: Scenario, *, run_dir: Path, quiet: bool, superlink: str = "",
                 root_certificates: Path | None = None, tracking_uri: str = "",
                 extra: dict[str, str] | None = None, resume: bool = False) -> dict[str, Any]:
    """Run one scenario through Flower; return its summary (see ``tracking/summary.py``)."""
    from fedsparse.launch import Launch, run_flower

    workdir = Path.cwd()
    settings = {**tracking_settings(workdir, tracking_uri, deployment=bool(superlink)),
                **(extra or {})}
    if resume:
        settings["resume-from"] = str(run_dir.resolve())
    launch = Launch(scenario=scenario, run_dir=run_dir, workdir=workdir, superlink=superlink,
                    insecure=root_certificates is None, root_certificates=root_certificates,
                    settings=settings)
    if not quiet:
        where = f"SuperLink {superlink}" if superlink else "Ray simulation"
        print(f"fedsparse: {scenario.name} on {where}, {scenario.data.num_clients} clients, "
              f"{scenario.run.rounds} rounds -> {run_dir} (Flower log: {launch.log_path})",
              file=sys.stderr)
    started = time.perf_counter()
    progress = Progress(scenario.name, scenario.run.rounds, quiet)
    try:
        summary = run_flower(launch, progress)
    finally:
        if progress.bar is not None:
            progress.bar.close()
    summary["total_wall_s"] = time.perf_counter() - started
    summary["run_dir"] = str(run_dir)
    return summary


def _validate(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.file, args.overrides)
    if not args.quiet:
        print(f"# {args.file}: valid (fingerprint {scenario.fingerprint()})")
        print(scenario.to_toml(), end="")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.resume:
        run_dir = args.resume
        scenario = load_scenario(run_dir / "scenario.toml", args.overrides)
    elif args.file is None:
        raise SystemExit("fedsparse run: give a scenario FILE or --resume RUN_DIR")
    else:
        scenario = load_scenario(args.file, args.overrides)
        run_dir = args.run_dir or _run_dir(scenario)
    summary = run_scenario(scenario, run_dir=run_dir, quiet=args.quiet, superlink=args.superlink,
                           root_certificates=args.root_certificates,
                           tracking_uri=args.tracking_uri, resume=bool(args.resume))
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedsparse.tracking.history import read_csv
    from fedsparse.tracking.mlflow_run import MlflowRun, experiment_id
    from fedsparse.tracking.report import write_report

    experiment = args.experiment or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [*args.overrides, f"tracking.experiment={json.dumps(experiment)}"]
    scenarios = [load_scenario(f, overrides) for f in args.files]  # all valid before any runs
    labels = [s.name for s in scenarios]
    if len(set(labels)) < len(labels):
        labels = [f"{s.name}[{f.stem}]" for s, f in zip(scenarios, args.files, strict=True)]
    # the CLI's own view of the store (the ServerApps get --tracking-uri, see run_scenario)
    settings = tracking_settings(Path.cwd())
    exp_id = experiment_id(settings["tracking-uri"], experiment, settings["artifact-location"])
    parent = MlflowRun.create(settings["tracking-uri"], exp_id, "comparison",
                              {"fedsparse.compare": ",".join(labels)})
    summaries, histories = {}, {}
    try:
        for label, scenario in zip(labels, scenarios, strict=True):
            run_dir = _run_dir(scenario)
            summaries[label] = run_scenario(
                scenario, run_dir=run_dir, quiet=args.quiet, superlink=args.superlink,
                root_certificates=args.root_certificates,
                tracking_uri=args.tracking_uri,
                extra={"parent-run-id": parent.run_id, "run-name": label})
            run = MlflowRun(settings["tracking-uri"], summaries[label]["mlflow_run_id"])
            histories[label] = read_csv(run.download("metrics.csv", run_dir / "tracked"))
        out = args.out or Path("reports") / experiment
        for path in write_report(summaries, histories, out, f"Comparison: {experiment}"):
            parent.log_artifact(path, "plots" if path.suffix == ".png" else None)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    print(f"report: {out / 'report.md'} (MLflow experiment {experiment!r}, "
          f"parent run {parent.run_id})")
    print((out / "report.md").read_text())
    return 0


@contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit, so that every started Flower process gets stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"validate": _validate, "run": _run, "compare": _compare}
    try:
        with _exit_on_sigterm():
            return handlers[args.command](args)
    except ScenarioError as err:
        print(f"fedsparse: {err}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("fedsparse: interrupted; finished rounds are checkpointed in the run folder "
              "(resume with fedsparse run --resume RUN_DIR)", file=sys.stderr)
        return 130
    except Exception as err:
        from fedsparse.launch import LaunchError

        if isinstance(err, LaunchError):
            print(f"fedsparse: {err}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
