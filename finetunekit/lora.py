"""LoRA adapters on any module, built on peft: add, merge, save and load them.

The adapters are injected in place with ``peft.inject_adapter_in_model``, so the model
keeps its class, its module names and its head. ``layer_groups``, ``freeze``,
``param_groups``, ``describe`` and the ``Trainer`` therefore work on the result. A LoRA
layer keeps its pretrained layer as ``<name>.base_layer`` and adds ``<name>.lora_A.default``
and ``<name>.lora_B.default``. peft computes the adapter output and merges the weights;
this module picks the targets, sets what trains, and saves what training changed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ._norms import (
    POLICY,
    check_policy,
    has_running_stats,
    set_policy,
    sync_norm_layers,
)
from ._utils import close_matches, format_suggestions, named_parameters_once
from .errors import NoMatchingTargetError
from .groups import LayerGroup, layer_groups
from .heads import _head_names

__all__ = [
    "add_lora",
    "enable_gradient_checkpointing",
    "load_adapter",
    "lora_groups",
    "merge_lora",
    "save_adapter",
    "unmerge_lora",
]

logger = logging.getLogger(__name__)

LoraTarget = str | type[nn.Module] | LayerGroup
"""One LoRA target: a module name, a peft-style name suffix, a glob or ``"re:"`` pattern,
a module class, or a layer group."""

# Attribute name under which finetunekit stores a model's LoRA settings.
_STATE = "_finetunekit_lora"

ADAPTER_FILE = "finetunekit_adapter.safetensors"
CONFIG_FILE = "finetunekit_adapter.json"
_FORMAT = "finetunekit-lora"
_FORMAT_VERSION = 1

# The fingerprint hashes every base parameter's name, shape and dtype, and the values of
# this many tensors, spread evenly over the sorted names, at this many evenly spaced
# positions each. So it costs the same on a 100M and a 10B parameter model.
_FINGERPRINT_TENSORS = 32
_FINGERPRINT_VALUES = 256

# LoraConfig fields that add_lora sets itself or does not support.
_MANAGED_OPTIONS = {
    "r": "pass r=",
    "lora_alpha": "pass alpha=",
    "lora_dropout": "pass dropout=",
    "target_modules": "pass targets=",
    "target_parameters": "pass targets= with module names",
    "exclude_modules": "pass targets= without the modules to leave out",
    "layers_to_transform": "pass groups=",
    "layers_pattern": "pass groups=",
    "modules_to_save": "pass modules_to_save= to add_lora",
    "fan_in_fan_out": "add_lora sets it from the layer types",
    "bias": "name the layers whose biases should train in modules_to_save=",
    "inference_mode": "use load_adapter(..., trainable=False)",
    "peft_type": "add_lora always adds LoRA",
    "task_type": "add_lora works on any module and needs no task type",
}

# Name segments of the two LoRA matrices inside a peft LoRA layer.
_A_SEGMENTS = frozenset({"lora_A", "lora_embedding_A"})
_B_SEGMENTS = frozenset({"lora_B", "lora_embedding_B"})

_GLOB_CHARS = frozenset("*?[")
_REGEX_PREFIX = "re:"
_BASE_LAYER = re.compile(r"\.base_layer(?=\.|$)")


@dataclass
class _LoraState:
    """LoRA settings of a model: enough to save the adapter and to rebuild it on a fresh base."""

    options: dict[str, Any]
    targets: list[str]
    modules_to_save: list[str]
    norm_policies: dict[str, str]
    fingerprint: str
    buffer_digests: dict[str, str] = field(default_factory=dict)
    # Whether peft's injection created the model's ``peft_config`` attribute, which unloading removes.
    owns_peft_config: bool = False

    @property
    def trained_norms(self) -> list[str]:
        """Normalization layers outside the saved modules whose affine parameters train (policy ``"train"``)."""
        return [name for name, policy in self.norm_policies.items() if policy == "train"]


# --- add_lora -------------------------------------------------------------------------------


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: Literal["auto"] | LoraTarget | Sequence[LoraTarget] = "auto",
    *,
    groups: int | Sequence[int | str] | None = None,
    modules_to_save: Sequence[str] = (),
    train_head: bool | None = None,
    bn: Literal["frozen", "train", "stats"] | None = None,
    use_dora: bool = False,
    use_rslora: bool = False,
    init_lora_weights: bool | str = True,
    **lora_options: Any,
) -> nn.Module:
    """Add LoRA adapters to ``model`` in place, through peft, and freeze the base weights.

    Each targeted layer becomes a peft LoRA layer: its output is the frozen layer's output
    plus ``(alpha / r) * B(A(x))``, where ``A`` maps to ``r`` dimensions and ``B`` maps back
    (``alpha / sqrt(r)`` with ``use_rslora=True``). ``B`` starts at zero, so the model's
    output does not change until training. The model keeps its class and its module names,
    and a LoRA layer keeps the pretrained layer as ``<name>.base_layer``.

    After the call the adapters and the saved modules are trainable and every other
    parameter is frozen, as by :func:`finetunekit.freeze`. The saved modules are the head
    (when ``train_head``) and ``modules_to_save``: they train fully and
    :func:`save_adapter` stores them with the adapters. Normalization layers with running
    statistics follow the BatchNorm policy ``bn``. Checks run before the first change, and
    a failure inside peft removes the adapters again, so a call that raises leaves the
    model as it was.

    Args:
        model: The model to change, in place. The same object is returned.
        r: Rank of the adapters.
        alpha: Scale numerator: the update is multiplied by ``alpha / r``.
        dropout: Dropout probability on the adapter input.
        targets: The layers that get adapters:

            - ``"auto"``: every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and transformers
              ``Conv1D`` outside the head and the saved modules. Grouped convolutions
              (``groups > 1``, such as depthwise ones) are left out, because peft cannot
              merge them.
            - a ``str``: a module's qualified name, a name suffix as in peft
              (``"query"`` matches ``"bert.encoder.layer.0.attention.self.query"``), a glob
              pattern (``"layer4.*"``) or a regular expression after ``"re:"`` that must
              match a whole name. A name or pattern that reaches a container selects the
              supported layers inside it.
            - a module class, such as ``nn.Conv2d``: every layer of that class outside the
              head and the saved modules.
            - a :class:`~finetunekit.LayerGroup`: the supported layers in that group.
            - a list of the above. Each item must select at least one layer.
        groups: Restrict the targets to some layer groups of ``layer_groups(model)``. An
            int ``n`` keeps the groups from index ``n`` on, as in
            :func:`finetunekit.freeze_to`, so ``groups=-3`` is the top two groups below the
            head. A list keeps the groups at those indexes or with those names.
        modules_to_save: Names or patterns of further modules that train fully and are
            saved with the adapters, such as a LayerNorm or an embedding.
        train_head: Whether the head found by :func:`finetunekit.find_head` (and any
            auxiliary head) trains fully and is saved. ``None`` trains it unless it is the
            model's output embedding layer (a language model's ``lm_head``), which is
            pretrained and often tied to the input embeddings.
        bn: BatchNorm policy of the frozen normalization layers with running statistics:
            ``"frozen"`` locks their statistics, ``"train"`` trains their affine parameters
            and statistics, and ``"stats"`` lets the statistics adapt. ``None`` keeps the
            policy an earlier freezing call set, ``"frozen"`` by default. Parameters and
            statistics that can change are saved by :func:`save_adapter`.
        use_dora: Use DoRA, which also learns a magnitude vector per output.
        use_rslora: Scale the update by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        init_lora_weights: peft's initialisation: ``True`` (``B`` at zero), ``False``,
            ``"gaussian"``, ``"orthogonal"``, or one of the options that rewrite the base
            weights (``"pissa"``, ``"olora"``, ...). :func:`save_adapter` rejects a model
            whose base weights changed, so merge and save the whole model after those.
        **lora_options: Other fields of ``peft.LoraConfig``, such as ``rank_pattern`` or
            ``lora_bias``. They must be JSON values for :func:`save_adapter`.

    Returns:
        ``model`` itself, with adapters.

    Raises:
        NoMatchingTargetError: If a target, a name in ``modules_to_save`` or a group in
            ``groups`` matches nothing. The message names it and the closest module names.
        ValueError: If a target selects only layers that LoRA cannot adapt (the message
            lists the supported types), names the head or a saved module, the model already
            has adapters, or ``r``, ``alpha``, ``dropout`` or ``bn`` is out of range.
        TypeError: If a target has an unsupported kind, or ``lora_options`` contains a
            key that ``LoraConfig`` lacks or that add_lora sets itself.
        ImportError: If peft is not installed.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(weights=None)
        >>> replace_head(model, 5)
        Linear(in_features=512, out_features=5, bias=True)
        >>> model = add_lora(model, r=4)
        >>> type(model.layer1[0].conv1).__name__, model.fc.weight.requires_grad
        ('Conv2d', True)
        >>> sum(p.numel() for p in model.parameters() if p.requires_grad)
        157733
    """
    _require_peft()
    if getattr(model, _STATE, None) is not None or _lora_layers(model):
        raise ValueError(
            f"{type(model).__name__} already has LoRA adapters. Call add_lora once per model, or "
            "merge_lora(model) first to fold the adapters into the weights."
        )
    options = _check_options(r, alpha, dropout, use_dora, use_rslora, init_lora_weights, lora_options)
    check_policy(bn)

    saved = _saved_modules(model, modules_to_save, train_head)
    target_names = _resolve_targets(model, targets, groups, saved)
    options["fan_in_fan_out"] = _fan_in_fan_out(model, target_names)
    norm_policies = _norm_policies(model, saved, bn)

    state = _LoraState(
        options=options,
        targets=target_names,
        modules_to_save=saved,
        norm_policies=norm_policies,
        fingerprint="",
        buffer_digests=_buffer_digests(model),
    )
    state.fingerprint = _fingerprint(model, state)
    _inject(model, state, trainable=True)

    trainable = sum(p.numel() for _, p in named_parameters_once(model) if p.requires_grad)
    total = sum(p.numel() for _, p in named_parameters_once(model))
    logger.info(
        "added LoRA (r=%d, alpha=%g) to %d layers of %s; saved modules %s; %s of %s values trainable (%.2f%%)",
        r,
        alpha,
        len(target_names),
        type(model).__name__,
        saved,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return model


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise ImportError("LoRA needs peft: pip install peft") from error


def _check_options(
    r: int,
    alpha: float,
    dropout: float,
    use_dora: bool,
    use_rslora: bool,
    init_lora_weights: bool | str,
    lora_options: dict[str, Any],
) -> dict[str, Any]:
    from peft import LoraConfig

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r={r!r} must be a positive integer rank, such as 8.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha={alpha!r} must be a positive number, such as 2 * r.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r} must be a probability in [0, 1).")

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    for key, value in lora_options.items():
        if key in _MANAGED_OPTIONS:
            raise TypeError(f"add_lora sets LoraConfig.{key} itself; {_MANAGED_OPTIONS[key]}.")
        if key not in fields:
            suggestions = format_suggestions(close_matches(key, fields - set(_MANAGED_OPTIONS)))
            raise TypeError(f"add_lora got {key}={value!r}, which is not a LoraConfig field.{suggestions}")

    options = {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(dropout),
        "use_dora": bool(use_dora),
        "use_rslora": bool(use_rslora),
        "init_lora_weights": init_lora_weights,
        **lora_options,
    }
    # LoraConfig checks the values itself (an unknown init_lora_weights, for example), and
    # building it here raises before the model changes.
    _lora_config(options, ["x"])
    return options


def _lora_config(options: dict[str, Any], targets: list[str]) -> Any:
    from peft import LoraConfig

    # A string target_modules is a regular expression that must match a whole module name,
    # so each name selects exactly that module.
    pattern = "|".join(re.escape(name) for name in targets)
    return LoraConfig(target_modules=f"(?:{pattern})", **options)


# --- targets --------------------------------------------------------------------------------


def _adaptable_types() -> tuple[type[nn.Module], ...]:
    """Layer types peft's LoRA adapts with its default layers (peft 0.21)."""
    types: tuple[type[nn.Module], ...] = (
        nn.Linear,
        nn.Embedding,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
    )
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return types
    return (*types, Conv1D)


