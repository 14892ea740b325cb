"""Optimizer parameter groups with a learning rate per layer group and no decay on norms and biases."""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from . import _l2sp
from ._utils import close_matches, format_suggestions
from .errors import NoMatchingTargetError, NoParametersError
from .groups import LayerGroup, resolve_groups

__all__ = ["NoDecayRule", "ParamGroup", "is_no_decay", "layer_lrs", "param_groups"]

logger = logging.getLogger(__name__)

ParamGroup = dict[str, Any]
"""A dict handed to a ``torch.optim`` optimizer: ``params``, ``lr`` and other settings."""

NoDecayRule = Callable[[nn.Module, str, nn.Parameter], bool]
"""Tells whether a parameter gets no weight decay, from its owning module, its name in that module and itself."""

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    _NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES += (nn.RMSNorm,)

# Parameter names, inside their module, of learned position embeddings and special tokens
# (torchvision's and timm's ViTs, Swin, DeiT). They are 2-d or 3-d, so the 1-d rule misses them.
_EMBEDDING_PARAM_NAMES = frozenset(
    {
        "pos_embed",
        "pos_embedding",
        "position_embeddings",
        "absolute_pos_embed",
        "cls_token",
        "class_token",
        "dist_token",
        "mask_token",
        "register_tokens",
        "relative_position_bias_table",
    }
)


