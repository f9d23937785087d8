"""SCAFFOLD / SCALLION / SCAFCOM maths (fedsparse/scaffold.py) on a small heterogeneous
logistic-regression problem, without Flower: the reformulation equals classic SCAFFOLD
(option II), the compressed variants reduce to it, and c = mean c_i holds every round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedsparse.compress import build_compressor
from fedsparse.compress.identity import IdentitySpec
from fedsparse.compress.randk import RandKSpec
from fedsparse.compress.topk import TopKSpec
from fedsparse.scaffold import (
    ControlState,
    MessageRule,
    client_message,
    flat_parameters,
    local_steps,
    server_update,
    set_flat_parameters,
    step_direction,
)

N, S, K, ROUNDS = 8, 3, 5, 12
LR, GLOBAL_LR = 0.1, 1.0


def problem(seed: int = 0):
    """Per-client data with shifted feature means and skewed labels (heterogeneous)."""
    rng = np.random.default_rng(seed)
    clients = []
    for i in range(N):
        x = rng.normal(loc=i % 3, size=(40, 6)).astype(np.float32)
        y = rng.choice(3, size=40, p=np.roll([0.7, 0.2, 0.1], i)).astype(np.int64)
        clients.append((torch.from_numpy(x), torch.from_numpy(y)))
    return clients


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(6, 3)


def loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def batches(data, client: int, round_: int):
    """K minibatches of 10, the same for every method (seeded by client and round)."""
    g = torch.Generator().manual_seed(int(1000 * round_ + client))
    x, y = data[client]
    return [tuple(t[idx] for t in (x, y))
            for idx in (torch.randperm(len(x), generator=g)[:10] for _ in range(K))]


def samples():
    rng = np.random.default_rng(42)
    return [sorted(rng.choice(N, S, replace=False)) for _ in range(ROUNDS)]


def classic_scaffold(data):
    """Karimireddy et al. 2020, Algorithm 1 with option II, two uplink vectors."""
    model = make_model()
    x = flat_parameters(model).astype(np.float64)
    d = x.size
    c, c_i = np.zeros(d), np.zeros((N, d))
    for r, sampled in enumerate(samples()):
        dy, dc = [], []
        for i in sampled:
            set_flat_parameters(model, x.astype(np.float32))
            for batch in batches(data, i, r):
                model.zero_grad()
                loss(model, batch).backward()
                g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy()
                y = flat_parameters(model).astype(np.float64) - LR * (g - c_i[i] + c)
                set_flat_parameters(model, y.astype(np.float32))
            y = flat_parameters(model).astype(np.float64)
            c_plus = c_i[i] - c + (x - y) / (K * LR)
            dy.append(y - x)
            dc.append(c_plus - c_i[i])
            c_i[i] = c_plus
        x = x + GLOBAL_LR * np.mean(dy, axis=0)
        c = c + (S / N) * np.mean(dc, axis=0)
    return x, c, c_i


def reformulated(data, variant, compressor, alpha=1.0, beta=1.0, momentum_in_steps=False,
                 check_invariant=False):
    """The one-vector form through fedsparse.scaffold, as the Flower apps run it."""
    model = make_model()
    x = flat_parameters(model)
    d = x.size
    c = np.zeros(d, np.float32)
    states = [ControlState.zeros(d) for _ in range(N)]
    rng = np.random.default_rng(7)
    gamma = GLOBAL_LR * LR * K
    for r, sampled in enumerate(samples()):
        deltas = []
        for i in sampled:
            set_flat_parameters(model, x)
            state = states[i]
            rule = MessageRule(variant, IdentitySpec(), alpha, beta, momentum_in_steps)
            shift, scale = step_direction(rule, state, c)
            g_bar = local_steps(model, batches(data, i, r), loss, LR, shift, scale).g_bar
            message = client_message(variant, g_bar, state, compressor, rng, alpha, beta)
            state.c_i = state.c_i + message.c_i_step  # the server accepted it
            deltas.append(message.delta)
        x, c = server_update(x, c, deltas, N, gamma, alpha)
        if check_invariant:
            np.testing.assert_allclose(c, np.mean([s.c_i for s in states], axis=0), atol=1e-6)
    return x, c, np.stack([s.c_i for s in states])


IDENTITY = build_compressor(IdentitySpec())


def test_reformulated_scaffold_equals_classic_option_ii():
    data = problem()
    x0, c0, ci0 = classic_scaffold(data)
    x1, c1, ci1 = reformulated(data, "scaffold", IDENTITY)
    assert np.abs(x0).max() > 0.1 and np.abs(c0).max() > 1e-3  # a non-trivial run
    np.testing.assert_allclose(x1, x0, atol=1e-6)
    np.testing.assert_allclose(c1, c0, atol=1e-6)
    np.testing.assert_allclose(ci1, ci0, atol=1e-6)


@pytest.mark.parametrize(("variant", "kwargs"), [
    ("scallion", {"alpha": 1.0}),
    ("scafcom", {"alpha": 1.0, "beta": 1.0}),
    ("scafcom", {"alpha": 1.0, "beta": 1.0, "momentum_in_steps": True}),
])
def test_identity_compression_reduces_to_scaffold(variant, kwargs):
    data = problem()
    reference = reformulated(data, "scaffold", IDENTITY)
    result = reformulated(data, variant, IDENTITY, **kwargs)
    for a, b in zip(result, reference, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("variant", "spec", "kwargs"), [
    ("scafcom", TopKSpec(ratio=0.2), {"beta": 0.2}),
    ("scafcom", TopKSpec(ratio=0.2, value_dtype="float16"), {"beta": 0.5, "alpha": 0.5}),
    ("scafcom", TopKSpec(ratio=0.2), {"beta": 0.2, "momentum_in_steps": True}),
    ("scallion", RandKSpec(ratio=0.3), {"alpha": 0.3}),
])
def test_control_variate_is_the_mean_of_the_clients_after_every_round(variant, spec, kwargs):
    x, c, _ = reformulated(problem(), variant, build_compressor(spec), check_invariant=True,
                             **kwargs)
    assert np.isfinite(x).all() and np.abs(c).max() > 0


def test_scafcom_beta_below_one_differs_from_scaffold():
    data = problem()
    a = reformulated(data, "scafcom", IDENTITY, beta=0.2)
    b = reformulated(data, "scaffold", IDENTITY)
    assert not np.allclose(a[0], b[0])


def test_server_update_scaling():
    x, c = np.zeros(3, np.float32), np.ones(3, np.float32)
    deltas = [np.array([1, 0, 0], np.float32), np.array([0, 2, 0], np.float32)]
    x1, c1 = server_update(x, c, deltas, num_clients=10, gamma=0.5, alpha=0.5)
    np.testing.assert_allclose(x1, -0.5 * (1 + np.array([0.5, 1.0, 0.0])))
    np.testing.assert_allclose(c1, 1 + 0.05 * np.array([1, 2, 0]))
    assert server_update(x, c, [], 10, 0.5) == (x, c)


def test_a_diverged_round_raises_before_the_state_changes():
    state = ControlState(np.ones(4, np.float32), np.full(4, 2.0, np.float32))
    g_bar = np.array([1.0, np.nan, 0.0, 0.0], np.float32)
    with pytest.raises(FloatingPointError, match="not finite"):
        client_message("scafcom", g_bar, state, IDENTITY, np.random.default_rng(0), 1.0, 0.5)
    assert np.array_equal(state.v_i, np.full(4, 2.0, np.float32))  # momentum untouched
