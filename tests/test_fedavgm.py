"""FedAvgM, the README's "write your own strategy" example: without momentum and with a unit
step it is FedAvg bit for bit; with momentum every round is ``w_{t+1} = w_t - eta v_t``;
its momentum buffer is server state (checkpointed, restored); and the README shows the file
as it is."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedsparse.scenario import parse_scenario
from strategies.fedavgm import VELOCITY, FedAvgM
from strategies.records import cast_like, to_numpy
from strategies.server_app import build_strategy
from tests.conftest import REPO, digits_scenario
from tests.local_grid import run_federation

pytestmark = pytest.mark.usefixtures("flower_task")

TIMING = ("round_s", "train_s")


def scenario(**strategy: object):
    return parse_scenario(digits_scenario(run={"rounds": 3}, strategy=strategy))


def model(federation) -> dict[str, np.ndarray]:
    return to_numpy(federation.state.arrays)


def test_without_momentum_and_with_a_unit_step_it_is_fedavg_bit_for_bit():
    fedavg = run_federation(scenario(name="fedavg", fraction_train=0.5))
    plain = run_federation(scenario(name="fedavgm", fraction_train=0.5, server_momentum=0.0,
                                    server_lr=1.0))
    assert isinstance(plain.strategy, FedAvgM)
    for key, value in model(fedavg).items():
        assert np.array_equal(model(plain)[key], value), key
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in plain.rows] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in fedavg.rows]


def test_every_round_steps_the_model_by_eta_times_the_momentum_buffer():
    beta, eta = 0.9, 0.5
    seen: list[tuple[dict, dict]] = []  # (w_t sent, v_t) of every round

    def record(server_round, federation):
        strategy = federation.strategy
        seen.append(({k: v.copy() for k, v in strategy.current.items()},
                     {k: v.copy() for k, v in strategy.velocity.items()}))

    run = run_federation(scenario(name="fedavgm", server_momentum=beta, server_lr=eta),
                         on_round=record)
    sent = [w for w, _ in seen] + [model(run)]
    for t, (w, v) in enumerate(seen):
        for key in w:
            assert np.array_equal(sent[t + 1][key], cast_like(w[key] - eta * v[key],
                                                              w[key].dtype)), (t, key)
    assert any(np.abs(v).max() > 0 for v in seen[-1][1].values())
    fedavg = run_federation(scenario(name="fedavg"))
    assert not all(np.array_equal(model(run)[k], v) for k, v in model(fedavg).items())


def test_the_momentum_buffer_is_checkpointed_and_restored():
    run = run_federation(scenario(name="fedavgm"))
    saved = run.strategy.state_arrays()
    assert {k.removeprefix(VELOCITY) for k in saved if k.startswith(VELOCITY)} == \
        set(run.strategy.current)
    fresh = build_strategy(run.scenario)
    fresh.load_state_arrays(saved)
    assert fresh.velocity.keys() == run.strategy.velocity.keys()
    for key, value in run.strategy.velocity.items():
        assert np.array_equal(fresh.velocity[key], value)


def test_fedavgm_learns_the_digits():
    run = run_federation(parse_scenario(digits_scenario(
        run={"rounds": 5}, strategy={"name": "fedavgm", "server_momentum": 0.5})))
    assert run.rows[-1]["accuracy"] > 0.85


def readme_blocks(language: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_readme_tutorial_shows_the_strategy_and_a_scenario_that_validates():
    source = (REPO / "strategies/fedavgm.py").read_text()
    assert source in readme_blocks("python")
    tutorial = [b for b in readme_blocks("toml") if 'name = "fedavgm"' in b]
    assert tutorial, "the README's FedAvgM scenario"
    assert parse_scenario(tutorial[0]).strategy.server_momentum == 0.9
