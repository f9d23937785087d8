"""``fedsparse ls``, ``fedsparse show`` and ``fedsparse report``: the runs that exist, one run
in detail, and the comparison report of finished runs, none of them re-run
(``tracking/runs.py`` reads them back).

    fedsparse ls [FOLDER] [--experiment NAME]
    fedsparse show RUN_DIR|RUN_ID [--scenario]
    fedsparse report RUN_DIR|RUN_ID ... | --experiment NAME [--out DIR] [--target ACC]
                     [--reference LABEL]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedsparse.scenario import ScenarioError


def add_commands(commands: argparse._SubParsersAction) -> None:
    tracking = {"default": "", "help": "MLflow tracking URI to read runs from (default: "
                "MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)"}
    p = commands.add_parser("ls", help="list the runs of a folder or an MLflow experiment",
                            description="List runs: name, status, rounds done of planned, "
                                        "final centralised accuracy, uplink, and where the "
                                        "run is (its folder, or its MLflow run id).")
    p.add_argument("folder", type=Path, nargs="?", default=Path("runs"), metavar="FOLDER",
                   help="a folder of run folders (default runs/), or one run folder")
    p.add_argument("--experiment", metavar="NAME",
                   help="list the runs of this MLflow experiment instead")
    p.add_argument("--tracking-uri", **tracking)

    p = commands.add_parser("show", help="one run: its summary and a row per round",
                            description="Show one run: its final metrics, then one row per "
                                        "finished round (a run that has not finished: the "
                                        "rounds of its last checkpoint).")
    p.add_argument("run", metavar="RUN_DIR|RUN_ID", help="a run folder or an MLflow run id")
    p.add_argument("--scenario", action="store_true", help="print the run's scenario too")
    p.add_argument("--tracking-uri", **tracking)

    p = commands.add_parser("report", help="the comparison report of runs that exist",
                            description="Write the comparison report of finished runs (the "
                                        "one `fedsparse compare` writes) without running "
                                        "them: a table of final metrics and of the scenario "
                                        "keys that differ between the runs, and overlaid "
                                        "plots whose legends name those keys.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("runs", nargs="*", default=[], metavar="RUN_DIR|RUN_ID",
                      help="run folders or MLflow run ids")
    what.add_argument("--experiment", metavar="NAME",
                      help="every run of this MLflow experiment (less compare's parent runs)")
    p.add_argument("--out", type=Path, help="report folder (default reports/report-<time>)")
    p.add_argument("--target", type=float, metavar="ACC",
                   help="report the rounds each run needs to reach this centralised accuracy "
                        "and draw it on the accuracy plots")
    p.add_argument("--reference", metavar="LABEL",
                   help="report each run's uplink reduction against this run (its label)")
    p.add_argument("--tracking-uri", **tracking)


def _tracking_uri(args: argparse.Namespace) -> str:
    from fedsparse.experiments import tracking_settings

    return tracking_settings(Path.cwd(), args.tracking_uri)["tracking-uri"]


def ls(args: argparse.Namespace) -> int:
    from fedsparse.tracking.runs import experiment_runs, from_folder, run_folders, view_labels
    from fedsparse.tracking.terminal import runs_table

    if args.experiment:
        views = experiment_runs(_tracking_uri(args), args.experiment)
    else:
        views = []
        for path in run_folders(args.folder):
            try:
                views.append(from_folder(path))
            except (ValueError, OSError) as err:  # a damaged or foreign folder: said, skipped
                print(f"fedsparse: note: {path} is left out: it cannot be read "
                      f"({type(err).__name__}: {str(err).splitlines()[0]})", file=sys.stderr)
    if not views:
        where = f"MLflow experiment {args.experiment!r}" if args.experiment else str(args.folder)
        print(f"no runs in {where}")
        return 0
    print(runs_table(views, view_labels(views)))
    return 0


def show(args: argparse.Namespace) -> int:
    from fedsparse.tracking.mirror import tracked_at
    from fedsparse.tracking.runs import find, status_line
    from fedsparse.tracking.terminal import rounds_table, table

    view = find(args.run, _tracking_uri(args))
    if args.scenario and view.scenario_text:
        print(view.scenario_text.rstrip() + "\n")
    print(f"{view.name}: {status_line(view)}, {view.rounds} of {view.planned_rounds} rounds "
          f"({view.where})")
    if view.status in ("FINISHED", "FAILED") and "uplink_bytes" in view.summary:
        summary = {"total_wall_s": view.summary.get("wall_s", 0.0), "failure": "",
                   **view.summary, "run_dir": view.where}  # the folder it is read from
        uri = tracked_at(Path(view.where)) or _tracking_uri(args)  # its folder's, if a folder
        print(table(view.name, summary, uri).split("\n", 1)[1])
    if view.history:
        print(rounds_table(view.history))
    return 0


def report(args: argparse.Namespace) -> int:
    from fedsparse.tracking.report import write_report
    from fedsparse.tracking.runs import differences, experiment_runs, find, view_labels

    uri = _tracking_uri(args)
    views = experiment_runs(uri, args.experiment) if args.experiment else \
        [find(ref, uri) for ref in args.runs]
    for view in views:
        if not view.history:
            print(f"fedsparse: note: {view.where} ({view.name}) has no finished round; it is "
                  f"left out of the report", file=sys.stderr)
    views = [v for v in views if v.history]
    if not views:
        raise ScenarioError("runs", ["none of them has a finished round to report"])
    names = view_labels(views)
    if args.reference and args.reference not in names:
        raise ScenarioError("--reference", [f"{args.reference!r} is none of the runs; "
                                            f"allowed: {', '.join(names)}"])
    out = args.out or Path("reports") / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
    write_report({n: v.summary for n, v in zip(names, views, strict=True)},
                 {n: v.history for n, v in zip(names, views, strict=True)}, out,
                 f"Report: {args.experiment or ', '.join(names)}", target=args.target,
                 reference=args.reference or "",
                 params=differences(names, [v.params for v in views]))
    print(f"report: {out / 'report.md'}")
    print((out / "report.md").read_text())
    return 0