def _supported_names() -> str:
    return ", ".join(
        f"transformers {cls.__name__}" if cls.__module__.startswith("transformers") else f"nn.{cls.__name__}"
        for cls in _adaptable_types()
    )


def _is_adaptable(module: nn.Module) -> bool:
    if not isinstance(module, _adaptable_types()):
        return False
    # peft cannot merge LoRA into a grouped convolution and needs r divisible by groups.
    return getattr(module, "groups", 1) == 1


def _is_auto_target(module: nn.Module) -> bool:
    return _is_adaptable(module) and not isinstance(module, nn.Embedding)


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def _saved_modules(model: nn.Module, modules_to_save: Sequence[str], train_head: bool | None) -> list[str]:
    """Return the names of the modules that train fully: the head when it trains, then ``modules_to_save``."""
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    heads = _head_names(model)
    if train_head is None:
        train_head = bool(heads) and not _is_output_embedding(model, heads[0])
    elif train_head and not heads:
        raise ValueError(
            f"train_head=True, but {type(model).__name__} has no head that find_head recognises. "
            "Name the output layer in modules_to_save instead."
        )

    saved = list(heads) if train_head else []
    modules = [n for n, _ in model.named_modules() if n]
    for item in modules_to_save:
        if not isinstance(item, str):
            raise TypeError(f"modules_to_save item {item!r} has type {type(item).__name__}; pass module names.")
        matched = _match_names(item, modules)
        if not matched:
            raise NoMatchingTargetError(
                f"modules_to_save item {item!r} matched no module of {type(model).__name__}."
                f"{format_suggestions(close_matches(item, modules))}"
            )
        saved.extend(matched)
    # A module inside another saved module is saved with it.
    unique = list(dict.fromkeys(saved))
    return [n for n in unique if not _under(n, [p for p in unique if p != n])]


