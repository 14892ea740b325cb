"""Callbacks of the Trainer: hooks at run, phase, epoch and step boundaries, and early stopping.

A callback is an object with any of the ``on_*`` methods of :class:`Callback`. The
Trainer calls them in the order the callbacks were given. A callback ends the current
phase by setting ``trainer.stop_phase = True`` and the whole run by setting
``trainer.stop_training = True``; both take effect after the current epoch.

This module does not import the Trainer, so the Trainer depends on it and not the
other way round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from .trainer import Phase, Trainer

__all__ = ["Callback", "EarlyStopping"]

logger = logging.getLogger(__name__)


class Callback:
    """Base class of Trainer callbacks; every hook does nothing by default.

    Override the hooks you need. A callback that keeps state across epochs returns it
    from :meth:`state_dict` and takes it back in :meth:`load_state_dict`, so that a run
    resumed from a checkpoint continues with the same state.

    Example:
        >>> class PrintLoss(Callback):
        ...     def on_epoch_end(self, trainer, record):
        ...         logging.info("epoch %d: %.3f", record["epoch"], record["train_loss"])
        >>> Trainer(model, phases, train_loader, callbacks=[PrintLoss()]).fit()
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Run once when ``fit()`` starts, after the model was moved to its device."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Run once when ``fit()`` ends, also after ``stop_training``."""

    def on_phase_start(self, trainer: Trainer, phase: Phase) -> None:
        """Run after the phase's freezing, optimizer and scheduler were set up."""

    def on_phase_end(self, trainer: Trainer, phase: Phase) -> None:
        """Run after the phase's last epoch, or the epoch after which it was stopped."""

    def on_epoch_start(self, trainer: Trainer, phase: Phase, epoch: int) -> None:
        """Run before the first batch of ``epoch`` (counted from 1 within the phase)."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Run after validation, with the epoch's history record already in ``trainer.history``."""

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        """Run after each optimizer step, with the batch's loss."""

    def state_dict(self) -> dict[str, Any]:
        """Return the state to save in a checkpoint; empty by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back the state that :meth:`state_dict` returned."""


class EarlyStopping(Callback):
    """Stop each phase once a validation value stops improving, optionally restoring its best weights.

    The count starts again in every phase, because unfreezing more layer groups
    usually changes the loss curve. After each epoch the value ``monitor`` of the
    history record is compared with the best value of the phase so far. An epoch
    improves when the value beats the best by more than ``min_delta``. After
    ``patience`` epochs in a row without improvement the phase ends, and the run goes
    on with the next phase.

    With ``restore_best_weights=True`` the callback copies the trainable parameters
    and all buffers at each improving epoch, and loads them back at the end of the
    phase, so the next phase starts from the best epoch's weights. The optimizer state
    is not rolled back.

    Args:
        monitor: Key of the history record to watch, such as ``"val_loss"`` or
            ``"val_accuracy"``. It needs validation data unless it is ``"train_loss"``.
        mode: ``"min"`` when lower is better, ``"max"`` when higher is better.
        patience: Epochs without improvement after which the phase ends.
        min_delta: Smallest change that counts as an improvement, in the units of ``monitor``.
        restore_best_weights: Load the best epoch's weights back at the end of each phase.

    Raises:
        ValueError: If ``mode``, ``patience`` or ``min_delta`` is invalid.

    Example:
        >>> stopper = EarlyStopping("val_accuracy", mode="max", patience=2,
        ...                         restore_best_weights=True)
        >>> Trainer(model, phases, train_loader, val_loader, callbacks=[stopper]).fit()
        >>> stopper.best_epoch, stopper.best
        (3, 0.94)
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        *,
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        restore_best_weights: bool = False,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode={mode!r} is not 'min' or 'max'.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping patience={patience!r} must be a positive integer (epochs).")
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ValueError(
                f"EarlyStopping min_delta={min_delta!r} must be a number >= 0; the direction comes from mode."
            )
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.restore_best_weights = restore_best_weights
        self.best: float = math.inf if mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.wait = 0
        self.best_weights: dict[str, torch.Tensor] | None = None

    def on_phase_start(self, trainer: Trainer, phase: Phase) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = None
        self.wait = 0
        self.best_weights = None

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.monitor not in record:
            raise KeyError(
                f"EarlyStopping monitor={self.monitor!r} is not in the history record, "
                f"which has {sorted(record)}. Pick one of those keys; val_* keys need val_data."
            )
        value = float(record[self.monitor])
        if self._improves(value):
            self.best = value
            self.best_epoch = int(record["epoch"])
            self.wait = 0
            if self.restore_best_weights:
                self.best_weights = _copy_weights(trainer.model)
            return

        self.wait += 1
        if self.wait >= self.patience:
            trainer.stop_phase = True
            logger.info(
                "early stopping: phase %s ends after epoch %d, %s did not improve on %.4f (epoch %s) for %d epochs",
                record["phase"],
                record["epoch"],
                self.monitor,
                self.best,
                self.best_epoch,
                self.wait,
            )

    def on_phase_end(self, trainer: Trainer, phase: Phase) -> None:
        if not self.restore_best_weights or self.best_weights is None:
            return
        _load_weights(trainer.model, self.best_weights)
        logger.info(
            "restored the weights of epoch %s of phase %s (%s %.4f)",
            self.best_epoch,
            phase.name,
            self.monitor,
            self.best,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_epoch = state["best_epoch"]
        self.wait = int(state["wait"])
        self.best_weights = state["best_weights"]

    def _improves(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


def _copy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copy the trainable parameters and every buffer, by state-dict name."""
    copied = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    copied.update({name: buffer.detach().clone() for name, buffer in model.named_buffers()})
    return copied


def _load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name, value in weights.items():
            tensors[name].copy_(value)
