"""More freezing policies: re-initializing the top layer groups, and progressive freezing.

Also contains the gradient scoring behind :meth:`~finetunekit.SurgicalFineTuning.from_gradients`.
The policies follow the conventions of :mod:`finetunekit.policies`, which re-exports them.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from ._norms import NormPolicy, check_policy
from ._policy_utils import _changed_or_none, _check_int, _train_only
from .errors import FinetuneKitWarning
from .freezing import FreezeSummary, unfreeze
from .groups import LayerGroup, resolve_groups

__all__ = ["ProgressiveFreezing", "ReinitializeTop"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReinitializeTop:
    """Re-initialize the top ``k`` layer groups below the head, then train every parameter.

    Re-initializing the top few layers of a pretrained transformer before fine-tuning is
    reported to help when the dataset is small. Those layers are the most specific to
    the pretraining task, and fresh weights there can adapt faster than pretrained ones.
    The head is not counted in ``k`` and keeps its weights.

    Each module of the chosen groups is re-initialized the way its model builds it:

    - a model with ``_init_weights`` (a Hugging Face ``PreTrainedModel``) gets
      ``model._init_weights(module)`` for each module;
    - any other model gets ``module.reset_parameters()`` for each module that has it.
      This also resets the running statistics of BatchNorm layers.

    The new values come from the global torch random number generator, so
    ``torch.manual_seed`` before :meth:`apply` makes them repeatable.

    Attributes:
        k: Number of layer groups to re-initialize, counted down from the group just
            below the head: ``1`` is that group only.

    Raises:
        TypeError: If ``k`` is not an int.
        ValueError: If ``k`` is less than 1.

    Example:
        >>> model = torchvision.models.resnet18(weights=None)
        >>> before = model.layer4[1].conv2.weight.clone()
        >>> ReinitializeTop(1).apply(model).num_frozen
        0
        >>> torch.equal(model.layer4[1].conv2.weight, before)
        False
    """

    k: int

    def __post_init__(self) -> None:
        _check_int("ReinitializeTop", "k", self.k, minimum=1)

    def apply(self, model: nn.Module, *, groups: Sequence[LayerGroup] | None = None) -> FreezeSummary:
        """Re-initialize the top ``k`` groups below the head of ``model`` and unfreeze every parameter, in place.

        Args:
            model: The model to change.
            groups: Layer groups to use instead of ``layer_groups(model)``. The last one
                is taken as the head.

        Returns:
            What changed in ``requires_grad``, as :func:`~finetunekit.unfreeze` reports
            it. The re-initialized groups are logged at INFO level.

        Warns:
            FinetuneKitWarning: If a parameter of the chosen groups belongs to a module
                without ``reset_parameters``, so it keeps its value. Models with
                ``_init_weights`` are not checked.

        Raises:
            IndexError: If ``k`` is larger than the number of groups below the head. The
                model is not changed then.
        """
        groups = resolve_groups(model, groups)
        body = groups[:-1]
        if self.k > len(body):
            raise IndexError(
                f"ReinitializeTop(k={self.k}) re-initializes {self.k} layer groups below the head, but "
                f"{type(model).__name__} has {len(body)}. Pass 1 <= k <= {len(body)}."
            )

        chosen = body[-self.k :]
        skipped = [name for group in chosen for name in _reinitialize_group(model, group)]
        if skipped:
            warnings.warn(
                f"ReinitializeTop(k={self.k}) kept the pretrained values of {skipped[:5]} "
                f"({len(skipped)} tensors), because their modules have no reset_parameters(). "
                "Re-initialize them yourself, or pass groups= that leave them out.",
                FinetuneKitWarning,
                stacklevel=2,
            )
        logger.info("ReinitializeTop re-initialized %s", [group.name for group in chosen])
        return unfreeze(model, groups=groups)


@dataclass(frozen=True)
class ProgressiveFreezing:
    """Freeze the layer groups one after another, from the input side up, to save compute (FreezeOut).

    Every group trains at first. Body group ``i`` (``0`` is the group nearest the
    input, and there are ``n`` groups below the head) is frozen from epoch

        ``t_i = ceil(first * total_epochs + (1 - first) * total_epochs * i / n)``

    on. So the input-side group freezes at ``first * total_epochs`` and the last body
    group near ``total_epochs``. The head always trains. Frozen groups need no weight
    gradients, so later epochs run faster.

    Use it for a large dataset when training time matters more than the last bit of
    accuracy. Call :meth:`apply` once before training and :meth:`on_epoch` at the start
    of every epoch. Each call sets the exact state of its epoch, so training can resume
    at any epoch.

    Attributes:
        total_epochs: Number of epochs of the whole training, at least 1.
        first: Fraction of ``total_epochs`` after which the first group freezes, with
            ``0 < first <= 1``. ``1`` freezes no group before ``total_epochs``.
        bn: BatchNorm policy for the frozen normalization layers, as the ``bn=`` argument
            of :func:`~finetunekit.freeze`.

    Raises:
        TypeError: If ``total_epochs`` is not an int, or ``first`` is not a real number.
        ValueError: If ``total_epochs < 1``, ``first`` is outside ``0 < first <= 1``, or
            ``bn`` is not a BatchNorm policy.

    Example:
        >>> policy = ProgressiveFreezing(total_epochs=4, first=0.5)
        >>> policy.freeze_epochs(9)  # resnet18 has 9 groups below the head
        [2, 3, 3, 3, 3, 4, 4, 4, 4]
    """

    total_epochs: int
    first: float = 0.5
    bn: NormPolicy | None = None

    def __post_init__(self) -> None:
        _check_int("ProgressiveFreezing", "total_epochs", self.total_epochs, minimum=1)
        if isinstance(self.first, bool) or not isinstance(self.first, numbers.Real):
            raise TypeError(
                f"ProgressiveFreezing(first={self.first!r}): first must be a real number, "
                f"not {type(self.first).__name__}."
            )
        if not 0 < self.first <= 1:
            raise ValueError(f"ProgressiveFreezing(first={self.first!r}) is out of range: pass 0 < first <= 1.")
        check_policy(self.bn)

    def freeze_epochs(self, num_body_groups: int) -> list[int]:
        """Return the epoch from which each of ``num_body_groups`` body groups is frozen, input side first.

        Raises:
            TypeError: If ``num_body_groups`` is not an int.
            ValueError: If ``num_body_groups`` is negative.
        """
        _check_int("freeze_epochs", "num_body_groups", num_body_groups, minimum=0)
        # The decimal form of ``first`` is what the user wrote, so 0.3 counts as 3/10 and
        # ceil does not round 0.3 * 10 = 3.0000000000000004 up to 4.
        first = Fraction(str(self.first))
        total = self.total_epochs
        return [
            math.ceil(first * total + (1 - first) * total * Fraction(i, num_body_groups))
            for i in range(num_body_groups)
        ]

    def apply(self, model: nn.Module, *, groups: Sequence[LayerGroup] | None = None) -> FreezeSummary:
        """Make every parameter of ``model`` trainable, in place: the state of epoch 0.

        Args:
            model: The model to change.
            groups: Layer groups to use instead of ``layer_groups(model)``.

        Returns:
            What changed, as :func:`~finetunekit.unfreeze` reports it.
        """
        return unfreeze(model, groups=groups)

    def on_epoch(
        self, model: nn.Module, epoch: int, *, groups: Sequence[LayerGroup] | None = None
    ) -> FreezeSummary | None:
        """Freeze the body groups of ``model`` whose epoch has come and train the others, in place.

        Args:
            model: The model to change.
            epoch: Index of the epoch about to start, from 0.
            groups: Layer groups to use instead of ``layer_groups(model)``. The last one
                is taken as the head and always trains.

        Returns:
            What changed, or ``None`` when the model already had this epoch's trainable
            groups.

        Raises:
            TypeError: If ``epoch`` is not an int.
            ValueError: If ``epoch`` is negative. The model is not changed then.
        """
        _check_int("on_epoch", "epoch", epoch, minimum=0)
        groups = resolve_groups(model, groups)
        body, head = groups[:-1], groups[-1]
        training = [group for group, start in zip(body, self.freeze_epochs(len(body))) if epoch < start]

        keep = {id(p) for group in [*training, head] for p in group.parameters()}
        summary = _train_only(model, keep, groups=groups, bn=self.bn, policy=f"ProgressiveFreezing epoch {epoch}")
        return _changed_or_none(summary, f"ProgressiveFreezing epoch {epoch}")


def _reinitialize_group(model: nn.Module, group: LayerGroup) -> list[str]:
    """Re-initialize the modules of ``group`` in place and return the parameter names left as they were."""
    owned = {id(p) for p in group.parameters()}
    modules = _modules_owned_by(group, owned)
    init_weights = getattr(model, "_init_weights", None)

    covered: set[int] = set()
    with torch.no_grad(), _hf_initialized_flags_cleared(group.parameters()):
        for module in modules:
            if init_weights is not None:
                init_weights(module)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                continue
            covered |= {id(p) for p in module.parameters(recurse=False)}

    # NOTE: _init_weights skips module types it does not know without saying so, so the
    # Hugging Face path cannot tell which parameters kept their values.
    if init_weights is not None:
        return []
    return [name for name, p in group.params if id(p) not in covered]


def _modules_owned_by(group: LayerGroup, owned: set[int]) -> list[nn.Module]:
    """Return the modules of ``group`` whose own parameters all belong to the group, each once.

    A listed module whose children sit in other groups (a ViT root that owns the class
    token) contributes itself only, so re-initializing it does not reach other groups.
    """
    found: dict[int, nn.Module] = {}
    for _, module in group.modules:
        whole = all(id(p) in owned for p in module.parameters())
        for candidate in module.modules() if whole else [module]:
            if all(id(p) in owned for p in candidate.parameters(recurse=False)):
                found.setdefault(id(candidate), candidate)
    return list(found.values())


@contextmanager
def _hf_initialized_flags_cleared(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Remove the ``_is_hf_initialized`` flag from ``params`` for the duration, then restore it.

    Since transformers 5, ``from_pretrained`` sets this flag on loaded weights, and the
    ``transformers.initialization`` functions that ``_init_weights`` calls skip flagged
    tensors, so without this the pretrained values would silently stay.
    """
    flagged = [p for p in params if hasattr(p, "_is_hf_initialized")]
    values = [p._is_hf_initialized for p in flagged]
    for param in flagged:
        del param._is_hf_initialized
    try:
        yield
    finally:
        for param, value in zip(flagged, values):
            param._is_hf_initialized = value


