from __future__ import annotations

import pytest
import torch
from conftest import make_bert, snapshot
from torch.utils.data import Dataset

import finetunekit as ftk
from finetunekit.hf_callback import PhaseScheduleCallback

transformers = pytest.importorskip("transformers")


class Tokens(Dataset):
    def __init__(self, samples: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(5, 120, (samples, 10), generator=generator)
        self.labels = torch.arange(samples) % 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


class Probe:
    """Record the trainable names, the weights and the optimizer rates at the end of each epoch."""

    def __init__(self) -> None:
        self.trainable: list[set[str]] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.rates: list[dict[str, float]] = []

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_epoch_end(self, args, state, control, model, optimizer, **kwargs):
        self.trainable.append({n for n, p in model.named_parameters() if p.requires_grad})
        self.weights.append(snapshot(model))
        self.rates.append({g["name"]: g["initial_lr"] for g in optimizer.param_groups})


def train(tmp_path, phases, epochs: int, **options):
    model = make_bert()
    before = snapshot(model)
    callback, probe = PhaseScheduleCallback(phases), Probe()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        **options,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback, probe])
    trainer.train()
    return model, before, callback, probe


def names_of(groups) -> set[str]:
    return {name for group in groups for name, _ in group.named_parameters()}


@pytest.fixture(scope="module")
def gradual_run(tmp_path_factory):
    """A head epoch, then two epochs of the top three groups, trained once for several tests."""
    phases = [ftk.Phase(1, train_groups=1, lr=1e-2), ftk.Phase(2, train_groups=3, lr=slice(1e-4, 1e-3))]
    return train(tmp_path_factory.mktemp("hf"), phases, epochs=3)


def test_trainable_sets_per_epoch(gradual_run):
    model, _, callback, probe = gradual_run

    groups = ftk.layer_groups(model)
    head, top3 = names_of(groups[-1:]), names_of(groups[-3:])
    assert probe.trainable == [head, top3, top3]
    assert [r["phase"] for r in callback.records] == ["head", "top3", "top3"]
    assert [r["epoch"] for r in callback.records] == [1, 2, 3]


def test_frozen_weights_unchanged_per_phase(gradual_run):
    model, before, _, probe = gradual_run

    groups = ftk.layer_groups(model)
    head, top3 = names_of(groups[-1:]), names_of(groups[-3:])
    after_head, after_all = probe.weights[0], probe.weights[-1]
    for name in names_of(groups):
        if name in head:
            assert not torch.equal(after_head[name], before[name]), name
        else:
            assert torch.equal(after_head[name], before[name]), name
        if name in top3:
            assert not torch.equal(after_all[name], after_head[name]), name
        else:
            assert torch.equal(after_all[name], before[name]), name


def test_rates_follow_phase(tmp_path):
    phases = [ftk.Phase(1, train_groups=1, lr=1e-2), ftk.Phase(1, train_groups=3, lr=slice(1e-4, 1e-3))]

    model, _, _, probe = train(tmp_path, phases, epochs=2, lr_scheduler_type="constant")

    groups = [g.name for g in ftk.layer_groups(model)]
    head, middle, low = groups[-1], groups[-2], groups[-3]
    assert probe.rates[0][head] == pytest.approx(1e-2)
    assert probe.rates[0][middle] == 0.0
    assert probe.rates[1][head] == pytest.approx(1e-3)
    assert probe.rates[1][middle] == pytest.approx(10**-3.5)
    assert probe.rates[1][low] == pytest.approx(1e-4)
    assert probe.rates[1][groups[0]] == 0.0


def test_epoch_mismatch_warns(tmp_path):
    phases = [ftk.Phase(1, train_groups=1, lr=1e-2), ftk.Phase(1, train_groups=2, lr=1e-3)]

    with pytest.warns(
        ftk.FinetuneKitWarning, match=r"num_train_epochs=1 differs from the 2 epochs.*late phases are cut"
    ):
        train(tmp_path, phases, epochs=1)


def test_empty_phases_rejected():
    with pytest.raises(ValueError, match="PhaseScheduleCallback needs at least one Phase"):
        PhaseScheduleCallback([])
