"""Optimizer state saved and loaded by parameter name, across a changed frozen set."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from conftest import make_bert

import finetunekit as ftk
from finetunekit.optim_state import load_optimizer_state_dict, optimizer_state_dict


def train_steps(model, optimizer, steps: int = 5) -> None:
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 32, 32)).square().mean().backward()
        optimizer.step()


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_with_new_frozen_set():
    model = torchvision.models.resnet18(weights=None)
    ftk.freeze_to(model, -3)  # layer4.0, layer4.1, fc
    optimizer = torch.optim.AdamW(ftk.param_groups(model, lr=slice(1e-4, 1e-3)))
    train_steps(model, optimizer)
    saved = roundtrip(optimizer_state_dict(model, optimizer))
    expected = {
        name: {k: v.clone() for k, v in optimizer.state[p].items()}
        for name, p in model.named_parameters()
        if p in optimizer.state
    }

    fresh = torchvision.models.resnet18(weights=None)
    fresh.load_state_dict(model.state_dict())
    ftk.freeze_to(fresh, -4)  # layer3.1 now trains too, and sits first in the optimizer
    new_optimizer = torch.optim.AdamW(ftk.param_groups(fresh, lr=slice(1e-4, 1e-3)))
    load_optimizer_state_dict(fresh, new_optimizer, saved)

    params = dict(fresh.named_parameters())
    assert set(expected) == {n for n in params if n.startswith(("layer4.", "fc."))}
    for name, state in expected.items():
        loaded = new_optimizer.state[params[name]]
        assert torch.equal(loaded["exp_avg"], state["exp_avg"]), name
        assert torch.equal(loaded["exp_avg_sq"], state["exp_avg_sq"]), name
        assert float(loaded["step"]) == 5.0
    # Parameters that were frozen when the state was saved start fresh.
    assert all(not new_optimizer.state[p] for n, p in params.items() if n.startswith("layer3.1."))


def test_named_load_keeps_fc_moments():
    # The failure this module exists for: torch's positional state dict of an optimizer
    # over fc only, loaded into one over layer4.1 + fc, puts fc's moments on layer4.1.
    model = torchvision.models.resnet18(weights=None)
    ftk.freeze_to(model, -1)
    optimizer = torch.optim.Adam(ftk.param_groups(model, lr=1e-3, merge=False))
    train_steps(model, optimizer, 2)
    named = optimizer_state_dict(model, optimizer)

    ftk.freeze_to(model, -2)
    wider = torch.optim.Adam(ftk.param_groups(model, lr=1e-3, merge=False))
    load_optimizer_state_dict(model, wider, named)

    assert torch.equal(
        wider.state[model.fc.weight]["exp_avg"],
        optimizer.state[model.fc.weight]["exp_avg"],
    )
    assert not wider.state[model.layer4[1].conv1.weight]


def test_group_settings_are_restored_when_groups_match():
    model = make_bert()
    optimizer = torch.optim.AdamW(ftk.param_groups(model, lr=slice(1e-5, 1e-3)))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()
    scheduler.step()
    saved = optimizer_state_dict(model, optimizer)

    again = torch.optim.AdamW(ftk.param_groups(model, lr=slice(1e-5, 1e-3)))
    load_optimizer_state_dict(model, again, saved)

    assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert [g["initial_lr"] for g in again.param_groups] == [g["initial_lr"] for g in optimizer.param_groups]


def test_strict_refuses_state_for_parameters_now_frozen():
    model = torchvision.models.resnet18(weights=None)
    ftk.freeze_to(model, -2)
    optimizer = torch.optim.SGD(ftk.param_groups(model, lr=0.1), momentum=0.9)
    train_steps(model, optimizer, 1)
    saved = optimizer_state_dict(model, optimizer)
    ftk.freeze_to(model, -1)
    narrower = torch.optim.SGD(ftk.param_groups(model, lr=0.1), momentum=0.9)

    with pytest.raises(ValueError, match=r"no place in the optimizer.*'layer4\.1\..*strict=False"):
        load_optimizer_state_dict(model, narrower, saved)
    assert not narrower.state

    load_optimizer_state_dict(model, narrower, saved, strict=False)
    assert torch.equal(
        narrower.state[model.fc.weight]["momentum_buffer"],
        optimizer.state[model.fc.weight]["momentum_buffer"],
    )


def test_other_architecture_is_rejected():
    model = torchvision.models.resnet18(weights=None)
    optimizer = torch.optim.Adam(model.parameters())
    train_steps(model, optimizer, 1)
    saved = optimizer_state_dict(model, optimizer)

    other = torchvision.models.resnet18(weights=None, num_classes=7)
    with pytest.raises(
        ValueError,
        match=r"'exp_avg' of 'fc.weight' has shape \(1000, 512\).*\(7, 512\)",
    ):
        load_optimizer_state_dict(other, torch.optim.Adam(other.parameters()), saved)

    vgg = torchvision.models.vgg11(weights=None)
    with pytest.raises(ValueError, match=r"does not have, such as 'bn1.bias'"):
        load_optimizer_state_dict(vgg, torch.optim.Adam(vgg.parameters()), saved)


def test_positional_state_dict_is_refused_with_the_fix():
    model = torchvision.models.resnet18(weights=None)
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"optimizer.load_state_dict\(\)"):
        load_optimizer_state_dict(model, optimizer, optimizer.state_dict())


def test_foreign_tensor_in_optimizer_is_named():
    model = torchvision.models.resnet18(weights=None)
    stray = torch.nn.Parameter(torch.zeros(3, 4))
    optimizer = torch.optim.Adam([*model.parameters(), stray])
    with pytest.raises(ValueError, match=r"shape \(3, 4\) that is not a parameter of the model"):
        optimizer_state_dict(model, optimizer)


def test_check_optimizer_finds_missing_duplicated_and_stale_state():
    model = torchvision.models.resnet18(weights=None)
    ftk.freeze_to(model, -2)
    optimizer = torch.optim.Adam(ftk.param_groups(model, lr=1e-3))
    train_steps(model, optimizer, 1)
    assert ftk.check_optimizer(model, optimizer).ok

    ftk.freeze_to(model, -1)  # layer4.1 keeps its Adam moments while frozen
    ftk.unfreeze(model, "layer3.1")  # trainable, but not in the optimizer
    optimizer.param_groups[-1]["params"].append(model.fc.weight)  # fc.weight now in two groups

    check = ftk.check_optimizer(model, optimizer)

    assert not check.ok
    assert check.missing == tuple(n for n, _ in model.named_parameters() if n.startswith("layer3.1."))
    assert check.duplicated == ("fc.weight",)
    assert check.frozen_with_state == tuple(n for n, _ in model.named_parameters() if n.startswith("layer4.1."))
    assert check.num_foreign_tensors == 0
    problems = check.problems
    assert len(problems) == 3
    assert problems[0].startswith("6 trainable parameters are in no param group")
    assert "fc.weight. Build the groups with finetunekit.param_groups" in problems[1]
    assert "keep_state=False" in problems[2]


def test_describe_shows_rates_and_the_check(resnet):
    ftk.freeze_to(resnet, -2)
    optimizer = torch.optim.AdamW(ftk.param_groups(resnet, lr=slice(1e-4, 1e-3), weight_decay=0.05))
    train_steps(resnet, optimizer, 1)
    ftk.freeze_to(resnet, -1)

    report = ftk.describe(resnet, optimizer)

    rows = {row.name: row for row in report.rows}
    assert rows["layer4.1"].lrs == (1e-4,)
    assert rows["fc"].lrs == (1e-3,)
    assert rows["fc"].weight_decays == (0.05, 0.0)
    assert report.frozen_with_state == tuple(n for n, _ in resnet.named_parameters() if n.startswith("layer4.1."))
    assert any("still have optimizer state" in w for w in report.warnings)
