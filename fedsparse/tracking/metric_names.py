"""The names a run's metrics have in MLflow: grouped by the prefix before ``/``, which MLflow's
UI groups charts by (``eval/``, ``comm/``, ``compute/``, ``clients/``, ``time/``,
``train/``, ``model/``), with the unit in the name (bytes become MB, FLOPs GFLOPs).

``metrics.csv``, ``summary.json`` and the reports keep the plain names (``accuracy``,
``cum_uplink_bytes``); only what is pushed to MLflow is renamed, and :func:`plain_metric`
turns an MLflow metric back into its plain name and unit, including the plain names that
runs tracked before the grouping were logged under (they have no ``/``).
"""

from __future__ import annotations

import re

# (plain suffix, MLflow suffix, MLflow value per plain unit)
UNITS: tuple[tuple[str, str, float], ...] = (("_bytes", "_MB", 1e-6),
                                             ("_flops", "_GFLOPs", 1e-9))

# Names that read better than the rules below make them; everything else follows the rules.
NAMED: dict[str, str] = {
    "accuracy": "eval/accuracy",
    "loss": "eval/loss",
    "round_counted": "clients/round_counted",
    "eval_counted": "clients/eval_counted",
    **{f"clients_{what}": f"clients/{what}" for what in ("sampled", "ok", "failed", "rejected")},
    **{f"eval_clients_{what}": f"clients/eval_{what}"
       for what in ("sampled", "ok", "failed", "rejected")},
}
PLAIN = {grouped: plain for plain, grouped in NAMED.items()}

EVALUATION = re.compile(r"accuracy|loss|forgetting|^fed_|^novel_")


def _group(name: str) -> str:
    """The group of a plain name that :data:`NAMED` does not list."""
    if name.endswith(tuple(suffix for suffix, _, _ in UNITS)):
        return "comm" if name.endswith("_bytes") else "compute"
    if name.endswith("_s"):
        return "time"
    if name.startswith("train_"):
        return "train"
    if "clients" in name:
        return "clients"
    return "eval" if EVALUATION.search(name) else "model"


def mlflow_metric(name: str, value: float) -> tuple[str, float]:
    """The MLflow name and value of the plain metric ``name`` (e.g. ``cum_uplink_bytes``,
    79684000 -> ``comm/cum_uplink_MB``, 79.684)."""
    if name in NAMED:
        return NAMED[name], value
    group = _group(name)
    for suffix, unit, scale in UNITS:
        if name.endswith(suffix):
            return f"{group}/{name.removesuffix(suffix)}{unit}", value * scale
    if group == "train":
        return f"train/{name.removeprefix('train_')}", value
    return f"{group}/{name}", value


def plain_metric(key: str, value: float) -> tuple[str, float]:
    """The plain name and value of an MLflow metric: the inverse of :func:`mlflow_metric`;
    a key without a group (a run tracked before the grouping) is already plain."""
    if "/" not in key:
        return key, value
    if key in PLAIN:
        return PLAIN[key], value
    group, name = key.split("/", 1)
    for suffix, unit, scale in UNITS:
        if name.endswith(unit):
            return f"{name.removesuffix(unit)}{suffix}", round(value / scale)
    if group == "train":
        return f"train_{name}", value
    return name, value