def _is_output_embedding(model: nn.Module, head_name: str) -> bool:
    get_output = getattr(model, "get_output_embeddings", None)
    if not callable(get_output):
        return False
    try:
        output = get_output()
    except NotImplementedError:
        return False
    return output is not None and output is model.get_submodule(head_name)


def _match_names(target: str, names: Sequence[str]) -> list[str]:
    """Return the names that ``target`` selects: exact, peft-style suffix, glob or ``re:`` match."""
    if target.startswith(_REGEX_PREFIX):
        try:
            compiled = re.compile(target[len(_REGEX_PREFIX) :])
        except re.error as error:
            raise ValueError(f"LoRA target {target!r} is not a valid regular expression: {error}.") from None
        return [n for n in names if compiled.fullmatch(n)]
    # A plain name selects that module and every module whose name ends in it, as in peft.
    exact = [n for n in names if n == target or n.endswith(f".{target}")]
    if exact:
        return exact
    if _GLOB_CHARS & set(target):
        return [n for n in names if fnmatch.fnmatchcase(n, target)]
    return []


def _resolve_targets(
    model: nn.Module,
    targets: Any,
    groups: int | Sequence[int | str] | None,
    saved: list[str],
) -> list[str]:
    """Return the qualified names of the layers that get adapters, in module order."""
    modules = {n: m for n, m in model.named_modules() if n}
    allowed = _modules_in_groups(model, groups, modules) if groups is not None else None

    if isinstance(targets, (str, type, LayerGroup)):
        items = [targets]
    elif isinstance(targets, Sequence):
        items = list(targets)
        if not items:
            raise ValueError("targets=[] selects no layer; pass 'auto' or at least one name, pattern or type.")
    else:
        raise TypeError(
            f"targets={targets!r} has type {type(targets).__name__}; pass 'auto', a module name or pattern, "
            "a module class, a LayerGroup, or a list of them."
        )

    # "auto", module classes and layer groups never pick the head, even when it does not train;
    # only a name can put adapters on it.
    excluded = saved + _head_names(model)
    selected: set[str] = set()
    for item in items:
        found = _select_name(model, item, modules, saved) if isinstance(item, str) and item != "auto" else None
        if found is None:
            found = _select(model, item, modules, excluded)
        if allowed is not None:
            found = [n for n in found if n in allowed]
            if not found:
                raise NoMatchingTargetError(
                    f"LoRA target {_describe_target(item)} matched no layer inside groups={groups!r}. "
                    "Widen groups= or pick targets inside those groups."
                )
        selected.update(found)
    return [n for n in modules if n in selected]


