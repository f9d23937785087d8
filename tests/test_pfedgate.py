"""pFedGate: block arithmetic, knapsack solvers, gated forward, and the federation through
the real ServerApp loop and ClientApp on an in-process grid (no Ray)."""

from __future__ import annotations

import itertools
import math
import tomllib

import numpy as np
import pytest
import tomli_w
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedsparse.models import build_model
from fedsparse.models.cnn import CNNParams
from fedsparse.personal import (
    BlockPartition,
    GatedLearner,
    GatedModel,
    GatingLayer,
    block_scale,
    exact,
    greedy,
    select_blocks,
)
from fedsparse.scenario import ScenarioError, parse_scenario
from fedsparse.training import batches
from strategies.records import Received, to_numpy
from strategies.server_app import initial_arrays
from tests.conftest import DATA
from tests.local_grid import LocalGrid, run_federation

pytestmark = pytest.mark.usefixtures("flower_task")

TEXT = (DATA / "pfedgate_digits.toml").read_text()


def two_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(10, 100), nn.ReLU(), nn.Linear(100, 3))


# -- blocks, knapsack, selection ----------------------------------------------------------

def test_blocks_follow_the_release_arithmetic():
    model = build_model(CNNParams(channels=[6, 16], hidden=[120, 84]), (1, 28, 28), 10)
    partition = BlockPartition(model, 5)
    for name, param in model.named_parameters():
        sizes = [b.size for b in partition.blocks if b.tensor == name]
        n = param.numel()
        chunk = math.ceil(n / min(5, n))
        assert sizes == [chunk] * (len(sizes) - 1) + [n - chunk * (len(sizes) - 1)]
        assert len(sizes) == math.ceil(n / chunk) and sum(sizes) == n
    bias = [b.size for b in partition.blocks if b.tensor == "0.0.bias"]  # 6 elements
    assert bias == [2, 2, 2]
    assert partition.total == sum(p.numel() for p in model.parameters())
    assert int(partition.first.sum()) == len(list(model.parameters()))
    linear = {b.tensor for b in partition.blocks if b.group == "linear"}
    assert linear == {n for n, _ in model.named_parameters() if not n.startswith("0.")}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10), st.integers(1, 50)), min_size=0, max_size=9),
       st.integers(0, 200))
def test_knapsack_solvers_against_brute_force(items, capacity):
    values = np.array([v for v, _ in items], np.int64)
    sizes = np.array([w for _, w in items], np.int64)
    best = max((int(values[list(c)].sum()) for r in range(len(items) + 1)
                for c in itertools.combinations(range(len(items)), r)
                if sizes[list(c)].sum() <= capacity), default=0)
    for solver in (greedy, exact):
        chosen = solver(values, sizes, capacity)
        assert sizes[chosen].sum() <= capacity  # the budget is never exceeded
    assert values[exact(values, sizes, capacity)].sum() == best
    assert values[greedy(values, sizes, capacity)].sum() <= best
    if len(set(sizes.tolist())) <= 1:  # equal sizes: greedy by value is optimal
        assert values[greedy(values, sizes, capacity)].sum() == best


@pytest.mark.parametrize("budget, rule, kept", [
    (1.0, "exact", 1.0), (0.5, "exact", 0.4), (0.9, "exact", 0.8), (0.25, "exact", 0.2),
    (0.5, "release", 0.4), (0.9, "release", 0.6), (1.0, "release", 1.0)])
def test_selected_density_follows_the_block_arithmetic(budget, rule, kept):
    """One linear weight of 1000 entries in 5 blocks of 200 (+ a 100-entry bias, 5 x 20):
    exact: kept <= floor(s * 1000); release: first block + round((s - s_min) * 800)."""
    model = nn.Sequential(nn.Linear(10, 100, bias=False))
    partition = BlockPartition(model, 5)
    importance = np.full(len(partition), 5)
    keep = select_blocks(partition, importance, budget, rule=rule, s_min=min(0.2, budget))
    assert partition.kept_fraction(keep) == pytest.approx(kept)
    assert bool(keep[partition.first].all())


