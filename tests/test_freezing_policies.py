"""BatchNorm policies of freezing, and keeping an optimizer consistent with unfreezing."""

from __future__ import annotations

import pytest
import torch
from conftest import snapshot, trainable_names
from torch import nn

import finetunekit as ftk


def bn_params(model: nn.Module, prefix: str = "") -> set[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and name.startswith(prefix):
            names |= {f"{name}.weight", f"{name}.bias"}
    return names


def forward_train(model: nn.Module, steps: int = 2) -> None:
    model.train()
    for _ in range(steps):
        model(torch.randn(4, 3, 32, 32) * 3 + 1)


def test_bn_train_keeps_affine_and_stats_training(resnet):
    before = resnet.bn1.running_mean.clone()

    ftk.freeze_to(resnet, -1, bn="train")
    forward_train(resnet)

    assert trainable_names(resnet) == {"fc.weight", "fc.bias"} | bn_params(resnet)
    assert resnet.bn1.training
    assert not torch.equal(resnet.bn1.running_mean, before)


def test_bn_stats_freezes_affine_updates_stats(resnet):
    before = snapshot(resnet.bn1)

    ftk.freeze_to(resnet, -1, bn="stats")
    forward_train(resnet)

    assert trainable_names(resnet) == {"fc.weight", "fc.bias"}
    assert resnet.bn1.training
    assert not torch.equal(resnet.bn1.running_mean, before["running_mean"])
    assert torch.equal(resnet.bn1.weight, before["weight"])


def test_bn_policy_persists_across_calls(resnet):
    ftk.freeze_to(resnet, -1, bn="train")

    ftk.freeze_to(resnet, -3)

    assert bn_params(resnet, "layer1") <= trainable_names(resnet)
    assert not resnet.layer1[0].conv1.weight.requires_grad


def test_bn_frozen_replaces_earlier_policy(resnet):
    ftk.freeze_to(resnet, -1, bn="stats")

    ftk.freeze_to(resnet, -1, bn="frozen")
    resnet.train()

    resnet(torch.randn(2, 3, 32, 32))
    assert not resnet.bn1.training


def test_bn_policy_in_describe(resnet):
    ftk.freeze_to(resnet, -1, bn="stats")

    report = ftk.describe(resnet)

    assert all(row.locked_norms == () for row in report.rows)


def test_bad_bn_policy_leaves_model(resnet):
    with pytest.raises(ValueError, match=r"bn='eval' is not a BatchNorm policy; pass one of \['frozen', 'train', 'stats'\]"):
        ftk.freeze_to(resnet, -1, bn="eval")

    assert trainable_names(resnet) == set(dict(resnet.named_parameters()))


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 1000, (4,))).backward()
    optimizer.step()


def test_plain_optimizer_misses_late_unfreeze(resnet):
    ftk.freeze_to(resnet, -1)
    optimizer = torch.optim.AdamW(ftk.param_groups(resnet, lr=1e-3))
    before = resnet.layer4[1].conv2.weight.detach().clone()

    ftk.unfreeze(resnet, "layer4")
    step(resnet, optimizer)

    assert torch.equal(resnet.layer4[1].conv2.weight, before)


def test_unfreeze_with_optimizer_trains_new_params(resnet):
    ftk.freeze_to(resnet, -1)
    optimizer = torch.optim.AdamW(ftk.param_groups(resnet, lr=1e-3))
    before = resnet.layer4[1].conv2.weight.detach().clone()

    ftk.unfreeze(resnet, "layer4", optimizer=optimizer, lr=1e-4)
    step(resnet, optimizer)

    assert not torch.equal(resnet.layer4[1].conv2.weight, before)
    added = optimizer.param_groups[2:]
    assert [(g["name"], g["no_decay"], g["lr"]) for g in added] == [
        ("layer4.0", False, 1e-4),
        ("layer4.0", True, 1e-4),
        ("layer4.1", False, 1e-4),
        ("layer4.1", True, 1e-4),
    ]
    assert {g["weight_decay"] for g in added if g["no_decay"]} == {0.0}
    assert {g["weight_decay"] for g in added if not g["no_decay"]} == {0.01}


def test_freeze_to_with_optimizer_uses_smallest_lr(resnet):
    ftk.freeze_to(resnet, -2)
    optimizer = torch.optim.SGD(ftk.param_groups(resnet, lr=slice(1e-3, 1e-2)), lr=0.1, momentum=0.9)

    ftk.freeze_to(resnet, -3, optimizer=optimizer)

    assert {g["lr"] for g in optimizer.param_groups if g["name"] == "layer4.0"} == {1e-3}
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in resnet.parameters() if p.requires_grad}


@pytest.mark.parametrize("keep_state", [True, False])
def test_keep_state_on_refreeze(resnet, keep_state):
    optimizer = torch.optim.Adam(resnet.parameters(), lr=1e-3)
    step(resnet, optimizer)
    ftk.freeze_to(resnet, -1)

    ftk.unfreeze(resnet, optimizer=optimizer, keep_state=keep_state)

    assert (resnet.conv1.weight in optimizer.state) is keep_state
    assert resnet.fc.weight in optimizer.state


@pytest.mark.parametrize(
    "norm",
    [nn.BatchNorm1d(8), nn.LazyBatchNorm1d(), nn.InstanceNorm1d(8, affine=True, track_running_stats=True)],
    ids=["BatchNorm1d", "LazyBatchNorm1d", "InstanceNorm1d"],
)
def test_norm_kinds_locked_when_frozen(norm):
    model = nn.Sequential(nn.Conv1d(4, 8, 1), norm, nn.Conv1d(8, 2, 1))
    model(torch.randn(6, 4, 5))  # materializes the lazy layer
    ftk.freeze(model, "1")
    before = norm.running_mean.clone()

    model.train()
    model(torch.randn(6, 4, 5) * 5)

    assert not norm.training
    assert torch.equal(norm.running_mean, before)


def test_sync_batchnorm_frozen_runs_without_process_group(resnet):
    model = nn.SyncBatchNorm.convert_sync_batchnorm(resnet)
    ftk.freeze_to(model, -1)
    before = model.bn1.running_mean.clone()

    model.train()
    model(torch.randn(2, 3, 32, 32))

    assert isinstance(model.bn1, nn.SyncBatchNorm)
    assert torch.equal(model.bn1.running_mean, before)