def param_groups(
    model: nn.Module,
    lr: float | slice | Mapping[str, float],
    *,
    weight_decay: float | None = None,
    layer_decay: float | None = None,
    lr_scale: Mapping[str, float] | None = None,
    no_decay: NoDecayRule | None = None,
    no_decay_embeddings: bool = False,
    decay_toward: Literal["zero", "pretrained"] | Mapping[str, torch.Tensor] = "zero",
    include_frozen: bool = False,
    merge: bool = True,
    lora_plus_ratio: float | None = None,
    groups: Sequence[LayerGroup] | None = None,
) -> list[ParamGroup]:
    """Build optimizer parameter groups with a learning rate per layer group.

    Parameters are split by layer group and by weight decay: biases, parameters of
    normalization layers and every other parameter with fewer than two dimensions get
    ``weight_decay=0.0`` (see :func:`is_no_decay`). Each parameter appears exactly once,
    a tied one included. Adjacent layer groups with identical settings share one dict
    unless ``merge=False``. Every dict carries:

    * ``lr`` and ``initial_lr``, both the group's real rate, so every torch scheduler
      (``LambdaLR``, ``StepLR``, ``OneCycleLR``, ``ReduceLROnPlateau``, ...) scales all
      groups and keeps their ratios, and a scheduler resumed with ``last_epoch`` works;
    * ``name``, the layer group's name (``"first..last"`` for merged groups), and
      ``layer_groups``, the names of all the layer groups in the dict, for reports;
    * ``no_decay``, true for the dict of parameters without weight decay.

    The model is not modified, except that ``decay_toward="pretrained"`` records each
    decayed parameter's current value (see below).

    Args:
        model: The model whose parameters to group.
        lr: The learning rate per layer group. A float gives one rate everywhere;
            ``slice(lo, hi)`` spreads rates geometrically from ``lo`` at the lowest group
            to ``hi`` at the head; ``slice(hi)`` follows fastai: ``hi / 10`` for every group
            but the head. A mapping from layer-group names or glob patterns to rates sets
            each group's rate. An exact name wins over patterns, then the first matching
            pattern in the mapping's order. Every group needs a rate, so add ``"*"`` as a
            default.
        weight_decay: Weight decay of the decayed parameters. ``None`` leaves the key out,
            so the optimizer's own default applies (0.01 for ``AdamW``).
        layer_decay: Layer-wise decay of a float ``lr``: the head trains at ``lr`` and each
            group below at the rate of the group above times ``layer_decay`` (0.75 gives
            the top group ``0.75 * lr``, the one below ``0.5625 * lr``).
        lr_scale: Multipliers applied on top of the rates from ``lr``, as a mapping from
            layer-group names or glob patterns to factors, matched like a mapping ``lr``.
            Groups that no key matches keep their rate.
        no_decay: A rule ``(module, param_name, param) -> bool`` to use instead of
            :func:`is_no_decay`, called with each parameter's owning module.
        no_decay_embeddings: Also exempt embedding tables (``nn.Embedding``) and learned
            position embeddings and special tokens (``pos_embed``, ``cls_token``,
            ``position_embeddings``, ...) from weight decay, as many vision-transformer
            recipes do.
        decay_toward: ``"zero"`` for ordinary weight decay. ``"pretrained"`` decays every
            decayed parameter outside the head toward its value at the time of this call
            (L2-SP) instead of toward zero; the head, which has no pretrained value, still
            decays toward zero. A mapping from parameter names to tensors (such as the
            pretrained ``state_dict``) gives the values to decay toward, for example when
            resuming a run. The pull is applied after every optimizer step to the
            parameters that have a gradient, as ``p -= lr * weight_decay * (p - p0)``.
        include_frozen: Also put the currently frozen parameters in their groups, so that
            unfreezing them later needs no ``add_param_group`` and the optimizer, its
            state and any scheduler keep working unchanged. Optimizers skip parameters
            without a gradient, so frozen ones do not move. With this option, rates
            spread over all layer groups; without it, over the groups from the lowest one
            with trainable parameters up to the head.
        merge: Whether adjacent layer groups with identical settings share one dict.
            ``False`` gives one dict per layer group and weight-decay setting.
        lora_plus_ratio: LoRA+: train the B matrices (up projections) of LoRA adapters,
            added with :func:`finetunekit.add_lora`, at this multiple of their layer
            group's rate, in dicts of their own marked ``lora_plus=True``. The A matrices
            keep the group's rate. ``None`` treats adapters like any other parameter.
        groups: Layer groups to use instead of ``layer_groups(model)``; the last one is
            taken as the head.

    Returns:
        Parameter groups for any ``torch.optim`` optimizer, in layer-group order.

    Raises:
        NoParametersError: If no parameter of ``model`` is trainable (and
            ``include_frozen`` is false), or the model has no parameters.
        NoMatchingTargetError: If a key of a mapping ``lr`` or of ``lr_scale`` matches no
            layer group, or a mapping ``lr`` leaves a group without a rate.
        ValueError: If a rate, factor or decay is not positive and finite, a slice has a
            step or ``lo > hi``, ``layer_decay`` is combined with a slice or mapping,
            ``decay_toward="pretrained"`` comes without ``weight_decay``, or ``groups``
            does not match the model's parameters.

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
    rule = no_decay if no_decay is not None else is_no_decay
    if weight_decay is not None:
        _non_negative(weight_decay, "weight_decay")
    anchors = _anchor_source(model, decay_toward, weight_decay)

    if include_frozen:
        first = 0
    else:
        # Rates span the trainable groups only, so that training the top three groups with
        # slice(1e-4, 1e-3) gives 1e-4 to the lowest of them, whatever sits frozen below.
        first = next(
            (i for i, g in enumerate(groups) if any(p.requires_grad for p in g.parameters())),
            len(groups),
        )
    spanned = groups[first:]
    if not spanned or not any(True for g in spanned for _ in g.parameters()):
        raise NoParametersError(
            f"No parameter of {type(model).__name__} is trainable, so there is nothing to optimize. "
            "Unfreeze some layer groups first, for example finetunekit.freeze_to(model, -1), "
            "or pass include_frozen=True to build the optimizer before unfreezing."
        )
    names = [g.name for g in spanned]
    rates = _rates(lr, names, layer_decay)
    if lr_scale is not None:
        factors = _match_names(lr_scale, names, "lr_scale", require_all=False)
        rates = [rate * factors.get(name, 1.0) for rate, name in zip(rates, names)]

    no_decay_ids = {id(p) for _, p in _no_decay_parameters(model, rule, no_decay_embeddings)}
    lora_b_ids = _lora_b_parameters(model, lora_plus_ratio)
    entries: list[ParamGroup] = []
    for group, rate in zip(spanned, rates):
        chosen = [p for p in group.parameters() if include_frozen or p.requires_grad]
        is_head = group is groups[-1]
        for flag in (False, True):
            params = [p for p in chosen if (id(p) in no_decay_ids) == flag]
            for is_lora_b, subset in _split_lora_b(params, lora_b_ids):
                entry: ParamGroup = {"params": subset, "lr": rate, "initial_lr": rate}
                if is_lora_b:
                    entry["lr"] = entry["initial_lr"] = rate * lora_plus_ratio  # type: ignore[operator]
                    entry["lora_plus"] = True
                if flag:
                    entry["weight_decay"] = 0.0
                elif anchors is not None and not is_head:
                    # The optimizer's own decay would pull toward zero; the step hook pulls toward p0.
                    entry["weight_decay"] = 0.0
                    entry[_l2sp.KEY] = weight_decay
                elif weight_decay is not None:
                    entry["weight_decay"] = weight_decay
                entry.update(name=group.name, layer_groups=[group.name], no_decay=flag)
                entries.append(entry)

    result = _merged(entries) if merge else entries
    if anchors is not None:
        _record_anchors(model, result, anchors)
    logger.info("built %d param groups over %d layer groups", len(result), len(spanned))
    return result


def _rates(lr: float | slice | Mapping[str, float], names: list[str], layer_decay: float | None) -> list[float]:
    if layer_decay is not None:
        if isinstance(lr, (slice, Mapping)):
            raise ValueError(
                f"layer_decay={layer_decay!r} needs a float lr, the head's rate; got lr={lr!r}. "
                "Pass one of layer_decay, a slice or a mapping."
            )
        if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
            raise ValueError(
                f"layer_decay={layer_decay!r} must be in (0, 1]: each group trains at the rate "
                "of the group above times layer_decay, so the head trains fastest."
            )
        head = _positive(lr, "lr")
        return [head * layer_decay ** (len(names) - 1 - i) for i in range(len(names))]
    if isinstance(lr, Mapping):
        chosen = _match_names(lr, names, "lr", require_all=True)
        return [chosen[name] for name in names]
    return layer_lrs(lr, len(names))


def _match_names(
    mapping: Mapping[str, float], names: list[str], argument: str, *, require_all: bool
) -> dict[str, float]:
    """Resolve a mapping from names or glob patterns to positive values, per layer-group name."""
    values = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise TypeError(f"{argument} keys must be layer-group names or glob patterns; got {key!r}.")
        values[key] = _positive(value, f"{argument}[{key!r}]")
    result: dict[str, float] = {}
    used: set[str] = set()
    for name in names:
        if name in values:
            result[name] = values[name]
            used.add(name)
            continue
        key = next((k for k in values if fnmatch.fnmatchcase(name, k)), None)
        if key is not None:
            result[name] = values[key]
            used.add(key)
    unused = [k for k in values if k not in used and not any(fnmatch.fnmatchcase(n, k) for n in names)]
    if unused:
        raise NoMatchingTargetError(
            f"{argument} key {unused[0]!r} matches no layer group.{format_suggestions(close_matches(unused[0], names))} "
            f"The layer groups are: {', '.join(names)}."
        )
    missing = [name for name in names if name not in result]
    if require_all and missing:
        raise NoMatchingTargetError(
            f"lr gives no rate for layer group {missing[0]!r}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}. "
            "Add it, or a default such as '*': 1e-4, to the mapping."
        )
    return result


def _merged(entries: list[ParamGroup]) -> list[ParamGroup]:
    """Join each dict to the open dict of the same decay kind when all their settings agree."""
    result: list[ParamGroup] = []
    open_by_kind: dict[tuple[bool, bool], ParamGroup] = {}
    for entry in entries:
        kind = (entry["no_decay"], entry.get("lora_plus", False))
        current = open_by_kind.get(kind)
        if current is not None and _settings(current) == _settings(entry):
            current["params"] = current["params"] + entry["params"]
            current["layer_groups"] = current["layer_groups"] + entry["layer_groups"]
            current["name"] = f"{current['layer_groups'][0]}..{current['layer_groups'][-1]}"
        else:
            entry = dict(entry)
            open_by_kind[kind] = entry
            result.append(entry)
    return result


def _lora_b_parameters(model: nn.Module, ratio: float | None) -> set[int]:
    """Return the ids of LoRA's up-projection (B) parameters when LoRA+ is on, else an empty set."""
    if ratio is None:
        return set()
    _positive(ratio, "lora_plus_ratio")
    from .lora import _lora_role

    found = {id(p) for name, p in model.named_parameters() if _lora_role(name) == "B"}
    if not found:
        raise NoMatchingTargetError(
            f"lora_plus_ratio={ratio!r} was given, but {type(model).__name__} has no LoRA B matrices. "
            "Add adapters first with finetunekit.add_lora(model), or leave lora_plus_ratio out."
        )
    return found