@pytest.mark.parametrize("solver", ["greedy", "exact"])
def test_selection_stays_within_the_budget_per_group(solver):
    model = build_model(CNNParams(channels=[6, 16], hidden=[120, 84]), (1, 28, 28), 10)
    partition = BlockPartition(model, 5)
    rng = np.random.default_rng(0)
    for budget in (0.05, 0.1, 0.3, 0.5, 0.8):
        keep = select_blocks(partition, rng.integers(0, 11, len(partition)), budget, solver)
        for group in ("linear", "other"):
            members = partition.group(group)
            cap = math.floor(budget * int(partition.sizes[members].sum()))
            first = int(partition.sizes[members & partition.first].sum())
            kept = int(partition.sizes[keep & members].sum())
            if first <= cap:
                assert first <= kept <= cap
            else:  # below the first blocks' share (about 1/B) only they are kept
                assert bool((keep & members == members & partition.first).all())


# -- gated model --------------------------------------------------------------------------

def test_full_budget_with_fixed_gates_is_the_plain_model():
    model = two_layer()
    gated = GatedModel(model, BlockPartition(model, 5), 1.0, gating=None)
    x = torch.randn(7, 10)
    assert torch.equal(gated.forward(x).logits, model(x))


def test_kept_blocks_are_scaled_by_their_gates_and_dropped_blocks_get_no_gradient():
    model = two_layer()
    partition = BlockPartition(model, 5)
    gating = GatingLayer((10,), len(partition))
    gated = GatedModel(model, partition, 0.4, gating=gating)
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    batch = gated.forward(x)
    assert bool((batch.gates >= gated.s_min).all())
    assert batch.density <= 0.4
    scale = partition.expand(batch.keep.float() * batch.gates)
    manual = torch.func.functional_call(
        model, {n: p * scale[n] for n, p in model.named_parameters()}, (x,))
    torch.testing.assert_close(batch.logits, manual)
    nn.functional.cross_entropy(batch.logits, y).backward()
    dropped = partition.expand((~batch.keep).float())
    for name, p in model.named_parameters():
        assert not p.grad[dropped[name].bool()].any()
    assert gating.linear.weight.grad.abs().sum() > 0  # the selection trains end to end


def test_block_scale_values_and_gradients_of_both_rules():
    s_min, keep = 0.1, torch.tensor([1.0, 1.0, 0.0])

    def scale_and_grads(rule, separate=False, budget=0.5):
        g = torch.tensor([0.05, 0.3, 0.8], requires_grad=True)
        t = torch.tensor([0.5, 0.6, 0.7], requires_grad=True) if separate else g
        scale = block_scale(g, t, keep, s_min, rule, budget)
        scale.sum().backward()
        return scale.detach(), g.grad, t.grad if separate else None

    value, grad, _ = scale_and_grads("fedsparse")  # clipped value, gradient straight through
    torch.testing.assert_close(value, torch.tensor([0.1, 0.3, 0.0]))
    torch.testing.assert_close(grad, torch.tensor([1.0, 1.0, 0.0]))
    value, grad, _ = scale_and_grads("release")  # the unclipped gate, 1 + g above s_min
    torch.testing.assert_close(value, torch.tensor([0.05, 0.3, 0.0]))
    torch.testing.assert_close(grad, torch.tensor([1.0, 1.3, 0.0]))
    value, grad, trans = scale_and_grads("release", separate=True)  # t scales, g picks
    torch.testing.assert_close(value, torch.tensor([0.5, 0.6, 0.0]))
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.6, 0.0]))  # the clip stops g < s_min
    torch.testing.assert_close(trans, torch.tensor([1.0, 1.0, 0.0]))
    value, grad, _ = scale_and_grads("release", budget=1.0)  # no selection, no mask at s = 1
    torch.testing.assert_close(value, torch.tensor([0.05, 0.3, 0.0]))
    torch.testing.assert_close(grad, torch.tensor([1.0, 1.0, 0.0]))


def test_release_gradient_and_seperate_trans_in_the_gated_model():
    model = two_layer()
    partition = BlockPartition(model, 5)
    x = torch.randn(16, 10)
    torch.manual_seed(3)
    gating = GatingLayer((10,), len(partition), seperate_trans=True)
    assert torch.equal(gating.trans[0].weight, gating.linear.weight)  # a copy, as released
    with pytest.raises(ValueError, match='seperate_trans needs gate_gradient = "release"'):
        GatedModel(model, partition, 0.4, gating=gating)
    gated = GatedModel(model, partition, 0.4, gating=gating, gradient="release")
    with torch.no_grad():  # heads that have trained apart
        gating.trans[0].weight.mul_(3.0)
    batch = gated.forward(x)
    g, t = gated.gates(x)  # batch statistics in training mode: the same scores again
    scale = partition.expand(batch.keep.float() * t.detach())  # scaled by the second head
    manual = torch.func.functional_call(
        model, {n: p * scale[n] for n, p in model.named_parameters()}, (x,))
    torch.testing.assert_close(batch.logits, manual)
    assert not torch.equal(t, g)
    nn.functional.cross_entropy(batch.logits, torch.randint(0, 3, (16,))).backward()
    assert gating.linear.weight.grad.abs().sum() > 0  # the gates train through the selection
    assert gating.trans[0].weight.grad.abs().sum() > 0  # and so do the scales