def _relative_gradient_norms(
    model: nn.Module,
    groups: list[LayerGroup],
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
) -> list[float]:
    """Return each group's sum over ``batches`` of ``||gradient|| / ||weights||``, leaving ``model`` as it was.

    Raises:
        ValueError: If ``batches`` yields no pair.
    """
    params = [p for group in groups for p in group.parameters()]
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = [(module, module.training) for module in model.modules()]
    scores = [0.0] * len(groups)
    num_batches = 0

    try:
        # Eval mode keeps BatchNorm running statistics and dropout out of the scores.
        model.eval()
        for param in params:
            param.requires_grad_(True)
        with torch.enable_grad():
            for inputs, labels in batches:
                # backward() adds into an existing .grad in place, so the caller's tensors
                # are detached from the parameters first and put back at the end.
                for param in params:
                    param.grad = None
                loss_fn(model(inputs), labels).backward()
                for index, group in enumerate(groups):
                    scores[index] += _relative_norm(group)
                num_batches += 1
    finally:
        for param, flag, grad in zip(params, flags, grads):
            param.requires_grad_(flag)
            param.grad = grad
        for module, training in modes:
            module.training = training

    if num_batches == 0:
        raise ValueError("from_gradients(batches=...) yielded no (inputs, labels) pair. Pass at least one batch.")
    return scores


def _relative_norm(group: LayerGroup) -> float:
    weights = [p.detach() for p in group.parameters()]
    grads = [p.grad.detach() for p in group.parameters() if p.grad is not None]
    if not weights or not grads:
        return 0.0
    weight_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w) for w in weights]))
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    # An all-zero group would divide by zero. Its relative change is unbounded, so it ranks high.
    return (grad_norm / weight_norm.clamp_min(1e-12)).item()
