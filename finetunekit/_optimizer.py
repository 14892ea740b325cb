"""Keep an optimizer consistent with freezing: add parameters that became trainable."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ._utils import named_parameters_once
from .groups import LayerGroup, resolve_groups
from .param_groups import _no_decay_parameters

logger = logging.getLogger(__name__)


def sync_optimizer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    unfrozen: Sequence[str],
    *,
    lr: float | None,
    keep_state: bool,
    groups: Sequence[LayerGroup] | None,
) -> None:
    """Add the trainable parameters that ``optimizer`` does not hold, and clear state if asked.

    The added param groups follow :func:`finetunekit.param_groups`: one per layer group
    and weight-decay setting, each with the layer group's ``name`` and a ``no_decay`` flag.
    """
    named = dict(named_parameters_once(model))
    if not keep_state:
        for name in unfrozen:
            optimizer.state.pop(named[name], None)

    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = {id(p) for p in named.values() if p.requires_grad and id(p) not in held}
    if not missing:
        return

    rate = lr if lr is not None else min(group["lr"] for group in optimizer.param_groups)
    no_decay = {id(p) for _, p in _no_decay_parameters(model)}
    # Schedulers resumed with last_epoch > -1 read each group's initial_lr, so the new groups
    # get one too. NOTE: a scheduler created before this call does not scale the new groups.
    has_initial_lr = any("initial_lr" in group for group in optimizer.param_groups)
    added = 0
    for layer_group in resolve_groups(model, groups):
        params = [p for p in layer_group.parameters() if id(p) in missing]
        for flag in (False, True):
            chosen = [p for p in params if (id(p) in no_decay) == flag]
            if not chosen:
                continue
            entry = {"params": chosen, "lr": rate, "name": layer_group.name, "no_decay": flag}
            if flag:
                entry["weight_decay"] = 0.0
            if has_initial_lr:
                entry["initial_lr"] = rate
            optimizer.add_param_group(entry)
            added += len(chosen)
    logger.info("added %d newly trainable parameter tensors to %s at lr %g", added, type(optimizer).__name__, rate)