def test_gated_training_learns_and_reports_truthful_density():
    torch.manual_seed(1)
    x = torch.randn(256, 10)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = two_layer()
    partition = BlockPartition(model, 5)
    learner = GatedLearner(GatedModel(model, partition, 0.5,
                                      gating=GatingLayer((10,), len(partition))),
                           lr=0.1, lr_gating=0.1, momentum=0.9, weight_decay=5e-4,
                           grad_clip=10.0)
    before = learner.evaluate(x, y, 32)[1]
    stats = learner.fit(x, y, batches(256, 32, torch.Generator().manual_seed(0)), 200)
    after = learner.evaluate(x, y, 32)[1]
    assert after > before + 0.2  # half the parameters in 5 contiguous chunks per tensor
    assert 0.2 <= stats.density <= 0.5
    assert partition.kept_fraction(stats.active) >= stats.density - 1e-9
    few = x[[1, 2, 0]]  # test batches of 2 and 1 examples
    density = learner.evaluate(few, y[[1, 2, 0]], 2)[2]
    learner.gated.train(False)
    with torch.no_grad():
        pair, single = (learner.gated.forward(batch).density for batch in (few[:2], few[2:]))
    assert pair != single  # the two batches' gates select differently
    assert density == pytest.approx((2 * pair + single) / 3, abs=1e-12)  # per example


# -- the federation -----------------------------------------------------------------------

def run(text: str = TEXT, tamper=None):
    f = run_federation(parse_scenario(text), tamper)
    return f.scenario, f.grid, f.strategy, f.state, f.rows, f.records


@pytest.fixture(scope="module")
def federation():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    return run()


def test_gating_layers_and_optimiser_state_never_leave_the_client(federation):
    scn, grid, strategy, _, _, records = federation
    model_names = set(to_numpy(initial_arrays(scn)))
    for message in grid.sent:
        for record in message.content.array_records.values():
            assert set(record) <= model_names  # down: the base model only
    for reply in grid.received:
        for name, record in reply.content.array_records.items():
            assert name == "update"
            assert set(record) - {"values"} <= {f"blocks.idx.{s}"
                                               for s in ("plain", "delta", "bitmap")}
    trained = {r.partition_id for r in records if r.phase == "train"}
    for pid in trained:
        state = held(grid, strategy, pid)
        assert "pfedgate-gating" in state and "pfedgate-momentum" in state


def test_uplink_holds_only_the_blocks_used(federation):
    scn, _, _strategy, _, rows, records = federation
    dense = sum(a.nbytes for a in to_numpy(initial_arrays(scn)).values())
    train = [r for r in records if r.phase == "train"]
    assert all(r.status == "ok" for r in train)
    for record in train:
        expected = record.metrics["active-density"] * dense  # float32 values
        assert expected <= record.uplink_bytes <= expected + 16  # + the block ids
        assert record.metrics["active-density"] <= 1.0
        assert record.metrics["density"] <= 0.5
    assert all(row["uplink_bytes"] < row["clients_ok"] * dense for row in rows)


def test_state_survives_rounds_and_novel_clients_join_at_the_end(federation):
    scn, grid, strategy, _, rows, records = federation
    novel = scn.data.num_clients - 1
    assert all(r.partition_id != novel for r in records if r.phase != "novel")
    novel_records = [r for r in records if r.phase == "novel"]
    assert [r.partition_id for r in novel_records] == [novel]
    assert novel_records[0].status == "ok"
    assert 0 <= rows[-1]["novel_accuracy_mean"] <= 1
    assert not held(grid, strategy, novel)  # its fit served that evaluation, nothing kept
    assert "fed_accuracy_bottom10" in rows[-1]
    assert rows[-1]["fed_accuracy_bottom10"] <= rows[-1]["fed_accuracy_mean"]
    twice = [pid for pid in range(novel)
             if sum(r.partition_id == pid for r in records
                    if r.phase == "train") >= 2]
    assert twice  # some client trained in two rounds: its momentum was restored in between
    momentum = held(grid, strategy, twice[0])["pfedgate-momentum"]
    assert any(k.startswith("gating/") for k in momentum)


