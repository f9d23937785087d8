"""The fedsparse ServerApp: scenario from the run config -> strategy -> round loop -> MLflow.

The run config (see ``fedsparse.protocol.RUN_CONFIG_DEFAULTS``) carries the validated
scenario as TOML text and where to write and track. The ServerApp writes, under its output
directory: ``scenario.toml``, ``tracking.json`` (what its MLflow run is), ``clients.jsonl``
(per-client accounting) and ``checkpoint.npz`` after every round, and at the end
``metrics.csv``, ``clients.csv``, ``model.safetensors`` and ``mlflow_model/`` (the model
as an MLflow PyTorch model, or ``adapter/`` for LoRA), the plots and ``summary.json``. The run
folder is the source of truth: MLflow receives all of it from a background mirror
(``fedsparse/tracking/mirror.py``), after it is on disk, and never holds up a round.
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
from fedsparse.data import dataset_shape, held_out_set
from fedsparse.deploy.serverside import confine, deployment_dir, registered_partitions
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
from fedsparse.tracking.mirror import BackgroundMirror, TrackedRun, new_tracked_run, run_tags
from fedsparse.tracking.mlflow_model import MODEL_DIR, save_model
from fedsparse.tracking.plots import round_plots
from fedsparse.tracking.summary import summarize
from fedsparse.tracking.system_metrics import SystemSampler
from fedsparse.training import evaluate
from strategies.base import FedSparseStrategy
from strategies.directory import directory_for
from strategies.loop import Evaluator, LoopState, run_rounds

app = ServerApp()
log = logging.getLogger("fedsparse")
CLIENT_ROWS = "clients.jsonl"
SCENARIO_FILE = "scenario.toml"
SUMMARY_FILE = "summary.json"


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
    x, y = held_out_set(scenario.data, scenario.seed)
    spec = scenario.continual
    stream = reference_stream(scenario, dataset_shape(scenario.data).num_classes) \
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
    return _save_adapter(final_model(scenario, arrays), directory)


def final_model(scenario: Scenario, arrays: ArrayRecord) -> torch.nn.Module:
    """The scenario's model with the global weights ``arrays`` loaded."""
    model = scenario_model(scenario)
    load_shared_state(model, arrays.to_torch_state_dict())
    return model


def _save_adapter(model: torch.nn.Module, directory: Path) -> list[Path]:
    if not hasattr(model, "save_adapter"):
        return []
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


Artifact = tuple[Path, str | None]  # a file and the MLflow artifact folder it goes in