def _split_lora_b(params: list[nn.Parameter], lora_b_ids: set[int]) -> list[tuple[bool, list[nn.Parameter]]]:
    """Split parameters into the others and LoRA's B matrices, dropping an empty part."""
    others = [p for p in params if id(p) not in lora_b_ids]
    b_matrices = [p for p in params if id(p) in lora_b_ids]
    return [(is_b, part) for is_b, part in ((False, others), (True, b_matrices)) if part]


def _settings(entry: ParamGroup) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in ("params", "name", "layer_groups")}


def _anchor_source(
    model: nn.Module,
    decay_toward: str | Mapping[str, torch.Tensor],
    weight_decay: float | None,
) -> Mapping[str, torch.Tensor] | None:
    if isinstance(decay_toward, str):
        if decay_toward == "zero":
            return None
        if decay_toward != "pretrained":
            raise ValueError(f"decay_toward={decay_toward!r} is not 'zero', 'pretrained' or a mapping of tensors.")
        source: Mapping[str, torch.Tensor] = dict(model.named_parameters())
    elif isinstance(decay_toward, Mapping):
        source = decay_toward
    else:
        raise TypeError(f"decay_toward must be 'zero', 'pretrained' or a mapping of tensors; got {decay_toward!r}.")
    if not weight_decay:
        raise ValueError(
            f"decay_toward={'a mapping' if isinstance(decay_toward, Mapping) else repr(decay_toward)} needs a "
            f"positive weight_decay, the strength of the pull; got weight_decay={weight_decay!r}."
        )
    return source


