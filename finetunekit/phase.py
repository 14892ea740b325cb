"""Phases of a Trainer run and the built-in accuracy metric."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .freezing import FreezeSummary, freeze_to, unfreeze
from .groups import LayerGroup, resolve_groups

__all__ = ["Metric", "Phase", "accuracy"]

Metric = Callable[[torch.Tensor, torch.Tensor], float]
"""A metric over all validation logits and labels, returning a float."""


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the fraction of rows whose highest logit is at the label.

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        0.5
    """
    return (logits.argmax(dim=-1) == labels).float().mean().item()


@dataclass
class Phase:
    """One stage of fine-tuning: which layer groups train, for how long, at which rates.

    Attributes:
        epochs: Number of passes over the training data.
        train_groups: How many layer groups, counted from the head, train in this phase:
            ``1`` trains the head only, ``3`` the top two groups and the head, ``"all"``
            every group. The other groups are frozen.
        lr: Learning rate: a float, or ``slice(lo, hi)`` spread geometrically from the
            first trainable group to the head, as in :func:`finetunekit.param_groups`.
        weight_decay: Weight decay of the decayed parameters; ``None`` uses the optimizer's default.
        schedule: ``"constant"``, or ``"cosine"`` to anneal every group's rate to zero over
            the phase while keeping the ratios between groups.
        name: Name shown in logs and history; defaults to ``"head"``, ``"top<n>"`` or ``"all"``.

    Example:
        >>> phases = [Phase(epochs=1, train_groups=1, lr=1e-2),
        ...           Phase(epochs=2, train_groups=3, lr=slice(1e-4, 1e-3))]
    """

    epochs: int
    train_groups: int | Literal["all"] = 1
    lr: float | slice = 1e-3
    weight_decay: float | None = None
    schedule: Literal["constant", "cosine"] = "constant"
    name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"Phase epochs={self.epochs!r} must be a positive integer.")
        if self.train_groups != "all" and (
            isinstance(self.train_groups, bool) or not isinstance(self.train_groups, int) or self.train_groups < 1
        ):
            raise ValueError(
                f"Phase train_groups={self.train_groups!r} must be a positive integer "
                "(the number of layer groups from the head) or 'all'."
            )
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"Phase schedule={self.schedule!r} is not 'constant' or 'cosine'.")
        if self.name is None:
            if self.train_groups == "all":
                self.name = "all"
            else:
                self.name = "head" if self.train_groups == 1 else f"top{self.train_groups}"

    def apply(self, model: nn.Module, groups: Sequence[LayerGroup] | None = None) -> FreezeSummary:
        """Freeze and unfreeze ``model`` in place so that exactly this phase's groups train.

        Args:
            model: The model to change.
            groups: Layer groups to use instead of ``layer_groups(model)``.

        Returns:
            What changed, as :func:`finetunekit.freeze_to` reports it.

        Raises:
            IndexError: If ``train_groups`` is larger than the number of layer groups.
        """
        if self.train_groups == "all":
            return unfreeze(model, groups=groups)
        groups = resolve_groups(model, groups)
        if self.train_groups > len(groups):
            raise IndexError(
                f"Phase {self.name!r} trains {self.train_groups} layer groups, but "
                f"{type(model).__name__} has {len(groups)}. Pass train_groups <= {len(groups)} or 'all'."
            )
        return freeze_to(model, -self.train_groups, groups=groups)
