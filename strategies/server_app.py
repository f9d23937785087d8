"""The fedsparse ServerApp: scenario from the run config -> strategy -> round loop -> MLflow.

The run config (see ``fedsparse.protocol.RUN_CONFIG_DEFAULTS``) carries the validated
scenario as TOML text and where to write and track. The ServerApp writes, under its output
directory: ``scenario.toml``, ``checkpoint.npz`` (after every round), ``clients.jsonl``
(per-client accounting, appended every round), and at the end ``metrics.csv``,
``clients.csv``,
``model.safetensors``, the plots and ``summary.json``; all of them are logged to the run's
MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from fedsparse.checkpoint import Checkpoint
from fedsparse.data import held_out_set, load_dataset
from fedsparse.durable import write_bytes
from fedsparse.models import load_shared_state, scenario_model, shared_state
from fedsparse.protocol import RUN_CONFIG_DEFAULTS, derive_seed, run_setting
from fedsparse.registry import STRATEGIES
from fedsparse.scenario import Scenario, ScenarioError, parse_scenario
from fedsparse.sparse import sparse_parameters
from fedsparse.tracking import events
from fedsparse.tracking.continual import (
    evaluate_tasks,
    matrix_artifacts,
    reference_stream,
    task_end_metrics,
)
from fedsparse.tracking.history import Row, write_csv
from fedsparse.tracking.mlflow_run import MlflowRun
from fedsparse.tracking.plots import accuracy_plots
from fedsparse.tracking.summary import summarize
from fedsparse.training import evaluate
from strategies.base import FedSparseStrategy
from strategies.loop import Evaluator, LoopState, discover, run_rounds

app = ServerApp()
log = logging.getLogger("fedsparse")
CLIENT_ROWS = "clients.jsonl"


def build_strategy(scenario: Scenario) -> FedSparseStrategy:
    return STRATEGIES.get(scenario.strategy.name).impl(scenario.strategy, scenario)


def initial_arrays(scenario: Scenario) -> ArrayRecord:
    """The initial global model, seeded by the scenario's seed only."""
    torch.manual_seed(derive_seed(scenario.seed, "model-init"))
    return ArrayRecord(shared_state(scenario_model(scenario)))


def central_evaluator(scenario: Scenario,
                      views: Callable[[ArrayRecord], dict[int, ArrayRecord] | None] | None = None
                      ) -> Evaluator:
    """Accuracy and loss of a global model on the dataset's held-out test set (in a continual
    run: on the tasks seen so far, plus every seen task's accuracy), and the density of its
    linear/conv weights (non-zero fraction). ``views`` gives per-task models when tasks have
    their own subnetworks (``FedSparseStrategy.task_views``)."""
    model = scenario_model(scenario)
    x, y = held_out_set(scenario.data)
    spec = scenario.continual
    stream = reference_stream(scenario, load_dataset(scenario.data.dataset).num_classes) \
        if spec is not None else None

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        load_shared_state(model, arrays.to_torch_state_dict())
        weights = sparse_parameters(model).values()
        density = sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights)
        if spec is not None and stream is not None:
            per_task = views(arrays) if views is not None else None
            states = None if per_task is None else {
                j: view.to_torch_state_dict() for j, view in per_task.items()}
            return {**evaluate_tasks(model, x, y, stream, spec.task_of(server_round), states),
                    "model_density": density}
        result = evaluate(model, x, y)
        return {"accuracy": result.accuracy, "loss": result.loss, "model_density": density}

    return evaluate_global


def export_adapter(scenario: Scenario, arrays: ArrayRecord, directory: Path) -> list[Path]:
    """A model with frozen pretrained weights (LoRA) is exported as a standard peft adapter
    (SoRA: the pruned one) that ``PeftModel.from_pretrained`` loads on the same base."""
    model = scenario_model(scenario)
    if not hasattr(model, "save_adapter"):
        return []
    load_shared_state(model, arrays.to_torch_state_dict())
    try:
        return model.save_adapter(directory)
    except ValueError as err:  # e.g. SoRA pruned every rank: nothing to export
        log.warning("no adapter exported: %s", err)
        return []


def _append_client_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append this round's per-client rows (JSON lines: strategies report varying metrics),
    on disk before the round's checkpoint is."""
    with open(path, "a") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
        fh.flush()
        os.fsync(fh.fileno())


def _keep_client_rows(path: Path, last_round: int) -> None:
    """Drop the rows of rounds after ``last_round`` (a run stopped before it checkpointed
    them; the resumed run writes them again)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines()
                 if json.loads(line)["round"] <= last_round]
        write_bytes(path, "".join(line + "\n" for line in lines).encode())


def _client_table(jsonl: Path, csv_path: Path) -> Path:
    """All rounds' per-client rows as one CSV (union of columns)."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    return write_csv(rows, csv_path)


