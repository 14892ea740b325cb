"""Resolve add_lora's targets, saved modules and BatchNorm policies to qualified module names."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from ._norms import POLICY, has_running_stats
from ._utils import close_matches, format_suggestions
from .errors import NoMatchingTargetError
from .groups import LayerGroup, layer_groups
from .heads import _head_names

_GLOB_CHARS = frozenset("*?[")
_REGEX_PREFIX = "re:"


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
            f"{format_suggestions(close_matches(target, _with_short_names(modules)))} "
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


def _with_short_names(names: Sequence[str] | dict[str, nn.Module]) -> list[str]:
    """Return the names followed by their last components, which plain LoRA targets such as ``"query"`` match."""
    full = list(names)
    return full + sorted({name.rpartition(".")[2] for name in full if name})
