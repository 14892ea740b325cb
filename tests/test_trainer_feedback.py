from __future__ import annotations

import pytest
import torch
from torch import nn

import finetunekit as ftk
from finetunekit.history import History


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)) for _ in range(count)
    ]


@pytest.fixture(scope="module")
def history() -> History:
    torch.manual_seed(0)
    phases = [
        ftk.Phase(1, train_groups=1, lr=1e-2),
        ftk.Phase(2, train_groups="all", lr=slice(1e-3, 1e-2), schedule="cosine"),
    ]
    return ftk.Trainer(mlp(), phases, batches(), batches(1), progress=False).fit()


def test_history_is_list_of_records(history):
    assert isinstance(history, list)
    assert [(r["phase"], r["epoch"]) for r in history] == [("head", 1), ("all", 1), ("all", 2)]


def test_history_steps_record_lr_per_group(history):
    assert [s["step"] for s in history.steps] == list(range(1, 13))
    assert history.steps[0]["lr"] == {"4": pytest.approx(1e-2)}
    assert list(history.steps[4]["lr"]) == ["0", "2", "4"]
    # Cosine over 8 steps: after the first step of the phase the factor is (1 + cos(pi / 8)) / 2.
    factor = 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 8)).item())
    assert history.steps[4]["lr"]["4"] == pytest.approx(1e-2 * factor)
    assert history.steps[4]["lr"]["0"] == pytest.approx(1e-3 * factor)
    assert history.steps[-1]["lr"]["4"] == pytest.approx(0.0, abs=1e-12)


def test_history_to_pandas(history):
    frame = history.to_pandas()

    assert list(frame["phase"]) == ["head", "all", "all"]
    assert list(frame["epoch"]) == [1, 1, 2]
    assert list(frame.columns) == ["phase", "epoch", "trainable_params", "train_loss", "val_loss", "val_accuracy"]
    assert frame["val_loss"].tolist() == [r["val_loss"] for r in history]


def test_history_plot_draws_three_panels(history):
    figure = history.plot()

    loss, metric, lr = figure.axes
    assert [line.get_label() for line in loss.get_lines() if not line.get_label().startswith("_")] == [
        "train_loss",
        "val_loss",
    ]
    assert list(loss.get_lines()[0].get_ydata()) == [r["train_loss"] for r in history]
    assert [line.get_label() for line in metric.get_lines() if not line.get_label().startswith("_")] == ["val_accuracy"]
    assert [line.get_label() for line in lr.get_lines()] == ["4", "0", "2"]
    assert list(lr.get_lines()[0].get_xdata()) == list(range(1, 13))


def test_empty_history_plot_raises():
    with pytest.raises(ValueError, match="history is empty"):
        History().plot()


def test_missing_pandas_raises(monkeypatch, history):
    import sys

    monkeypatch.setitem(sys.modules, "pandas", None)

    with pytest.raises(ImportError, match="needs pandas; install it"):
        history.to_pandas()


def test_missing_matplotlib_raises(monkeypatch, history):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)

    with pytest.raises(ImportError, match="needs matplotlib; install it"):
        history.plot()


def test_progress_bar_shows_running_loss_and_metric(monkeypatch):
    postfixes: list[dict[str, str]] = []
    import finetunekit.trainer as trainer_module

    class RecordingBar:
        def __init__(self, iterable, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, values):
            postfixes.append(dict(values))

    monkeypatch.setattr(trainer_module, "tqdm", RecordingBar)
    data = batches(2)
    model = mlp()
    trainer = ftk.Trainer(model, [ftk.Phase(1, train_groups="all", lr=1e-30)], data, optimizer=torch.optim.SGD)

    trainer.fit()

    # SGD steps of 1e-30 round away in float32, so the weights stay put and the running values can be recomputed.
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(model(x), y).item() for x, y in data]
        accuracies = [ftk.accuracy(model(x), y) for x, y in data]
    assert [set(p) for p in postfixes] == [{"loss", "accuracy"}] * 2
    assert float(postfixes[1]["loss"]) == pytest.approx(sum(losses) / 2, abs=1e-4)
    assert float(postfixes[1]["accuracy"]) == pytest.approx(sum(accuracies) / 2, abs=1e-4)