def _finish(out_dir: Path, scenario: Scenario, state: LoopState, tracker: MlflowRun,
            wall_s: float) -> dict[str, Any]:
    """Write and log the run's artifacts; return the summary (``failure``: why the run
    counts as failed, "" if it does not)."""
    summary = summarize(state.history, wall_s, tracker.run_id)
    summary["failure"] = scenario.run.verdict(summary["rounds"], summary["rounds_failed"])
    files = [out_dir / "scenario.toml", write_csv(state.history, out_dir / "metrics.csv"),
             _client_table(out_dir / CLIENT_ROWS, out_dir / "clients.csv")]
    files += accuracy_plots({scenario.name: state.history}, out_dir / "plots")
    if scenario.continual is not None:
        summary |= task_end_metrics(state.history, scenario)
        files += matrix_artifacts(state.history, scenario, out_dir / "plots")
    if scenario.tracking.log_model:
        weights = out_dir / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.arrays.to_torch_state_dict().items()},
                  str(weights), metadata={"scenario": scenario.name})
        files.append(weights)
        adapter = export_adapter(scenario, state.arrays, out_dir / "adapter")
        for path in adapter:
            tracker.log_artifact(path, "adapter")
        if adapter:
            summary["adapter_dir"] = str(out_dir / "adapter")
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    files.append(summary_path)
    for path in files:
        if path.exists():
            tracker.log_artifact(path, "plots" if path.suffix == ".png" else None)
    return summary


def _numeric(row: Row) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "round" and isinstance(v, int | float)}


def _setup_logging() -> None:
    logger = logging.getLogger("fedsparse")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@dataclass
class Prepared:
    """What the server needs besides its clients: model state, MLflow run, evaluator."""

    state: LoopState
    tracker: MlflowRun
    prior_wall_s: float
    evaluate_central: Evaluator


def prepare(scenario: Scenario, strategy: FedSparseStrategy, setting: dict[str, str],
            out_dir: Path) -> Prepared:
    """A fresh start (initial model, new MLflow run) or a resumed one (checkpoint, same run)."""
    if setting["resume-from"]:
        checkpoint = Checkpoint.load(Path(setting["resume-from"]))
        _keep_client_rows(out_dir / CLIENT_ROWS, checkpoint.round)
        tracker = MlflowRun(setting["tracking-uri"], checkpoint.state["mlflow_run_id"])
        tracker.reopen()
        log.info("resuming after round %d from %s", checkpoint.round, setting["resume-from"])
        return Prepared(LoopState.restore(checkpoint, strategy), tracker,
                        float(checkpoint.state["wall_s"]),
                        central_evaluator(scenario, strategy.task_views))
    tracker = MlflowRun.start(scenario, tracking_uri=setting["tracking-uri"],
                              artifact_location=setting["artifact-location"],
                              run_name=setting["run-name"], parent_run_id=setting["parent-run-id"])
    tracker.log_artifact(out_dir / "scenario.toml")
    return Prepared(LoopState(arrays=initial_arrays(scenario)), tracker, 0.0,
                    central_evaluator(scenario, strategy.task_views))


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    _setup_logging()
    setting = {key: run_setting(context.run_config, key) for key in RUN_CONFIG_DEFAULTS}
    scenario = parse_scenario(setting["scenario"], source="run config 'scenario'")
    if setting["federation"] == "deployment":
        try:
            scenario.refuse_deployment("run config 'scenario' (federation = deployment)")
        except ScenarioError as err:
            events.emit("error", message=str(err))
            raise
    out_dir = Path(setting["out-dir"] or tempfile.mkdtemp(prefix="fedsparse-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scenario.toml").write_text(scenario.to_toml())
    strategy = build_strategy(scenario)
    if setting["federation"] == "deployment":  # the devices' data is theirs: a cap, not sizes
        strategy.examples_cap = scenario.run.max_client_examples
    # MLflow and the model are set up while the clients start (Ray, actors): both take seconds.
    with ThreadPoolExecutor(max_workers=1) as pool:
        preparing = pool.submit(prepare, scenario, strategy, setting, out_dir)
        try:
            strategy.bind(discover(grid, scenario))
        except BaseException as err:
            events.emit("error", message=f"{type(err).__name__}: {err}", out_dir=str(out_dir))
            if preparing.exception() is None:
                preparing.result().tracker.finish("FAILED")
            raise
    prepared = preparing.result()
    state, tracker = prepared.state, prepared.tracker
    events.emit("start", mlflow_run_id=tracker.run_id, out_dir=str(out_dir),
                first_round=state.next_round, rounds=scenario.run.rounds)
    strategy.summary()

    def wall_s() -> float:
        return prepared.prior_wall_s + time.perf_counter() - started

    def on_round(server_round: int, row: Row) -> None:
        """The round on disk first (client rows, then the checkpoint), then to MLflow."""
        _append_client_rows(out_dir / CLIENT_ROWS,
                            [r.row() for r in strategy.client_records if r.round == server_round])
        state.checkpoint(strategy, {"mlflow_run_id": tracker.run_id, "wall_s": wall_s(),
                                    "fedsparse_run_id": setting["fedsparse-run-id"]}
                         ).save(out_dir)
        tracker.log_round(server_round, _numeric(row))

    try:
        run_rounds(grid, scenario, strategy, state, prepared.evaluate_central, on_round)
        summary = _finish(out_dir, scenario, state, tracker, wall_s())
    except BaseException as err:
        tracker.finish("FAILED")
        events.emit("error", message=f"{type(err).__name__}: {err}", out_dir=str(out_dir))
        raise
    if summary["failure"]:
        log.error("the run failed: %s (clients.csv says why each reply was dropped)",
                  summary["failure"])
    tracker.finish("FAILED" if summary["failure"] else "FINISHED")
    events.emit("done", summary=summary, out_dir=str(out_dir))
