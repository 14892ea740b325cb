"""Private helpers shared by the freezing policies: argument checks and exact trainable sets."""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from ._norms import NormPolicy
from ._utils import named_parameters_once
from .errors import NoParametersError
from .freezing import FreezeSummary, freeze, unfreeze
from .groups import LayerGroup

logger = logging.getLogger(__name__)


def _check_int(call: str, name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{call}({name}={value!r}): {name} must be an int, not {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{call}({name}={value!r}) is out of range: pass {name} >= {minimum}.")


def _train_only(
    model: nn.Module, keep: set[int], *, groups: list[LayerGroup], bn: NormPolicy | None, policy: str
) -> FreezeSummary:
    """Freeze every parameter whose id is not in ``keep`` and make the others trainable.

    The returned summary compares the state after both steps with the state before.
    """
    named = list(named_parameters_once(model))
    if not any(id(p) in keep for _, p in named):
        raise NoParametersError(
            f"{policy} selects no parameter of {type(model).__name__}, so nothing would train "
            "(a head whose weights are tied to the embeddings owns none). Choose layer groups "
            "that own parameters: see [g.num_params for g in layer_groups(model)]."
        )
    frozen: tuple[str, ...] = ()
    # freeze and unfreeze raise on a target that selects nothing, so a side with no
    # parameter is skipped. The two sides are disjoint, so their changes simply add up.
    if any(id(p) not in keep for _, p in named):
        frozen = freeze(model, _by_id(lambda key: key not in keep), groups=groups, bn=bn).frozen
    summary = unfreeze(model, _by_id(lambda key: key in keep), groups=groups)
    return FreezeSummary(frozen, summary.unfrozen, summary.num_trainable, summary.num_frozen)


def _by_id(accept: Callable[[int], bool]) -> Callable[[str, nn.Parameter], bool]:
    return lambda name, param: accept(id(param))


def _changed_or_none(summary: FreezeSummary, label: str) -> FreezeSummary | None:
    if summary.frozen or summary.unfrozen:
        logger.info("%s: froze %d and unfroze %d tensors", label, len(summary.frozen), len(summary.unfrozen))
        return summary
    return None
