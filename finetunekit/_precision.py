"""Mixed precision for the Trainer: autocast, the fp16 gradient scaler and fp32 master weights."""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: object, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision={precision!r} is not one of {list(PRECISIONS)}. Use 'bf16' for "
            "bfloat16 autocast on CPU or GPU, 'fp16' for float16 with a gradient scaler on CUDA."
        )
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision='fp16' needs a CUDA device, but the Trainer runs on {device}. "
            "Use precision='bf16' on this device, or pass device='cuda'."
        )


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Return the autocast context of ``precision``; a no-op context for ``"fp32"``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def make_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    """Return a gradient scaler for fp16, which underflows without one; ``None`` otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def upcast_trainable(model: nn.Module) -> int:
    """Cast trainable float16 and bfloat16 parameters to float32 in place; return how many.

    The optimizer then updates float32 master weights, and autocast casts them down for
    each forward pass. ``GradScaler`` rejects float16 gradients, and a bfloat16 weight
    loses small updates to rounding. Frozen parameters keep their dtype and memory.
    The parameter objects stay the same, so optimizers and hooks that hold them still work.
    """
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
            count += 1
    if count:
        logger.info("cast %d trainable parameter tensors to float32 master weights", count)
    return count
