"""The Trainer's history: one record per epoch, the learning rates per step, a DataFrame and a plot."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import matplotlib.figure
    import pandas

__all__ = ["History"]


class History(list):  # type: ignore[type-arg]
    """The records of a run, one dict per epoch, in order; a ``list`` with a few extras.

    Each record has ``phase``, ``epoch``, ``trainable_params`` and ``train_loss``, and with
    validation data ``val_loss`` and ``val_<metric>``. :attr:`steps` keeps one entry per
    optimizer step with the loss and each layer group's learning rate, for plots of
    schedules.

    Example:
        >>> history = trainer.fit()
        >>> history[-1]["val_accuracy"]
        0.97
        >>> history.to_pandas()[["phase", "epoch", "val_loss"]]  # needs pandas
        >>> history.plot().savefig("history.png")                 # needs matplotlib
    """

    def __init__(self, records: list[dict[str, Any]] | None = None) -> None:
        super().__init__(records or [])
        self.steps: list[dict[str, Any]] = []
        """One dict per optimizer step: ``step`` (counted over the run), ``phase``,
        ``loss`` and ``lr``, a dict from param-group name to learning rate."""

    def to_pandas(self) -> pandas.DataFrame:
        """Return the epoch records as a pandas DataFrame, one row per epoch.

        Raises:
            ImportError: If pandas is not installed.
        """
        try:
            import pandas
        except ImportError as error:
            raise ImportError("History.to_pandas() needs pandas; install it with `pip install pandas`.") from error
        return pandas.DataFrame.from_records(list(self))

    def plot(self) -> matplotlib.figure.Figure:
        """Plot the losses, the validation metrics and each param group's learning rate.

        The first two panels have one point per epoch, numbered over the whole run, with a
        dashed line at each phase change. The third has one point per optimizer step.

        Returns:
            A matplotlib ``Figure`` with three axes; save it with ``fig.savefig(path)``.

        Raises:
            ImportError: If matplotlib is not installed.
            ValueError: If the history is empty.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError("History.plot() needs matplotlib; install it with `pip install matplotlib`.") from error
        if not self:
            raise ValueError("The history is empty; call trainer.fit() before plot().")

        figure = Figure(figsize=(12, 3.5), layout="constrained")
        loss_axes, metric_axes, lr_axes = figure.subplots(1, 3)
        epochs = list(range(1, len(self) + 1))
        for key in ("train_loss", "val_loss"):
            if key in self[0]:
                loss_axes.plot(epochs, [r.get(key) for r in self], marker="o", label=key)
        metric_keys = [k for k in self[0] if k.startswith("val_") and k != "val_loss"]
        for key in metric_keys:
            metric_axes.plot(epochs, [r.get(key) for r in self], marker="o", label=key)
        for axes in (loss_axes, metric_axes):
            for index in range(1, len(self)):
                if self[index]["phase"] != self[index - 1]["phase"]:
                    axes.axvline(index + 0.5, color="grey", linestyle="--", linewidth=0.8)
            axes.set_xlabel("epoch")
        loss_axes.set_title("loss")
        metric_axes.set_title("validation metrics")

        group_names = list(dict.fromkeys(n for s in self.steps for n in s["lr"]))
        for name in group_names:
            steps = [s["step"] for s in self.steps if name in s["lr"]]
            rates = [s["lr"][name] for s in self.steps if name in s["lr"]]
            lr_axes.plot(steps, rates, label=name)
        lr_axes.set_title("learning rate per param group")
        lr_axes.set_xlabel("step")
        for axes in (loss_axes, metric_axes, lr_axes):
            if axes.get_legend_handles_labels()[0]:
                axes.legend(fontsize="small")
        return figure
