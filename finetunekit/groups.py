"""Find the ordered layer groups of any module: the stem or embeddings, each block, the head."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._discovery import Entry, plan_groups
from ._utils import close_matches, format_suggestions, named_parameters_once
from .errors import NoMatchingTargetError, NoParametersError
from .heads import _auxiliary_head_names, _find_head_name

__all__ = ["LayerGroup", "Split", "layer_groups"]

logger = logging.getLogger(__name__)

Split = Callable[[nn.Module], Any] | Mapping[str, Any]
"""A user's own grouping for :func:`layer_groups`. It is a mapping from group names to
module names, parameter names or glob patterns (or lists of them), or a callable that
takes the model and returns such a mapping or a list of groups. A group may also hold
modules or parameters themselves."""

@dataclass(eq=False)
class LayerGroup:
    """An ordered slice of a model: the unit of freezing and of learning-rate scaling.

    Attributes:
        name: The group's name: a module's qualified name (``"layer4.1"``,
            ``"bert.encoder.layer.5"``), ``"stem"`` for the modules in front of the first
            block stack, or the names of several modules joined with ``"+"``.
        modules: ``(qualified name, module)`` pairs that make up the group. A module whose
            own parameters are in the group while its children sit in other groups (such as
            a ViT's class token on the root module) is listed too.
        params: ``(qualified name, parameter)`` pairs owned by the group. Every parameter of
            the model is in exactly one group.
        is_head: Whether this is the model's output layer.
        tied: Names under which this group's modules also reach parameters owned by an
            earlier group (a language model head tied to the input embeddings).
    """

    name: str
    modules: list[tuple[str, nn.Module]]
    params: list[tuple[str, nn.Parameter]]
    is_head: bool = False
    tied: list[str] = field(default_factory=list)

    def parameters(self) -> Iterator[nn.Parameter]:
        """Yield the group's parameters."""
        for _, param in self.params:
            yield param

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Yield ``(qualified name, parameter)`` pairs of the group."""
        yield from self.params

    @property
    def num_params(self) -> int:
        """Number of scalar values in the group's parameters."""
        return sum(p.numel() for _, p in self.params)

    def __repr__(self) -> str:
        head = ", head" if self.is_head else ""
        return f"LayerGroup({self.name!r}, {len(self.params)} tensors, {self.num_params:,} values{head})"


def layer_groups(
    model: nn.Module,
    *,
    split: Split | None = None,
    example_input: Any = None,
    num_groups: int | None = None,
) -> list[LayerGroup]:
    """Split ``model`` into ordered layer groups, input side first and head last.

    Without ``split`` the groups are found from the module tree. Each ``nn.Sequential``
    or ``nn.ModuleList`` that repeats a block class (ResNet's ``layer1``, MobileNetV2's
    ``features``, BERT's ``encoder.layer``) is a block stack, and each of its children
    becomes a group. Nested stacks are walked in order, a stage that wraps a stack of
    blocks is split into its blocks, and sibling modules of one repeated composite class
    (GoogLeNet's ``inception3a``, ``inception3b``, ...) are blocks too. The other modules
    in front of the first block form ``"stem"``, and other modules between or after
    blocks form groups of their own. The output layer found by :func:`finetunekit.find_head`
    is the last group, together with any auxiliary heads (GoogLeNet, Inception v3). A
    model with no block stack gets a group per child that holds parameters. Modules
    without parameters (activations, pooling, dropout) join the group before them. The
    model is not modified.

    Args:
        model: Any module with parameters.
        split: Groups of your own, in order, head last: a mapping such as
            ``{"backbone": "features.*", "head": "classifier"}`` from group names to module
            names, parameter names or glob patterns (or lists of them), or a callable that
            takes the model and returns such a mapping or a list of groups. Each group may
            also hold modules or parameters themselves.
        example_input: An input for ``model(example_input)`` (a tensor, a tuple of
            arguments or a dict of keyword arguments). When given, the automatic groups are
            put in the order in which the forward pass first runs them, which matters for
            models that register modules in another order than they call them. The model
            runs once in eval mode under ``torch.no_grad()`` and its mode is restored.
        num_groups: Merge the groups into this many coarser groups of near-equal depth:
            the head stays a group of its own and the body groups are cut into
            ``num_groups - 1`` contiguous runs whose lengths differ by at most one.

    Returns:
        The layer groups. Every parameter of the model is in exactly one group; a
        parameter reached under two names (tied weights) belongs to the first group that
        reaches it, and the later group lists the name in ``tied``. A head whose weights
        are all tied to the input embeddings is kept as an empty head group.

    Raises:
        NoParametersError: If ``model`` has no parameters.
        NoMatchingTargetError: If a name or pattern in ``split`` matches nothing.
        ValueError: If ``split`` leaves parameters out or puts one in two groups (the
            message names them), or ``num_groups`` is out of range.

    Example:
        >>> import torchvision
        >>> [g.name for g in layer_groups(torchvision.models.resnet18(weights=None))]
        ['stem', 'layer1.0', 'layer1.1', 'layer2.0', 'layer2.1', 'layer3.0', 'layer3.1', 'layer4.0', 'layer4.1', 'fc']
        >>> [g.name for g in layer_groups(torchvision.models.resnet18(weights=None), num_groups=3)]
        ['stem..layer2.1', 'layer3.0..layer4.1', 'fc']
    """
    if next(model.parameters(), None) is None:
        raise NoParametersError(
            f"{type(model).__name__} has no parameters, so it has no layer groups to freeze or "
            "train. Pass the model that holds the layers to fine-tune."
        )

    if split is not None:
        groups = _split_groups(model, split)
    else:
        groups = _automatic_groups(model)
        if example_input is not None:
            groups = _in_execution_order(model, groups, example_input)

    if num_groups is not None:
        groups = _merge(groups, num_groups)
    logger.debug("layer groups of %s: %s", type(model).__name__, [g.name for g in groups])
    return groups


def _automatic_groups(model: nn.Module) -> list[LayerGroup]:
    head_name = _find_head_name(model)
    head_names = [head_name, *_auxiliary_heads(model)] if head_name is not None else []
    planned = plan_groups(model, head_names)
    if head_names:
        planned.append([Entry(name, model.get_submodule(name), direct=False) for name in head_names])

    groups = _assign_parameters(model, planned, has_head=bool(head_names))
    _check_coverage(model, groups)
    return groups


def _auxiliary_heads(model: nn.Module) -> list[str]:
    """Return the top-level auxiliary head modules (GoogLeNet's ``aux1``), whole, not just their output layers."""
    return list(dict.fromkeys(name.split(".")[0] for name in _auxiliary_head_names(model)))


def _assign_parameters(model: nn.Module, planned: Sequence[list[Entry]], *, has_head: bool) -> list[LayerGroup]:
    """Turn planned entries into groups, each parameter owned by the first group that reaches it."""
    seen: set[int] = set()
    groups: list[LayerGroup] = []
    carried: list[Entry] = []

    for index, entries in enumerate(planned):
        is_head = has_head and index == len(planned) - 1
        params: list[tuple[str, nn.Parameter]] = []
        tied: list[str] = []
        for entry in entries:
            for name, param in entry.named_parameters():
                if id(param) in seen:
                    tied.append(name)
                    continue
                seen.add(id(param))
                params.append((name, param))

        modules = [(e.name, e.module) for e in carried + entries]
        if not params and not (is_head and tied):
            # Parameter-free modules (activations, pooling) join the group before them. A head
            # whose weights are all tied to an earlier group stays, so the head is still known.
            if groups and not is_head:
                groups[-1].modules.extend(modules)
            else:
                carried = carried + entries
            continue

        carried = []
        name = entries[0].name if is_head else _group_name(entries, first=not groups)
        groups.append(LayerGroup(name, modules, params, is_head=is_head, tied=tied))
    return groups


def _group_name(entries: list[Entry], *, first: bool) -> str:
    names = [e.name for e in entries if e.direct or next(e.module.parameters(), None) is not None]
    if len(names) == 1 and names[0]:
        return names[0]
    if first:
        return "stem"
    return "+".join(n or "<root>" for n in names)


def _check_coverage(model: nn.Module, groups: Sequence[LayerGroup]) -> None:
    grouped = {id(p) for g in groups for p in g.parameters()}
    missing = [name for name, param in named_parameters_once(model) if id(param) not in grouped]
    if missing:
        raise RuntimeError(
            f"layer_groups left {len(missing)} parameters of {type(model).__name__} out of every "
            f"group (first: {missing[:3]}). This is a finetunekit bug; please report it with the model."
        )


# --- a user's own split -------------------------------------------------------------------


def _split_groups(model: nn.Module, split: Split) -> list[LayerGroup]:
    spec = split(model) if callable(split) and not isinstance(split, Mapping) else split
    if isinstance(spec, Mapping):
        named_specs = [(str(name), items) for name, items in spec.items()]
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        named_specs = [(None, items) for items in spec]
    else:
        raise TypeError(
            f"split returned {type(spec).__name__}; return a mapping from group names to names or "
            "patterns, or a list of groups."
        )
    if not named_specs:
        raise ValueError("split gave no groups; give at least one group, head last.")

    resolver = _SplitResolver(model)
    owner: dict[int, tuple[str, str]] = {}
    groups: list[LayerGroup] = []
    for index, (name, items) in enumerate(named_specs):
        modules, params = resolver.resolve(items)
        group_name = name or _default_split_name(modules, index)
        owned, tied = [], []
        for param_name, param in params:
            previous = owner.get(id(param))
            if previous is None:
                owner[id(param)] = (group_name, param_name)
                owned.append((param_name, param))
            elif previous[1] == param_name:
                raise ValueError(
                    f"split puts parameter {param_name!r} in two groups, {previous[0]!r} and "
                    f"{group_name!r}. Make the names or patterns of the groups disjoint."
                )
            else:
                tied.append(param_name)
        is_head = index == len(named_specs) - 1
        groups.append(LayerGroup(group_name, modules, owned, is_head=is_head, tied=tied))

    missing = [name for name, param in named_parameters_once(model) if id(param) not in owner]
    if missing:
        raise ValueError(
            f"split leaves {len(missing)} parameters of {type(model).__name__} out of every group: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}. Add their modules to a group."
        )
    return groups


def _default_split_name(modules: list[tuple[str, nn.Module]], index: int) -> str:
    return modules[0][0] if len(modules) == 1 and modules[0][0] else f"group{index}"


class _SplitResolver:
    """Turn the items of one group of a user's split into modules and named parameters."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.module_names = {id(m): n for n, m in reversed(list(self.modules.items()))}
        self.named = list(model.named_parameters(remove_duplicate=False))
        self.param_names = {id(p): n for n, p in reversed(self.named)}

    def resolve(self, items: Any) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Parameter]]]:
        if isinstance(items, (str, nn.Module, torch.Tensor)) or not isinstance(items, Iterable):
            items = [items]
        modules: list[tuple[str, nn.Module]] = []
        params: dict[str, nn.Parameter] = {}
        for item in items:
            found_modules, found_params = self._resolve_item(item)
            modules.extend(found_modules)
            for module_name, module in found_modules:
                for name, param in module.named_parameters(prefix=module_name, remove_duplicate=False):
                    params.setdefault(name, param)
            for name, param in found_params:
                params.setdefault(name, param)
        return modules, list(params.items())

    def _resolve_item(self, item: Any) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Parameter]]]:
        if isinstance(item, nn.Parameter):
            if id(item) not in self.param_names:
                raise ValueError(f"split names a parameter of shape {tuple(item.shape)} that is not in the model.")
            return [], [(self.param_names[id(item)], item)]
        if isinstance(item, nn.Module):
            if id(item) not in self.module_names:
                raise ValueError(f"split names a {type(item).__name__} module that is not part of the model.")
            return [(self.module_names[id(item)], item)], []
        if not isinstance(item, str):
            raise TypeError(
                f"split item {item!r} has type {type(item).__name__}; use a module or parameter "
                "name, a glob pattern, a module or a parameter."
            )
        return self._resolve_name(item)

    def _resolve_name(self, pattern: str) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Parameter]]]:
        if pattern in self.modules:
            return [(pattern, self.modules[pattern])], []
        params = [(n, p) for n, p in self.named if n == pattern]
        if params:
            return [], params

        modules = [(n, m) for n, m in self.modules.items() if n and fnmatch.fnmatchcase(n, pattern)]
        # Drop modules inside another match, so a pattern such as "layer4*" lists each block once.
        modules = [(n, m) for n, m in modules if not any(n.startswith(o + ".") for o, _ in modules)]
        params = [(n, p) for n, p in self.named if fnmatch.fnmatchcase(n, pattern)]
        if modules or params:
            return modules, params

        candidates = list(self.modules) + [n for n, _ in self.named]
        raise NoMatchingTargetError(
            f"split pattern {pattern!r} matched no module or parameter of {type(self.model).__name__}."
            f"{format_suggestions(close_matches(pattern, candidates))}"
        )


# --- ordering and merging -----------------------------------------------------------------


def _in_execution_order(model: nn.Module, groups: list[LayerGroup], example_input: Any) -> list[LayerGroup]:
    """Sort the body groups by the first forward call of any of their modules; the head stays last."""
    first_call: dict[int, int] = {}

    def record(module: nn.Module, args: Any) -> None:
        first_call.setdefault(id(module), len(first_call))

    handles = [m.register_forward_pre_hook(record) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, Mapping):
                model(**example_input)
            elif isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    body = [g for g in groups if not g.is_head]
    head = [g for g in groups if g.is_head]
    keys: list[float] = []
    previous = -1.0
    for group in body:
        calls = [first_call[id(m)] for _, m in group.modules if id(m) in first_call]
        # A group the forward pass never ran keeps its place after the group before it.
        key = float(min(calls)) if calls else previous + 0.5
        keys.append(key)
        previous = key
    order = sorted(range(len(body)), key=lambda i: keys[i])
    return [body[i] for i in order] + head


def _merge(groups: list[LayerGroup], num_groups: int) -> list[LayerGroup]:
    body = [g for g in groups if not g.is_head]
    head = [g for g in groups if g.is_head]
    low = 1 + len(head) if body else len(head)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or not low <= num_groups <= len(groups):
        raise ValueError(
            f"num_groups={num_groups!r} is out of range: the model has {len(groups)} layer groups"
            f"{' including the head, which stays a group of its own' if head else ''}. "
            f"Pass {low} <= num_groups <= {len(groups)}."
        )
    chunks = num_groups - len(head)
    size, extra = divmod(len(body), chunks)
    merged: list[LayerGroup] = []
    start = 0
    for index in range(chunks):
        stop = start + size + (1 if index < extra else 0)
        merged.append(_merge_run(body[start:stop]))
        start = stop
    return merged + head


def _merge_run(run: list[LayerGroup]) -> LayerGroup:
    if len(run) == 1:
        return run[0]
    return LayerGroup(
        f"{run[0].name}..{run[-1].name}",
        [m for g in run for m in g.modules],
        [p for g in run for p in g.params],
        is_head=False,
        tied=[t for g in run for t in g.tied],
    )


def resolve_groups(model: nn.Module, groups: Sequence[LayerGroup] | None) -> list[LayerGroup]:
    """Return ``groups`` checked against ``model``, or ``layer_groups(model)`` when None.

    Raises:
        ValueError: If the groups miss a parameter of the model or hold one the model no
            longer has, as after ``replace_head`` on a model whose groups were computed before.
    """
    if groups is None:
        return layer_groups(model)
    groups = list(groups)
    grouped = {id(p) for g in groups for p in g.parameters()}
    named = list(named_parameters_once(model))
    missing = [name for name, p in named if id(p) not in grouped]
    stale = len(grouped - {id(p) for _, p in named})
    if missing or stale:
        raise ValueError(
            f"groups= does not match the parameters of {type(model).__name__}: {len(missing)} parameters "
            f"are in no group (first: {missing[:3]}) and {stale} grouped tensors are no longer in the model. "
            "Recompute the groups with layer_groups(model) after changing the model, for example after replace_head."
        )
    return groups
