"""Freeze and unfreeze parameters by layer group, name, pattern or module type.

Freezing does three things, so that a frozen layer stays exactly as it was under any
training loop. It sets ``requires_grad=False``. It sets ``.grad`` to ``None``, because an
optimizer skips parameters without a gradient, so momentum and weight decay cannot move
them. And it runs the normalization layers with running statistics whose parameters are
all frozen in eval mode, also after a later ``model.train()``.

NOTE: ``model.train()`` still sets ``training=True`` on such a layer. A forward pre-hook sets
it back to False as each forward pass starts, so the statistics never change, but the flag
reads True between ``model.train()`` and the next forward pass.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ._norms import NormPolicy, check_policy, set_policy, sync_norm_layers
from ._optimizer import sync_optimizer
from ._utils import close_matches, format_suggestions, named_parameters_once
from .errors import FinetuneKitWarning, NoMatchingTargetError, NoParametersError
from .groups import LayerGroup, resolve_groups
from .param_groups import layer_lrs

__all__ = ["FreezeSummary", "Target", "freeze", "freeze_to", "frozen", "unfreeze"]

logger = logging.getLogger(__name__)

Target = int | str | type[nn.Module] | Callable[[str, nn.Parameter], bool]
"""Selector accepted by :func:`freeze` and :func:`unfreeze`: a layer-group index, a group
name, module or parameter name, a glob pattern over those names, a module class, or a
predicate over ``(name, parameter)``."""

_GLOB_CHARS = frozenset("*?[")
_REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class FreezeSummary:
    """Changes made by one freezing call, and the totals after it.

    Attributes:
        frozen: Names of the parameters this call froze (they were trainable before).
        unfrozen: Names of the parameters this call made trainable.
        num_trainable: Number of scalar values that are trainable after the call.
        num_frozen: Number of scalar values that are frozen after the call.
    """

    frozen: tuple[str, ...]
    unfrozen: tuple[str, ...]
    num_trainable: int
    num_frozen: int


def freeze(
    model: nn.Module,
    *targets: Target,
    groups: Sequence[LayerGroup] | None = None,
    bn: NormPolicy | None = None,
) -> FreezeSummary:
    """Freeze the parameters that ``targets`` select, or every parameter when none is given.

    Frozen parameters get ``requires_grad=False`` and ``.grad = None``, so no
    ``torch.optim`` optimizer moves them, whatever the loop does with ``zero_grad``.
    Normalization layers with running statistics (BatchNorm and InstanceNorm with
    ``track_running_stats``) whose parameters are all frozen switch to eval mode and run
    every forward pass in eval mode, also after ``model.train()``, so their running
    statistics do not change.
    The model is modified in place; a call that raises changes nothing.

    Args:
        model: The model to change.
        *targets: What to freeze. Each is one of:

            - an ``int``: a layer-group index from :func:`layer_groups`, negative from the head;
            - a ``str``: a layer-group name (``"head"`` is the head group), a module's or a
              parameter's qualified name, a glob pattern over those names (``"layer4.*"``),
              or a regular expression after ``"re:"`` that must match a whole name
              (``"re:layer[34]"``);
            - a module class, such as ``nn.BatchNorm2d``: every module of that class;
            - a callable ``(name, parameter) -> bool`` that selects parameters.
        groups: Layer groups to use instead of ``layer_groups(model)``.
        bn: BatchNorm policy for the normalization layers with running statistics whose
            parameters this call freezes. ``"frozen"`` locks their statistics and runs
            them in eval mode. ``"train"`` keeps their affine parameters trainable and
            their statistics updating (fastai's ``train_bn``). ``"stats"`` freezes the
            parameters but lets the statistics adapt to the new data. ``None`` keeps the
            policy an earlier call set on each layer, ``"frozen"`` by default.

    Returns:
        A summary of the parameters that changed and the trainable and frozen totals.

    Warns:
        FinetuneKitWarning: If a frozen tensor is tied to a name that no target selected
            (freezing ``lm_head`` also freezes the input embeddings it shares a weight with).

    Raises:
        NoMatchingTargetError: If a target selects no parameter. The message names the
            target and the closest names in the model.
        NoParametersError: If ``model`` has no parameters.
        IndexError: If a group index is out of range.
        TypeError: If a target is not one of the kinds above (a float, a bool).
        ValueError: If ``groups`` does not match the model's parameters.

    Example:
        >>> model = torchvision.models.resnet18(weights=None)
        >>> freeze(model, "layer1.*", nn.BatchNorm2d).frozen[:2]
        ('bn1.weight', 'bn1.bias')
    """
    check_policy(bn)
    selected = _select_all(model, targets, groups, warn_tied=True)
    return _apply(model, frozen=selected, trainable={}, bn=bn)


def unfreeze(
    model: nn.Module,
    *targets: Target,
    groups: Sequence[LayerGroup] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    keep_state: bool = True,
) -> FreezeSummary:
    """Make the parameters that ``targets`` select trainable, or every parameter when none is given.

    Normalization layers whose parameters become trainable return to the model's current
    mode (training or eval). Targets are read as in :func:`freeze`. The model is modified
    in place; a call that raises changes nothing.

    Args:
        model: The model to change.
        *targets: What to unfreeze, as in :func:`freeze`.
        groups: Layer groups to use instead of ``layer_groups(model)``.
        optimizer: An optimizer to keep consistent. Parameters that become trainable
            and are not in it are added as new param groups, one per layer group and
            weight-decay setting, so the next ``step()`` updates them.
        lr: Learning rate of the added param groups. ``None`` uses the smallest rate in
            the optimizer, because layers unfrozen later sit below the trained ones.
        keep_state: Whether a parameter that becomes trainable keeps the optimizer state
            (momentum, Adam moments) it had from before it was frozen. False clears it.

    Returns:
        A summary of the parameters that changed and the trainable and frozen totals.

    Raises:
        NoMatchingTargetError: If a target selects no parameter.
        NoParametersError: If ``model`` has no parameters.
        IndexError: If a group index is out of range.
        TypeError: If a target is not one of the kinds that :func:`freeze` accepts.
        ValueError: If ``groups`` does not match the model's parameters.

    Example:
        >>> _ = freeze(model)
        >>> unfreeze(model, "fc").unfrozen
        ('fc.weight', 'fc.bias')
    """
    if lr is not None:
        layer_lrs(lr, 1)
    selected = _select_all(model, targets, groups)
    summary = _apply(model, frozen={}, trainable=selected)
    if optimizer is not None:
        sync_optimizer(model, optimizer, summary.unfrozen, lr=lr, keep_state=keep_state, groups=groups)
    return summary


@contextmanager
def frozen(
    model: nn.Module,
    *targets: Target,
    groups: Sequence[LayerGroup] | None = None,
    bn: NormPolicy | None = None,
) -> Iterator[FreezeSummary]:
    """Freeze ``targets`` for the duration of a ``with`` block, then restore the previous state.

    Inside the block the targets are frozen as by :func:`freeze`. On exit, including exit
    through an exception, every parameter gets back the ``requires_grad`` flag it had
    before, and normalization layers are locked or unlocked to match. Gradients that
    freezing set to ``None`` are not restored.

    Args:
        model: The model to change for the duration of the block.
        *targets: What to freeze, as in :func:`freeze`; every parameter when none is given.
        groups: Layer groups to use instead of ``layer_groups(model)``.
        bn: BatchNorm policy inside the block, as in :func:`freeze`.

    Yields:
        The summary of the freezing done on entry.

    Raises:
        NoMatchingTargetError: If a target selects no parameter; nothing is changed then.

    Example:
        >>> with frozen(model, "layer1", "layer2"):
        ...     evaluate_probe(model)   # layer1 and layer2 cannot change here
        >>> model.layer1[0].conv1.weight.requires_grad
        True
    """
    before = [(param, param.requires_grad) for _, param in named_parameters_once(model)]
    summary = freeze(model, *targets, groups=groups, bn=bn)
    try:
        yield summary
    finally:
        for param, requires_grad in before:
            param.requires_grad_(requires_grad)
        sync_norm_layers(model)


def freeze_to(
    model: nn.Module,
    n: int,
    *,
    groups: Sequence[LayerGroup] | None = None,
    bn: NormPolicy | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    keep_state: bool = True,
) -> FreezeSummary:
    """Freeze the layer groups before index ``n`` and make the rest trainable.

    This follows fastai's ``freeze_to``: ``freeze_to(model, -1)`` trains the head only,
    ``freeze_to(model, -3)`` trains the top two groups and the head, and
    ``freeze_to(model, 0)`` trains everything. The model is modified in place.

    Args:
        model: The model to change.
        n: Index of the first trainable layer group; negative counts from the head.
            ``n`` equal to the number of groups freezes everything, with a warning.
        groups: Layer groups to use instead of ``layer_groups(model)``.
        bn: BatchNorm policy for the normalization layers with running statistics whose
            parameters this call freezes. ``"frozen"`` locks their statistics and runs
            them in eval mode. ``"train"`` keeps their affine parameters trainable and
            their statistics updating (fastai's ``train_bn``). ``"stats"`` freezes the
            parameters but lets the statistics adapt to the new data. ``None`` keeps the
            policy an earlier call set on each layer, ``"frozen"`` by default.
        optimizer: An optimizer to keep consistent. Parameters that become trainable
            and are not in it are added as new param groups, one per layer group and
            weight-decay setting, so the next ``step()`` updates them.
        lr: Learning rate of the added param groups. ``None`` uses the smallest rate in
            the optimizer, because layers unfrozen later sit below the trained ones.
        keep_state: Whether a parameter that becomes trainable keeps the optimizer state
            (momentum, Adam moments) it had from before it was frozen. False clears it.

    Returns:
        A summary of the parameters that changed and the trainable and frozen totals.

    Raises:
        IndexError: If ``n`` is outside ``-len(groups) <= n <= len(groups)``.
        TypeError: If ``n`` is not an int.
        NoParametersError: If ``model`` has no parameters.
        ValueError: If ``groups`` does not match the model's parameters.

    Example:
        >>> model = torchvision.models.resnet18(weights=None)
        >>> summary = freeze_to(model, -1)
        >>> summary.num_trainable  # fc: 512 * 1000 weights + 1000 biases
        513000
    """
    check_policy(bn)
    if lr is not None:
        layer_lrs(lr, 1)
    groups = resolve_groups(model, groups)
    count = len(groups)
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n={n!r} must be an int layer-group index.")
    if not -count <= n <= count:
        raise IndexError(
            f"freeze_to(n={n}) is out of range: {type(model).__name__} has {count} layer groups "
            f"({_preview([g.name for g in groups])}). Pass {-count} <= n <= {count}."
        )
    start = n % count if n < 0 else n
    frozen = {id(p): (name, p) for g in groups[:start] for name, p in g.params}
    trainable = {id(p): (name, p) for g in groups[start:] for name, p in g.params}
    if start == count:
        warnings.warn(
            f"freeze_to(n={n}) freezes all {count} layer groups, so nothing will train. "
            f"Pass n < {count} to keep the head trainable.",
            FinetuneKitWarning,
            stacklevel=2,
        )
    elif not trainable:
        tied = [name for g in groups[start:] for name in g.tied]
        warnings.warn(
            f"freeze_to(n={n}) leaves no parameter trainable: the groups from index {start} on own none "
            f"(their weights {tied} are tied to an earlier group). Pass a smaller n.",
            FinetuneKitWarning,
            stacklevel=2,
        )
    summary = _apply(model, frozen=frozen, trainable=trainable, bn=bn)
    if optimizer is not None:
        sync_optimizer(model, optimizer, summary.unfrozen, lr=lr, keep_state=keep_state, groups=groups)
    return summary


_Selection = dict[int, tuple[str, nn.Parameter]]


def _select_all(
    model: nn.Module,
    targets: Sequence[Target],
    groups: Sequence[LayerGroup] | None,
    *,
    warn_tied: bool = False,
) -> _Selection:
    named = list(named_parameters_once(model))
    if not named:
        raise NoParametersError(
            f"{type(model).__name__} has no parameters, so there is nothing to freeze or unfreeze. "
            "Pass the model that holds the layers to fine-tune."
        )
    if not targets:
        return {id(p): (name, p) for name, p in named}

    resolver = _Resolver(model, named, groups)
    selected: _Selection = {}
    for target in targets:
        selected.update(resolver.select(target))
    if warn_tied:
        for name, others in resolver.tied_aliases(selected):
            warnings.warn(
                f"Freezing {name!r} also freezes {others}: they are one tied tensor. "
                "Unfreeze it again if the tied layer should keep training.",
                FinetuneKitWarning,
                stacklevel=3,
            )
    return selected


class _Resolver:
    """Turn freeze targets into the parameters they select.

    ``reached`` collects every name under which a target reached a parameter, so that a
    tied tensor reached under one of its names only can be reported.
    """

    def __init__(
        self, model: nn.Module, named: list[tuple[str, nn.Parameter]], groups: Sequence[LayerGroup] | None
    ) -> None:
        self.model = model
        self.named = named
        self.names = {id(p): name for name, p in named}
        self.all_named = list(model.named_parameters(remove_duplicate=False))
        self.reached: set[str] = set()
        self._given_groups = groups
        self._groups: list[LayerGroup] | None = None

    @property
    def groups(self) -> list[LayerGroup]:
        if self._groups is None:
            self._groups = resolve_groups(self.model, self._given_groups)
        return self._groups

    def select(self, target: Target) -> _Selection:
        if isinstance(target, bool):
            raise TypeError(f"Freeze target {target!r} is a bool; pass a group index, name, pattern or type.")
        if isinstance(target, int):
            return self._by_group_index(target)
        if isinstance(target, str):
            return self._by_name(target)
        if isinstance(target, type) and issubclass(target, nn.Module):
            return self._by_type(target)
        if callable(target):
            return self._by_predicate(target)
        raise TypeError(
            f"Freeze target {target!r} has type {type(target).__name__}; pass a group index, "
            "a name or glob pattern, an nn.Module subclass, or a (name, parameter) -> bool callable."
        )

    def _by_group_index(self, index: int) -> _Selection:
        count = len(self.groups)
        if not -count <= index < count:
            raise IndexError(
                f"Layer-group index {index} is out of range for {type(self.model).__name__}, which has "
                f"{count} groups ({_preview([g.name for g in self.groups])}). Pass {-count} <= index < {count}."
            )
        return self._of_group(self.groups[index])

    def _by_name(self, target: str) -> _Selection:
        if target.startswith(_REGEX_PREFIX):
            return self._checked(target, self._by_match(_regex_matcher(target)))
        for group in self.groups:
            if target == group.name or (target == "head" and group.is_head):
                return self._of_group(group)

        modules = dict(self.model.named_modules())
        if target in modules and target:
            return self._checked(target, self._of_module(target, modules[target]))
        for name, param in self.all_named:
            if name == target:
                return self._of_named([(name, param)])

        if _GLOB_CHARS & set(target):
            return self._checked(target, self._by_match(lambda name: fnmatch.fnmatchcase(name, target)))
        return self._checked(target, {})

    def _by_match(self, matches: Callable[[str], bool]) -> _Selection:
        """Select the modules, parameters and layer groups whose names ``matches`` accepts."""
        selected: _Selection = {}
        for name, module in self.model.named_modules():
            if name and matches(name):
                selected.update(self._of_module(name, module))
        selected.update(self._of_named([(n, p) for n, p in self.all_named if matches(n)]))
        for group in self.groups:
            if matches(group.name):
                selected.update(self._of_group(group))
        return selected

    def _by_type(self, cls: type[nn.Module]) -> _Selection:
        selected: _Selection = {}
        for name, module in self.model.named_modules():
            if isinstance(module, cls):
                selected.update(self._of_module(name, module))
        if not selected:
            present = sorted({type(m).__name__ for m in self.model.modules() if _has_own_params(m)})
            raise NoMatchingTargetError(
                f"Freeze target {cls.__name__} matched no module with parameters in "
                f"{type(self.model).__name__}. Module classes with parameters there: {_preview(present)}."
            )
        return selected

    def _by_predicate(self, predicate: Callable[[str, nn.Parameter], bool]) -> _Selection:
        selected = self._of_named([(n, p) for n, p in self.all_named if predicate(n, p)])
        if not selected:
            raise NoMatchingTargetError(
                f"Freeze predicate {getattr(predicate, '__name__', predicate)!r} returned False for every "
                f"parameter of {type(self.model).__name__}. Check it against list(model.named_parameters())."
            )
        return selected

    def _of_group(self, group: LayerGroup) -> _Selection:
        # A group also reaches the tied names it lists, such as a head tied to the embeddings.
        by_name = dict(self.all_named)
        tied = [(name, by_name[name]) for name in group.tied if name in by_name]
        return self._of_named([*group.named_parameters(), *tied])

    def _of_module(self, name: str, module: nn.Module) -> _Selection:
        return self._of_named(list(module.named_parameters(prefix=name, remove_duplicate=False)))

    def _of_named(self, named: list[tuple[str, nn.Parameter]]) -> _Selection:
        self.reached.update(name for name, _ in named)
        return {id(p): (self.names[id(p)], p) for _, p in named}

    def _checked(self, target: str, selected: _Selection) -> _Selection:
        if selected:
            return selected
        candidates = [g.name for g in self.groups] + [n for n, _ in self.model.named_modules()] + [
            n for n, _ in self.named
        ]
        raise NoMatchingTargetError(
            f"Freeze target {target!r} matched no layer group, module or parameter of "
            f"{type(self.model).__name__}.{format_suggestions(close_matches(target, candidates))} "
            f"Layer groups: {_preview([g.name for g in self.groups])}."
        )

    def tied_aliases(self, selected: _Selection) -> list[tuple[str, list[str]]]:
        """Return, per selected tied tensor, the names of it that no target reached."""
        names_by_id: dict[int, list[str]] = {}
        for name, param in self.all_named:
            names_by_id.setdefault(id(param), []).append(name)
        found = []
        for key in selected:
            names = names_by_id.get(key, [])
            reached = [n for n in names if n in self.reached]
            others = [n for n in names if n not in self.reached]
            if reached and others:
                found.append((reached[0], others))
        return found


def _regex_matcher(target: str) -> Callable[[str], bool]:
    pattern = target[len(_REGEX_PREFIX) :]
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"Freeze target {target!r} is not a valid regular expression: {error}.") from None
    return lambda name: compiled.fullmatch(name) is not None


def _apply(
    model: nn.Module, *, frozen: _Selection, trainable: _Selection, bn: NormPolicy | None = None
) -> FreezeSummary:
    named = list(named_parameters_once(model))
    names = {id(p): name for name, p in named}
    # Under the "train" policy the affine parameters of normalization layers keep training
    # inside a frozen group, as fastai's train_bn does.
    for param in set_policy(model, set(frozen), bn):
        frozen.pop(id(param), None)
        trainable[id(param)] = (names[id(param)], param)
    newly_frozen = [name for name, p in named if id(p) in frozen and p.requires_grad]
    newly_trainable = [name for name, p in named if id(p) in trainable and not p.requires_grad]

    for _, param in frozen.values():
        param.requires_grad_(False)
        param.grad = None
    for _, param in trainable.values():
        param.requires_grad_(True)
    sync_norm_layers(model)

    num_trainable = num_frozen = 0
    for _, param in named:
        if param.requires_grad:
            num_trainable += param.numel()
        else:
            num_frozen += param.numel()
    logger.info(
        "froze %d and unfroze %d parameter tensors of %s: %s values trainable, %s frozen",
        len(newly_frozen),
        len(newly_trainable),
        type(model).__name__,
        f"{num_trainable:,}",
        f"{num_frozen:,}",
    )
    return FreezeSummary(tuple(newly_frozen), tuple(newly_trainable), num_trainable, num_frozen)


def _has_own_params(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _preview(names: list[str], limit: int = 6) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[: limit // 2]) + ", ..., " + ", ".join(names[-(limit // 2) :])
