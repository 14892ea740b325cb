"""The learning-rate range test on real data: the curve, the suggestion, group ratios and restoration."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import snapshot
from sklearn.datasets import load_digits
from torch import nn

import finetunekit as ftk


@pytest.fixture(scope="module")
def digits() -> list[tuple[torch.Tensor, torch.Tensor]]:
    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32) / 16.0
    y = torch.tensor(labels)
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, 1280, 64)]


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def test_curve_falls_then_diverges(digits):
    model = make_mlp()

    result = ftk.lr_find(model, digits, nn.functional.cross_entropy, start_lr=1e-5, end_lr=10.0, num_steps=80, smoothing=0.9)

    assert result.stopped_early  # AdamW at rates near 10 blows the loss up
    assert len(result.lrs) == len(result.losses) == len(result.raw_losses) < 80
    assert result.lrs[0] == pytest.approx(1e-5)
    assert min(result.losses) < 0.6 * result.losses[0]
    assert 1e-4 < result.suggestion < result.min_loss_lr < 10.0


def test_model_optimizer_and_rng_are_restored(digits):
    model = make_mlp()
    model.eval()
    before = snapshot(model)
    optimizer = torch.optim.SGD(ftk.param_groups(model, lr=slice(1e-3, 1e-1), merge=False), momentum=0.9)
    rates = [g["lr"] for g in optimizer.param_groups]
    rng = torch.get_rng_state()

    ftk.lr_find(model, digits, nn.functional.cross_entropy, optimizer=optimizer, num_steps=20)

    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert not model.training
    assert not model[1].training
    assert [g["lr"] for g in optimizer.param_groups] == rates
    assert not optimizer.state  # no momentum left over from the sweep
    assert torch.equal(torch.get_rng_state(), rng)


def test_group_ratios_are_kept_during_the_sweep(digits):
    model = make_mlp()
    optimizer = torch.optim.AdamW(ftk.param_groups(model, lr=slice(1e-4, 1e-2), merge=False))
    seen = []
    original_step = optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([g["lr"] for g in optimizer.param_groups])
        return original_step(*args, **kwargs)

    optimizer.step = recording_step
    result = ftk.lr_find(model, digits, nn.functional.cross_entropy, optimizer=optimizer, num_steps=5)

    # Groups 0 (Linear), 1 (BatchNorm, no decay only), 3 and 5 (Linear): rates 1e-4 .. 1e-2.
    per_layer = [100 ** (i / 3 - 1) for i in range(4)]
    expected = [per_layer[0], per_layer[0], per_layer[1], per_layer[2], per_layer[2], per_layer[3], per_layer[3]]
    assert result.group_ratios == pytest.approx(expected, rel=1e-9)
    for rates, head in zip(seen, result.lrs):
        assert rates == pytest.approx([head * r for r in result.group_ratios])


def test_frozen_parameters_stay_frozen_and_unchanged(digits):
    model = make_mlp()
    ftk.freeze_to(model, -1)
    frozen_weight = model[0].weight.detach().clone()

    result = ftk.lr_find(model, digits, nn.functional.cross_entropy, num_steps=10)

    assert torch.equal(model[0].weight, frozen_weight)
    assert not model[0].weight.requires_grad
    assert model[-1].weight.requires_grad
    assert len(result.lrs) == 10


def test_short_data_is_cycled(digits):
    model = make_mlp()
    result = ftk.lr_find(model, digits[:3], nn.functional.cross_entropy, num_steps=7, end_lr=1e-2)
    assert len(result.lrs) == 7

    with pytest.raises(ValueError, match=r"data ran out after 3 batches.*DataLoader or a list"):
        ftk.lr_find(model, iter(digits[:3]), nn.functional.cross_entropy, num_steps=7)


def test_too_short_a_fall_warns_and_gives_nan(digits):
    model = make_mlp()
    with pytest.warns(ftk.FinetuneKitWarning, match=r"too few to suggest a rate"):
        result = ftk.lr_find(model, digits, nn.functional.cross_entropy, start_lr=5.0, end_lr=100.0, num_steps=5)
    assert math.isnan(result.suggestion)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start_lr": 1.0, "end_lr": 1e-3}, r"start_lr=1.0 and end_lr=0.001 must satisfy"),
        ({"num_steps": 1}, r"num_steps=1 must be an integer of at least 2"),
        ({"smoothing": 1.0}, r"smoothing=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_arguments_are_named(digits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ftk.lr_find(make_mlp(), digits, nn.functional.cross_entropy, **kwargs)


def test_plot_marks_the_suggestion(digits):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    result = ftk.lr_find(make_mlp(), digits, nn.functional.cross_entropy, start_lr=1e-5, num_steps=60)

    ax = result.plot()

    assert ax.get_xscale() == "log"
    assert len(ax.lines) == 2
    assert ax.lines[1].get_xdata()[0] == result.suggestion
