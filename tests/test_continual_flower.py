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
from strategies.records import content_bytes, to_numpy
from strategies.server_app import build_strategy
from tests.conftest import DATA
from tests.local_grid import LocalGrid, run_federation

pytestmark = pytest.mark.usefixtures("flower_task")

TEXT = (DATA / "continual_digits.toml").read_text()


def run(text: str = TEXT, on_round=None, tamper=None):
    hook = None if on_round is None else \
        (lambda rnd, f: on_round(rnd, f.grid, f.strategy, f.state))
    f = run_federation(parse_scenario(text), tamper, hook)
    return f.scenario, f.grid, f.strategy, f.state, f.rows, f.records


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

    return (*run(on_round=check)[:5], checks)


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
    scn, grid, strategy, _, rows, _ = tdm_run
    for pid in range(scn.data.num_clients):
        state = grid.client_state(pid, strategy.accepted_round[pid])
        buffer = state["replay-buffer"]
        assert len(buffer["labels"]) == scn.client.buffer_size
        removal = state["data-removal"]
        assert int(removal["task"][0]) == 4
        data = client_data(scn.data, scn.seed, pid)
        from clients.programs.continual import ContinualProgram

        stream = ContinualProgram(scn, pid, state=None).stream
        n_task = len(stream.select(data.y_train, 4))
        # removals at epochs 2 and 4 of the task: round(0.25 n) in all
        assert len(removal["kept"]) == n_task - round(0.25 * n_task)
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


def _dst_text(growth: str) -> str:
    """The test scenario with DST (ERK initial mask, ``growth`` regrowth) instead of TDM."""
    return TEXT.replace('init = "magnitude"', 'init = "erk"').replace(
        'mask_update = "tdm"', f'mask_update = "dst"\ngrowth = "{growth}"')


@pytest.mark.parametrize("growth", ["gradient", "momentum"])
def test_dst_keeps_density_and_asks_for_its_signal_before_each_update(growth):
    text = _dst_text(growth)
    if growth == "momentum":
        text = text.replace("lr = 0.05", "lr = 0.05\nmomentum = 0.9")
    densities, signals, sent = [], [], []

    def check(rnd, grid, strategy, state):
        weights = to_numpy(state.arrays)
        densities.append(strategy.mask.density())
        assert all(not weights[n][~m.numpy()].any() for n, m in strategy.mask.items())
        signals.append(strategy.requested)

    def keep(message, reply):
        if "signal" in reply.content.array_records:
            sent.extend(a.numpy() for a in reply.content.array_records["signal"].values())
        return reply

    run(text, check, keep)
    assert max(densities) - min(densities) < 1e-3 and abs(densities[0] - 0.25) < 1e-3
    kind = {"gradient": "grad-dense", "momentum": "momentum-dense"}[growth]
    # updates at rounds 2, 3 of every 3-round task -> signals in rounds 1, 2 of each task
    assert signals == [kind, kind, "none"] * 5
    # a dense signal, not one the mask (25% of the weights) zeroed: regrowth needs it there
    assert np.mean([np.count_nonzero(v) / v.size for v in sent]) > 0.5


def test_momentum_growth_needs_client_momentum():
    scn = parse_scenario(_dst_text("momentum"))
    with pytest.raises(ValueError, match=r"client\.momentum > 0"):
        build_strategy(scn)


def test_one_client_global_model_is_the_clients_model():
    text = TEXT.replace("num_clients = 3", "num_clients = 1")
    replies = {}

    def keep(message, reply):
        if "arrays" in reply.content.array_records:
            replies[int(message.content.config_records["config"]["server-round"])] = reply
        return reply

    from fedsparse.sparse.wire import decode_values

    def check(rnd, grid, strategy, state):
        masks = {n: m.numpy() for n, m in strategy.mask.items()}
        sent = decode_values(to_numpy(replies[rnd].content.array_records["arrays"]),
                             to_numpy(state.arrays), masks)
        for name, value in to_numpy(state.arrays).items():
            np.testing.assert_array_equal(value, sent[name])

    run(text, check, keep)


def test_a_malformed_signal_rejects_that_client_only():
    from flwr.app import Array, ArrayRecord

    def tamper(message, reply):
        if LocalGrid.partition_of(message) == 1 and "signal" in reply.content.array_records:
            signal = reply.content.array_records["signal"]
            name = next(iter(signal))
            bad = signal[name].numpy().copy()
            bad[0] = np.nan
            reply.content["signal"] = ArrayRecord({**{k: signal[k] for k in signal},
                                                   name: Array(bad)})
        return reply

    _, _, _strategy, _, rows, records = run(tamper=tamper)
    rejected = [r for r in records if r.status == "rejected"]
    assert rejected and all(r.partition_id == 1 and "NaN" in r.reason for r in rejected)
    assert len(rows) == 15 and all(r["clients_ok"] >= 2 for r in rows)


