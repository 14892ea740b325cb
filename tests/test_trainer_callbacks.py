from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import finetunekit as ftk
from finetunekit.callbacks import Callback, EarlyStopping


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(count: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(16, 8, generator=generator),
            torch.randint(0, 3, (16,), generator=generator),
        )
        for _ in range(count)
    ]


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_fit_start(self, trainer):
        self.events.append(("fit_start",))

    def on_fit_end(self, trainer):
        self.events.append(("fit_end",))

    def on_phase_start(self, trainer, phase):
        self.events.append(("phase_start", phase.name, trainer.optimizer is not None))

    def on_phase_end(self, trainer, phase):
        self.events.append(("phase_end", phase.name))

    def on_epoch_start(self, trainer, phase, epoch):
        self.events.append(("epoch_start", phase.name, epoch))

    def on_epoch_end(self, trainer, record):
        self.events.append(("epoch_end", record["phase"], record["epoch"]))

    def on_step_end(self, trainer, loss):
        self.events.append(("step", trainer.global_step))


class ScriptedLoss(Callback):
    """Overwrite val_loss with scripted values, so the best epoch is known in advance."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def on_epoch_end(self, trainer, record):
        record["val_loss"] = self.values.pop(0)


class WeightLog(Callback):
    """Copy the model's weights after every epoch."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, trainer, record):
        self.weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})


def test_hooks_run_in_order():
    recorder = Recorder()
    phases = [ftk.Phase(1, train_groups=1), ftk.Phase(2, train_groups="all")]

    ftk.Trainer(mlp(), phases, batches(2), progress=False, callbacks=[recorder]).fit()

    steps = [("step", n) for n in range(1, 7)]
    assert recorder.events == [
        ("fit_start",),
        ("phase_start", "head", True),
        ("epoch_start", "head", 1),
        *steps[0:2],
        ("epoch_end", "head", 1),
        ("phase_end", "head"),
        ("phase_start", "all", True),
        ("epoch_start", "all", 1),
        *steps[2:4],
        ("epoch_end", "all", 1),
        ("epoch_start", "all", 2),
        *steps[4:6],
        ("epoch_end", "all", 2),
        ("phase_end", "all"),
        ("fit_end",),
    ]


def test_early_stopping_ends_phase_at_right_epoch():
    # val_loss improves until epoch 2, then stalls; patience 2 stops after epoch 4.
    # The count starts again in the second phase, which runs both its epochs.
    scripted = ScriptedLoss([1.0, 0.5, 0.6, 0.55] + [0.9, 0.8])
    stopper = EarlyStopping("val_loss", patience=2)
    phases = [ftk.Phase(6, train_groups="all"), ftk.Phase(2, train_groups=1)]

    history = ftk.Trainer(
        mlp(),
        phases,
        batches(),
        batches(1),
        progress=False,
        callbacks=[scripted, stopper],
    ).fit()

    assert [(r["phase"], r["epoch"]) for r in history] == [
        ("all", 1),
        ("all", 2),
        ("all", 3),
        ("all", 4),
        ("head", 1),
        ("head", 2),
    ]
    assert stopper.best == pytest.approx(0.8)
    assert stopper.best_epoch == 2


def test_early_stopping_max_mode_and_min_delta():
    scripted = ScriptedLoss([0.5, 0.505, 0.6, 0.6])
    stopper = EarlyStopping("val_loss", mode="max", patience=1, min_delta=0.01)

    history = ftk.Trainer(
        mlp(),
        [ftk.Phase(4)],
        batches(),
        batches(1),
        progress=False,
        callbacks=[scripted, stopper],
    ).fit()

    assert len(history) == 2
    assert stopper.best == pytest.approx(0.5)
    assert stopper.best_epoch == 1


def test_restore_best_weights_equals_best_epoch():
    scripted = ScriptedLoss([1.0, 0.5, 0.7, 0.8, 0.9])
    weights = WeightLog()
    stopper = EarlyStopping("val_loss", patience=3, restore_best_weights=True)
    model = mlp()

    history = ftk.Trainer(
        model,
        [ftk.Phase(5, train_groups="all", lr=1e-2)],
        batches(),
        batches(1),
        progress=False,
        callbacks=[scripted, weights, stopper],
    ).fit()

    assert len(history) == 5
    best, last = weights.weights[1], weights.weights[4]
    restored = model.state_dict()
    for name in best:
        assert torch.equal(restored[name], best[name]), name
    assert not torch.equal(restored["4.weight"], last["4.weight"])


def test_restored_weights_start_next_phase():
    scripted = ScriptedLoss([0.5, 0.9, 0.9])
    first_phase_end: dict[str, torch.Tensor] = {}

    class Capture(Callback):
        def on_phase_start(self, trainer, phase):
            if phase.name == "head":
                first_phase_end.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    weights = WeightLog()
    stopper = EarlyStopping("val_loss", patience=5, restore_best_weights=True)
    phases = [ftk.Phase(2, train_groups="all", lr=1e-2), ftk.Phase(1, train_groups=1)]

    ftk.Trainer(
        mlp(),
        phases,
        batches(),
        batches(1),
        progress=False,
        callbacks=[scripted, weights, stopper, Capture()],
    ).fit()

    for name, value in weights.weights[0].items():
        assert torch.equal(first_phase_end[name], value), name


def test_callback_stop_training_ends_run():
    class StopAfterFirst(Callback):
        def on_epoch_end(self, trainer, record):
            trainer.stop_training = True

    recorder = Recorder()
    history = ftk.Trainer(
        mlp(),
        [ftk.Phase(3), ftk.Phase(2)],
        batches(2),
        progress=False,
        callbacks=[StopAfterFirst(), recorder],
    ).fit()

    assert len(history) == 1
    assert recorder.events[-2:] == [("phase_end", "head"), ("fit_end",)]


def test_early_stopping_unknown_monitor_raises():
    stopper = EarlyStopping("val_f1")
    trainer = ftk.Trainer(
        mlp(),
        [ftk.Phase(1)],
        batches(2),
        batches(1),
        progress=False,
        callbacks=[stopper],
    )

    with pytest.raises(KeyError, match=r"monitor='val_f1' is not in the history record.*'val_accuracy'"):
        trainer.fit()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "lowest"}, "mode='lowest' is not 'min' or 'max'"),
        ({"patience": 0}, "patience=0 must be a positive integer"),
        ({"min_delta": -0.1}, "min_delta=-0.1 must be a number >= 0"),
    ],
)
def test_bad_early_stopping_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EarlyStopping(**kwargs)


def test_phase_transition_log_names_groups(caplog):
    phases = [ftk.Phase(1, train_groups=1), ftk.Phase(1, train_groups=2)]

    with caplog.at_level(logging.INFO, logger="finetunekit.trainer"):
        ftk.Trainer(mlp(), phases, batches(1), progress=False).fit()

    lines = [r.getMessage() for r in caplog.records if "now trainable" in r.getMessage()]
    assert lines == [
        "phase head: layer groups now trainable [], now frozen ['0', '2']",
        "phase top2: layer groups now trainable ['2'], now frozen []",
    ]
