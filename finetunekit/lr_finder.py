"""Learning-rate range test: sweep the rate upward over a few batches and watch the loss."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._batches import forward_batch
from .errors import FinetuneKitWarning
from .param_groups import param_groups

__all__ = ["LRFinderResult", "lr_find"]

logger = logging.getLogger(__name__)


@dataclass
class LRFinderResult:
    """The loss curve of a learning-rate range test.

    Attributes:
        lrs: The head group's learning rate at each step. Every other group ran at its own
            fixed fraction of it, as set by the optimizer's groups.
        losses: The training loss at each step, smoothed with an exponential moving average.
        raw_losses: The training loss at each step as measured.
        suggestion: A head-group rate where the smoothed loss falls fastest (the steepest
            descent against the logarithm of the rate), or ``nan`` when the curve is too
            short to tell.
        min_loss_lr: The head-group rate at the lowest smoothed loss. A tenth of it is a
            common, more cautious choice.
        group_ratios: Each param group's rate divided by the head group's rate, in the
            optimizer's order.
        stopped_early: Whether the sweep stopped because the loss diverged.
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    suggestion: float
    min_loss_lr: float
    group_ratios: list[float] = field(default_factory=list)
    stopped_early: bool = False

    def plot(self, ax: Any = None, *, skip_end: int = 3) -> Any:
        """Plot the smoothed loss against the learning rate on a log axis, marking the suggestion.

        Args:
            ax: A matplotlib ``Axes`` to draw on; a new figure is made when ``None``.
            skip_end: Number of final points to leave out, where the loss shoots up.

        Returns:
            The matplotlib ``Axes``.

        Raises:
            ImportError: If matplotlib is not installed.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                "LRFinderResult.plot needs matplotlib: pip install matplotlib (or finetunekit[plot])."
            ) from error
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        end = max(1, len(self.lrs) - skip_end)
        ax.plot(self.lrs[:end], self.losses[:end], label="smoothed training loss")
        if math.isfinite(self.suggestion):
            index = int(np.argmin(np.abs(np.asarray(self.lrs) - self.suggestion)))
            ax.plot([self.suggestion], [self.losses[index]], "o", color="C3", label=f"suggestion {self.suggestion:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate of the head group")
        ax.set_ylabel("loss")
        ax.legend()
        return ax


def lr_find(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | slice | Mapping[str, float] = 1.0,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    diverge_factor: float = 4.0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> LRFinderResult:
    """Run a learning-rate range test, keeping the ratios between param groups.

    For ``num_steps`` batches, the head group's rate rises geometrically from
    ``start_lr`` to ``end_lr`` while every other group keeps its ratio to the head, so
    the curve tests the discriminative rates the run will use. The sweep stops early
    once the smoothed loss exceeds ``diverge_factor`` times its lowest value. Afterwards
    the model's parameters and buffers, its train or eval mode, the optimizer's state
    and rates, and torch's random-number generators are restored to what they were, so
    the call has no lasting effect. The copy of the model's state lives on the CPU
    during the sweep.

    Batches are ``(inputs, labels)`` pairs or mappings with a ``"labels"`` entry, as the
    Trainer takes them. ``data`` is iterated again when it runs out before ``num_steps``.

    Args:
        model: The model to test, with its freezing already applied.
        data: Training batches, such as a ``DataLoader``.
        loss_fn: Called as ``loss_fn(logits, labels)``.
        optimizer: The optimizer to test. ``None`` builds ``torch.optim.AdamW`` over
            ``param_groups(model, lr)``, with the same ratios as ``lr``.
        lr: Without ``optimizer``, the rates whose ratios to keep; only the ratios matter.
        start_lr: Head-group rate of the first step.
        end_lr: Head-group rate of the last step.
        num_steps: Number of batches in the sweep.
        smoothing: Weight of the past in the exponential moving average of the loss.
        diverge_factor: Stop when the smoothed loss exceeds this multiple of its minimum.
        device: Device for the batches; defaults to the device of the model's parameters.
        progress: Whether to show a tqdm progress bar.

    Returns:
        The curve and a suggested head-group rate.

    Raises:
        ValueError: If the rates, ``num_steps`` or ``smoothing`` are out of range, or
            ``data`` yields no batches.

    Example:
        >>> result = lr_find(model, train_loader, nn.functional.cross_entropy, lr=slice(1e-5, 1e-3))
        >>> result.suggestion
        0.0021
        >>> result.plot()
    """
    if not (0 < start_lr < end_lr and math.isfinite(end_lr)):
        raise ValueError(f"start_lr={start_lr!r} and end_lr={end_lr!r} must satisfy 0 < start_lr < end_lr.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps={num_steps!r} must be an integer of at least 2.")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing={smoothing!r} must be in [0, 1).")
    if optimizer is None:
        optimizer = torch.optim.AdamW(param_groups(model, lr))
    device = torch.device(device) if device is not None else next(model.parameters()).device

    base = [float(group["lr"]) for group in optimizer.param_groups]
    top = max(base)
    ratios = [rate / top for rate in base]
    saved = _save(model, optimizer)
    try:
        result = _sweep(
            model,
            data,
            loss_fn,
            optimizer,
            ratios,
            start_lr,
            end_lr,
            num_steps,
            smoothing,
            diverge_factor,
            device,
            progress,
        )
    finally:
        _restore(model, optimizer, saved)
    result.group_ratios = ratios
    logger.info("lr_find: %d steps, suggested head rate %.3g", len(result.lrs), result.suggestion)
    return result


def _sweep(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    ratios: list[float],
    start_lr: float,
    end_lr: float,
    num_steps: int,
    smoothing: float,
    diverge_factor: float,
    device: torch.device,
    progress: bool,
) -> LRFinderResult:
    model.train()
    lrs, raw, smoothed = [], [], []
    average, best = 0.0, math.inf
    stopped = False
    batches = _cycle(data)
    for step in tqdm(range(num_steps), disable=not progress, desc="lr_find", leave=False):
        rate = start_lr * (end_lr / start_lr) ** (step / (num_steps - 1))
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = rate * ratio
        optimizer.zero_grad(set_to_none=True)
        logits, labels = forward_batch(model, next(batches), device)
        loss = loss_fn(logits, labels)
        value = float(loss.detach())
        if not math.isfinite(value):
            stopped = True
            break
        loss.backward()
        optimizer.step()

        average = smoothing * average + (1 - smoothing) * value
        current = average / (1 - smoothing ** (step + 1))
        lrs.append(rate)
        raw.append(value)
        smoothed.append(current)
        best = min(best, current)
        if step > 0 and current > diverge_factor * best:
            stopped = True
            break
    suggestion, min_loss_lr = _suggest(lrs, smoothed)
    return LRFinderResult(lrs, smoothed, raw, suggestion, min_loss_lr, stopped_early=stopped)


def _suggest(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    if not lrs:
        return math.nan, math.nan
    lowest = int(np.argmin(losses))
    min_loss_lr = lrs[lowest]
    # The steepest fall before the minimum; the first tenth is left out, where the
    # average is still settling.
    start = len(lrs) // 10
    if lowest - start < 2:
        warnings.warn(
            f"lr_find: the smoothed loss fell over {lowest - start + 1} step(s) only, too few to suggest a rate. "
            "Lower start_lr or raise num_steps.",
            FinetuneKitWarning,
            stacklevel=4,
        )
        return math.nan, min_loss_lr
    slopes = np.gradient(np.asarray(losses[start : lowest + 1]), np.log10(np.asarray(lrs[start : lowest + 1])))
    return lrs[start + int(np.argmin(slopes))], min_loss_lr


def _cycle(data: Iterable[Any]) -> Any:
    first = True
    while True:
        count = 0
        for batch in data:
            count += 1
            yield batch
        if count == 0:
            raise ValueError("data yielded no batches." if first else "data yielded no batches when iterated again.")
        if iter(data) is data:  # a one-shot iterator: it cannot be iterated again
            raise ValueError(
                f"data ran out after {count} batches, before the sweep ended. Pass a DataLoader or a list, "
                "which can be iterated again, or lower num_steps."
            )
        first = False


def _save(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict(keep_vars=True).items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "optimizer": _copy_optimizer_state(optimizer),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.copy_(saved["model"][name])
    for name, module in model.named_modules():
        module.training = saved["training"][name]
    optimizer.load_state_dict(saved["optimizer"])
    optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


def _copy_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = optimizer.state_dict()
    return {
        "state": {
            key: {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
            for key, value in state["state"].items()
        },
        "param_groups": [dict(group) for group in state["param_groups"]],
    }
