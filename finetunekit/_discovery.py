"""Automatic layer-group discovery: walk the module tree and plan the groups.

The planner returns groups as lists of entries (qualified module names), head excluded;
``groups.py`` turns them into :class:`~finetunekit.LayerGroup` objects.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from ._utils import join_name


@dataclass
class Entry:
    """A module in a planned group; ``direct`` means only its own parameters, not its children's."""

    name: str
    module: nn.Module
    direct: bool

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.module.named_parameters(recurse=not self.direct, remove_duplicate=False):
            yield join_name(self.name, name), param


def plan_groups(model: nn.Module, head_names: Sequence[str]) -> list[list[Entry]]:
    """Return the body groups of ``model`` in module-tree order, without the head modules."""
    planner = _Planner(head_names)
    if _is_stack(model):
        planner.visit_stack(model, "")
    elif _contains_stack(model):
        planner.visit_container(model, "")
    else:
        planner.visit_flat(model, "", share=1.0)
    planner.flush()
    return planner.groups


class _Planner:
    def __init__(self, head_names: Sequence[str]) -> None:
        self.head_names = set(head_names)
        self.groups: list[list[Entry]] = []
        self.pending: list[Entry] = []

    def flush(self) -> None:
        if self.pending:
            self.groups.append(self.pending)
            self.pending = []

    def add_alone(self, entry: Entry) -> None:
        self.flush()
        self.pending.append(entry)
        self.flush()

    def visit_container(self, module: nn.Module, prefix: str) -> None:
        """Walk a module that holds block stacks somewhere below it."""
        if _has_direct_parameters(module):
            self.pending.append(Entry(prefix, module, direct=True))

        # Composite siblings of one block class (GoogLeNet's inception3a, inception3b, ...)
        # are blocks even when no Sequential holds them. Leaf layers such as GPT-2's two
        # embeddings are not, so they stay together in the stem.
        repeated = {cls for cls in _repeated_classes(module) if not _is_leaf_class(module, cls)}
        for name, child in module.named_children():
            qualified = join_name(prefix, name)
            if qualified in self.head_names:
                continue
            if self._is_head_ancestor(qualified):
                self.visit_container(child, qualified)
            elif _is_stack(child):
                self.flush()
                self.visit_stack(child, qualified)
            elif type(child) in repeated and not _contains_deep_stack(child):
                self.add_alone(Entry(qualified, child, direct=False))
            elif _contains_stack(child):
                # What follows a container's last stack (an encoder's final norm) stays apart
                # from what comes next (a decoder's embeddings).
                self.visit_container(child, qualified)
                self.flush()
            else:
                self.pending.append(Entry(qualified, child, direct=False))

    def visit_stack(self, stack: nn.Module, prefix: str) -> None:
        """Make each child of a block stack a group, walking nested stacks in order."""
        if _has_direct_parameters(stack):
            self.add_alone(Entry(prefix, stack, direct=True))

        for name, child in stack.named_children():
            qualified = join_name(prefix, name)
            if qualified in self.head_names:
                continue
            self.flush()
            if self._is_head_ancestor(qualified):
                self.visit_container(child, qualified)
            elif _is_stack(child):
                self.visit_stack(child, qualified)
            elif _contains_uniform_stack(child):
                # A stage that wraps a stack of blocks (Hugging Face ConvNeXt and Swin stages)
                # is split into its blocks, like a nested Sequential.
                self.visit_container(child, qualified)
                self.flush()
            else:
                self.pending.append(Entry(qualified, child, direct=False))
        self.flush()

    def visit_flat(self, module: nn.Module, prefix: str, share: float) -> None:
        """Split a model without block stacks into a group per child with parameters.

        A child that contains most of the parameters and wraps several children with
        parameters, one of them composite (ALBERT's ``albert``, whose one shared layer
        forms no stack), is split the same way, so that the groups are not one wrapper
        and a head.
        """
        if _has_direct_parameters(module):
            self.add_alone(Entry(prefix, module, direct=True))

        total = _count(module)
        for name, child in module.named_children():
            qualified = join_name(prefix, name)
            if qualified in self.head_names:
                continue
            child_share = share * _count(child) / total if total else 0.0
            if self._is_head_ancestor(qualified) or (child_share > 0.5 and _is_wrapper(child)):
                self.flush()
                self.visit_flat(child, qualified, child_share)
            elif _has_parameters(child):
                self.add_alone(Entry(qualified, child, direct=False))
            else:
                self.pending.append(Entry(qualified, child, direct=False))

    def _is_head_ancestor(self, name: str) -> bool:
        return any(head.startswith(name + ".") for head in self.head_names)


def _has_direct_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_wrapper(module: nn.Module) -> bool:
    """Return whether ``module`` has two or more children with parameters, one of them composite."""
    if hasattr(module, "base_layer") and hasattr(module, "adapter_layer_names"):
        return False  # a peft adapter layer (LoRA) is one layer, not a wrapper
    children = [child for child in module.children() if _has_parameters(child)]
    return len(children) >= 2 and any(next(child.children(), None) is not None for child in children)


def _repeated_classes(module: nn.Module) -> set[type[nn.Module]]:
    """Return the classes of which ``module`` has two or more children with parameters."""
    counts = Counter(type(child) for child in module.children() if _has_parameters(child))
    return {cls for cls, count in counts.items() if count >= 2}


def _is_leaf_class(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Return whether the children of ``module`` of class ``cls`` have no children of their own."""
    return all(next(child.children(), None) is None for child in module.children() if type(child) is cls)


def _is_stack(module: nn.Module) -> bool:
    """Return whether ``module`` is a Sequential or ModuleList that repeats a block class."""
    return isinstance(module, (nn.Sequential, nn.ModuleList)) and bool(_repeated_classes(module))


def _is_uniform_stack(module: nn.Module) -> bool:
    """Return whether ``module`` is a stack whose children with parameters are all composite blocks of one class.

    Sequentials of layers inside a block (MobileNetV2's ``conv``, MobileNetV3's ``block``
    of three Conv2dNormActivation) are not uniform stacks, because their repeated class is
    itself a Sequential of layers or a leaf layer. Blocks that hold them stay whole.
    """
    if not _is_stack(module):
        return False
    classes = {type(child) for child in module.children() if _has_parameters(child)}
    if len(classes) != 1:
        return False
    cls = next(iter(classes))
    return not issubclass(cls, nn.Sequential) and not _is_leaf_class(module, cls)


def _depth(module: nn.Module) -> int:
    """Return the number of levels of the module tree below ``module``."""
    return 1 + max((_depth(child) for child in module.children()), default=-1)


def _contains_deep_stack(module: nn.Module) -> bool:
    """Return whether ``module`` holds a uniform stack of blocks that nest modules two or more levels deep.

    T5's encoder and decoder are two siblings of one class, but each holds a stack of deep
    blocks, so they are walked into. GoogLeNet's inception modules hold only short
    Sequentials of conv-and-norm pairs, so each stays one block.
    """
    for sub in module.modules():
        if sub is not module and _is_uniform_stack(sub):
            blocks = [child for child in sub.children() if _has_parameters(child)]
            if min(_depth(block) for block in blocks) >= 2:
                return True
    return False


def _contains_stack(module: nn.Module) -> bool:
    return any(_is_stack(sub) for sub in module.modules())


def _contains_uniform_stack(module: nn.Module) -> bool:
    return any(_is_uniform_stack(sub) for sub in module.modules() if sub is not module)