def test_mask_and_signal_survive_a_checkpoint(tdm_run):
    scn, _, strategy, _, _, _ = tdm_run
    restored = build_strategy(scn)
    restored.load_state_arrays(strategy.state_arrays())
    assert restored.mask.equals(strategy.mask)
    assert (restored.signal is None) == (strategy.signal is None)


def test_isolation_freezes_finished_tasks_bit_for_bit():
    text = _dst_text("random").replace("[strategy]\n", "[strategy]\nisolation = true\n", 1)
    finished: dict[int, dict[str, np.ndarray]] = {}
    checked = []

    def check(rnd, grid, strategy, state):
        iso = strategy.isolation
        for j in range(len(iso.task_masks)):
            view = {n: w.numpy().copy() for n, w in iso.task_weights(j).items()}
            finished.setdefault(j, view)
            assert all(np.array_equal(view[n], finished[j][n]) for n in view), (rnd, j)
        weights = to_numpy(state.arrays)
        for name, m in strategy.frozen().items():  # frozen inside the mask: copied exactly
            assert np.array_equal(weights[name][m], iso.store[name].numpy()[m])
            checked.append(int(m.sum()))
        views = strategy.task_views(state.arrays)
        assert sorted(views) == list(range(len(iso.task_masks) + 1))

    scn, grid, strategy, _, rows, _records = run(text, check)
    assert len(strategy.isolation.task_masks) == 4 and len(finished) == 4
    assert sum(checked) > 0  # later masks do overlap earlier ones
    sent = [m for m in grid.sent if "frozen" in m.content.array_records]
    assert sent and all(k.split(".idx.")[0] in strategy.names
                        for m in sent for k in m.content.array_records["frozen"])
    restored = build_strategy(scn)
    restored.load_state_arrays(strategy.state_arrays())
    assert all(a.equals(b) for a, b in zip(restored.isolation.task_masks,
                                            strategy.isolation.task_masks, strict=True))
    assert 0.0 <= rows[-1]["task_il_accuracy"] <= 1.0


def test_isolation_needs_fresh_random_masks():
    with pytest.raises(ScenarioError, match="isolation = true needs mask_update"):
        parse_scenario(TEXT.replace("[strategy]\n", "[strategy]\nisolation = true\n", 1))


@pytest.mark.parametrize(("edits", "message"), [
    ([("freeze_at = 2", "freeze_at = 3")],
     r"strategy\.freeze_at = 3 must be a round of the task after its first, 1 to 2"),
    ([("freeze_at = 2\n", ""), ("rounds_per_task = 3", "rounds_per_task = 1"),
      ("rounds = 15", "rounds = 5")],
     r"strategy\.freeze_at = 0 must be a round of the task after its first"),
    ([("removal_until = 4", "removal_until = 6")], r"every <= until < 6, the epochs of a task"),
    ([("removal_every = 2", "removal_every = 5")],
     r"client\.removal_every = 5 and client\.removal_until = 4 must satisfy"),
])
def test_schedules_that_would_never_fire_are_refused(edits, message):
    text = TEXT
    for old, new in edits:
        text = text.replace(old, new)
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(text)


@pytest.mark.parametrize("rule", ["fedsparse", "release"])
def test_release_skips_replay_in_the_first_task_and_short_last_batches(rule):
    """Three rounds of the first task, 2 epochs each: with SparCL's release behaviour every
    step sees only the current batch and short batches are skipped; with fedsparse's, the
    buffer is replayed (two more batches a step) and every example trains."""
    edits = {"[run]\nrounds = 15": "[run]\nrounds = 3", "num_tasks = 5": "num_tasks = 1",
             "removal_fraction = 0.25": "removal_fraction = 0.0",
             "removal_until = 4": f'removal_until = 4\nfirst_task_replay = "{rule}"\n'
                                  f'partial_batch = "{rule}"'}
    text = TEXT
    for old, new in edits.items():
        text = text.replace(old, new)
    _, grid, _, _, _, records = run(text)
    replies = [m.content.metric_records["metrics"] for m in grid.received
               if "train-examples" in m.content.metric_records.get("metrics", {})]
    assert len(replies) == 9 and all(r.status == "ok" for r in records)
    for metrics in replies:
        n, trained = int(metrics["examples-remaining"]), int(metrics["train-examples"])
        assert n % 16  # a short last batch exists
        if rule == "release":
            assert trained == 2 * (n // 16) * 16
        else:
            assert trained > 2 * n
