"""Learning-rate schedules used in fine-tuning, each scaling every param group and keeping their ratios.

Each function returns a standard ``torch.optim.lr_scheduler`` object, so it saves,
loads and steps like any other: call ``scheduler.step()`` after each
``optimizer.step()``. Rates are read from each group's ``initial_lr`` (set by
:func:`finetunekit.param_groups`), or its ``lr`` when there is none, so the per-group
rates of discriminative fine-tuning are scaled, never replaced by one shared rate.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

__all__ = ["one_cycle", "slanted_triangular", "warmup_schedule"]


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    decay: Literal["cosine", "linear", "constant"] = "cosine",
    final_ratio: float = 0.0,
) -> LambdaLR:
    """Warm up linearly from zero, then decay each group's rate to a fraction of itself.

    The schedule most transformer fine-tuning recipes use. During the first
    ``warmup_steps`` steps every group's rate rises linearly from zero to its own rate.
    Over the remaining steps it falls to ``final_ratio`` times that rate, along a half
    cosine or a straight line, and it stays there after ``total_steps``.

    Args:
        optimizer: The optimizer whose groups to schedule. Its groups' rates are the peaks.
        total_steps: Number of optimizer steps the schedule spans, warmup included.
        warmup_steps: Number of warmup steps, from 0 to ``total_steps``.
        decay: ``"cosine"``, ``"linear"`` or ``"constant"`` (no decay after warmup).
        final_ratio: Rate at the end as a fraction of the peak, from 0 to 1.

    Returns:
        A ``LambdaLR`` scheduler over all groups.

    Raises:
        ValueError: If a step count or ``final_ratio`` is out of range or ``decay`` is unknown.

    Example:
        >>> optimizer = torch.optim.AdamW(param_groups(model, lr=slice(1e-5, 1e-3)))
        >>> scheduler = warmup_schedule(optimizer, total_steps=1000, warmup_steps=100)
    """
    total = _steps(total_steps, "total_steps", minimum=1)
    warmup = _steps(warmup_steps, "warmup_steps", minimum=0)
    if warmup > total:
        raise ValueError(f"warmup_steps={warmup_steps} is more than total_steps={total_steps}.")
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"decay={decay!r} is not 'cosine', 'linear' or 'constant'.")
    if isinstance(final_ratio, bool) or not isinstance(final_ratio, (int, float)) or not 0 <= final_ratio <= 1:
        raise ValueError(f"final_ratio={final_ratio!r} must be between 0 and 1.")

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if decay == "constant" or total == warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
        return final_ratio + (1.0 - final_ratio) * shape

    return LambdaLR(optimizer, factor)


def one_cycle(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    cycle_momentum: bool = True,
) -> OneCycleLR:
    """Return torch's ``OneCycleLR`` with each group's own rate as its maximum.

    ``OneCycleLR(optimizer, max_lr=1e-3)`` gives every group the same maximum, which
    silently undoes discriminative rates. Here each group peaks at its own rate, so the
    ratios between groups hold at every step.

    Args:
        optimizer: The optimizer whose groups to schedule. Its groups' rates are the maxima.
        total_steps: Number of optimizer steps in the cycle.
        pct_start: Fraction of the cycle spent rising to the maximum.
        div_factor: The cycle starts at ``max / div_factor``.
        final_div_factor: The cycle ends at ``max / (div_factor * final_div_factor)``.
        cycle_momentum: Whether to cycle momentum (or Adam's ``beta1``) inversely to the rate.

    Returns:
        The ``OneCycleLR`` scheduler.

    Raises:
        ValueError: If ``total_steps`` is not a positive integer.

    Example:
        >>> scheduler = one_cycle(optimizer, total_steps=len(loader) * epochs)
    """
    total = _steps(total_steps, "total_steps", minimum=1)
    peaks = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    return OneCycleLR(
        optimizer,
        max_lr=peaks,
        total_steps=total,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        cycle_momentum=cycle_momentum,
    )


def slanted_triangular(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    cut_frac: float = 0.1,
    ratio: float = 32.0,
) -> LambdaLR:
    """Return ULMFiT's slanted triangular schedule: a short linear rise, then a long linear fall.

    Over the first ``cut_frac`` of the steps each group's rate rises linearly from
    ``1 / ratio`` of its own rate to the full rate, then falls linearly back to
    ``1 / ratio`` of it at ``total_steps``.

    Args:
        optimizer: The optimizer whose groups to schedule. Its groups' rates are the peaks.
        total_steps: Number of optimizer steps the schedule spans.
        cut_frac: Fraction of the steps spent rising, between 0 and 1.
        ratio: How much smaller the lowest rate is than the peak, at least 1.

    Returns:
        A ``LambdaLR`` scheduler over all groups.

    Raises:
        ValueError: If ``total_steps``, ``cut_frac`` or ``ratio`` is out of range.

    Example:
        >>> scheduler = slanted_triangular(optimizer, total_steps=len(loader) * epochs)
    """
    total = _steps(total_steps, "total_steps", minimum=1)
    if isinstance(cut_frac, bool) or not isinstance(cut_frac, (int, float)) or not 0 < cut_frac < 1:
        raise ValueError(f"cut_frac={cut_frac!r} must be strictly between 0 and 1.")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
        raise ValueError(f"ratio={ratio!r} must be a finite number of at least 1.")
    cut = max(1, math.floor(total * cut_frac))

    def factor(step: int) -> float:
        step = min(step, total)
        if step < cut:
            progress = step / cut
        else:
            progress = 1.0 - (step - cut) / max(1, total - cut)
        return (1.0 + progress * (ratio - 1.0)) / ratio

    return LambdaLR(optimizer, factor)


def _steps(value: object, argument: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise ValueError(f"{argument}={value!r} must be {kind}.")
    return value
