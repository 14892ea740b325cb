"""Freezing policies: the standard fine-tuning strategies as small objects.

Each policy is a dataclass whose ``apply(model, *, groups=None)`` sets which parameters
train, through :func:`~finetunekit.freeze`, :func:`~finetunekit.unfreeze` and
:func:`~finetunekit.freeze_to`, and returns their :class:`~finetunekit.FreezeSummary`.
The schedules (:class:`GradualUnfreezing`, :class:`LinearProbeThenFinetune`,
:class:`ProgressiveFreezing`) also have ``on_epoch(model, epoch, *, groups=None)``, to
call at the start of each epoch (counted from 0). It returns ``None`` when the epoch changes nothing. Policies need no
:class:`~finetunekit.Trainer`.

Which policy to start from depends on the dataset size and on how close the new data is
to the pretraining data:

- small and similar: :class:`FeatureExtraction`;
- medium: :class:`PartialFineTuning`;
- large, or different from the pretraining data: :class:`FullFineTuning`;
- small, with a risk of forgetting what pretraining learned: :class:`GradualUnfreezing`
  or :class:`LinearProbeThenFinetune`;
- many tasks on one backbone, or a tiny memory budget: :class:`BitFit`;
- a shift that concerns known layers only: :class:`SurgicalFineTuning`, or
  :meth:`SurgicalFineTuning.from_gradients` when the layers are not known;
- small data on a transformer whose top layers are too specific to the pretraining
  task: :class:`ReinitializeTop`;
- a large dataset and a tight compute budget: :class:`ProgressiveFreezing`.

:class:`ReinitializeTop` and :class:`ProgressiveFreezing` live in
:mod:`finetunekit.policies_extra` and are re-exported here.

Arguments are checked when a policy is built, and the ones that depend on the model (a
group count, a group name) at the start of ``apply``, before the model is changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._norms import NormPolicy, check_policy
from ._policy_utils import _changed_or_none, _check_int, _train_only
from ._utils import close_matches, format_suggestions, named_parameters_once
from .errors import NoMatchingTargetError
from .freezing import FreezeSummary, freeze_to, unfreeze
from .groups import LayerGroup, resolve_groups
from .policies_extra import (
    ProgressiveFreezing,
    ReinitializeTop,
    _relative_gradient_norms,
)

__all__ = [
    "BitFit",
    "FeatureExtraction",
    "FullFineTuning",
    "GradualUnfreezing",
    "LinearProbeThenFinetune",
    "PartialFineTuning",
    "ProgressiveFreezing",
    "ReinitializeTop",
    "SurgicalFineTuning",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureExtraction:
    """Train the head only and keep the whole backbone frozen.

    Use it when the dataset is small and similar to the pretraining data: the pretrained
    features already fit, and the few examples are best spent on the head.

    Attributes:
        bn: BatchNorm policy for the frozen normalization layers, as the ``bn=`` argument
            of :func:`~finetunekit.freeze_to`. ``None`` keeps each layer's current policy.

    Example:
        >>> model = torchvision.models.resnet18(weights=None)
        >>> FeatureExtraction().apply(model).num_trainable  # fc: 512 * 1000 + 1000
        513000
    """

    bn: NormPolicy | None = None

    def __post_init__(self) -> None:
        check_policy(self.bn)

    def apply(self, model: nn.Module, *, groups: Sequence[LayerGroup] | None = None) -> FreezeSummary:
        """Freeze every layer group but the head of ``model``, in place.

        Args:
            model: The model to change.
            groups: Layer groups to use instead of ``layer_groups(model)``.

        Returns:
            What changed, as :func:`~finetunekit.freeze_to` reports it.
        """
        return freeze_to(model, -1, groups=groups, bn=self.bn)


@dataclass(frozen=True)
class PartialFineTuning:
    """Train the top ``k`` layer groups, the head included, and freeze the groups below.

    Use it for a medium-sized dataset: the upper groups, whose features are the most
    specific to the pretraining task, adapt, and the generic lower groups stay as they were.

    Attributes:
        k: Number of layer groups that train, counted from the head: ``1`` is the head
            only, ``len(layer_groups(model))`` is every group.
        bn: BatchNorm policy for the frozen normalization layers, as the ``bn=`` argument
            of :func:`~finetunekit.freeze_to`.

    Raises:
        TypeError: If ``k`` is not an int.
        ValueError: If ``k`` is less than 1, or ``bn`` is not a BatchNorm policy.

    Example:
        >>> model = torchvision.models.resnet18(weights=None)
        >>> PartialFineTuning(3).apply(model).frozen[:2]
        ('conv1.weight', 'bn1.weight')
        >>> sorted({name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad})
        ['fc', 'layer4']
    """

    k: int
    bn: NormPolicy | None = None

    def __post_init__(self) -> None:
        _check_int("PartialFineTuning", "k", self.k, minimum=1)
        check_policy(self.bn)

    def apply(self, model: nn.Module, *, groups: Sequence[LayerGroup] | None = None) -> FreezeSummary:
        """Freeze all but the top ``k`` layer groups of ``model``, in place.

        Args:
            model: The model to change.
            groups: Layer groups to use instead of ``layer_groups(model)``.

        Returns:
            What changed, as :func:`~finetunekit.freeze_to` reports it.

        Raises:
            IndexError: If ``k`` is larger than the number of layer groups. The model is
                not changed then.
        """
        groups = resolve_groups(model, groups)
        if self.k > len(groups):
            raise IndexError(
                f"PartialFineTuning(k={self.k}) trains {self.k} layer groups, but {type(model).__name__} "
                f"has {len(groups)}. Pass 1 <= k <= {len(groups)}."
            )
        return freeze_to(model, -self.k, groups=groups, bn=self.bn)


@dataclass(frozen=True)
class FullFineTuning:
    """Train every parameter.

    Use it when the dataset is large, or different from the pretraining data, so that
    every layer has to adapt and there is enough data to do it without overfitting. Pair
    it with a low learning rate (``param_groups(model, lr=slice(1e-5, 1e-3))``), because
    a high one destroys the pretrained weights in the first steps.

    Example:
        >>> model = torchvision.models.resnet18(weights=None)
        >>> FullFineTuning().apply(model).num_frozen
        0
    """

    def apply(self, model: nn.Module, *, groups: Sequence[LayerGroup] | None = None) -> FreezeSummary:
        """Make every parameter of ``model`` trainable, in place.

        Args:
            model: The model to change.
            groups: Layer groups to use instead of ``layer_groups(model)``.

        Returns:
            What changed, as :func:`~finetunekit.unfreeze` reports it.
        """
        return unfreeze(model, groups=groups)


@dataclass(frozen=True)
class GradualUnfreezing:
    """Unfreeze one more layer group, from the head down, every ``every`` epochs (ULMFiT).

    Until epoch ``start`` and during it only the head trains. At epoch
    ``start + i * every`` the top ``i + 1`` groups train, until every group does. This is
    the gradual unfreezing of ULMFiT.

    Use it for a small dataset with a risk of forgetting. The head settles before the
    layers below it start to move, so the large gradients of a fresh head do not reach
    the pretrained weights. The lowest, most generic groups train for the fewest epochs.

    Call :meth:`apply` once before training and :meth:`on_epoch` at the start of every
    epoch. Build the optimizer over all parameters: frozen ones have ``.grad = None``, so
    the optimizer skips them until they are unfrozen.

    Attributes:
        every: Epochs between two unfreezing steps, at least 1.
        start: Epoch of the first step that trains the head only, at least 0. The next
            group joins at ``start + every``.
        bn: BatchNorm policy for the frozen normalization layers, as the ``bn=`` argument
            of :func:`~finetunekit.freeze_to`.

    Raises:
        TypeError: If ``every`` or ``start`` is not an int.
        ValueError: If ``every < 1``, ``start < 0``, or ``bn`` is not a BatchNorm policy.

    Example:
        >>> model = torchvision.models.resnet18(weights=None)
        >>> policy = GradualUnfreezing(every=2)
        >>> _ = policy.apply(model)
        >>> [policy.on_epoch(model, epoch) is None for epoch in range(4)]
        [True, True, False, True]
    """

    every: int = 1
    start: int = 0
    bn: NormPolicy | None = None

    def __post_init__(self) -> None:
        _check_int("GradualUnfreezing", "every", self.every, minimum=1)
        _check_int("GradualUnfreezing", "start", self.start, minimum=0)
        check_policy(self.bn)

    def apply(self, model: nn.Module, *, groups: Sequence[LayerGroup] | None = None) -> FreezeSummary:
        """Freeze every layer group but the head of ``model``, in place: the state before epoch ``start``.

        Args:
            model: The model to change.
            groups: Layer groups to use instead of ``layer_groups(model)``.

        Returns:
            What changed, as :func:`~finetunekit.freeze_to` reports it.
        """
        return freeze_to(model, -1, groups=groups, bn=self.bn)

    def num_trainable_groups(self, epoch: int) -> int:
        """Return how many layer groups, counted from the head, train in ``epoch``.

        The count is not capped at the number of groups of a model, which
        :meth:`on_epoch` does.

        Raises:
            TypeError: If ``epoch`` is not an int.
            ValueError: If ``epoch`` is negative.
        """
        _check_int("on_epoch", "epoch", epoch, minimum=0)
        return 1 + max(0, epoch - self.start) // self.every

    def on_epoch(
        self, model: nn.Module, epoch: int, *, groups: Sequence[LayerGroup] | None = None
    ) -> FreezeSummary | None:
        """Set the layer groups of ``model`` that train in ``epoch``, in place.

        Args:
            model: The model to change.
            epoch: Index of the epoch about to start, from 0.
            groups: Layer groups to use instead of ``layer_groups(model)``.

        Returns:
            What changed, as :func:`~finetunekit.freeze_to` reports it, or ``None`` when
            the model already had this epoch's trainable groups.

        Raises:
            TypeError: If ``epoch`` is not an int.
            ValueError: If ``epoch`` is negative. The model is not changed then.
        """
        count = self.num_trainable_groups(epoch)
        groups = resolve_groups(model, groups)
        summary = freeze_to(model, -min(count, len(groups)), groups=groups, bn=self.bn)
        return _changed_or_none(summary, f"GradualUnfreezing epoch {epoch}")


@dataclass(frozen=True)
class LinearProbeThenFinetune:
    """Train the head only for ``probe_epochs`` epochs, then every parameter (LP-FT).

    A head fitted first on frozen features sends smaller gradients into the backbone when
    full fine-tuning starts than a randomly initialized head does, so the pretrained
    features change less.

    Use it for a small dataset with a risk of forgetting, when gradual unfreezing's many
    stages are not worth tuning, or when robustness outside the training distribution
    matters. Call :meth:`apply` once before training and :meth:`on_epoch` at the start
    of every epoch. Build the optimizer over all parameters, and use a lower learning
    rate once the backbone trains.

    Attributes:
        probe_epochs: Number of head-only epochs, at least 1.
        bn: BatchNorm policy for the frozen normalization layers during the probe, as
            the ``bn=`` argument of :func:`~finetunekit.freeze_to`.

    Raises:
        TypeError: If ``probe_epochs`` is not an int.
        ValueError: If ``probe_epochs < 1``, or ``bn`` is not a BatchNorm policy.

    Example:
        >>> model = torchvision.models.resnet18(weights=None)
        >>> policy = LinearProbeThenFinetune(probe_epochs=2)
        >>> _ = policy.apply(model)
        >>> [policy.on_epoch(model, epoch) is None for epoch in range(4)]
        [True, True, False, True]
    """

    probe_epochs: int
    bn: NormPolicy | None = None

    def __post_init__(self) -> None:
        _check_int("LinearProbeThenFinetune", "probe_epochs", self.probe_epochs, minimum=1)
        check_policy(self.bn)

    def apply(self, model: nn.Module, *, groups: Sequence[LayerGroup] | None = None) -> FreezeSummary:
        """Freeze every layer group but the head of ``model``, in place: the probe.

        Args:
            model: The model to change.
            groups: Layer groups to use instead of ``layer_groups(model)``.

        Returns:
            What changed, as :func:`~finetunekit.freeze_to` reports it.
        """
        return freeze_to(model, -1, groups=groups, bn=self.bn)

    def on_epoch(
        self, model: nn.Module, epoch: int, *, groups: Sequence[LayerGroup] | None = None
    ) -> FreezeSummary | None:
        """Train the head only before epoch ``probe_epochs`` and every parameter from it on.

        Args:
            model: The model to change, in place.
            epoch: Index of the epoch about to start, from 0.
            groups: Layer groups to use instead of ``layer_groups(model)``.

        Returns:
            What changed, or ``None`` when the model already had this epoch's trainable
            parameters.

        Raises:
            TypeError: If ``epoch`` is not an int.
            ValueError: If ``epoch`` is negative. The model is not changed then.
        """
        _check_int("on_epoch", "epoch", epoch, minimum=0)
        if epoch < self.probe_epochs:
            summary = self.apply(model, groups=groups)
        else:
            summary = unfreeze(model, groups=groups)
        return _changed_or_none(summary, f"LinearProbeThenFinetune epoch {epoch}")


@dataclass(frozen=True)
class BitFit:
    """Train only the biases and the head (BitFit).

    Every parameter whose name ends in ``bias`` trains, which includes the shift of
    normalization layers (LayerNorm, BatchNorm), and so does every parameter of the head
    group.

    Use it when one backbone serves many tasks, since each task then stores only its
    biases and head, or when memory for gradients and optimizer state is tight, because
    the biases are a small fraction of the weights.

    Attributes:
        bn: BatchNorm policy for the normalization layers whose parameters end up all
            frozen, as the ``bn=`` argument of :func:`~finetunekit.freeze`. A BatchNorm
            layer keeps a trainable bias here, so it is not locked and its running
            statistics keep updating in training mode.

    Example:
        >>> model = torchvision.models.resnet18(weights=None)
        >>> summary = BitFit().apply(model)
        >>> sorted({name.rsplit(".", 1)[1] for name, p in model.named_parameters() if p.requires_grad})
        ['bias', 'weight']
        >>> [name for name, p in model.named_parameters() if p.requires_grad and name.endswith("weight")]
        ['fc.weight']
    """

    bn: NormPolicy | None = None

    def __post_init__(self) -> None:
        check_policy(self.bn)

    def apply(self, model: nn.Module, *, groups: Sequence[LayerGroup] | None = None) -> FreezeSummary:
        """Freeze every parameter of ``model`` but the biases and the head, in place.

        Args:
            model: The model to change.
            groups: Layer groups to use instead of ``layer_groups(model)``.

        Returns:
            What changed: ``frozen`` and ``unfrozen`` compare the state after the call
            with the state before it.

        Raises:
            NoParametersError: If the model has neither a bias nor a head parameter.
        """
        groups = resolve_groups(model, groups)
        keep = {id(p) for _, p in groups[-1].params}
        keep |= {id(p) for name, p in named_parameters_once(model) if name.rsplit(".", 1)[-1] == "bias"}
        return _train_only(model, keep, groups=groups, bn=self.bn, policy="BitFit()")


@dataclass(frozen=True)
class SurgicalFineTuning:
    """Train a chosen set of layer groups and freeze everything else.

    Use it when the way the new data differs from the pretraining data is known, and the
    dataset is too small to tune everything. The head is included only if it is listed
    (by index ``-1``, by its group name, or as ``"head"``), so a new, untrained head
    must be listed.

    Attributes:
        groups_to_train: Layer groups that train, each an index into
            ``layer_groups(model)`` (negative counts from the head) or a group name
            (``"head"`` is the head group). Stored as a tuple.
        bn: BatchNorm policy for the frozen normalization layers, as the ``bn=`` argument
            of :func:`~finetunekit.freeze`.

    Raises:
        TypeError: If an entry is neither an int nor a str.
        ValueError: If ``groups_to_train`` is empty, or ``bn`` is not a BatchNorm policy.

    Example:
        >>> model = torchvision.models.resnet18(weights=None)
        >>> _ = SurgicalFineTuning(["stem", "layer1.0", "head"]).apply(model)
        >>> sorted({name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad})
        ['bn1', 'conv1', 'fc', 'layer1']
    """

    groups_to_train: Sequence[int | str]
    bn: NormPolicy | None = None

    def __post_init__(self) -> None:
        if isinstance(self.groups_to_train, (str, int)):
            entries: tuple[int | str, ...] = (self.groups_to_train,)
        else:
            entries = tuple(self.groups_to_train)
        if not entries:
            raise ValueError(
                "SurgicalFineTuning(groups_to_train=()) would train nothing. Pass at least one "
                "layer-group index or name, such as [-1] or ['head'] for the head."
            )
        for entry in entries:
            if isinstance(entry, bool) or not isinstance(entry, (int, str)):
                raise TypeError(
                    f"SurgicalFineTuning entry {entry!r} has type {type(entry).__name__}; "
                    "pass layer-group indexes (int) or names (str)."
                )
        check_policy(self.bn)
        object.__setattr__(self, "groups_to_train", entries)

    def apply(self, model: nn.Module, *, groups: Sequence[LayerGroup] | None = None) -> FreezeSummary:
        """Make exactly the chosen layer groups of ``model`` trainable, in place.

        The names and indexes are checked first, so a call that raises changes nothing.

        Args:
            model: The model to change.
            groups: Layer groups to use instead of ``layer_groups(model)``.

        Returns:
            What changed: ``frozen`` and ``unfrozen`` compare the state after the call
            with the state before it.

        Raises:
            IndexError: If an index is outside ``-len(groups) <= index < len(groups)``.
            NoMatchingTargetError: If a name is not a layer-group name of the model.
            NoParametersError: If the chosen groups own no parameter.
        """
        groups = resolve_groups(model, groups)
        chosen = [_find_group(model, groups, entry) for entry in self.groups_to_train]
        keep = {id(p) for group in chosen for _, p in group.params}
        return _train_only(model, keep, groups=groups, bn=self.bn, policy=repr(self))

    @classmethod
    def from_gradients(
        cls,
        model: nn.Module,
        batches: Iterable[tuple[Any, torch.Tensor]],
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        k: int,
        *,
        groups: Sequence[LayerGroup] | None = None,
    ) -> SurgicalFineTuning:
        """Choose the ``k`` layer groups with the largest relative gradient norm.

        Each group's score is the sum over ``batches`` of the L2 norm of the group's
        gradients divided by the L2 norm of its parameters. Every group, the head
        included, takes part, and ties go to the group nearer the input. Groups whose
        gradients are large next to their weights are the ones the new data pushes to change.

        The batches run in eval mode with every parameter requiring grad, so frozen groups
        get a score too and BatchNorm running statistics do not change. Afterwards the model
        is as before: the same weights, buffers, ``requires_grad`` flags, ``.grad`` tensors
        and training or eval mode of every module. No optimizer step is taken.

        Args:
            model: The model to score. Not modified.
            batches: ``(inputs, labels)`` pairs. A few batches are enough.
            loss_fn: Called as ``loss_fn(model(inputs), labels)``. Returns a scalar loss.
            k: Number of layer groups to choose, from 1 to ``len(groups)``.
            groups: Layer groups to use instead of ``layer_groups(model)``. Apply the
                returned policy with the same ``groups``.

        Returns:
            A policy that trains the chosen groups, listed by name in model order (by
            index when two groups share a name).

        Raises:
            TypeError: If ``k`` is not an int.
            ValueError: If ``k < 1``, or ``batches`` yields no pair.
            IndexError: If ``k`` is larger than the number of layer groups.

        Example:
            >>> model = torchvision.models.resnet18(weights=None)
            >>> batches = [(torch.randn(4, 3, 64, 64), torch.randint(0, 1000, (4,)))]
            >>> policy = SurgicalFineTuning.from_gradients(model, batches, nn.functional.cross_entropy, k=2)
            >>> policy.groups_to_train  # the exact groups depend on the data
            ('stem', 'fc')
        """
        _check_int("SurgicalFineTuning.from_gradients", "k", k, minimum=1)
        groups = resolve_groups(model, groups)
        if k > len(groups):
            raise IndexError(
                f"SurgicalFineTuning.from_gradients(k={k}) chooses {k} layer groups, but "
                f"{type(model).__name__} has {len(groups)}. Pass 1 <= k <= {len(groups)}."
            )

        scores = _relative_gradient_norms(model, groups, batches, loss_fn)
        ranked = sorted(range(len(groups)), key=lambda i: -scores[i])
        chosen = sorted(ranked[:k])
        logger.info(
            "from_gradients chose %s (scores %s)",
            [groups[i].name for i in chosen],
            [f"{scores[i]:.3g}" for i in chosen],
        )

        names = [group.name for group in groups]
        if len(set(names)) == len(names):
            return cls(tuple(names[i] for i in chosen))
        return cls(tuple(chosen))


def _find_group(model: nn.Module, groups: list[LayerGroup], entry: int | str) -> LayerGroup:
    names = [group.name for group in groups]
    if isinstance(entry, int):
        if not -len(groups) <= entry < len(groups):
            raise IndexError(
                f"Layer-group index {entry} is out of range for {type(model).__name__}, which has "
                f"{len(groups)} groups. Pass -{len(groups)} <= index < {len(groups)}."
            )
        return groups[entry]

    for group in groups:
        if entry == group.name or (entry == "head" and group.is_head):
            return group
    raise NoMatchingTargetError(
        f"{entry!r} is not a layer-group name of {type(model).__name__}."
        f"{format_suggestions(close_matches(entry, names))} Layer groups: {names}."
    )
