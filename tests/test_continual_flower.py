"""Federated continual learning through the real ServerApp loop and ClientApp on an
in-process grid (no Ray): the server-agreed mask keeps the target sparsity after every
aggregation, only the mask's values cross the wire, DDR and the buffer live in
Context.state, the accuracy matrix fills row by row."""

from __future__ import annotations

import numpy as np
import pytest

from fedsparse.data import client_data
from fedsparse.scenario import ScenarioError, parse_scenario
from fedsparse.sparse import keep_count
from fedsparse.tracking.continual import accuracy_matrix
from strategies.loop import LoopState, discover, run_rounds
from strategies.records import content_bytes, to_numpy
from strategies.server_app import build_strategy, central_evaluator, initial_arrays
from tests.conftest import DATA
from tests.local_grid import LocalGrid

pytestmark = pytest.mark.usefixtures("flower_task")

TEXT = (DATA / "continual_digits.toml").read_text()


def run(text: str = TEXT, on_round=None):
    scn = parse_scenario(text)
    grid = LocalGrid(scn.data.num_clients, {"scenario": scn.to_toml()})
    strategy = build_strategy(scn)
    strategy.bind(discover(grid, scn))
    state = LoopState(arrays=initial_arrays(scn))
    rows = []

    def hook(rnd, row):
        rows.append(row)
        if on_round:
            on_round(rnd, grid, strategy, state)

    run_rounds(grid, scn, strategy, state, central_evaluator(scn), hook)
    return scn, grid, strategy, state, rows


@pytest.fixture(scope="module")
def tdm_run():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    checks = []

    def check(rnd, grid, strategy, state):
        weights = to_numpy(state.arrays)
        scheduled = strategy.tdm.bounds(strategy._in_task(rnd))
        for name, m in strategy.mask.items():
            outside_zero = not weights[name][~m.numpy()].any()
            count = int(m.sum())
            expected = keep_count(m.numel(), 1 - scheduled[1]) if scheduled else None
            checks.append((rnd, name, outside_zero, count, expected,
                           int(np.count_nonzero(weights[name])), m.numel()))

    return (*run(on_round=check), checks)


def test_aggregation_keeps_the_scheduled_sparsity(tdm_run):
    scn, _, strategy, _, rows, checks = tdm_run
    assert len(checks) == 15 * len(strategy.names)
    for rnd, name, outside_zero, count, expected, nonzero, size in checks:
        assert outside_zero, (rnd, name)
        assert nonzero <= count
        if expected is not None:  # a TDM update this round: exactly its upper bound
            assert count == expected, (rnd, name)
        else:
            assert count == keep_count(size, 1 - scn.strategy.sparsity), (rnd, name)
    # the task-start boost (rounds 1, 4, ...) leaves 26% density; frozen rounds 25%
    densities = [r["mask_density"] for r in rows]
    assert densities[0] > densities[2] and all(d <= 0.2601 for d in densities)


def test_only_mask_values_cross_the_wire(tdm_run):
    scn, grid, strategy, state, _, _ = tdm_run
    masks = {n: m.numpy() for n, m in strategy.mask.items()}
    dense_bytes = sum(a.nbytes for a in to_numpy(state.arrays).values())
    train_replies = [m for m in grid.received if "arrays" in m.content.array_records]
    last_round = train_replies[-scn.data.num_clients:]  # every client trains every round
    for reply in last_round:
        up = to_numpy(reply.content.array_records["arrays"])
        for name, m in masks.items():
            assert up[name].shape == (int(m.sum()),)  # values only, no positions
        assert content_bytes(reply.content) < 0.4 * dense_bytes
    sent = [m for m in grid.sent if "arrays" in m.content.array_records][-1]
    down = to_numpy(sent.content.array_records["arrays"])
    for name, m in masks.items():
        assert down[name].shape == (int(m.sum()),)
        assert [k for k in down if k.startswith(f"{name}.idx.")]  # coded positions


def test_client_state_holds_buffer_and_removals(tdm_run):
    scn, grid, _, _, rows, _ = tdm_run
    for pid in range(scn.data.num_clients):
        state = grid.state(pid)
        buffer = state.array_records["replay-buffer"]
        assert len(buffer["labels"].numpy()) == scn.client.buffer_size
        removal = state.array_records["data-removal"]
        assert int(removal["task"].numpy()[0]) == 4
        data = client_data(scn.data, scn.seed, pid)
        from clients.programs.continual import ContinualProgram

        stream = ContinualProgram(scn, pid, state).stream
        n_task = len(stream.select(data.y_train, 4))
        # removals at epochs 2 and 4 of the task: round(0.25 n) in all
        assert len(removal["kept"].numpy()) == n_task - round(0.25 * n_task)
    removed = sum(r["examples_removed"] for r in rows)
    assert removed > 0


def test_accuracy_matrix_fills_at_task_ends(tdm_run):
    scn, _, _, state, rows, _ = tdm_run
    matrix = accuracy_matrix(state.history, scn)
    assert not np.isnan(matrix[np.tril_indices(5)]).any()
    assert np.isnan(matrix[np.triu_indices(5, 1)]).all()
    last = rows[-1]
    assert last["accuracy"] > 0.5  # class-IL over all 10 digits after 5 tasks
    assert "forgetting" in last and "backward_transfer" in last
    assert last["cum_train_dense_flops"] > 3 * last["cum_train_flops"]


def test_continual_program_needs_a_continual_section():
    text = TEXT.split("[continual]")[0] + "[run]\nrounds = 3\n"
    with pytest.raises(ScenarioError, match=r"Continual needs a \[continual\] section"):
        parse_scenario(text)
    with pytest.raises(ScenarioError, match=r"continual\.num_tasks x continual\.rounds_per_task"):
        parse_scenario(TEXT.replace("rounds = 15", "rounds = 14"))
