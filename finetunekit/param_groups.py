"""Optimizer parameter groups with a learning rate per layer group and no decay on norms and biases."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .errors import NoParametersError
from .groups import LayerGroup, resolve_groups

__all__ = ["ParamGroup", "is_no_decay", "layer_lrs", "param_groups"]

logger = logging.getLogger(__name__)

ParamGroup = dict[str, Any]
"""A dict handed to a ``torch.optim`` optimizer: ``params``, ``lr`` and other settings."""

_NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES += (nn.RMSNorm,)


def param_groups(
    model: nn.Module,
    lr: float | slice,
    *,
    weight_decay: float | None = None,
    groups: Sequence[LayerGroup] | None = None,
) -> list[ParamGroup]:
    """Build optimizer parameter groups with a learning rate per layer group.

    Each layer group with trainable parameters gives one dict, or two when its
    parameters split into decayed and not decayed ones. Biases, parameters of
    normalization layers and every other parameter with fewer than two dimensions get
    ``weight_decay=0.0`` (see :func:`is_no_decay`). Frozen parameters are left out. Each
    dict carries the layer group's ``name`` and a ``no_decay`` flag, which torch
    optimizers keep in ``optimizer.param_groups``. The model is not modified.

    Args:
        model: The model whose trainable parameters to group.
        lr: A float for one rate everywhere, or ``slice(lo, hi)`` for rates spread
            geometrically from ``lo`` at the lowest layer group with trainable parameters
            to ``hi`` at the head. ``slice(hi)`` follows fastai: ``hi / 10`` for every
            group but the head. Unlike fastai, frozen groups below the first trainable
            one take no share of the spread.
        weight_decay: Weight decay of the decayed parameters. ``None`` leaves the key out,
            so the optimizer's own default applies (0.01 for ``AdamW``).
        groups: Layer groups to use instead of ``layer_groups(model)``.

    Returns:
        Parameter groups for any ``torch.optim`` optimizer, in layer-group order.

    Raises:
        NoParametersError: If no parameter of ``model`` is trainable.
        ValueError: If a rate is not positive and finite, a slice has a step or ``lo > hi``,
            or ``groups`` does not match the model's parameters.

    Example:
        >>> model = torchvision.models.resnet18(weights=None)
        >>> _ = freeze_to(model, -3)  # layer4.0, layer4.1 and fc train
        >>> groups = param_groups(model, lr=slice(1e-5, 1e-3), weight_decay=0.05)
        >>> [(g["name"], g["lr"], g["no_decay"]) for g in groups]
        [('layer4.0', 1e-05, False), ('layer4.0', 1e-05, True), ('layer4.1', 0.0001, False),
         ('layer4.1', 0.0001, True), ('fc', 0.001, False), ('fc', 0.001, True)]
        >>> optimizer = torch.optim.AdamW(groups)
    """
    groups = resolve_groups(model, groups)
    # Rates span the trainable groups only, so that training the top three groups with
    # slice(1e-4, 1e-3) gives 1e-4 to the lowest of them, whatever sits frozen below.
    first = next((i for i, g in enumerate(groups) if any(p.requires_grad for p in g.parameters())), len(groups))
    rates = [0.0] * first + layer_lrs(lr, len(groups) - first) if first < len(groups) else []
    no_decay_ids = {id(p) for _, p in _no_decay_parameters(model)}

    result: list[ParamGroup] = []
    for group, rate in zip(groups, rates):
        trainable = [p for p in group.parameters() if p.requires_grad]
        decay = [p for p in trainable if id(p) not in no_decay_ids]
        no_decay = [p for p in trainable if id(p) in no_decay_ids]
        if decay:
            entry: ParamGroup = {"params": decay, "lr": rate, "name": group.name, "no_decay": False}
            if weight_decay is not None:
                entry["weight_decay"] = weight_decay
            result.append(entry)
        if no_decay:
            result.append({"params": no_decay, "lr": rate, "weight_decay": 0.0, "name": group.name, "no_decay": True})

    if not result:
        raise NoParametersError(
            f"No parameter of {type(model).__name__} is trainable, so there is nothing to optimize. "
            "Unfreeze some layer groups first, for example finetunekit.freeze_to(model, -1)."
        )
    logger.info("built %d param groups over %d layer groups", len(result), len(groups))
    return result


def layer_lrs(lr: float | slice, num_groups: int) -> list[float]:
    """Return the learning rate of each of ``num_groups`` layer groups, head last.

    Args:
        lr: A float, ``slice(lo, hi)`` (geometric from ``lo`` to ``hi``) or ``slice(hi)``
            (``hi / 10`` everywhere but the head), as in :func:`param_groups`.
        num_groups: Number of layer groups.

    Returns:
        One learning rate per group.

    Raises:
        ValueError: If a rate is not positive and finite, the slice has a step, or ``lo > hi``.

    Example:
        >>> layer_lrs(slice(1e-5, 1e-3), 3)
        [1e-05, 0.0001, 0.001]
    """
    if isinstance(lr, slice):
        if lr.step is not None:
            raise ValueError(f"lr={lr!r} has a step; pass slice(lo, hi) or slice(hi).")
        high = _positive(lr.stop, "the slice's stop")
        if lr.start is None:
            return [high / 10] * (num_groups - 1) + [high]
        low = _positive(lr.start, "the slice's start")
        if low > high:
            raise ValueError(
                f"lr={lr!r} falls toward the head; pass slice(lo, hi) with lo <= hi, "
                "so the head gets the largest rate."
            )
        if num_groups == 1:
            return [high]
        ratio = high / low
        rates = [low * ratio ** (i / (num_groups - 1)) for i in range(num_groups)]
        rates[0], rates[-1] = low, high
        return rates
    return [_positive(lr, "lr")] * num_groups


def is_no_decay(module: nn.Module, param_name: str, param: nn.Parameter) -> bool:
    """Tell whether a parameter should get no weight decay.

    True for biases, for every parameter of a normalization layer (BatchNorm,
    InstanceNorm, GroupNorm, LayerNorm, RMSNorm, and library classes whose name ends in
    ``Norm`` such as a transformer's own ``LlamaRMSNorm``) and for every other parameter
    with fewer than two dimensions.

    Args:
        module: The module that owns the parameter directly.
        param_name: The parameter's name inside ``module`` (``"bias"``, ``"weight"``).
        param: The parameter.

    Returns:
        Whether the parameter belongs in a group with ``weight_decay=0.0``.

    Example:
        >>> is_no_decay(nn.LayerNorm(8), "weight", nn.LayerNorm(8).weight)
        True
    """
    if param_name == "bias" or param.ndim < 2:
        return True
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def _no_decay_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    found = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if is_no_decay(module, name, param):
                found.append((name, param))
    return found


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Learning rate {what}={value!r} must be a positive finite number.")
    return float(value)