def _select(model: nn.Module, item: Any, modules: dict[str, nn.Module], excluded: list[str]) -> list[str]:
    if item == "auto":
        found = [n for n, m in modules.items() if _is_auto_target(m) and not _under(n, excluded)]
        if not found:
            present = sorted({type(m).__name__ for m in modules.values()})
            raise NoMatchingTargetError(
                f"targets='auto' found no nn.Linear or convolution outside the head in {type(model).__name__} "
                f"(module types there: {present}). Name the layers to adapt in targets=."
            )
        return found
    if isinstance(item, LayerGroup):
        return _select_in_group(model, item, modules, excluded)
    if isinstance(item, type) and issubclass(item, nn.Module):
        return _select_type(model, item, modules, excluded)
    raise TypeError(
        f"LoRA target {item!r} has type {type(item).__name__}; pass a module name or pattern, "
        "a module class or a LayerGroup."
    )


def _select_name(model: nn.Module, target: str, modules: dict[str, nn.Module], saved: list[str]) -> list[str]:
    matched = _match_names(target, list(modules))
    if not matched:
        raise NoMatchingTargetError(
            f"LoRA target {target!r} matched no module of {type(model).__name__}."
            f"{format_suggestions(close_matches(target, modules))} "
            "Check the names with [n for n, _ in model.named_modules()]."
        )
    clash = [n for n in matched if _under(n, saved)]
    if clash and len(clash) == len(matched):
        raise ValueError(
            f"LoRA target {target!r} selects {clash[:3]}, which train fully as saved modules {saved}. "
            "Leave them out of targets, or pass train_head=False to put adapters on the head."
        )

    found = [n for n, m in modules.items() if _is_adaptable(m) and _under(n, matched) and not _under(n, saved)]
    if not found:
        kinds = sorted({type(modules[n]).__name__ for n in matched})
        raise ValueError(
            f"LoRA target {target!r} selects {matched[:3]} of type {kinds}, and LoRA cannot adapt "
            f"them or any layer inside them. Supported types: {_supported_names()} "
            "(convolutions with groups=1 only)."
        )
    return found


def _select_type(
    model: nn.Module,
    cls: type[nn.Module],
    modules: dict[str, nn.Module],
    saved: list[str],
) -> list[str]:
    if not issubclass(cls, _adaptable_types()):
        raise ValueError(  # noqa: TRY004 (the class is a valid argument; LoRA lacks a layer for it)
            f"LoRA cannot adapt {cls.__name__} layers. Supported types: {_supported_names()}."
        )
    found = [n for n, m in modules.items() if isinstance(m, cls) and _is_adaptable(m) and not _under(n, saved)]
    if not found:
        present = sorted({type(m).__name__ for n, m in modules.items() if _is_adaptable(m) and not _under(n, saved)})
        raise NoMatchingTargetError(
            f"LoRA target {cls.__name__} matched no layer outside the saved modules of {type(model).__name__} "
            f"(grouped convolutions are left out). Adaptable types there: {present}."
        )
    return found


def _select_in_group(model: nn.Module, group: LayerGroup, modules: dict[str, nn.Module], saved: list[str]) -> list[str]:
    owned = {id(p) for p in group.parameters()}
    found = [
        n
        for n, m in modules.items()
        if _is_adaptable(m) and not _under(n, saved) and id(getattr(m, "weight", None)) in owned
    ]
    if not found:
        raise NoMatchingTargetError(
            f"LoRA target {group!r} contains no layer that LoRA can adapt outside the saved modules. "
            f"Supported types: {_supported_names()}."
        )
    return found


def _modules_in_groups(model: nn.Module, groups: int | Sequence[int | str], modules: dict[str, nn.Module]) -> set[str]:
    all_groups = layer_groups(model)
    count = len(all_groups)
    if isinstance(groups, bool):
        raise TypeError(f"groups={groups!r} is a bool; pass a layer-group index or a list of indexes and names.")
    if isinstance(groups, int):
        if not -count <= groups < count:
            raise IndexError(f"groups={groups} is out of range: {type(model).__name__} has {count} layer groups.")
        chosen = all_groups[groups:]
    elif isinstance(groups, Sequence) and not isinstance(groups, str):
        chosen = [_pick_group(model, all_groups, item) for item in groups]
    else:
        raise TypeError(f"groups={groups!r} must be an int or a list of layer-group indexes and names.")

    owned = {id(p) for g in chosen for p in g.parameters()}
    return {n for n, m in modules.items() if id(getattr(m, "weight", None)) in owned}


def _pick_group(model: nn.Module, all_groups: list[LayerGroup], item: int | str) -> LayerGroup:
    if isinstance(item, int) and not isinstance(item, bool):
        if not -len(all_groups) <= item < len(all_groups):
            raise IndexError(
                f"groups item {item} is out of range: {type(model).__name__} has {len(all_groups)} layer groups."
            )
        return all_groups[item]
    names = [g.name for g in all_groups]
    if isinstance(item, str) and item in names:
        return all_groups[names.index(item)]
    raise NoMatchingTargetError(
        f"groups item {item!r} was not found among the layer groups of {type(model).__name__}.{format_suggestions(close_matches(str(item), names))}"
    )


