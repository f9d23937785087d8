"""The run's final model as an MLflow PyTorch model that ``mlflow.pytorch.load_model`` loads.

The ServerApp saves it into the run folder after the last round (``mlflow_model/``: MLflow's
``MLmodel`` format, with a signature and an input example of the held-out set), and the
mirror logs that folder as the MLflow run's logged model ``model`` (:func:`log_saved_model`),
so that a run whose tracking server was away gets it from ``fedsparse sync`` like every other
artifact. Load it with ``mlflow.pytorch.load_model("models:/<model id>")`` or
``mlflow.pytorch.load_model("runs:/<run id>/model")``: a ``torch.nn.Module`` that takes the
dataset's normalised features (as the held-out set has them) and returns class logits.
The model is pickled whole (MLflow's ``pickle`` format: 0.02 s, where its default ``pt2``,
a ``torch.export`` trace, took 3.4 s after every run), so loading it runs code from the
artifact (load models of runs you trust; the run's ``model.safetensors`` holds the same
weights as plain tensors) and needs the classes it is made of: fedsparse's MLP and CNN are
``torch.nn.Sequential`` stacks of torch's own layers, so torch (the requirement it is saved
with) is all they need; a model of a class of one's own needs that class importable.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_DIR = "mlflow_model"  # in the run folder
MODEL_NAME = "model"  # the MLflow logged model's name
EXAMPLES = 4  # rows of the input example


def save_model(model: nn.Module, x: torch.Tensor, directory: Path) -> Path:
    """Save ``model`` (its final weights loaded) in MLflow's format into ``directory``, its
    signature and input example taken from the first rows of ``x``."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    model.eval()
    example = x[:EXAMPLES].numpy()
    with torch.no_grad():
        logits = model(x[:EXAMPLES]).numpy()
    shutil.rmtree(directory, ignore_errors=True)  # a resumed run saves it again
    quiet = logging.getLogger("mlflow.pytorch")  # its warning on pickles: the README says it
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        mlflow.pytorch.save_model(model, str(directory), serialization_format="pickle",
                                  signature=infer_signature(example, logits),
                                  input_example=example,
                                  pip_requirements=[f"torch=={torch.__version__}"])
    finally:
        quiet.setLevel(level)
    return directory


def log_saved_model(client: Any, run_id: str, experiment_id: str, directory: Path,
                    step: int) -> str:
    """Log the saved model in ``directory`` as the logged model :data:`MODEL_NAME` of MLflow
    run ``run_id`` (``client``: an ``mlflow.MlflowClient``), the model of round ``step``
    (its tag ``fedsparse.round``); return the model's id. Found again, not created twice,
    when an earlier attempt failed half-way or an earlier session of the run (a resume) logged
    it: its files are then replaced, and its link to the run keeps the step it was first
    logged at (MLflow keeps one link per run and model)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    found = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'")
    model = found[0] if found else client.create_logged_model(
        experiment_id, name=MODEL_NAME, source_run_id=run_id, model_type="pytorch")
    client.log_model_artifacts(model.model_id, str(directory))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.set_logged_model_tags(model.model_id, {"fedsparse.round": str(step)})
    outputs = client.get_run(run_id).outputs
    if model.model_id not in {o.model_id for o in outputs.model_outputs}:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    return model.model_id
