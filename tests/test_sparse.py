"""Masks and dynamic sparse training (fedsparse/sparse): ERK, exact densities, DST updates,
per-task isolation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedsparse.payload import PayloadError
from fedsparse.sparse import (
    Mask,
    TaskIsolation,
    cosine_rate,
    drop_and_grow,
    erk_densities,
    keep_count,
    sparse_parameters,
    uniform_densities,
)
from fedsparse.sparse.wire import decode_model, decode_values, encode_model, encode_values


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 10))


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in sparse_parameters(model).items()}


def test_erk_matches_the_closed_form_on_two_layers():
    # n1 = 100*10 = 1000, raw1 = 110/1000; n2 = 10*10 = 100, raw2 = 20/100.
    # eps from 0.5 * 1100 = eps * (110 + 20) -> eps = 550/130; raw2 * eps = 0.846 < 1.
    d = erk_densities({"a": (100, 10), "b": (10, 10)}, 0.5)
    eps = 550 / 130
    assert d["a"] == pytest.approx(eps * 110 / 1000)
    assert d["b"] == pytest.approx(eps * 20 / 100)


def test_erk_caps_dense_layers_and_keeps_the_budget():
    layer_shapes = {"big": (400, 784), "mid": (400, 400), "head": (10, 400), "tiny": (2, 3)}
    sizes = {n: math.prod(s) for n, s in layer_shapes.items()}
    d = erk_densities(layer_shapes, 0.1)
    assert d["tiny"] == 1.0  # raw density above 1 -> dense
    kept = sum(d[n] * sizes[n] for n in sizes)
    assert kept == pytest.approx(0.1 * sum(sizes.values()))
    free = [n for n in d if d[n] < 1.0]
    ratios = {d[n] * sizes[n] / sum(layer_shapes[n]) for n in free}
    assert max(ratios) == pytest.approx(min(ratios))  # d_l proportional to sum(dims)/prod(dims)


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
def test_random_and_magnitude_masks_have_exact_counts(density):
    params = sparse_parameters(mlp())
    dens = uniform_densities(shapes(mlp()), density)
    for mask in (Mask.random(params, dens, torch.Generator().manual_seed(0)),
                 Mask.magnitude(params, dens)):
        for m in mask.masks.values():
            assert int(m.sum()) == keep_count(m.numel(), density)


def test_magnitude_mask_keeps_the_largest_weights():
    params = sparse_parameters(mlp())
    mask = Mask.magnitude(params, uniform_densities(shapes(mlp()), 0.2))
    for name, m in mask.items():
        w = params[name].detach().abs()
        assert w[m].min() >= w[~m].max()


def test_unknown_dense_layer_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"allowed: \['1', '3', '5'\]"):
        sparse_parameters(mlp(), dense=["9"])
    assert list(sparse_parameters(mlp(), dense=["5"])) == ["1.weight", "3.weight"]


def test_cosine_rate_decays_from_initial_to_final():
    rates = [cosine_rate(t / 10, 0.5, 0.005) for t in range(11)]
    assert rates[0] == pytest.approx(0.5) and rates[-1] == pytest.approx(0.005)
    assert all(a > b for a, b in itertools.pairwise(rates))


@pytest.mark.parametrize("growth", ["random", "gradient", "momentum"])
def test_drop_and_grow_keeps_density_and_zeroes_new_weights(growth):
    model = mlp()
    params = sparse_parameters(model)
    mask = Mask.random(params, erk_densities(shapes(model), 0.2), torch.Generator().manual_seed(1))
    mask.apply(params)
    signals = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(2))
               for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    new = drop_and_grow(mask, params, 0.3, growth, torch.Generator().manual_seed(3), signals)
    for name, m in new.items():
        old, w = mask[name], params[name].detach()
        assert int(m.sum()) == int(old.sum())
        assert not w[~m].any()
        kept = m & old & (w == before[name]) & (w != 0)
        assert torch.equal(w[kept], before[name][kept])
        grown = m & ~kept
        assert not w[grown].any()  # regrown weights start at zero
        assert int(grown.sum()) == round(0.3 * int(old.sum()))
        if growth != "random":
            assert signals[name].abs()[grown].min() >= signals[name].abs()[~m].max()


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_frozen_positions_are_never_regrown(growth):
    model = mlp()
    params = sparse_parameters(model)
    mask = Mask.random(params, erk_densities(shapes(model), 0.2), torch.Generator().manual_seed(1))
    frozen = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(4)) < 0.5
              for n, p in params.items()}
    signals = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(2))
               for n, p in params.items()}
    new = drop_and_grow(mask, params, 0.3, growth, torch.Generator().manual_seed(3), signals,
                        frozen)
    for name, m in new.items():
        assert int(m.sum()) == int(mask[name].sum())  # enough unfrozen room: density kept
        assert not (m & ~mask[name] & frozen[name]).any()


def test_isolation_leaves_old_task_weights_bit_identical():
    torch.manual_seed(0)
    model = mlp()
    params = sparse_parameters(model)
    dens = uniform_densities(shapes(model), 0.3)
    isolation = TaskIsolation({n: torch.zeros_like(p) for n, p in params.items()})
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)
    for task in range(3):
        mask = Mask.random(params, dens, torch.Generator().manual_seed(10 + task))
        isolation.working_copy(mask, params)
        if task == 0:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(torch.randn_like(p) * mask[n])
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            mask.apply_to_grads(params)
            isolation.zero_frozen_grads(params)
            opt.step()
            mask.apply(params)
        if task == 1:
            first = isolation.task_weights(0)
        isolation.finish_task(mask, params)
    assert all(torch.equal(isolation.task_weights(0)[n], first[n]) for n in params)
    frozen = isolation.task_masks[0]
    assert any(bool((frozen[n] & isolation.task_masks[2][n]).any()) for n in params)


def _masked_state() -> tuple[dict, dict]:
    model = mlp()
    params = sparse_parameters(model)
    mask = Mask.random(params, erk_densities(shapes(model), 0.2), torch.Generator().manual_seed(4))
    mask.apply(params)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return state, {n: m.numpy() for n, m in mask.items()}


def test_masked_model_round_trips_exactly_on_the_wire():
    state, masks = _masked_state()
    arrays = encode_model(state, masks)
    decoded, got_masks = decode_model(arrays, state)
    assert all(np.array_equal(decoded[k], state[k]) for k in state)
    assert all(np.array_equal(got_masks[k], masks[k]) for k in masks)
    assert all(arrays[k].size == masks[k].sum() for k in masks)  # values only at the mask
    up = encode_values(state, masks)
    assert all(np.array_equal(decode_values(up, state, masks)[k], state[k]) for k in state)
    dense_bytes = sum(v.nbytes for v in state.values())
    assert sum(v.nbytes for v in up.values()) < 0.3 * dense_bytes


@pytest.mark.parametrize("corrupt, reason", [
    (lambda a, n: a.__setitem__(n, a[n][:-1]), "active positions"),
    (lambda a, n: a.__setitem__(n, a[n].astype(np.float64)), "dtype float64"),
    (lambda a, n: a[n].__setitem__(0, np.inf), "NaN or Inf"),
    (lambda a, n: a.pop(n), "values missing"),
    (lambda a, n: a.__setitem__("extra", np.zeros(1)), "unexpected arrays"),
])
def test_malformed_masked_uploads_are_rejected_with_a_reason(corrupt, reason):
    state, masks = _masked_state()
    up = encode_values(state, masks)
    corrupt(up, "1.weight")
    with pytest.raises(PayloadError, match=reason):
        decode_values(up, state, masks)


def test_malformed_positions_are_rejected():
    state, masks = _masked_state()
    arrays = encode_model(state, masks)
    key = next(k for k in arrays if k.startswith("1.weight.idx."))
    arrays[key] = arrays[key][:-1]  # one byte (bitmap, delta) or index (plain) short
    with pytest.raises(PayloadError):
        decode_model(arrays, state)