def _finish(out_dir: Path, scenario: Scenario, state: LoopState, run_id: str,
            wall_s: float) -> tuple[dict[str, Any], list[Artifact], Path | None]:
    """Write the run's artifacts; return the summary (``failure``: why the run counts as
    failed, "" if it does not), the artifacts for MLflow and the saved MLflow model
    (``tracking/mlflow_model.py``; a LoRA run exports its peft adapter instead)."""
    summary = summarize(state.history, wall_s, run_id)
    summary["failure"] = scenario.run.verdict(summary["rounds"], summary["rounds_failed"])
    files = [out_dir / SCENARIO_FILE, write_csv(state.history, out_dir / "metrics.csv"),
             _client_table(out_dir / CLIENT_ROWS, out_dir / "clients.csv")]
    files += round_plots({scenario.name: state.history}, out_dir / "plots")
    if scenario.continual is not None:
        summary |= task_end_metrics(state.history, scenario)
        files += matrix_artifacts(state.history, scenario, out_dir / "plots")
    artifacts: list[Artifact] = []
    model_dir = None
    if scenario.tracking.log_model:
        weights = out_dir / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.arrays.to_torch_state_dict().items()},
                  str(weights), metadata={"scenario": scenario.name})
        files.append(weights)
        model = final_model(scenario, state.arrays)
        if hasattr(model, "save_adapter"):  # LoRA: its model is a peft adapter on the base
            adapter = _save_adapter(model, out_dir / "adapter")
            artifacts += [(path, "adapter") for path in adapter]
            if adapter:
                summary["adapter_dir"] = str(out_dir / "adapter")
        else:
            model_dir = save_model(model, held_out_set(scenario.data, scenario.seed)[0],
                                   out_dir / MODEL_DIR)
    summary_path = write_bytes(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    files.append(summary_path)
    artifacts += [(path, "plots" if path.suffix == ".png" else None) for path in files
                  if path.exists()]
    return summary, artifacts, model_dir


def _setup_logging() -> None:
    logger = logging.getLogger("fedsparse")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@dataclass
class Prepared:
    """What the server needs besides its clients: model state, MLflow record, evaluator."""

    state: LoopState
    record: TrackedRun
    prior_wall_s: float  # ServerApp time of a resumed run's earlier sessions
    prior_total_s: float  # command time of its earlier sessions
    evaluate_central: Evaluator


def prepare(scenario: Scenario, strategy: FedSparseStrategy, setting: dict[str, str],
            out_dir: Path) -> Prepared:
    """A fresh start (initial model, a new MLflow record) or a resumed one (checkpoint, the
    same MLflow run). A resume writes the run folder's scenario only once its checkpoint has
    loaded, so a resume that fails leaves the folder as it was; then it drops what an
    earlier session's end left (its ``summary.json``: the run is not finished again yet;
    its artifacts and model as pushed: this session's end pushes its own)."""
    import mlflow.entities  # noqa: F401  (seconds to import: here, while the clients start)

    evaluator = central_evaluator(scenario, strategy.task_views)
    scenario_text = scenario.to_toml().encode()
    if setting["resume-from"]:
        checkpoint = Checkpoint.load(Path(setting["resume-from"]))
        _keep_client_rows(out_dir / CLIENT_ROWS, checkpoint.round)
        record = TrackedRun.load(out_dir)
        record.tags = run_tags(scenario, setting["parent-run-id"], setting["command-line"])
        record.status = record.pushed_status = ""
        record.artifacts, record.pushed_artifacts = [(SCENARIO_FILE, None)], []
        record.model_dir = record.model_id = ""
        record.tracking_uri = setting["tracking-uri"] or record.tracking_uri
        record.save(out_dir)
        write_bytes(out_dir / SCENARIO_FILE, scenario_text)
        (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
        log.info("resuming after round %d from %s", checkpoint.round, setting["resume-from"])
        return Prepared(LoopState.restore(checkpoint, strategy), record,
                        float(checkpoint.state["wall_s"]),
                        float(checkpoint.state["total_wall_s"]), evaluator)
    write_bytes(out_dir / SCENARIO_FILE, scenario_text)
    record = new_tracked_run(scenario, tracking_uri=setting["tracking-uri"],
                             artifact_location=setting["artifact-location"],
                             run_name=setting["run-name"], parent_run_id=setting["parent-run-id"],
                             fedsparse_run_id=setting["fedsparse-run-id"],
                             command=setting["command-line"])
    record.artifacts = [(SCENARIO_FILE, None)]
    record.save(out_dir)
    return Prepared(LoopState(arrays=initial_arrays(scenario)), record, 0.0, 0.0, evaluator)


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    _setup_logging()
    setting = {key: run_setting(context.run_config, key) for key in RUN_CONFIG_DEFAULTS}
    scenario = parse_scenario(setting["scenario"], source="run config 'scenario'")
    deployment, registered = deployment_dir(), None
    deployed = setting["federation"] == "deployment" or deployment is not None
    try:
        if deployment is not None:
            setting = confine(setting, deployment)
            registered = registered_partitions(deployment)
        if deployed:
            scenario.refuse_deployment("run config 'scenario' (federation = deployment)")
    except ScenarioError as err:
        events.emit("error", message=str(err))
        raise
    out_dir = Path(setting["out-dir"] or tempfile.mkdtemp(prefix="fedsparse-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    strategy = build_strategy(scenario)
    if deployed:  # the server does not know a device's data: a cap, not its size
        strategy.examples_cap = scenario.run.max_client_examples
    # The model and the run's state are set up while the clients start (Ray, actors).
    with ThreadPoolExecutor(max_workers=1) as pool:
        preparing = pool.submit(prepare, scenario, strategy, setting, out_dir)
        try:
            directory = directory_for(scenario, deployed, registered)
            directory.start(grid)
        except BaseException as err:
            events.emit("error", message=f"{type(err).__name__}: {err}", out_dir=str(out_dir))
            raise
    strategy.bind(directory)
    prepared = preparing.result()
    state, record = prepared.state, prepared.record
    mirror = BackgroundMirror(record, out_dir, lambda: state.history)
    mirror.round_done(state.next_round - 1)
    sampler = SystemSampler(out_dir, float(setting["system-metrics-s"] or 0),
                            mirror.push_soon).start()
    events.emit("start", mlflow_run_id=record.mlflow_run_id, out_dir=str(out_dir),
                first_round=state.next_round, rounds=scenario.run.rounds)
    strategy.summary()
    cli_started = float(setting["cli-started-at"] or time.time())

    def wall_s() -> float:
        return prepared.prior_wall_s + time.perf_counter() - started

    def on_round(server_round: int, row: Row) -> None:
        """The round on disk first (client rows, then the checkpoint), then to MLflow."""
        _append_client_rows(out_dir / CLIENT_ROWS,
                            [r.row() for r in strategy.client_records if r.round == server_round])
        state.checkpoint(strategy, {
            "wall_s": wall_s(), "total_wall_s": prepared.prior_total_s + time.time() - cli_started,
            "fedsparse_run_id": setting["fedsparse-run-id"]}).save(out_dir)
        mirror.round_done(server_round)

    try:
        run_rounds(grid, scenario, strategy, state, prepared.evaluate_central, on_round)
        summary, artifacts, model_dir = _finish(out_dir, scenario, state, record.mlflow_run_id,
                                                wall_s())
    except BaseException as err:
        sampler.stop()
        mirror.finish("FAILED", [])
        mirror.close(timeout=5)
        events.emit("error", message=f"{type(err).__name__}: {err}", out_dir=str(out_dir))
        raise
    if summary["failure"]:
        log.error("the run failed: %s (clients.csv says why each reply was dropped)",
                  summary["failure"])
    sampler.stop()
    mirror.finish("FAILED" if summary["failure"] else "FINISHED", artifacts, model_dir,
                  summary["rounds"])
    summary["mlflow_synced"] = mirror.close(scenario.tracking.flush_timeout_s)
    summary["mlflow_run_id"] = record.mlflow_run_id
    summary["mlflow_experiment_id"] = record.mlflow_experiment_id
    events.emit("done", summary=summary, out_dir=str(out_dir))
