"""Find the ordered layer groups of any module: the stem or embeddings, each block, the head."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from torch import nn

from ._utils import join_name, named_parameters_once
from .errors import NoParametersError
from .heads import _find_head_name

__all__ = ["LayerGroup", "layer_groups"]


logger = logging.getLogger(__name__)


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


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """Split ``model`` into ordered layer groups, input side first and head last.

    The split follows the module tree. Each ``nn.Sequential`` or ``nn.ModuleList`` that
    repeats a block class (ResNet's ``layer1``, MobileNetV2's ``features``, BERT's
    ``encoder.layer``) is a block stack, and each of its children becomes a group. Nested
    stacks are walked in order, and sibling modules of one repeated composite class (GoogLeNet's
    ``inception3a``, ``inception3b``, ...) are blocks too. The other modules in front of
    the first block form ``"stem"``, other modules between or after blocks form groups of
    their own, and the output layer found by :func:`finetunekit.find_head` is the last
    group. A model with no block stack gets a group per child that holds parameters.
    Modules without parameters (activations, pooling, dropout) join the group before
    them. The model is not modified.

    Args:
        model: Any module with parameters.

    Returns:
        The layer groups. Every parameter of the model is in exactly one group; a
        parameter reached under two names (tied weights) belongs to the first group that
        reaches it, and the later group lists the name in ``tied``. A head whose weights
        are all tied to the input embeddings is kept as an empty head group.

    Raises:
        NoParametersError: If ``model`` has no parameters.

    Example:
        >>> import torchvision
        >>> [g.name for g in layer_groups(torchvision.models.resnet18(weights=None))]
        ['stem', 'layer1.0', 'layer1.1', 'layer2.0', 'layer2.1', 'layer3.0', 'layer3.1', 'layer4.0', 'layer4.1', 'fc']
    """
    if next(model.parameters(), None) is None:
        raise NoParametersError(
            f"{type(model).__name__} has no parameters, so it has no layer groups to freeze or "
            "train. Pass the model that holds the layers to fine-tune."
        )

    head_name = _find_head_name(model)
    planner = _Planner(head_name)
    planner.plan(model)
    entries = planner.groups
    if head_name is not None:
        entries.append([_Entry(head_name, model.get_submodule(head_name), direct=False)])

    groups = _assign_parameters(model, entries, head_name)
    logger.debug("layer groups of %s: %s", type(model).__name__, [g.name for g in groups])
    return groups


@dataclass
class _Entry:
    """A module in a planned group; ``direct`` means only its own parameters, not its children's."""

    name: str
    module: nn.Module
    direct: bool

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.module.named_parameters(recurse=not self.direct, remove_duplicate=False):
            yield join_name(self.name, name), param


class _Planner:
    """Walk the module tree and collect the groups as lists of entries, head excluded."""

    def __init__(self, head_name: str | None) -> None:
        self.head_name = head_name
        self.groups: list[list[_Entry]] = []
        self.pending: list[_Entry] = []

    def plan(self, model: nn.Module) -> None:
        if _contains_stack(model):
            self.visit_container(model, "")
        else:
            self.visit_stack(model, "")
        self.flush()

    def flush(self) -> None:
        if self.pending:
            self.groups.append(self.pending)
            self.pending = []

    def visit_container(self, module: nn.Module, prefix: str) -> None:
        if _has_direct_parameters(module):
            self.pending.append(_Entry(prefix, module, direct=True))

        # Composite siblings of one block class (GoogLeNet's inception3a, inception3b, ...)
        # are blocks even when no Sequential holds them. Leaf layers such as GPT-2's two
        # embeddings are not, so they stay together in the stem.
        repeated = {cls for cls in _repeated_classes(module) if not _is_leaf_class(module, cls)}
        for name, child in module.named_children():
            qualified = join_name(prefix, name)
            if qualified == self.head_name:
                continue
            if self._is_head_ancestor(qualified):
                self.visit_container(child, qualified)
            elif _is_stack(child):
                self.flush()
                self.visit_stack(child, qualified)
            elif type(child) in repeated:
                self.flush()
                self.pending.append(_Entry(qualified, child, direct=False))
                self.flush()
            elif _contains_stack(child):
                self.visit_container(child, qualified)
            else:
                self.pending.append(_Entry(qualified, child, direct=False))

    def visit_stack(self, stack: nn.Module, prefix: str) -> None:
        if _has_direct_parameters(stack):
            self.flush()
            self.pending.append(_Entry(prefix, stack, direct=True))

        for name, child in stack.named_children():
            qualified = join_name(prefix, name)
            if qualified == self.head_name:
                continue
            self.flush()
            if self._is_head_ancestor(qualified):
                self.visit_container(child, qualified)
            elif _is_stack(child):
                self.visit_stack(child, qualified)
            else:
                self.pending.append(_Entry(qualified, child, direct=False))
        self.flush()

    def _is_head_ancestor(self, name: str) -> bool:
        return self.head_name is not None and self.head_name.startswith(name + ".")