def _describe_target(item: Any) -> str:
    return item.__name__ if isinstance(item, type) else repr(item)


def _fan_in_fan_out(model: nn.Module, targets: list[str]) -> bool:
    """Return whether the targets store their weight as (in, out), as transformers' Conv1D does."""
    kinds = {type(model.get_submodule(n)).__name__ == "Conv1D" for n in targets}
    if len(kinds) > 1:
        # TODO: peft 0.21 keeps one fan_in_fan_out per config, so targets of both layouts
        # need two adapters; allow them once add_lora can create more than one.
        raise NotImplementedError(
            "targets mix transformers Conv1D layers with other layers; peft needs one weight layout per "
            "adapter. Target only the Conv1D layers, or only the others."
        )
    return kinds == {True}


def _norm_policies(model: nn.Module, saved: list[str], bn: str | None) -> dict[str, str]:
    """Return the BatchNorm policy of every normalization layer with running statistics outside the saved modules."""
    return {
        name: bn if bn is not None else getattr(module, POLICY, "frozen")
        for name, module in model.named_modules()
        if has_running_stats(module) and not _under(name, saved)
    }


# --- injection and trainability -------------------------------------------------------------


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Return the adapter parameters (``lora_A``, ``lora_B``, DoRA magnitudes), found by module structure."""
    found = []
    for name, layer in _lora_layers(model):
        for attribute in layer.adapter_layer_names:
            container = getattr(layer, attribute, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                found.extend(container.named_parameters(prefix=f"{name}.{attribute}"))
    return found


def _inject(model: nn.Module, state: _LoraState, *, trainable: bool) -> None:
    """Inject the adapters that ``state`` describes, set what trains, and record ``state`` on the model."""
    from peft import inject_adapter_in_model

    config = _lora_config(dict(state.options), state.targets)
    flags = [(p, p.requires_grad) for _, p in named_parameters_once(model)]
    state.owns_peft_config = not hasattr(model, "peft_config")
    try:
        inject_adapter_in_model(config, model)
    except Exception:
        _remove_lora_layers(model, state)
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)
        raise

    _set_trainable(model, state, trainable=trainable)
    setattr(model, _STATE, state)


def _set_trainable(model: nn.Module, state: _LoraState, *, trainable: bool) -> None:
    """Freeze the base weights and make the adapters and saved modules trainable (or freeze everything)."""
    for name, policy in state.norm_policies.items():
        setattr(model.get_submodule(name), POLICY, policy)

    train_ids = {id(p) for _, p in _adapter_parameters(model)}
    for name in state.modules_to_save:
        train_ids.update(id(p) for p in model.get_submodule(name).parameters())
    named = list(named_parameters_once(model))
    base_ids = {id(p) for _, p in named if id(p) not in train_ids}
    # The "train" policy keeps the affine parameters of the frozen normalization layers trainable.
    train_ids.update(id(p) for p in set_policy(model, base_ids, None))

    for _, param in named:
        requires_grad = trainable and id(param) in train_ids
        param.requires_grad_(requires_grad)
        if not requires_grad:
            param.grad = None
    sync_norm_layers(model)


def _remove_lora_layers(model: nn.Module, state: _LoraState | None) -> None:
    """Put each LoRA layer's base layer back in its place, dropping the adapters and peft's config."""
    for name, layer in _lora_layers(model):
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.get_base_layer())
    if state is not None and state.owns_peft_config and hasattr(model, "peft_config"):
        delattr(model, "peft_config")


# --- fingerprint ----------------------------------------------------------------------------


def _plain_name(name: str) -> str:
    """Return a parameter's name as it was before peft moved its layer under ``base_layer``."""
    return _BASE_LAYER.sub("", name)


def _fingerprint(model: nn.Module, state: _LoraState) -> str:
    """Hash the base weights that the adapter file does not contain, cheaply.

    Every such parameter's name, shape and dtype go in, and so do the values of a fixed
    sample of tensors. NOTE: a sample detects another model or another pretrained
    checkpoint, but can miss a base that differs in a few values only.
    """
    skip = state.modules_to_save + state.trained_norms
    adapter_ids = {id(p) for _, p in _adapter_parameters(model)}
    base = sorted(
        ((_plain_name(n), p) for n, p in named_parameters_once(model) if id(p) not in adapter_ids),
        key=lambda item: item[0],
    )
    base = [(n, p) for n, p in base if not _under(n, skip)]

    digest = hashlib.sha256()
    for name, param in base:
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}\n".encode())
    if base:
        count = min(_FINGERPRINT_TENSORS, len(base))
        for index in _spread(len(base), count).tolist():
            digest.update(_sample_bytes(base[index][1]))
    return digest.hexdigest()


def _sample_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return b""
    positions = _spread(flat.numel(), _FINGERPRINT_VALUES).to(flat.device)
    values = flat[positions].cpu().contiguous()
    return values.view(torch.uint8).numpy().tobytes()


def _spread(size: int, count: int) -> torch.Tensor:
    """Return up to ``count`` evenly spaced indexes into ``range(size)``, first and last included."""
    # Integer arithmetic, because float32 positions round past the last index above 2**24.
    count = min(count, size)
    return torch.arange(count, dtype=torch.int64) * (size - 1) // max(count - 1, 1)