def _record_anchors(model: nn.Module, result: list[ParamGroup], source: Mapping[str, torch.Tensor]) -> None:
    names = {id(p): name for name, p in model.named_parameters()}
    pulled = [p for entry in result if entry.get(_l2sp.KEY) for p in entry["params"]]
    missing = [names[id(p)] for p in pulled if names[id(p)] not in source]
    if missing:
        raise ValueError(
            f"decay_toward has no value for {len(missing)} decayed parameters, such as {missing[0]!r}. "
            "Pass the full pretrained state_dict, or decay_toward='pretrained' to use the current values."
        )
    for param in pulled:
        value = source[names[id(param)]]
        if value.shape != param.shape:
            raise ValueError(
                f"decay_toward[{names[id(param)]!r}] has shape {tuple(value.shape)}, but the parameter has "
                f"shape {tuple(param.shape)}."
            )
    for param in pulled:
        _l2sp.set_anchor(param, source[names[id(param)]])
    logger.info("recorded pretrained values of %d parameters for decay toward them", len(pulled))


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
                f"lr={lr!r} falls toward the head; pass slice(lo, hi) with lo <= hi, so the head gets the largest rate."
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


def _no_decay_parameters(
    model: nn.Module, rule: NoDecayRule = is_no_decay, embeddings: bool = False
) -> list[tuple[str, nn.Parameter]]:
    found = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if rule(module, name, param) or (embeddings and _is_embedding(module, name)):
                found.append((name, param))
    return found


def _is_embedding(module: nn.Module, param_name: str) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or param_name in _EMBEDDING_PARAM_NAMES


def _positive(value: object, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Learning rate {argument}={value!r} must be a positive finite number.")
    return float(value)


def _non_negative(value: object, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{argument}={value!r} must be a non-negative finite number.")
    return float(value)
