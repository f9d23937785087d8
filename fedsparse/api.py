"""fedsparse from Python: what the ``fedsparse`` command does, as functions.

    import fedsparse

    summary = fedsparse.run("scenarios/quickstart.toml", overrides=["run.rounds=2"])
    result = fedsparse.compare(["scenarios/quickstart.toml"],
                               sweeps=["client.lr=[0.05, 0.1]"], overrides=["run.rounds=2"])
    for view in fedsparse.runs():
        print(view.name, view.status, view.summary.get("final_accuracy"))

The package exports these lazily (``fedsparse/__init__.py``): importing ``fedsparse`` stays
as cheap as it must be for every Flower and Ray process that imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsparse.experiments import Comparison, new_run_dir, refuse_unplaceable, run_scenario
from fedsparse.experiments import compare as compare_files
from fedsparse.runtime_env import splits_dir
from fedsparse.scenario import Scenario, load_scenario
from fedsparse.tracking.runs import RunView, find, from_folder, run_folders


def run(scenario: str | Path | Scenario, *, overrides: Sequence[str] = (),
        run_dir: str | Path | None = None, quiet: bool = True, tracking_uri: str = "",
        superlink: str = "", root_certificates: str | Path | None = None,
        system_metrics: bool = True) -> dict[str, Any]:
    """Run ``scenario`` (a scenario file with ``overrides`` as ``--set`` takes them, or a
    validated :class:`~fedsparse.scenario.Scenario`) as ``fedsparse run`` does: on the Ray
    simulation, or on the SuperLink at ``superlink``; return its summary (``summary.json``
    plus ``run_dir`` and ``total_wall_s``). Raises ``ScenarioError`` on bad input and
    ``experiments.Interrupted`` when interrupted."""
    from fedsparse.data.partition import check_partition

    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario, overrides)
    elif overrides:
        raise ValueError("overrides apply to a scenario file; a Scenario is already resolved")
    refuse_unplaceable(scenario, superlink)
    check_partition(scenario.data, scenario.seed, scenario.name, splits_dir(Path.cwd()))
    return run_scenario(scenario, run_dir=Path(run_dir) if run_dir else new_run_dir(scenario),
                        quiet=quiet, superlink=superlink, tracking_uri=tracking_uri,
                        root_certificates=Path(root_certificates) if root_certificates
                        else None, command_line="fedsparse.run(...)",
                        system_metrics=system_metrics)


def compare(files: Sequence[str | Path], *, sweeps: Sequence[str] = (),
            overrides: Sequence[str] = (), experiment: str = "", out: str | Path | None = None,
            target: float | None = None, reference: str = "", quiet: bool = True,
            tracking_uri: str = "", system_metrics: bool = True) -> Comparison:
    """``fedsparse compare``: run ``files`` (each once per combination of ``sweeps``,
    ``KEY=[V1, V2]``) into one MLflow experiment and write the report; return its
    :class:`~fedsparse.experiments.Comparison` (summaries and histories by label, the
    report's path)."""
    return compare_files([Path(f) for f in files], sweeps=sweeps, overrides=overrides,
                         experiment=experiment, out=Path(out) if out else None, target=target,
                         reference=reference, quiet=quiet, tracking_uri=tracking_uri,
                         command_line="fedsparse.compare(...)", system_metrics=system_metrics)


def runs(folder: str | Path = "runs") -> list[RunView]:
    """The runs in ``folder`` (finished or not), oldest first, as ``fedsparse ls`` lists them."""
    return [from_folder(path) for path in run_folders(Path(folder))]


def load_run(reference: str | Path, tracking_uri: str = "") -> RunView:
    """One run, by its folder or its MLflow run id (``fedsparse show``): its scenario,
    summary and per-round history."""
    from fedsparse.experiments import tracking_settings

    return find(str(reference), tracking_settings(Path.cwd(), tracking_uri)["tracking-uri"])