def held(grid: LocalGrid, strategy, pid: int) -> dict:
    """Client ``pid``'s state as of the server's last commit of its updates."""
    return grid.client_state(pid, strategy.accepted_round.get(pid, 0))


def edited(**sections: dict) -> str:
    """TEXT with whole sections replaced."""
    tree = tomllib.loads(TEXT)
    tree.update(sections)
    return tomli_w.dumps(tree)


def test_full_budget_with_fixed_gates_is_fedavg():
    common = {"lr": 0.05, "batch_size": 16, "local_epochs": 1, "momentum": 0.5}
    sampling = {"fraction_train": 0.6, "fraction_evaluate": 0.0}
    run_spec = {"rounds": 1, "eval_every": 1}
    fedavg = edited(strategy={"name": "fedavg", **sampling},
                    client={"program": "sgd", **common}, run=run_spec)
    gated = edited(strategy={"name": "pfedgate", **sampling},
                   client={"program": "pfedgate", **common, "weight_decay": 0.0,
                           "grad_clip": 0.0, "gates": "fixed", "budget": 1.0}, run=run_spec)
    first, second = to_numpy(run(fedavg)[3].arrays), to_numpy(run(gated)[3].arrays)
    assert first.keys() == second.keys()
    for name, value in first.items():
        np.testing.assert_array_equal(value, second[name])


def test_all_client_weighting_moves_theta_by_the_sampled_share():
    """``theta_1 = theta_0 + sum_i (n_i / n) (theta_i - theta_0)``, ``n`` over all five
    training clients, the sum over the sampled ones (ALGORITHMS.md §2.4.3)."""
    sent = {}

    def keep(message, reply):
        if "update" in reply.content.array_records:
            sent[LocalGrid.partition_of(message)] = reply.content
        return reply

    scn, _, strategy, state, _, _records = run(TEXT.replace(
        "novel_clients = 1", 'novel_clients = 1\naggregation = "all_clients"').replace(
        "rounds = 3", "rounds = 1").replace("eval_every = 3", "eval_every = 1"), keep)
    assert sorted(strategy.data_sizes) == list(range(5))
    theta0, theta1 = to_numpy(initial_arrays(scn)), to_numpy(state.arrays)
    assert 0 < len(sent) < 5
    strategy.current = theta0  # decode the replies against the model they trained from
    n = sum(strategy.data_sizes.values())
    for name in theta0:
        step = sum(strategy.data_sizes[pid] / n
                   * (strategy.check_train_reply(Received(content))[name].astype(np.float64)
                      - theta0[name]) for pid, content in sent.items())
        np.testing.assert_allclose(theta1[name], theta0[name] + step, rtol=0, atol=1e-6)
    assert any(not np.array_equal(theta1[name], theta0[name]) for name in theta0)


def test_a_malformed_update_rejects_that_client_only():
    from flwr.app import Array

    def tamper(message, reply):
        if "update" in reply.content.array_records and LocalGrid.partition_of(message) == 1:
            values = reply.content.array_records["update"]["values"].numpy()
            reply.content.array_records["update"]["values"] = Array(values[:-1].copy())
        return reply

    _, _, _strategy, _, rows, records = run(TEXT.replace("rounds = 3", "rounds = 2"), tamper)
    rejected = [r for r in records if r.status == "rejected"]
    assert rejected and all(r.partition_id == 1 for r in rejected)
    assert "values: length" in rejected[0].reason
    assert all(row["clients_ok"] >= 1 for row in rows)


class BatchNormCNN(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Flatten())
        self.head = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize("strategy", ["pfedgate", "fedavg"])
