"""Run a finetunekit phase schedule inside the Hugging Face ``transformers.Trainer``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._utils import named_parameters_once
from .errors import FinetuneKitWarning
from .groups import LayerGroup, resolve_groups
from .param_groups import param_groups
from .phase import Phase

__all__ = ["PhaseScheduleCallback"]

logger = logging.getLogger(__name__)


class PhaseScheduleCallback:
    """A ``transformers.TrainerCallback`` that applies :class:`~finetunekit.Phase` s by epoch.

    At the start of training the callback regroups the optimizer that the Hugging Face
    ``Trainer`` built into one parameter group per layer group and weight-decay setting,
    with every parameter of the model, frozen ones included. At the first epoch of each
    phase it applies the phase's freezing and gives each group the phase's learning rate
    (a float, or a ``slice`` spread over the trainable groups as in
    :func:`finetunekit.param_groups`); frozen groups get a rate of 0. The Trainer's own
    schedule (``lr_scheduler_type``, warm-up) keeps running and multiplies every group's
    phase rate, so ``TrainingArguments.learning_rate`` is not used. Optimizer state stays
    with each parameter across phases.

    It implements the ``TrainerCallback`` events without subclassing it, so importing
    this module does not import transformers. Phases' ``schedule`` and
    ``weight_decay`` fields are not used: the Trainer's schedule and
    ``TrainingArguments.weight_decay`` apply.

    TODO: ``Trainer.train(resume_from_checkpoint=...)`` is not supported yet: the Trainer
    loads the saved optimizer state, which has this callback's groups, into its own
    two-group optimizer before ``on_train_begin``, and torch rejects the mismatch.

    Args:
        phases: The phases in order. Set ``TrainingArguments(num_train_epochs=...)`` to
            the sum of their epochs.
        groups: Layer groups to use instead of ``layer_groups(model)``.

    Attributes:
        records: One dict per epoch: ``epoch`` (counted from 1 over the run), ``phase``,
            ``trainable_params`` and ``lr``, the base rate of each optimizer group by name.

    Raises:
        ValueError: If ``phases`` is empty.

    Example:
        >>> from transformers import Trainer, TrainingArguments
        >>> phases = [Phase(1, train_groups=1, lr=1e-3), Phase(2, train_groups=3, lr=slice(1e-5, 1e-4))]
        >>> trainer = Trainer(model, TrainingArguments("out", num_train_epochs=3), train_dataset=data,
        ...                   callbacks=[PhaseScheduleCallback(phases)])
        >>> trainer.train()
    """

    def __init__(self, phases: Sequence[Phase], *, groups: Sequence[LayerGroup] | None = None) -> None:
        if not phases:
            raise ValueError("PhaseScheduleCallback needs at least one Phase, for example [Phase(epochs=1)].")
        self.phases = list(phases)
        self.groups = list(groups) if groups is not None else None
        self.records: list[dict[str, Any]] = []
        self._epoch = 0
        self._phase_index = -1
        self._layers: list[LayerGroup] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        # The Trainer calls every event on every callback; the ones not defined here do nothing.
        if name.startswith("on_"):
            return _ignore
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Regroup the optimizer by layer group and apply the phase of the first epoch."""
        model, optimizer, scheduler = _unwrap(kwargs)
        total = sum(phase.epochs for phase in self.phases)
        if args.num_train_epochs != total:
            warnings.warn(
                f"TrainingArguments.num_train_epochs={args.num_train_epochs} differs from the {total} epochs of "
                f"the phases, so {'the last phase runs longer' if args.num_train_epochs > total else 'late phases are cut'}. "
                f"Pass num_train_epochs={total}.",
                FinetuneKitWarning,
                stacklevel=2,
            )
        if getattr(args, "world_size", 1) > 1 and not getattr(args, "ddp_find_unused_parameters", False):
            # NOTE: no test runs this callback in several processes.
            raise ValueError(
                "PhaseScheduleCallback freezes parameters after DistributedDataParallel wrapped the model, "
                "which then waits for their gradients. Pass TrainingArguments(ddp_find_unused_parameters=True)."
            )
        self._layers = resolve_groups(model, self.groups)
        self._regroup(model, optimizer, args.weight_decay)
        self._epoch = round(state.epoch or 0)
        self._phase_index = -1
        self._enter(self._phase_at(self._epoch), model, optimizer, scheduler)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start the next phase when this epoch is its first."""
        model, optimizer, scheduler = _unwrap(kwargs)
        index = self._phase_at(self._epoch)
        if index != self._phase_index:
            self._enter(index, model, optimizer, scheduler)
        self._epoch += 1
        self.records.append(
            {
                "epoch": self._epoch,
                "phase": self.phases[index].name,
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "lr": {str(g["name"]): g["initial_lr"] for g in optimizer.param_groups},
            }
        )

    def _phase_at(self, epoch: int) -> int:
        end = 0
        for index, phase in enumerate(self.phases):
            end += phase.epochs
            if epoch < end:
                return index
        return len(self.phases) - 1

    def _regroup(self, model: nn.Module, optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
        """Replace the optimizer's groups, in place, with one group per layer group and decay setting."""
        groups = param_groups(
            model, 1.0, weight_decay=weight_decay, include_frozen=True, merge=False, groups=self._layers
        )
        state = optimizer.state
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        # add_param_group keeps the state dict, so moments of parameters seen before stay.
        assert optimizer.state is state

    def _enter(self, index: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        phase = self.phases[index]
        phase.apply(model, groups=self._layers)
        rates = {
            id(p): g["lr"] for g in param_groups(model, phase.lr, merge=False, groups=self._layers) for p in g["params"]
        }
        base_rates = [rates.get(id(group["params"][0]), 0.0) for group in optimizer.param_groups]
        _set_base_rates(optimizer, scheduler, base_rates)
        self._phase_index = index
        trainable = [name for name, p in named_parameters_once(model) if p.requires_grad]
        logger.info(
            "epoch %d: phase %s, %d trainable tensors, rates %s",
            self._epoch + 1,
            phase.name,
            len(trainable),
            sorted({rate for rate in base_rates if rate > 0}),
        )


def _set_base_rates(optimizer: torch.optim.Optimizer, scheduler: Any, rates: list[float]) -> None:
    """Give each group a new base rate, and the scheduler a factor for each group."""
    factor = 1.0
    if scheduler is not None:
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise TypeError(
                f"PhaseScheduleCallback needs a LambdaLR schedule, as transformers builds for "
                f"lr_scheduler_type 'linear', 'cosine' or 'constant'; got {type(scheduler).__name__}. "
                "Pass lr_scheduler_type='linear', 'cosine' or 'constant'."
            )
        # LambdaLR keeps one factor function and one base rate per group; the groups share HF's function.
        scheduler.lr_lambdas = [scheduler.lr_lambdas[0]] * len(rates)
        scheduler.base_lrs = list(rates)
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group, rate in zip(optimizer.param_groups, rates):
        group["initial_lr"] = rate
        group["lr"] = rate * factor


def _unwrap(kwargs: dict[str, Any]) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """Return the model and the torch optimizer and scheduler inside accelerate's wrappers."""
    optimizer = kwargs.get("optimizer")
    if optimizer is None:
        raise RuntimeError(
            "The Trainer passed no optimizer to PhaseScheduleCallback; it must run inside Trainer.train()."
        )
    optimizer = getattr(optimizer, "optimizer", optimizer)
    scheduler = kwargs.get("lr_scheduler")
    scheduler = getattr(scheduler, "scheduler", scheduler)
    return kwargs["model"], optimizer, scheduler


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