def _has_direct_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _repeated_classes(module: nn.Module) -> set[type[nn.Module]]:
    """Return the classes of which ``module`` has two or more children with parameters."""
    counts = Counter(type(child) for child in module.children() if _has_parameters(child))
    return {cls for cls, count in counts.items() if count >= 2}


def _is_leaf_class(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether the children of ``module`` of class ``cls`` have no children of their own."""
    return all(next(child.children(), None) is None for child in module.children() if type(child) is cls)


def _is_stack(module: nn.Module) -> bool:
    """Whether ``module`` is a Sequential or ModuleList that repeats a block class."""
    return isinstance(module, (nn.Sequential, nn.ModuleList)) and bool(_repeated_classes(module))


def _contains_stack(module: nn.Module) -> bool:
    return any(_is_stack(sub) for sub in module.modules())


def _assign_parameters(
    model: nn.Module, entries: Sequence[list[_Entry]], head_name: str | None
) -> list[LayerGroup]:
    """Turn planned entries into groups, each parameter owned by the first group that reaches it."""
    seen: set[int] = set()
    groups: list[LayerGroup] = []
    carried: list[_Entry] = []

    for index, group_entries in enumerate(entries):
        is_head = head_name is not None and index == len(entries) - 1
        params: list[tuple[str, nn.Parameter]] = []
        tied: list[str] = []
        for entry in group_entries:
            for name, param in entry.named_parameters():
                if id(param) in seen:
                    tied.append(name)
                    continue
                seen.add(id(param))
                params.append((name, param))

        modules = [(e.name, e.module) for e in carried + group_entries]
        if not params and not (is_head and tied):
            # Parameter-free modules (activations, pooling) join the group before them. A head
            # whose weights are all tied to an earlier group stays, so the head is still known.
            if groups and not is_head:
                groups[-1].modules.extend(modules)
            else:
                carried = carried + group_entries
            continue

        carried = []
        name = _group_name(group_entries, first=not groups, is_head=is_head)
        groups.append(LayerGroup(name, modules, params, is_head=is_head, tied=tied))

    _check_coverage(model, seen)
    return groups


def _group_name(entries: list[_Entry], *, first: bool, is_head: bool) -> str:
    names = [e.name for e in entries if _has_parameters(e.module) or e.direct]
    if len(names) == 1 and names[0]:
        return names[0]
    if first and not is_head:
        return "stem"
    return "+".join(n or "<root>" for n in names)


def _check_coverage(model: nn.Module, seen: set[int]) -> None:
    missing = [name for name, param in named_parameters_once(model) if id(param) not in seen]
    if missing:
        raise RuntimeError(
            f"layer_groups left {len(missing)} parameters of {type(model).__name__} out of every "
            f"group (first: {missing[:3]}). This is a finetunekit bug; please report it with the model."
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
