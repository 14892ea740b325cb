from __future__ import annotations

import math

import pytest
import torch
from conftest import bert_inputs, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import finetunekit as ftk


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        conv_block(1, 8), conv_block(8, 16), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10)
    )


@pytest.fixture(scope="module")
def digits() -> tuple[DataLoader, DataLoader]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]
    generator = torch.Generator().manual_seed(0)
    train_loader = DataLoader(TensorDataset(images[train], labels[train]), batch_size=64, shuffle=True, generator=generator)
    val_loader = DataLoader(TensorDataset(images[val], labels[val]), batch_size=256)
    return train_loader, val_loader


def test_group_names_of_small_cnn():
    assert [g.name for g in ftk.layer_groups(small_cnn())] == ["0", "1", "4"]


def test_fit_lowers_loss_on_digits(digits):
    model = small_cnn()
    phases = [ftk.Phase(2, train_groups=1, lr=1e-2), ftk.Phase(3, train_groups="all", lr=slice(3e-3, 1e-2))]

    history = ftk.Trainer(model, phases, *digits, progress=False).fit()

    assert [(r["phase"], r["epoch"]) for r in history] == [("head", 1), ("head", 2), ("all", 1), ("all", 2), ("all", 3)]
    assert history[0]["trainable_params"] == 64 * 10 + 10
    assert history[-1]["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[-1]["val_accuracy"] > 0.9
    assert history[-1]["val_accuracy"] > history[1]["val_accuracy"]


def test_head_phase_keeps_body_bit_identical(digits):
    model = small_cnn()
    before = snapshot(model)

    ftk.Trainer(model, [ftk.Phase(1, train_groups=1, lr=1e-2)], *digits, progress=False).fit()

    after = snapshot(model)
    for name in before:
        if name.startswith("4."):
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name


def test_optimizer_state_carries_across_phases(digits):
    train_loader, _ = digits
    model = small_cnn()
    phases = [ftk.Phase(1, train_groups=1, lr=1e-2), ftk.Phase(1, train_groups=2, lr=1e-3)]
    trainer = ftk.Trainer(model, phases, train_loader, None, progress=False)

    trainer.fit()

    steps = len(train_loader)
    state = trainer.optimizer.state
    assert float(state[model[4].weight]["step"]) == 2 * steps
    assert float(state[model[1][0].weight]["step"]) == steps
    assert model[0][0].weight not in state


def test_optimizer_state_returns_after_frozen_phase(digits):
    train_loader, _ = digits
    model = small_cnn()
    phases = [ftk.Phase(1, train_groups=2), ftk.Phase(1, train_groups=1), ftk.Phase(1, train_groups=2)]
    trainer = ftk.Trainer(model, phases, train_loader, progress=False)

    trainer.fit()

    steps = len(train_loader)
    assert float(trainer.optimizer.state[model[1][0].weight]["step"]) == 2 * steps
    assert float(trainer.optimizer.state[model[4].weight]["step"]) == 3 * steps


def test_trainer_sees_head_replaced_later(digits):
    train_loader, _ = digits
    model = small_cnn()
    trainer = ftk.Trainer(model, [ftk.Phase(1, train_groups=1)], train_loader, progress=False)
    new_head = ftk.replace_head(model, 10)
    before = new_head.weight.detach().clone()

    trainer.fit()

    assert not torch.equal(new_head.weight, before)


def test_cosine_schedule_keeps_ratios(digits):
    train_loader, _ = digits
    model = small_cnn()
    phase = ftk.Phase(1, train_groups="all", lr=slice(1e-4, 1e-2), schedule="cosine")
    trainer = ftk.Trainer(model, [phase], train_loader, progress=False)
    trainer._start_phase(phase)
    scheduler = trainer._scheduler(phase)
    total = len(train_loader)

    for _ in range(total // 2):
        trainer.optimizer.step()
        scheduler.step()

    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    factor = 0.5 * (1 + math.cos(math.pi * (total // 2) / total))
    assert lrs[-1] == pytest.approx(1e-2 * factor)
    assert lrs[0] == pytest.approx(1e-4 * factor)


def test_mapping_batches_train_bert():
    from conftest import make_bert

    model = make_bert()
    batches = []
    for _ in range(4):
        inputs = bert_inputs(batch=8)
        inputs["labels"] = torch.randint(0, 3, (8,))
        batches.append(inputs)

    history = ftk.Trainer(model, [ftk.Phase(2, train_groups=2, lr=1e-3)], batches, batches[:1], progress=False).fit()

    assert len(history) == 2
    assert history[0]["trainable_params"] == sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("bert.pooler.", "classifier."))
    )
    assert set(history[0]) == {"phase", "epoch", "trainable_params", "train_loss", "val_loss", "val_accuracy"}


def test_phase_default_names():
    assert ftk.Phase(1).name == "head"
    assert ftk.Phase(1, train_groups=3).name == "top3"
    assert ftk.Phase(1, train_groups="all").name == "all"
    assert ftk.Phase(1, name="probe").name == "probe"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs=0 must be a positive integer"),
        ({"epochs": 1, "train_groups": 0}, "train_groups=0 must be a positive integer"),
        ({"epochs": 1, "schedule": "linear"}, "schedule='linear' is not"),
    ],
)
def test_bad_phase_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ftk.Phase(**kwargs)


def test_phase_with_too_many_groups_raises():
    model = small_cnn()

    with pytest.raises(IndexError, match="trains 5 layer groups, but Sequential has 3"):
        ftk.Phase(1, train_groups=5).apply(model)


def test_trainer_without_phases_raises():
    with pytest.raises(ValueError, match="at least one Phase"):
        ftk.Trainer(small_cnn(), [], [])


def test_bad_batch_raises():
    model = small_cnn()
    trainer = ftk.Trainer(model, [ftk.Phase(1)], [torch.zeros(2, 1, 8, 8)], progress=False)

    with pytest.raises(TypeError, match=r"an \(inputs, labels\) pair or a mapping"):
        trainer.fit()


def test_accuracy_metric():
    assert ftk.accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1])) == pytest.approx(2 / 3)
