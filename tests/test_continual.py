"""Continual learning core (fedsparse/continual): streams, metrics, buffer, learners, and
SparCL's TDM / DGM / DDR plugins, each against its invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsparse.continual import (
    DERPP,
    DataRemoval,
    GradientMasking,
    Naive,
    Replay,
    ReservoirBuffer,
    SparseHooks,
    TaskStream,
    TDMSchedule,
    average_accuracy,
    backward_transfer,
    class_order,
    empty_matrix,
    forgetting,
    removal_counts,
    task_accuracies,
    tdm_update,
    train_epochs,
)
from fedsparse.data import load_dataset
from fedsparse.metrics.sparse_flops import SparseFlops
from fedsparse.sparse import Mask, keep_count, sparse_parameters, uniform_densities


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    x, y = data.features(data.x_train), data.labels(data.y_train)
    xt, yt = data.features(data.x_test), data.labels(data.y_test)
    return x, y, xt, yt


def test_task_stream_splits_classes_in_a_seeded_order():
    assert TaskStream.split(class_order(10, None), 2, 5).tasks == (
        (0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    assert class_order(10, 3) == class_order(10, 3) != class_order(10, 4)
    stream = TaskStream.split(class_order(10, 3), 2, 5)
    assert sorted(c for t in stream.tasks for c in t) == list(range(10))
    with pytest.raises(ValueError, match="6 tasks x 2 classes need 12"):
        TaskStream.split(range(10), 2, 6)


def test_cl_metrics_on_a_hand_made_matrix():
    r = np.array([[0.9, np.nan, np.nan], [0.6, 0.8, np.nan], [0.5, 0.7, 0.95]])
    assert average_accuracy(r, 2) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert forgetting(r, 2) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert backward_transfer(r, 2) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert forgetting(r, 0) == 0.0 and np.isnan(empty_matrix(3)).all()


def test_task_il_accuracy_is_at_least_class_il(digits):
    _, _, xt, yt = digits
    stream = TaskStream.split(range(10), 2, 5)
    model = mlp()
    class_il = task_accuracies(model, xt, yt, stream, task_il=False)
    task_il = task_accuracies(model, xt, yt, stream, task_il=True)
    assert all(t >= c for t, c in zip(task_il, class_il, strict=True))
    assert min(task_il) > 0.0


def test_reservoir_keeps_every_example_with_equal_chance():
    hits = torch.zeros(100)
    for seed in range(400):
        buffer = ReservoirBuffer(10, (1,), 2)
        x = torch.arange(100.0).view(100, 1)
        buffer.add(x, torch.zeros(100, dtype=torch.int64), torch.zeros(100, 2),
                   torch.Generator().manual_seed(seed))
        assert len(buffer) == 10 and buffer.seen == 100
        hits[buffer.examples[:, 0].long()] += 1
    rate = hits / 400
    assert rate.mean() == pytest.approx(0.1)
    assert rate[:50].mean() == pytest.approx(0.1, abs=0.02)  # early items are not favoured
    restored = ReservoirBuffer(10, (1,), 2)
    restored.load(buffer.state())
    assert torch.equal(restored.examples, buffer.examples) and restored.seen == 100


def test_tdm_schedule_of_the_release():
    schedule = TDMSchedule(0.75)
    assert schedule.bounds(0) == (0.75, 0.74)
    assert schedule.bounds(5) == (0.76, 0.75) and schedule.bounds(40) == (0.76, 0.75)
    assert schedule.bounds(45) == (0.75, 0.75)
    assert schedule.bounds(3) is None and schedule.bounds(50) is None


def test_tdm_update_hits_the_scheduled_density_and_zeroes_outside(digits):
    model = mlp()
    params = sparse_parameters(model)
    mask = Mask.magnitude(params, uniform_densities({n: p.shape for n, p in params.items()}, 0.25))
    mask.apply(params)
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    schedule = TDMSchedule(0.75, update_every=2, freeze_at=6)
    for epoch in range(8):
        bounds = schedule.bounds(epoch)
        if bounds is None:
            continue
        mask = tdm_update(mask, params, grads, *bounds, lam=0.5,
                          generator=torch.Generator().manual_seed(epoch))
        for m in mask.masks.values():
            assert int(m.sum()) == keep_count(m.numel(), 1 - bounds[1])
        assert mask.outside_is_zero(params)


def test_tdm_keeps_the_most_important_weights():
    w = {"w": torch.tensor([[0.1, -0.5, 0.2, 0.0, 0.3, -0.05]])}
    g = {"w": torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])}
    mask = Mask({"w": torch.tensor([[True, True, True, False, True, True]])})
    new = tdm_update(mask, w, g, lower=0.5, upper=0.5, lam=0.5,
                     generator=torch.Generator().manual_seed(0))
    # importance |w| + 0.5|g|: 0.6, 0.5, 0.2, -, 0.3, 0.05 -> keep positions 0, 1, 4
    assert new["w"].tolist() == [[True, True, False, False, True, False]]
    assert torch.equal(w["w"], torch.tensor([[0.1, -0.5, 0.0, 0.0, 0.3, 0.0]]))


def test_weights_outside_the_mask_stay_zero_after_every_step(digits):
    x, y, _, _ = digits
    model = mlp()
    params = sparse_parameters(model)
    mask = Mask.magnitude(params, uniform_densities({n: p.shape for n, p in params.items()}, 0.1))
    mask.apply(params)
    hooks = SparseHooks(params, mask, GradientMasking(0.05, every=3))
    learner = Naive(model, lr=0.1, hooks=hooks)
    observe = learner.observe
    checked = []

    def checked_observe(xb, yb):
        step = observe(xb, yb)
        density = pytest.approx(0.1, abs=1e-3)
        checked.append(mask.outside_is_zero(params) and mask.density() == density)
        return step

    learner.observe = checked_observe
    train_epochs(learner, hooks, x[:256], y[:256], [0, 1], batch_size=32,
                 generator=torch.Generator().manual_seed(0),
                 flops=SparseFlops(model, (1, 8, 8), list(params)))
    assert len(checked) == 16 and all(checked)


def test_dgm_keeps_the_configured_gradient_density_and_reuses_its_mask():
    model = mlp()
    params = sparse_parameters(model)
    mask = Mask.magnitude(params, uniform_densities({n: p.shape for n, p in params.items()}, 0.5))
    dgm = GradientMasking(0.2, every=3)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    stored = None
    for batch in range(4):
        model.zero_grad()
        nn.functional.cross_entropy(model(x + batch), y).backward()
        dgm(params, mask, batch)
        for name, p in params.items():
            assert int(dgm.masks[name].sum()) == keep_count(p.numel(), 0.2)
            assert not p.grad[~dgm.masks[name]].any()
            assert not p.grad[~mask[name]].any()
        if batch == 0:
            stored = {n: m.clone() for n, m in dgm.masks.items()}
        if batch in (1, 2):
            assert all(torch.equal(dgm.masks[n], stored[n]) for n in stored)
    assert not all(torch.equal(dgm.masks[n], stored[n]) for n in stored)  # recomputed at 3


def test_dgm_never_opens_pruned_positions():
    """A gradient density above the weight density: the stored mask stays inside the weight
    mask, so the minibatches that reuse it give pruned weights no gradient either."""
    model = mlp()
    params = sparse_parameters(model)
    mask = Mask.magnitude(params, uniform_densities({n: p.shape for n, p in params.items()}, 0.1))
    dgm = GradientMasking(0.3, every=3)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    for batch in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(x + batch), y).backward()
        dgm(params, mask, batch)
        for name, p in params.items():
            assert not (dgm.masks[name] & ~mask[name]).any()
            assert not p.grad[~mask[name]].any()


def test_ddr_removes_the_scheduled_counts_at_the_scheduled_epochs():
    assert removal_counts(1000, 0.3, every=5, until=20) == {5: 75, 10: 75, 15: 75, 20: 75}
    assert removal_counts(10, 0.3, every=1, until=2) == {1: 2, 2: 1}
    ddr = DataRemoval(10, fraction=0.3, every=1, until=2, max_count=99)
    # examples 0..9; example 3 forgets twice, 7 once, 9 is never correct, the rest never forget
    pattern = {3: [1, 0, 1, 0], 7: [1, 0, 1, 1], 9: [0, 0, 0, 0]}
    for presentation in range(4):
        correct = torch.tensor([pattern.get(i, [1] * 4)[presentation] for i in range(10)]).bool()
        ddr.record(torch.arange(10), correct)
    assert ddr.remove(0) == 0 and len(ddr.kept) == 10
    assert ddr.counts()[[3, 7, 9]].tolist() == [2, 1, 99]
    assert ddr.remove(1) == 2
    assert ddr.kept.tolist() == [2, 3, 4, 5, 6, 7, 8, 9]  # ties: lowest indices go first
    assert ddr.remove(2) == 1 and ddr.kept.tolist() == [3, 4, 5, 6, 7, 8, 9]
    assert ddr.remove(3) == 0


def test_ddr_release_split_removes_int_of_remove_n_over_the_events_at_each():
    assert removal_counts(1000, 0.3, 5, 20, "release") == {5: 75, 10: 75, 15: 75, 20: 75}
    assert removal_counts(10, 0.3, 1, 2, "release") == {1: 1, 2: 1}  # the remainder stays
    # 2 removal epochs (5, 10) but until / every = 2.4: int(30 / 2.4) = 12 at each
    assert removal_counts(100, 0.3, 5, 12, "release") == {5: 12, 10: 12}
    assert removal_counts(100, 0.3, 5, 12) == {5: 15, 10: 15}
    ddr = DataRemoval(100, fraction=0.3, every=5, until=12, max_count=9, split="release")
    assert ddr.remove(10) == 24 and len(ddr.kept) == 76


def test_replay_off_for_a_task_trains_on_the_current_batch_only():
    torch.manual_seed(0)
    model = mlp()
    buffer = ReservoirBuffer(50, (1, 8, 8), 10)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    buffer.add(x, y, torch.randn(8, 10), torch.Generator().manual_seed(0))
    learner = DERPP(model, buffer, lr=0.0, cl_mask=False)
    learner.begin_task(torch.ones(10, dtype=torch.bool), replay=False)
    step = learner.observe(x, y)
    assert step.examples == 8
    with torch.no_grad():
        assert step.loss == pytest.approx(float(nn.functional.cross_entropy(model(x), y)))
    learner.begin_task(torch.ones(10, dtype=torch.bool))
    assert learner.observe(x, y).examples == 24  # + two buffer batches


def test_drop_last_skips_the_short_minibatch_of_each_epoch():
    model = mlp()
    params = sparse_parameters(model)
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    flops = SparseFlops(model, (1, 8, 8), list(params))
    for drop_last, steps, examples in ((False, 6, 20), (True, 4, 16)):
        result = train_epochs(Naive(model, lr=0.01), SparseHooks(params), x, y, range(2),
                              batch_size=4, generator=torch.Generator().manual_seed(0),
                              flops=flops, drop_last=drop_last)
        assert (result.steps, result.examples) == (steps, examples)


def test_ddr_catches_up_on_removal_epochs_it_did_not_train():
    """A federated client sampled in no round that holds epoch 1 or 2 removes both epochs'
    examples at the next epoch it trains."""
    ddr = DataRemoval(10, fraction=0.3, every=1, until=2, max_count=99)
    ddr.record(torch.arange(10), torch.ones(10, dtype=torch.bool))
    assert ddr.remove(0) == 0
    assert ddr.remove(4) == 3 and len(ddr.kept) == 7
    assert ddr.remove(5) == 0 and len(ddr.kept) == 7


def test_sparse_flops_scale_each_product_by_its_density():
    model = mlp()
    params = sparse_parameters(model)
    flops = SparseFlops(model, (1, 8, 8), list(params))
    f1, f2 = 2 * 64 * 128, 2 * 128 * 10  # forward FLOPs per example of the two layers
    assert flops.dense == f1 + f1 + f2 + 2 * f2  # first layer: no input gradient
    assert flops.layers["1.weight"].input_grad == 0 and flops.layers["3.weight"].input_grad == f2
    d_w = {"1.weight": 0.1, "3.weight": 0.5}
    d_g = {"1.weight": 0.05, "3.weight": 0.25}
    expected = f1 * 0.1 + f1 * 0.05 + f2 * 0.5 + f2 * 0.5 + f2 * 0.25
    assert flops.per_example(d_w, d_g) == round(expected)
    assert flops.per_example({n: 1.0 for n in d_w}, {n: 1.0 for n in d_w}) == flops.dense


def _class_il_run(learner_kind: str, digits) -> tuple[float, float]:
    x, y, xt, yt = digits
    stream = TaskStream.split(range(10), 2, 5)
    model = mlp(1)
    params = sparse_parameters(model)
    hooks = SparseHooks(params)
    generator = torch.Generator().manual_seed(0)
    flops = SparseFlops(model, (1, 8, 8), list(params))
    buffer = ReservoirBuffer(200, (1, 8, 8), 10)
    matrix = empty_matrix(5)
    common = {"lr": 0.05, "hooks": hooks, "generator": generator}
    for task in range(5):
        learner = {"naive": lambda: Naive(model, **common),
                   "er": lambda: Replay(model, buffer, **common),
                   "derpp": lambda: DERPP(model, buffer, alpha=0.3, beta=1.0, **common)
                   }[learner_kind]()
        learner.begin_task(stream.logit_mask(task, 10))
        idx = stream.select(y, task)
        train_epochs(learner, hooks, x[idx], y[idx], range(5), batch_size=16,
                     generator=generator, flops=flops)
        matrix[task] = task_accuracies(model, xt, yt, stream, task_il=False)
    return average_accuracy(matrix, 4), forgetting(matrix, 4)


def test_rehearsal_forgets_less_than_naive_fine_tuning(digits):
    naive_acc, naive_forgetting = _class_il_run("naive", digits)
    er_acc, _ = _class_il_run("er", digits)
    derpp_acc, derpp_forgetting = _class_il_run("derpp", digits)
    assert derpp_forgetting < naive_forgetting - 0.2
    assert derpp_acc > naive_acc + 0.2 and er_acc > naive_acc + 0.1
