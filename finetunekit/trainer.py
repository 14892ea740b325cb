"""A thin training loop that runs fine-tuning phases: head first, then more layer groups."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ._batches import forward_batch
from .freezing import FreezeSummary, freeze_to, unfreeze
from .groups import LayerGroup, resolve_groups
from .param_groups import param_groups

__all__ = ["Phase", "Trainer", "accuracy"]

logger = logging.getLogger(__name__)

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
        if (
            isinstance(self.epochs, bool)
            or not isinstance(self.epochs, int)
            or self.epochs < 1
        ):
            raise ValueError(
                f"Phase epochs={self.epochs!r} must be a positive integer."
            )
        if self.train_groups != "all" and (
            isinstance(self.train_groups, bool)
            or not isinstance(self.train_groups, int)
            or self.train_groups < 1
        ):
            raise ValueError(
                f"Phase train_groups={self.train_groups!r} must be a positive integer "
                "(the number of layer groups from the head) or 'all'."
            )
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(
                f"Phase schedule={self.schedule!r} is not 'constant' or 'cosine'."
            )
        if self.name is None:
            if self.train_groups == "all":
                self.name = "all"
            else:
                self.name = (
                    "head" if self.train_groups == 1 else f"top{self.train_groups}"
                )

    def apply(
        self, model: nn.Module, groups: Sequence[LayerGroup] | None = None
    ) -> FreezeSummary:
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


class Trainer:
    """Run fine-tuning phases over a model, validating after each epoch.

    At the start of each phase the trainer applies the phase's freezing, builds parameter
    groups with :func:`finetunekit.param_groups` and a new optimizer, and gives every
    parameter that trained in an earlier phase its optimizer state (such as Adam's
    moments) back. Batches are ``(inputs, labels)`` pairs, or mappings with a ``"labels"``
    key whose other entries are passed to the model as keyword arguments (Hugging Face
    style). A model output with a ``logits`` attribute is read through it.

    Args:
        model: The model to train, in place. It is moved to ``device`` when one is given.
        phases: The phases to run, in order.
        train_data: An iterable of training batches, such as a ``DataLoader``.
        val_data: An iterable of validation batches, or ``None`` to skip validation.
        loss_fn: ``loss_fn(logits, labels)``; cross-entropy by default.
        metrics: Functions of all validation logits and labels, by name; accuracy by default.
        optimizer: Optimizer class, called with the parameter groups and ``optimizer_kwargs``.
        optimizer_kwargs: Extra keyword arguments for the optimizer, such as ``betas``.
        device: Device for the model and batches; the model's current device by default.
        max_grad_norm: Clip the gradient norm of the trainable parameters to this value.
        groups: Layer groups to use instead of ``layer_groups(model)``, which is called
            at the start of each phase.
        progress: Show a tqdm progress bar for each epoch.

    Example:
        >>> trainer = Trainer(model, [Phase(1, train_groups=1, lr=1e-2),
        ...                           Phase(2, train_groups=3, lr=slice(1e-4, 1e-3))],
        ...                   train_loader, val_loader)
        >>> history = trainer.fit()
        >>> history[-1]["val_accuracy"]
        0.97
    """

    def __init__(
        self,
        model: nn.Module,
        phases: Sequence[Phase],
        train_data: Iterable[Any],
        val_data: Iterable[Any] | None = None,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metrics: Mapping[str, Metric] | None = None,
        optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        max_grad_norm: float | None = None,
        groups: Sequence[LayerGroup] | None = None,
        progress: bool = True,
    ) -> None:
        if not phases:
            raise ValueError(
                "Trainer needs at least one Phase, for example [Phase(epochs=1, train_groups=1)]."
            )
        self.model = model
        self.phases = list(phases)
        self.train_data = train_data
        self.val_data = val_data
        self.loss_fn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
        self.metrics = dict(metrics) if metrics is not None else {"accuracy": accuracy}
        self.optimizer_class = optimizer
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.device = (
            torch.device(device)
            if device is not None
            else next(model.parameters()).device
        )
        self.max_grad_norm = max_grad_norm
        self.groups = list(groups) if groups is not None else None
        self.progress = progress
        self.optimizer: torch.optim.Optimizer | None = None
        self._saved_state: dict[torch.Tensor, Any] = {}
        self.history: list[dict[str, Any]] = []

    def fit(self) -> list[dict[str, Any]]:
        """Run every phase and return one record per epoch.

        Returns:
            The history: dicts with ``phase``, ``epoch`` (counted within the phase),
            ``trainable_params``, ``train_loss``, and, with validation data, ``val_loss``
            and ``val_<metric>`` for each metric.
        """
        self.model.to(self.device)
        for phase in self.phases:
            self._start_phase(phase)
            scheduler = self._scheduler(phase)
            trainable = sum(
                p.numel() for p in self.model.parameters() if p.requires_grad
            )
            for epoch in range(1, phase.epochs + 1):
                train_loss = self._train_epoch(phase, epoch, scheduler)
                record: dict[str, Any] = {
                    "phase": phase.name,
                    "epoch": epoch,
                    "trainable_params": trainable,
                    "train_loss": train_loss,
                }
                if self.val_data is not None:
                    record.update({f"val_{k}": v for k, v in self.evaluate().items()})
                self.history.append(record)
                logger.info("%s", _format_record(record))
        return self.history

    @torch.no_grad()
    def evaluate(self, data: Iterable[Any] | None = None) -> dict[str, float]:
        """Compute the loss and metrics over ``data`` (the validation data by default).

        The model is put in eval mode and returned to its previous mode afterwards.

        Returns:
            ``{"loss": ..., <metric>: ...}``.
        """
        data = self.val_data if data is None else data
        if data is None:
            raise ValueError(
                "evaluate() needs data: pass it, or give the Trainer val_data."
            )
        was_training = self.model.training
        self.model.eval()
        all_logits, all_labels = [], []
        try:
            for batch in data:
                logits, labels = self._forward(batch)
                all_logits.append(logits.float().cpu())
                all_labels.append(labels.cpu())
        finally:
            self.model.train(was_training)

        logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        results = {"loss": float(self.loss_fn(logits, labels))}
        results.update(
            {name: float(fn(logits, labels)) for name, fn in self.metrics.items()}
        )
        return results

    def _start_phase(self, phase: Phase) -> None:
        # Groups are found per phase, so a head replaced after the Trainer was built is seen.
        layers = resolve_groups(self.model, self.groups)
        summary = phase.apply(self.model, groups=layers)
        groups = param_groups(
            self.model, phase.lr, weight_decay=phase.weight_decay, groups=layers
        )
        new = self.optimizer_class(groups, **self.optimizer_kwargs)

        # A parameter that trained in any earlier phase gets its optimizer state (moments,
        # step count) back, also after a phase in which it was frozen.
        if self.optimizer is not None:
            self._saved_state.update(self.optimizer.state)
        for group in new.param_groups:
            for param in group["params"]:
                if param in self._saved_state:
                    new.state[param] = self._saved_state[param]
        self.optimizer = new
        logger.info(
            "phase %s: %s trainable values in %d param groups",
            phase.name,
            f"{summary.num_trainable:,}",
            len(new.param_groups),
        )

    def _scheduler(self, phase: Phase) -> torch.optim.lr_scheduler.LRScheduler | None:
        if phase.schedule == "constant":
            return None
        try:
            total = phase.epochs * len(self.train_data)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"Phase {phase.name!r} uses schedule='cosine', which needs train_data with a len(). "
                "Pass a DataLoader or a list, or use schedule='constant'."
            ) from None
        assert self.optimizer is not None

        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def _train_epoch(
        self,
        phase: Phase,
        epoch: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    ) -> float:
        assert self.optimizer is not None
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        total_loss, total_count = 0.0, 0
        total = len(self.train_data) if hasattr(self.train_data, "__len__") else None
        bar = tqdm(
            self.train_data,
            total=total,
            desc=f"{phase.name} {epoch}/{phase.epochs}",
            disable=not self.progress,
            leave=False,
        )
        for batch in bar:
            self.optimizer.zero_grad(set_to_none=True)
            logits, labels = self._forward(batch)
            loss = self.loss_fn(logits, labels)
            loss.backward()
            if self.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(trainable, self.max_grad_norm)
            self.optimizer.step()
            if scheduler is not None:
                scheduler.step()

            count = labels.shape[0]
            total_loss += loss.item() * count
            total_count += count
            bar.set_postfix(loss=f"{total_loss / total_count:.4f}")
        if total_count == 0:
            raise ValueError("train_data yielded no batches.")
        return total_loss / total_count

    def _forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_batch(self.model, batch, self.device)


def _format_record(record: Mapping[str, Any]) -> str:
    parts = [
        f"phase {record['phase']}",
        f"epoch {record['epoch']}",
        f"trainable {record['trainable_params']:,}",
    ]
    for key, value in record.items():
        if key not in ("phase", "epoch", "trainable_params"):
            parts.append(f"{key} {value:.4f}")
    return "  ".join(parts)