def _buffer_digests(model: nn.Module) -> dict[str, str]:
    """Hash every persistent buffer in full, to find at save time the buffers that training changed."""
    parameter_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {
        _plain_name(name): _tensor_digest(tensor)
        for name, tensor in model.state_dict(keep_vars=True).items()
        if name not in parameter_names
    }


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(
        f"{tuple(tensor.shape)}|{tensor.dtype}".encode() + data.view(torch.uint8).numpy().tobytes()
    ).hexdigest()


# --- merge ----------------------------------------------------------------------------------


def merge_lora(model: nn.Module, *, keep_adapters: bool = False) -> nn.Module:
    """Fold the LoRA updates into the base weights of ``model``, in place.

    By default each LoRA layer is then replaced by its base layer, so the model has no
    adapter modules left and runs as fast as the base model. Every parameter keeps its
    ``requires_grad`` flag, so the base weights stay frozen and the head stays trainable.
    peft does the merging.

    Args:
        model: A model with adapters from :func:`add_lora` or :func:`load_adapter`.
        keep_adapters: Keep the LoRA layers, with their weights merged, so that
            :func:`unmerge_lora` can undo the merge.

    Returns:
        ``model`` itself. The object does not change, only its LoRA layers.

    Raises:
        ValueError: If ``model`` has no LoRA layers.
        NotImplementedError: If peft cannot merge a layer.

    Example:
        >>> model = add_lora(torchvision.models.resnet18(weights=None))
        >>> model = merge_lora(model)
        >>> type(model.layer1[0].conv1)
        <class 'torch.nn.modules.conv.Conv2d'>
    """
    layers = _require_lora_layers(model, "merge_lora")
    for _, layer in layers:
        if not layer.merged:
            layer.merge()
    if not keep_adapters:
        _remove_lora_layers(model, getattr(model, _STATE, None))
        if hasattr(model, _STATE):
            delattr(model, _STATE)
    logger.info(
        "merged LoRA into %d layers of %s%s",
        len(layers),
        type(model).__name__,
        "" if keep_adapters else " and removed the adapters",
    )
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract the LoRA updates from the base weights again, in place.

    This undoes ``merge_lora(model, keep_adapters=True)``. Layers that are not merged are
    left as they are. NOTE: adding and subtracting the update in floating point can change
    the last bits of a base weight, and :func:`save_adapter` then rejects the model because
    its base no longer matches the fingerprint taken by :func:`add_lora`.

    Args:
        model: A model with LoRA layers.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: If ``model`` has no LoRA layers, for example after ``merge_lora``
            without ``keep_adapters=True``, which removes them.

    Example:
        >>> _ = merge_lora(model, keep_adapters=True)
        >>> unmerge_lora(model).layer1[0].conv1.merged
        False
    """
    layers = _require_lora_layers(model, "unmerge_lora")
    for _, layer in layers:
        if layer.merged:
            layer.unmerge()
    return model


def _require_lora_layers(model: nn.Module, caller: str) -> list[tuple[str, nn.Module]]:
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            f"{caller} found no LoRA layer in {type(model).__name__}. Add adapters with add_lora or "
            "load_adapter; merge_lora(model) removes them unless keep_adapters=True."
        )
    return layers


# --- save and load --------------------------------------------------------------------------


def save_adapter(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save what LoRA training changed in ``model`` to the folder ``path``.

    The folder gets ``finetunekit_adapter.safetensors`` and ``finetunekit_adapter.json``.
    The tensors are the adapter weights, the full state of the saved modules (the trained
    head and ``modules_to_save``), the affine parameters of normalization layers under the
    ``"train"`` policy, and every buffer whose value differs from the one it had at
    :func:`add_lora` (running statistics under the ``"train"`` or ``"stats"`` policy). The
    JSON file contains the LoRA options, the targets and a fingerprint of the frozen base
    weights. The model is not modified.

    Args:
        model: A model with adapters from :func:`add_lora` or :func:`load_adapter`.
        path: Folder to write; created if missing. Existing adapter files are overwritten.

    Returns:
        The folder's path.

    Raises:
        ValueError: If ``model`` has no adapters from finetunekit, a LoRA layer is merged,
            a trainable parameter is neither an adapter nor in a saved module (its training
            would be lost), or the base weights changed since :func:`add_lora`.
        TypeError: If a LoRA option cannot be written as JSON.

    Example:
        >>> save_adapter(model, "runs/bbc-lora")
        PosixPath('runs/bbc-lora')
    """
    from safetensors.torch import save_file

    state = _require_state(model, "save_adapter")
    merged = [name for name, layer in _lora_layers(model) if layer.merged]
    if merged:
        raise ValueError(
            f"save_adapter found merged LoRA layers ({merged[:3]}); their base weights contain the update. "
            "Call unmerge_lora(model) first."
        )
    _check_untracked_training(model, state)
    current = _fingerprint(model, state)
    if current != state.fingerprint:
        raise ValueError(
            "The base weights of this model changed after add_lora, so an adapter alone cannot reproduce "
            "the model. They change when they train outside the adapters, when an init_lora_weights option "
            "such as 'pissa' rewrites them, or in their last bits after merge_lora(keep_adapters=True) and "
            "unmerge_lora. Save the whole state_dict instead."
        )

    tensors = _tensors_to_save(model, state)
    config = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "model_class": type(model).__name__,
        "lora": state.options,
        "targets": state.targets,
        "modules_to_save": state.modules_to_save,
        "norm_policies": state.norm_policies,
        "base_fingerprint": state.fingerprint,
    }
    try:
        text = json.dumps(config, indent=2)
    except TypeError as error:
        raise TypeError(
            f"A LoRA option of this model cannot be saved as JSON ({error}); pass JSON values to add_lora."
        ) from None

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
    logger.info(
        "saved %d adapter tensors (%s values) of %s to %s",
        len(tensors),
        f"{sum(t.numel() for t in tensors.values()):,}",
        type(model).__name__,
        folder,
    )
    return folder