def test_models_with_buffers_train_and_keep_their_dtypes(strategy, monkeypatch):
    from fedsparse.registry import MODELS, Entry, PluginParams

    class Params(PluginParams):
        name: str = "bn_cnn"

    # Registered for this test only: other tests list the registry's names.
    build = lambda params, shape, classes: BatchNormCNN(classes)  # noqa: E731
    monkeypatch.setitem(MODELS._entries, "bn_cnn", Entry("bn_cnn", Params, build))
    client = {"program": "sgd", "lr": 0.05, "batch_size": 16} if strategy == "fedavg" else \
        tomllib.loads(TEXT)["client"]
    f = run(edited(model={"name": "bn_cnn"}, strategy={"name": strategy, "fraction_train": 0.6},
                   client=client, run={"rounds": 2, "eval_every": 2}))
    assert all(r.status == "ok" for r in f[5])
    final = to_numpy(f[3].arrays)
    counter = final["body.1.num_batches_tracked"]
    assert counter.shape == () and counter.dtype == np.int64 and counter > 0
    assert final["body.1.running_var"].dtype == np.float32


def test_budgets_per_client_and_drawn_from_levels():
    from clients.programs.pfedgate import PFedGateParams

    listed = TEXT.replace("budget = 0.5", "budget = [0.3, 0.5, 1.0, 0.5, 0.3, 0.5]")
    assert parse_scenario(listed).client.budget_of(2, 5) == 1.0
    with pytest.raises(ScenarioError, match=r"client\.budget lists 2 values"):
        parse_scenario(TEXT.replace("budget = 0.5", "budget = [0.3, 0.5]"))
    with pytest.raises(ScenarioError, match=r"must be in \(0, 1\]"):
        parse_scenario(TEXT.replace("budget = 0.5", "budget = 1.5"))
    with pytest.raises(ScenarioError, match=r'finetune = "gating" needs a gating layer'):
        parse_scenario(TEXT.replace("budget = 0.5", 'budget = 0.5\ngates = "fixed"\n'
                                                    'finetune_epochs = 1\nfinetune = "gating"'))
    with pytest.raises(ScenarioError, match=r'client\.seperate_trans = true needs '
                                            r'client\.gate_gradient = "release"'):
        parse_scenario(TEXT.replace("budget = 0.5", "budget = 0.5\nseperate_trans = true"))
    released = parse_scenario(TEXT.replace("budget = 0.5", 'budget = 0.5\nseperate_trans = '
                                                           'true\ngate_gradient = "release"'))
    assert (released.client.seperate_trans, released.client.gate_gradient) == (True, "release")
    levels = PFedGateParams(budget={"levels": [0.3, 1.0], "weights": [1, 1]})
    drawn = [levels.budget_of(pid, seed=0) for pid in range(40)]
    assert set(drawn) == {0.3, 1.0}
    assert drawn == [levels.budget_of(pid, seed=0) for pid in range(40)]


@pytest.mark.parametrize("finetune", ["gating", "all"])
def test_finetuning_before_evaluation_changes_the_evaluation_only(federation, finetune):
    _, grid, strategy, state, rows, _records = federation
    _, tuned_grid, tuned_strategy, tuned_state, tuned_rows, _records = run(TEXT.replace(
        "budget = 0.5", f'budget = 0.5\nfinetune_epochs = 1\nfinetune = "{finetune}"'))
    for name, value in to_numpy(state.arrays).items():  # the same training ...
        np.testing.assert_array_equal(value, to_numpy(tuned_state.arrays)[name])
    for pid in range(6):
        kept, tuned_kept = held(grid, strategy, pid), held(tuned_grid, tuned_strategy, pid)
        assert kept.keys() == tuned_kept.keys()
        for key in kept:
            for name, array in kept[key].items():
                np.testing.assert_array_equal(array, tuned_kept[key][name])
    # ... and the clients evaluate after tuning
    assert rows[-1]["fed_loss_weighted"] != tuned_rows[-1]["fed_loss_weighted"]


def test_novel_clients_fit_their_gates_only_and_are_never_finetuned(federation):
    """With ``novel_steps = 0`` a novel client evaluates the global model behind its untrained
    gating layer, whether or not the other clients fine-tune before they evaluate; with
    ``novel_steps = 3`` (the fixture) it fits its gates first."""
    plain = TEXT.replace("novel_steps = 3", "novel_steps = 0")
    rows = run(plain)[4]
    assert rows[-1]["novel_loss_weighted"] != federation[4][-1]["novel_loss_weighted"]
    tuned = run(plain.replace("budget = 0.5", "budget = 0.5\nfinetune_epochs = 1"))[4]
    assert rows[-1]["novel_loss_weighted"] == tuned[-1]["novel_loss_weighted"]
    assert rows[-1]["fed_loss_weighted"] != tuned[-1]["fed_loss_weighted"]
