"""Models, local SGD and FLOPs measured by torch.utils.flop_counter."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from fedsparse.data import held_out_set, load_dataset
from fedsparse.models import build_model
from fedsparse.models.cnn import CNNParams
from fedsparse.models.mlp import MLPParams
from fedsparse.scenario import DataSpec
from fedsparse.training import evaluate, num_steps, train_sgd


def digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits")
    return data.features(data.x_train), data.labels(data.y_train)


def test_model_sizes():
    mlp = build_model(MLPParams(hidden=[200, 200]), (1, 28, 28), 10)
    assert sum(p.numel() for p in mlp.parameters()) == 784 * 200 + 200 + 200 * 200 + 200 + 2010
    for shape, flat in (((1, 28, 28), 16 * 7 * 7), ((1, 8, 8), 16 * 2 * 2)):
        cnn = build_model(CNNParams(), shape, 10)
        assert cnn(torch.zeros(3, *shape)).shape == (3, 10)
        first_linear = next(m for m in cnn.modules() if isinstance(m, nn.Linear))
        assert first_linear.in_features == flat


def test_cnn_rejects_too_many_pooling_stages():
    with pytest.raises(ValueError, match="too many pooling stages"):
        build_model(CNNParams(channels=[4, 4, 4]), (1, 4, 4), 10)


def mlp_step_flops(widths: list[int], batch: int) -> int:
    """Closed form: forward and weight-gradient matmuls of every layer (2*B*in*out each),
    input-gradient matmuls of every layer but the first (its input needs no gradient)."""
    layers = list(itertools.pairwise(widths))
    mm = [2 * batch * i * o for i, o in layers]
    return 2 * sum(mm) + sum(mm[1:])


def test_flops_match_the_closed_form_for_an_mlp():
    x, y = digits_train()
    model = build_model(MLPParams(hidden=[32, 16]), (1, 8, 8), 10)
    n, batch, steps = len(x), 50, 40
    result = train_sgd(model, x, y, lr=0.1, batch_size=batch, steps=steps,
                       generator=torch.Generator().manual_seed(0))
    per_epoch = math.ceil(n / batch)
    full, last = n // batch, n - (n // batch) * batch
    # steps run through epochs of ceil(n/B) batches, the last batch of each epoch partial
    partial_steps = steps // per_epoch
    expected = ((steps - partial_steps) * mlp_step_flops([64, 32, 16, 10], batch)
                + partial_steps * mlp_step_flops([64, 32, 16, 10], last))
    assert full == per_epoch - 1
    assert result.flops == expected
    assert result.examples == (steps - partial_steps) * batch + partial_steps * last


def test_cnn_flops_are_linear_in_examples():
    x, y = digits_train()
    counts = []
    for batch in (16, 32):
        model = build_model(CNNParams(), (1, 8, 8), 10)
        result = train_sgd(model, x[:batch * 4], y[:batch * 4], lr=0.01, batch_size=batch,
                           steps=4, generator=torch.Generator().manual_seed(0))
        counts.append(result.flops / result.examples)
    assert counts[0] == counts[1] > 0


def test_steps_and_epochs():
    assert num_steps(100, 32, epochs=2, steps=None) == 8
    assert num_steps(100, 32, epochs=None, steps=5) == 5
    x, y = digits_train()
    model = build_model(MLPParams(hidden=[8]), (1, 8, 8), 10)
    result = train_sgd(model, x[:100], y[:100], lr=0.1, batch_size=32,
                       steps=num_steps(100, 32, 2, None), generator=torch.Generator())
    assert result.steps == 8 and result.examples == 200  # 2 epochs, every example twice


def test_sgd_learns_digits_and_is_seeded():
    x, y = digits_train()
    x_test, y_test = held_out_set(DataSpec(dataset="digits"), seed=0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(MLPParams(hidden=[64]), (1, 8, 8), 10)
        before = evaluate(model, x_test, y_test)
        train_sgd(model, x, y, lr=0.1, batch_size=32, steps=300,
                  generator=torch.Generator().manual_seed(1))
        models.append(model)
    after = evaluate(models[0], x_test, y_test)
    assert before.accuracy < 0.3 and after.accuracy > 0.9 and after.loss < before.loss
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)  # same seeds, same model, bit for bit


def test_evaluate_counts_correct_predictions():
    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(len(x), 3)
            logits[:, 1] = 1.0
            return logits

    y = torch.tensor([1, 1, 0, 2, 1])
    result = evaluate(Constant(), torch.zeros(5, 1), y, batch_size=2)
    assert result.accuracy == pytest.approx(3 / 5) and result.num_examples == 5
    expected_loss = float(nn.functional.cross_entropy(Constant()(torch.zeros(5, 1)), y))
    assert result.loss == pytest.approx(expected_loss)


def test_grad_clip_bounds_the_norm_of_a_step():
    x, y = digits_train()
    norms = []
    for clip in (None, 0.01):
        torch.manual_seed(0)
        model = build_model(MLPParams(hidden=[8]), (1, 8, 8), 10)
        before = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        train_sgd(model, x[:32], y[:32], lr=1.0, batch_size=32, steps=1,
                  generator=torch.Generator().manual_seed(0), grad_clip=clip)
        after = nn.utils.parameters_to_vector(model.parameters()).detach()
        norms.append(float((after - before).norm()))
    assert norms[0] > 0.1  # plain SGD: the step is the whole gradient (lr 1)
    assert norms[1] == pytest.approx(0.01, rel=1e-3)  # clipped to norm 0.01