def _require_state(model: nn.Module, caller: str) -> _LoraState:
    state = getattr(model, _STATE, None)
    if not isinstance(state, _LoraState) or not _lora_layers(model):
        raise ValueError(
            f"{caller} needs a model with adapters from finetunekit's add_lora or load_adapter; "
            f"{type(model).__name__} has none."
        )
    return state


def _check_untracked_training(model: nn.Module, state: _LoraState) -> None:
    saved = state.modules_to_save + state.trained_norms
    adapter_ids = {id(p) for _, p in _adapter_parameters(model)}
    untracked = [
        n
        for n, p in named_parameters_once(model)
        if p.requires_grad and id(p) not in adapter_ids and not _under(_plain_name(n), saved)
    ]
    if untracked:
        raise ValueError(
            f"{len(untracked)} trainable parameters are neither adapters nor in saved modules, so save_adapter "
            f"would lose their training: {untracked[:5]}. Freeze them, or name their modules in "
            "add_lora(modules_to_save=...)."
        )


def _tensors_to_save(model: nn.Module, state: _LoraState) -> dict[str, torch.Tensor]:
    whole = model.state_dict()
    keep = {name for name, _ in _adapter_parameters(model)}
    keep.update(
        n
        for n in whole
        if _under(
            _plain_name(n).rpartition(".")[0],
            state.modules_to_save + state.trained_norms,
        )
    )
    parameter_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, tensor in whole.items():
        if name in parameter_names or name in keep:
            continue
        if state.buffer_digests.get(_plain_name(name)) != _tensor_digest(tensor):
            keep.add(name)
    # safetensors rejects tensors that share memory, so each one is copied.
    return {name: whole[name].detach().clone().contiguous() for name in whole if name in keep}


def load_adapter(model: nn.Module, path: str | os.PathLike[str], *, trainable: bool = False) -> nn.Module:
    """Add the adapters saved in the folder ``path`` to ``model``, in place.

    ``model`` must be the base the adapter was trained on, in the state it had when
    :func:`add_lora` was called. It needs the same pretrained weights and, for a replaced
    head, the same head shape, so call :func:`finetunekit.replace_head` first. The head's
    weights come from the file. The adapters are injected as :func:`add_lora` injected them, and the
    saved tensors are loaded, so the model's outputs equal the trained model's.

    Args:
        model: The base model, without adapters. Modified in place.
        path: A folder written by :func:`save_adapter`.
        trainable: Make the adapters and saved modules trainable, to train further. With
            False, every parameter is frozen.

    Returns:
        ``model`` itself, with adapters.

    Raises:
        FileNotFoundError: If the folder lacks the adapter files.
        ValueError: If the files are not a finetunekit adapter, ``model`` already has
            adapters, its base weights differ from the ones the adapter was trained on, or
            a saved tensor does not fit the model (a head of another size).

    Example:
        >>> model = torchvision.models.resnet18(weights=None)   # the same pretrained weights
        >>> replace_head(model, 5)
        Linear(in_features=512, out_features=5, bias=True)
        >>> model = load_adapter(model, "runs/resnet-lora")
    """
    from safetensors.torch import load_file

    _require_peft()
    folder = Path(path)
    for name in (CONFIG_FILE, ADAPTER_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} does not exist; pass the folder that save_adapter wrote.")
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("format") != _FORMAT or config.get("version") != _FORMAT_VERSION:
        raise ValueError(
            f"{folder / CONFIG_FILE} is not a finetunekit adapter config of version {_FORMAT_VERSION} "
            f"(format={config.get('format')!r}, version={config.get('version')!r})."
        )
    if getattr(model, _STATE, None) is not None or _lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; load the adapter into a fresh base model.")

    state = _LoraState(
        options=config["lora"],
        targets=config["targets"],
        modules_to_save=config["modules_to_save"],
        norm_policies=config["norm_policies"],
        fingerprint=config["base_fingerprint"],
    )
    _check_base(model, state, config)
    tensors = load_file(str(folder / ADAPTER_FILE))
    _check_shapes(model, tensors)

    state.buffer_digests = _buffer_digests(model)
    _inject(model, state, trainable=trainable)
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        # _check_shapes and the fingerprint make this unreachable for files save_adapter wrote.
        raise ValueError(f"The adapter file contains keys the model lacks: {result.unexpected_keys[:5]}.")
    logger.info(
        "loaded %d adapter tensors from %s into %s",
        len(tensors),
        folder,
        type(model).__name__,
    )
    return model


def _check_base(model: nn.Module, state: _LoraState, config: dict[str, Any]) -> None:
    modules = {n for n, _ in model.named_modules()}
    missing = [n for n in state.targets + state.modules_to_save + list(state.norm_policies) if n not in modules]
    if missing or _fingerprint(model, state) != state.fingerprint:
        detail = f" It lacks the modules {missing[:3]}." if missing else ""
        raise ValueError(
            f"This adapter was trained on a different base model than this {type(model).__name__} "
            f"(the adapter's base was a {config.get('model_class')}, and the base weights' fingerprints differ).{detail} "
            "Load the same pretrained weights the adapter was trained on, with the same head shape."
        )


