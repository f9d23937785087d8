"""MLflow's grouped metric names: each plain name has one, and it turns back into the plain
name and value; names logged before the grouping read as they are."""

from __future__ import annotations

import pytest

from fedsparse.tracking.metric_names import mlflow_metric, plain_metric

# every column of a quickstart run's metrics.csv, and those other strategies add
TEXT = (
    "train_examples train_flops train_loss train_s train_steps uplink_bytes downlink_bytes "
    "clients_sampled clients_ok clients_failed clients_rejected round_counted accuracy loss "
    "model_density eval_uplink_bytes eval_downlink_bytes eval_clients_sampled eval_clients_ok "
    "eval_clients_failed eval_clients_rejected eval_counted fed_accuracy_weighted "
    "fed_accuracy_mean fed_accuracy_bottom10 fed_loss_weighted fed_loss_mean cum_uplink_bytes "
    "cum_downlink_bytes cum_train_flops round_s train_dense_flops cum_train_dense_flops "
    "audit_clients_answered audit_control_gap average_accuracy forgetting task_il_accuracy "
    "novel_clients_ok novel_accuracy_mean ranks_alive mask_density up_density down_density "
    "update_density eval_density_mean eval_loss budget_mean task_3_accuracy density"
)
COLUMNS = tuple(TEXT.split())


def test_every_column_has_a_grouped_name_of_its_own():
    keys = [mlflow_metric(name, 1.0)[0] for name in COLUMNS]
    assert len(set(keys)) == len(COLUMNS)  # no two columns share an MLflow name
    groups = {key.split("/")[0] for key in keys}
    assert all(key.count("/") == 1 for key in keys)
    assert groups == {"eval", "comm", "compute", "clients", "time", "train", "model"}


@pytest.mark.parametrize("name", COLUMNS)
def test_a_grouped_name_turns_back_into_the_plain_one(name):
    value = 79_684_000 if name.endswith(("_bytes", "_flops")) else 0.9312
    assert plain_metric(*mlflow_metric(name, value)) == (name, value)


def test_names_and_units_read_as_the_ui_shows_them():
    assert mlflow_metric("accuracy", 0.93) == ("eval/accuracy", 0.93)
    assert mlflow_metric("cum_uplink_bytes", 79_684_000) == ("comm/cum_uplink_MB",
                                                             pytest.approx(79.684))
    assert mlflow_metric("train_flops", 2.5e9) == ("compute/train_GFLOPs", pytest.approx(2.5))
    assert mlflow_metric("clients_failed", 2) == ("clients/failed", 2)
    assert mlflow_metric("eval_clients_ok", 6) == ("clients/eval_ok", 6)
    assert mlflow_metric("round_s", 1.5) == ("time/round_s", 1.5)
    assert mlflow_metric("train_loss", 0.3) == ("train/loss", 0.3)
    assert mlflow_metric("fed_accuracy_mean", 0.9) == ("eval/fed_accuracy_mean", 0.9)


def test_runs_tracked_before_the_grouping_read_as_they_were_logged():
    for name in COLUMNS:
        assert plain_metric(name, 3.0) == (name, 3.0)
