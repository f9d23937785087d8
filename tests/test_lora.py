"""Sparse federated LoRA: peft adapters on a tiny random BERT, FLASC's sparse communication,
SoRA's gates and rank pruning, the exported adapter, and the text data (chatterbot topics)."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest
import tomli_w
import torch
from torch import nn

from fedsparse.compress.base import count
from fedsparse.data import available, client_data, held_out_set, load_dataset
from fedsparse.data.text import deduplicate
from fedsparse.lora.flasc import scheduled_density, sparsifier
from fedsparse.lora.model import LoRAClassifier, LoRAModelParams, base_model, classify
from fedsparse.lora.sora import (
    RankLayout,
    l1_penalty,
    release_threshold,
    soft_threshold,
    threshold,
)
from fedsparse.lora.training import GateRule, parameter_groups, train_adapter
from fedsparse.models import load_shared_state, scenario_model, shared_state
from fedsparse.protocol import SORA_RULE, derive_seed
from fedsparse.scenario import ScenarioError, parse_scenario
from fedsparse.training import cross_entropy, evaluate, num_steps
from strategies.records import to_numpy
from strategies.server_app import export_adapter, initial_arrays
from tests.conftest import DATA
from tests.local_grid import run_federation

pytestmark = [pytest.mark.usefixtures("flower_task"),
              pytest.mark.skipif(not available("chatterbot_en"),
                                 reason="chatterbot-corpus or the MiniLM tokenizer missing")]

TEXT = (DATA / "lora_tiny.toml").read_text()


def scenario(**sections: dict):
    tree = tomllib.loads(TEXT)
    for name, values in sections.items():
        tree[name].update(values)
    return parse_scenario(tomli_w.dumps(tree))


def tiny(sora: bool = False, rank: int = 4, gate_init: str = "normal") -> LoRAClassifier:
    torch.manual_seed(0)
    return LoRAClassifier(LoRAModelParams(base="tiny_bert", rank=rank, alpha=8.0, sora=sora,
                                          sora_gate_init=gate_init), 5)


def tokens(n: int = 6) -> torch.Tensor:
    x = torch.randint(1000, 2000, (n, 12), generator=torch.Generator().manual_seed(1))
    x[:, 9:] = 0  # padding
    return x


# -- text data ----------------------------------------------------------------------------

def test_texts_are_deduplicated_before_the_split():
    rows = [("english", "a", "Hello  there"), ("english", "a", "hello there"),
            ("english", "b", "Same"), ("english", "c", "same"), ("english", "b", "other")]
    assert deduplicate(rows) == [("english", "a", "Hello  there"), ("english", "b", "other")]
    data = load_dataset("chatterbot_en")
    train = {tuple(row) for row in data.x_train.tolist()}
    assert not any(tuple(row) in train for row in data.x_test.tolist())
    assert data.num_classes == len(data.classes) == 15
    assert data.x_train.dtype == np.int64 and data.x_train.shape[1] == 48
    share = np.bincount(data.y_test, minlength=15) / np.bincount(data.y_train, minlength=15)
    assert np.allclose(share, 0.25, atol=0.05)  # stratified 80/20


def test_natural_split_is_one_client_per_language():
    data = load_dataset("chatterbot")
    spec = parse_scenario(TEXT.replace('dataset = "chatterbot_en"', 'dataset = "chatterbot"')
                          .replace("num_clients = 4", f"num_clients = {len(data.group_names)}")
                          .replace('partition = "dirichlet"\nalpha = 1.0', 'partition = "natural"')
                          ).data
    english = data.group_names.index("english")
    local = client_data(spec, 0, english)
    assert len(local.x_train) + len(local.x_test) == int((data.groups == english).sum())
    with pytest.raises(ScenarioError, match=r"data\.num_clients must be 27"):
        parse_scenario(TEXT.replace('dataset = "chatterbot_en"', 'dataset = "chatterbot"')
                       .replace('partition = "dirichlet"\nalpha = 1.0', 'partition = "natural"'))


# -- model, SoRA --------------------------------------------------------------------------

def test_only_adapters_head_and_gates_are_shared():
    model = tiny(sora=True)
    shared = shared_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(shared) == trainable
    assert all(".lora_" in n or "classifier" in n or n.startswith("gates.") for n in shared)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sum(v.numel() for v in shared.values()) < frozen / 50


def test_soft_threshold_zeroes_small_gates_exactly():
    g = torch.tensor([-1.0, -0.2, 0.0, 0.1, 0.3, 2.0])
    out = soft_threshold(g, 0.25)
    torch.testing.assert_close(out, torch.tensor([-0.75, 0.0, 0.0, 0.0, 0.05, 1.75]))
    assert (out[1:4] == 0).all()


def test_release_threshold_zeroes_below_twice_xi_and_shrinks_the_rest_by_xi():
    g = torch.tensor([-1.0, -0.45, -0.2, 0.0, 0.1, 0.3, 0.5, 0.55, 2.0])
    torch.testing.assert_close(threshold(g, 0.25, "paper"), soft_threshold(g, 0.25))
    # (xi, 2 xi) is shrunk into (0, xi) by the first line and zeroed by the third; 2 xi stays
    torch.testing.assert_close(threshold(g, 0.25, "release"),
                               torch.tensor([-0.75, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 0.3, 1.75]))
    r = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    expected = torch.where(r.abs() < 0.5, 0.0, r - 0.25 * torch.sign(r))
    torch.testing.assert_close(release_threshold(r, 0.25), expected)
    assert int((threshold(r, 0.25, "release") != 0).sum()) < int((soft_threshold(r, 0.25) != 0)
                                                                  .sum())
    with pytest.raises(ValueError, match="SoRA threshold rule 'soft'; allowed: paper, release"):
        threshold(g, 0.25, "soft")


def test_topk_count_release_keeps_int_of_d_times_n():
    v = np.array([5.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.25], np.float32)
    rng = np.random.default_rng(0)
    for rule, kept in (("fedsparse", [5.0, -4.0, 3.0, -2.0]), ("release", [5.0, -4.0, 3.0])):
        out = sparsifier(0.5, topk_count=rule).decompress(
            sparsifier(0.5, topk_count=rule).compress(v, rng), v.size)
        np.testing.assert_array_equal(out, np.r_[kept, np.zeros(v.size - len(kept))])
    tiny_share = sparsifier(0.25, topk_count="release")  # int(0.75) = 0: nothing is sent
    assert not tiny_share.decompress(tiny_share.compress(v[:3], rng), 3).any()
    with pytest.raises(ValueError, match="topk_count = 'int'; allowed: fedsparse, release"):
        sparsifier(0.5, topk_count="int")


def test_sora_pruning_keeps_the_outputs_and_shrinks_the_rank(tmp_path):
    from peft import PeftModel

    model = tiny(sora=True)
    with torch.no_grad():
        for i, (name, layer) in enumerate(model.lora_layers().items()):
            layer.lora_B["default"].weight.normal_()
            model.gate(name)[: i + 1] = 0.0  # module i keeps rank - i - 1
        model.gate(name).zero_()  # the last module loses every rank
    model.eval()
    x = tokens()
    expected = model(x)
    config, _ = model.pruned()
    ranks = model.rank_counts()
    assert config.rank_pattern == {n: k for n, k in ranks.items() if k}
    assert max(ranks.values()) < 4 and min(ranks.values()) == 0
    model.save_adapter(tmp_path)
    reloaded = PeftModel.from_pretrained(base_model("tiny_bert", 5), str(tmp_path)).eval()
    got = classify(reloaded, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    adapted = [n for n, _ in reloaded.named_modules() if n.endswith("lora_A.default")]
    assert len(adapted) == sum(1 for k in ranks.values() if k)


def test_gate_init_normal_is_the_release_draw_and_ones_is_dense_lora():
    """``normal``: each module's gate is the next N(0, 1) draw after the adapters are built
    (the release's ``torch.randn``); ``ones``: the gated model is the plain LoRA model."""
    plain = tiny()
    draws = [torch.randn(4) for _ in plain.lora_layers()]
    normal, ones = tiny(sora=True), tiny(sora=True, gate_init="ones")
    for name, draw in zip(plain.lora_layers(), draws, strict=True):
        assert torch.equal(normal.gate(name).detach(), draw)
        assert torch.equal(ones.gate(name).detach(), torch.ones(4))
    with torch.no_grad():
        for model in (plain, normal, ones):
            torch.manual_seed(1)
            for layer in model.lora_layers().values():
                layer.lora_B["default"].weight.normal_()
    x = tokens()
    expected = plain.eval()(x)
    assert torch.equal(ones.eval()(x), expected)
    assert not torch.allclose(normal.eval()(x), expected)
    with pytest.raises(ScenarioError, match=r"sora_gate_init = 'ones' needs model\.sora = true"):
        scenario(model={"sora_gate_init": "ones"})
    with pytest.raises(ScenarioError, match="sora_gate_init"):
        scenario(model={"sora": True, "sora_gate_init": "zeros"})


def test_pruned_ranks_get_no_gradient_and_stay_zero():
    model = tiny(sora=True)
    layout = RankLayout(model)
    first = layout.modules[0]
    layout.alive[first][:2] = False
    state = {k: v.numpy().copy() for k, v in shared_state(model).items()}
    adapter, gates = layout.split(state)
    adapter[~layout.coordinates()] = 0.0
    gates[~layout.alive_gates()] = 0.0
    load_shared_state(model, {k: torch.from_numpy(v) for k, v in
                              layout.join(adapter, gates).items()})
    x, y = tokens(32), torch.randint(0, 5, (32,))
    train_adapter(model, layout, x, y, optimizer="sgd", lr=0.1, momentum=0.9,
                  weight_decay=0.0, batch_size=8, steps=8,
                  generator=torch.Generator().manual_seed(0), gates=GateRule(0.1, 1e-3, 0.05))
    after_adapter, after_gates = layout.split({k: v.numpy() for k, v in
                                               shared_state(model).items()})
    assert not after_adapter[~layout.coordinates()].any()
    assert not after_gates[~layout.alive_gates()].any()
    assert np.abs(after_adapter[layout.coordinates()] - adapter[layout.coordinates()]).max() > 0


@pytest.mark.parametrize("sora", [False, True])
def test_grad_clip_scales_the_whole_gradient_gates_and_l1_term_included(sora):
    eta = 20.0  # large, so that the gates' share of the norm is visible
    x, y = tokens(8), torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(2))
    reference = tiny(sora=sora)
    gates = list(reference.gates.values())
    (cross_entropy(reference, (x, y)) + (l1_penalty(gates, eta) if sora else 0.0)).backward()
    grad = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grad.values())))
    without_gates = float(torch.sqrt(sum((g.double() ** 2).sum() for n, g in grad.items()
                                         if not n.startswith("gates."))))
    assert (norm > 1.05 * without_gates) == sora
    model = tiny(sora=sora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clip, lr = norm / 4, 0.1
    train_adapter(model, RankLayout(model), x, y, optimizer="sgd", lr=lr, momentum=0.0,
                  weight_decay=0.0, batch_size=8, steps=1,
                  generator=torch.Generator().manual_seed(0),
                  gates=GateRule(eta, 0.0, 0.05) if sora else None, grad_clip=clip)
    moved = 0
    for n, p in model.named_parameters():
        if n in grad and not n.startswith("gates."):
            torch.testing.assert_close(p.detach(), before[n] - lr * grad[n] * (clip / norm))
            moved += int(bool(grad[n].any()))
    assert moved >= 2  # the head and the B factors at least


# -- the federation -----------------------------------------------------------------------

@pytest.mark.parametrize("topk_count", ["fedsparse", "release"])
def test_base_weights_never_cross_the_wire_and_uploads_hit_the_density(topk_count):
    scn = scenario(strategy={"topk_count": topk_count})
    f = run_federation(scn)
    layout = RankLayout(scenario_model(scn))
    d = int(layout.coordinates().sum())
    k = count(0.25, d) if topk_count == "fedsparse" else int(0.25 * d)
    for message in [*f.grid.sent, *f.grid.received]:
        for record in message.content.array_records.values():
            sizes = {name: a.numpy().size for name, a in record.items()}
            assert sum(sizes.values()) <= layout.size + 16  # adapters + head, never the base
            if "val" in sizes:
                assert sizes["val"] == k  # exactly d * (alive coordinates), both ways
    assert all(r.status == "ok" for r in f.records)
    assert all(row["uplink_bytes"] < 0.35 * 4 * layout.size * row["clients_ok"]
               for row in f.rows)


@pytest.mark.parametrize(("dtype", "bits", "density"), [("int8", 8, 0.25), ("int3", 3, 1.0)])
def test_integer_uploads_cost_their_bits_while_the_download_stays_float32(dtype, bits, density):
    scn = scenario(strategy={"up_value_dtype": dtype, "up_density": density,
                             "error_feedback": True})
    f = run_federation(scn)
    d = int(RankLayout(scenario_model(scn)).coordinates().sum())
    k = count(density, d)
    value_bytes = (bits * k + 7) // 8
    index_bound = (d + 7) // 8 if density < 1 else 0  # never more than a bitmap; dense: none
    for message in f.grid.sent:
        if "adapter" in message.content.array_records:
            assert message.content.array_records["adapter"]["val"].numpy().dtype == np.float32
    replies = [m.content.array_records["update"] for m in f.grid.received
               if "update" in m.content.array_records]
    assert replies
    for update in replies:
        payload = to_numpy(update)
        assert payload["val"].dtype == (np.int8 if bits == 8 else np.uint8)
        assert payload["val"].nbytes == value_bytes
        assert payload["scale"].dtype == np.float32 and payload["scale"].size == 1
        index_bytes = sum(a.nbytes for name, a in payload.items() if name.startswith("idx."))
        assert index_bytes <= index_bound
    assert all(row["uplink_bytes"] <= row["clients_ok"] * (value_bytes + index_bound + 4)
               for row in f.rows)
    assert all(r.status == "ok" for r in f.records)


def test_density_one_is_dense_federated_lora_with_the_same_server_optimiser():
    scn = scenario(strategy={"down_density": 1.0, "up_density": 1.0}, run={"rounds": 1,
                                                                           "eval_every": 1})
    f = run_federation(scn)
    theta0 = {k: torch.from_numpy(v) for k, v in to_numpy(initial_arrays(scn)).items()}
    layout = RankLayout(scenario_model(scn))
    start, _ = layout.split({k: v.numpy() for k, v in theta0.items()})
    trained = []
    for pid in sorted({r.partition_id for r in f.records}):
        model = scenario_model(scn)
        load_shared_state(model, theta0)
        data = client_data(scn.data, scn.seed, pid)
        train_adapter(model, layout, data.x_train, data.y_train, optimizer="sgd", lr=0.05,
                      momentum=0.9, weight_decay=0.0, batch_size=16,
                      steps=num_steps(len(data.x_train), 16, 1, None),
                      generator=torch.Generator().manual_seed(derive_seed(scn.seed, pid, 1)))
        trained.append(layout.split({k: v.numpy() for k, v in shared_state(model).items()})[0])
    p = nn.Parameter(torch.from_numpy(start.copy()))
    optimizer = torch.optim.AdamW([p], lr=0.01)
    p.grad = torch.from_numpy(np.mean([start - t for t in trained], axis=0))
    optimizer.step()
    got, _ = layout.split(to_numpy(f.state.arrays))
    np.testing.assert_array_equal(got, p.detach().numpy())


def test_sora_prunes_ranks_and_stops_sending_them():
    plain = {"down_density": 1.0, "up_density": 1.0, "sora_threshold": 0.02,
             "server_optimizer": "sgd", "server_lr": 1.0}
    scn = scenario(model={"sora": True}, strategy=plain,
                   client={"sora_l1": 0.5, "gate_lr": 0.5}, run={"rounds": 3, "eval_every": 3})
    with pytest.raises(ScenarioError, match=r"model\.sora = true needs server_optimizer = "
                                            r"'sgd' and server_lr = 1\.0, not 'adamw' at 0\.01"):
        scenario(model={"sora": True}, strategy={"sora_threshold": 0.02})
    f = run_federation(scn)
    alive = [row["ranks_alive"] for row in f.rows]
    assert alive[0] <= 16 and alive[-1] < 16 and alive == sorted(alive, reverse=True)
    per_module = {k: v for k, v in f.rows[-1].items() if k.startswith("ranks_alive/")}
    assert len(per_module) == 4 and sum(per_module.values()) == alive[-1]  # 2 layers x q, v
    down = [row["downlink_bytes"] / row["clients_sampled"] for row in f.rows]
    assert down[-1] < down[0]  # fewer coordinates once ranks are pruned
    final = {k: v for k, v in to_numpy(f.state.arrays).items()}
    layout = f.strategy.layout
    adapter, gates = layout.split(final)
    assert not adapter[~layout.coordinates()].any() and not gates[~layout.alive_gates()].any()


@pytest.mark.parametrize("rule", ["paper", "release"])
def test_server_gates_are_the_rule_applied_to_the_mean_of_the_clients(rule):
    xi = 0.02
    scn = scenario(model={"sora": True}, client={"sora_l1": 0.5, "gate_lr": 0.5},
                   strategy={"down_density": 1.0, "up_density": 1.0, "sora_threshold": xi,
                             "sora_threshold_rule": rule, "server_optimizer": "sgd",
                             "server_lr": 1.0}, run={"rounds": 1, "eval_every": 1})
    f = run_federation(scn)
    assert {str(m.content.config_records["config"][SORA_RULE]) for m in f.grid.sent
            if "gates" in m.content.array_records} == {rule}  # every train instruction
    uploaded = [m.content.array_records["gates"]["g"].numpy() for m in f.grid.received
                if "gates" in m.content.array_records]
    assert len(uploaded) == len(f.records) > 1
    if rule == "release":  # survivors had |g| >= 2 xi before the shrink by xi
        assert all(np.abs(g[g != 0]).min() >= xi - 1e-7 for g in uploaded)
    _, gates = f.strategy.layout.split(to_numpy(f.state.arrays))
    expected = threshold(torch.from_numpy(np.mean(uploaded, axis=0)), xi, rule).numpy()
    np.testing.assert_array_equal(gates, expected)


def test_error_feedback_keeps_what_top_k_did_not_send():
    f = run_federation(scenario(strategy={"error_feedback": True}))
    trained = {r.partition_id for r in f.records}
    for pid in trained:
        residual = f.grid.client_state(pid, f.strategy.accepted_round[pid])["lora-ef"][
            "residual"]
        assert np.count_nonzero(residual) > 0.5 * residual.size  # most of D stayed behind


def test_exported_adapter_reproduces_the_final_accuracy(tmp_path):
    from peft import PeftModel

    scn = scenario(model={"sora": True}, strategy={"sora_threshold": 0.01,
                                                   "server_optimizer": "sgd", "server_lr": 1.0},
                   client={"sora_l1": 0.1})
    f = run_federation(scn)
    x, y = held_out_set(scn.data, scn.seed)
    final = f.rows[-1]["accuracy"]
    files = export_adapter(scn, f.state.arrays, tmp_path)
    assert {p.name for p in files} >= {"adapter_config.json", "adapter_model.safetensors"}
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(base_model("tiny_bert", load_dataset(
        scn.data.dataset).num_classes), str(tmp_path))

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.peft = reloaded

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return classify(self.peft, ids)

    assert evaluate(Classifier(), x, y).accuracy == pytest.approx(final, abs=1e-12)


def test_density_schedule_and_cross_section_checks():
    assert scheduled_density(0.5, 0.5, 2, 1) == 0.5 == scheduled_density(0.5, 0.5, 2, 2)
    assert scheduled_density(0.5, 0.5, 2, 3) == 0.25
    with pytest.raises(ScenarioError, match=r"needs model\.sora = true"):
        scenario(strategy={"sora_threshold": 0.1})
    with pytest.raises(ScenarioError, match=r"needs model\.name = 'lora'"):
        parse_scenario(TEXT.replace('name = "lora"\nbase = "tiny_bert"\nrank = 4\nalpha = 8.0',
                                    'name = "mlp"'))


def test_pretrained_minilm_adapter_round_trips(tmp_path):
    """The real MiniLM: 22.7 M frozen parameters, only the adapters and head are shared, and
    the saved peft adapter reloads on the same base with identical outputs."""
    from peft import PeftModel

    torch.manual_seed(3)
    model = LoRAClassifier(LoRAModelParams(base="minilm", rank=4), 3).eval()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == 22_713_216 + 3 * 385  # the encoder + peft's frozen copy of the head
    assert sum(v.numel() for v in shared_state(model).values()) == 12 * 2 * 4 * 384 + 3 * 385
    with torch.no_grad():
        for layer in model.lora_layers().values():
            layer.lora_B["default"].weight.normal_(std=0.01)
    x = tokens()
    model.save_adapter(tmp_path)
    reloaded = PeftModel.from_pretrained(base_model("minilm", 3), str(tmp_path)).eval()
    torch.testing.assert_close(classify(reloaded, x),
                               model(x), atol=1e-6, rtol=0)


def test_biases_get_no_weight_decay():
    model = tiny(sora=True)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert no_decay["params"] and all(names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert not any(names[id(p)].endswith(".bias") for p in decay["params"])
    trained = {n for n, p in model.named_parameters()
               if p.requires_grad and not n.startswith("gates.")}
    assert {names[id(p)] for group in (decay, no_decay) for p in group["params"]} == trained