def _check_shapes(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = {_plain_name(n): t for n, t in model.state_dict().items()}
    wrong = []
    for name, tensor in tensors.items():
        target = expected.get(_plain_name(name))
        if target is not None and target.shape != tensor.shape:
            wrong.append(f"{name}: file {tuple(tensor.shape)}, model {tuple(target.shape)}")
    if wrong:
        raise ValueError(
            f"Saved tensors do not fit {type(model).__name__}: {wrong[:3]}. If the head differs, call "
            "replace_head(model, num_classes) with the trained class count before load_adapter."
        )


# --- fitting the other building blocks -------------------------------------------------------


def lora_groups(model: nn.Module) -> list[LayerGroup]:
    """Return layer groups for training a LoRA model in phases: frozen base first, then adapters by layer.

    The first group, ``"base"``, contains every parameter that LoRA keeps frozen. Each
    automatic layer group of ``model`` that contains adapters or saved modules follows,
    under its own name and with those parameters only, head last. So
    ``freeze_to(model, 1, groups=groups)`` trains everything LoRA trains, and a
    ``Phase(train_groups=len(groups) - 1)`` of the :class:`~finetunekit.Trainer` does too,
    with ``lr=slice(lo, hi)`` spread over the adapter groups. ``Phase(train_groups=1)``
    trains the head alone. The model is not modified.

    Args:
        model: A model with adapters from :func:`add_lora` or :func:`load_adapter`.

    Returns:
        The groups, ``"base"`` first and the head group last when the head trains.

    Raises:
        ValueError: If ``model`` has no adapters from finetunekit.

    Example:
        >>> groups = lora_groups(model)
        >>> [g.name for g in groups][:3], groups[-1].name
        (['base', 'layer1.0', 'layer1.1'], 'fc')
        >>> trainer = Trainer(model, [Phase(3, train_groups=len(groups) - 1, lr=1e-3)],
        ...                   train_loader, groups=groups)
    """
    state = _require_state(model, "lora_groups")
    train_ids = {id(p) for _, p in _adapter_parameters(model)}
    for name in state.modules_to_save + state.trained_norms:
        train_ids.update(id(p) for p in model.get_submodule(name).parameters())

    base = LayerGroup("base", [], [])
    result = [base]
    for group in layer_groups(model):
        trained = [(n, p) for n, p in group.params if id(p) in train_ids]
        base.params.extend((n, p) for n, p in group.params if id(p) not in train_ids)
        base.modules.extend(group.modules)
        if trained:
            result.append(
                LayerGroup(
                    group.name,
                    list(group.modules),
                    trained,
                    is_head=group.is_head,
                    tied=list(group.tied),
                )
            )
    return result


def enable_gradient_checkpointing(model: nn.Module, *, use_reentrant: bool = False) -> nn.Module:
    """Turn on gradient checkpointing in a Hugging Face model so that adapters still get gradients.

    With checkpointing, the layers recompute their activations in the backward pass. With
    ``use_reentrant=True``, a checkpointed block whose input does not require gradients
    (the output of frozen embeddings) gives no gradients to the adapters inside it. So this
    also registers transformers' ``enable_input_require_grads`` hook, which marks the input
    embeddings' output as requiring gradients. The model is modified in place.

    Args:
        model: A transformers ``PreTrainedModel`` that supports gradient checkpointing.
        use_reentrant: Passed to ``torch.utils.checkpoint.checkpoint``.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: If ``model`` is not a transformers model with gradient checkpointing.

    Example:
        >>> model = enable_gradient_checkpointing(add_lora(bert))
        >>> model(**batch).logits.sum().backward()   # the adapters get gradients
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    kwargs_name = "activation_checkpointing_kwargs"
    if not callable(enable):
        enable = getattr(model, "gradient_checkpointing_enable", None)
        kwargs_name = "gradient_checkpointing_kwargs"
    if not callable(enable) or not getattr(model, "supports_gradient_checkpointing", False):
        raise TypeError(
            f"{type(model).__name__} is not a transformers model with gradient checkpointing. For your own "
            "modules, wrap the blocks in torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False), "
            "which gives the adapters gradients without further set-up."
        )
    enable(**{kwargs_name: {"use_reentrant": use_reentrant}})
    # transformers 5 registers the hook itself for models that read input_ids; the check
    # keeps a second hook off those models.
    if not getattr(model, "_require_grads_hooks", None):
        model.enable_input_require_grads()
    return model


def _lora_role(param_name: str) -> Literal["A", "B"] | None:
    """Return which LoRA matrix a parameter is, from its qualified name: ``"A"``, ``"B"`` or None.

    ``"A"`` is the down projection (``lora_A``, ``lora_embedding_A``), ``"B"`` the up projection
    (``lora_B``, ``lora_embedding_B``, including a ``lora_bias`` bias). Anything else, a DoRA
    magnitude vector included, is None. LoRA+ trains the ``"B"`` parameters at a multiple of
    the ``"A"`` rate.

    Example:
        >>> _lora_role("layer1.0.conv1.lora_B.default.weight")
        'B'
    """
    segments = param_name.split(".")
    if _A_SEGMENTS.intersection(segments):
        return "A"
    if _B_SEGMENTS.intersection(segments):
        return "B"
    return None
