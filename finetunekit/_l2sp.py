"""Decay toward the pretrained weights (L2-SP), applied after each optimizer step.

:func:`finetunekit.param_groups` marks a param group with an ``"l2sp"`` strength and
records each of its parameters' starting values here. One global optimizer step hook,
registered on first use, then pulls every such parameter that received a gradient toward
its starting value: ``p -= lr * strength * (p - p0)``. That is AdamW's decoupled weight
decay with the pretrained value in place of zero. The hook reads each group's current
``lr``, so learning-rate schedulers scale the pull as they scale the step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

logger = logging.getLogger(__name__)

KEY = "l2sp"

_anchors: WeakIdKeyDictionary = WeakIdKeyDictionary()
_hook_handle: Any = None


def set_anchor(param: torch.Tensor, value: torch.Tensor) -> None:
    """Record ``value`` as the point ``param`` decays toward, and make sure the hook runs."""
    global _hook_handle
    _anchors[param] = value.detach().clone()
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_pull_toward_anchors)
        logger.debug("registered the L2-SP optimizer step hook")


def anchor_of(param: torch.Tensor) -> torch.Tensor | None:
    """Return the value ``param`` decays toward, or None."""
    return _anchors.get(param)


@torch.no_grad()
def _pull_toward_anchors(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        strength = group.get(KEY)
        if not strength:
            continue
        weight = float(group["lr"]) * strength
        for param in group["params"]:
            if param.grad is None:
                continue
            anchor = _anchors.get(param)
            if anchor is None:
                continue
            if anchor.device != param.device or anchor.dtype != param.dtype:
                anchor = anchor.to(device=param.device, dtype=param.dtype)
                _anchors[param] = anchor
            param.lerp_(anchor, weight)
