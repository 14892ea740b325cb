"""Multi-process training for the Trainer through Hugging Face accelerate.

accelerate does the process-group set-up, the ``DistributedDataParallel`` wrapping and
the data sharding. The Trainer adds the re-wrapping at phase transitions. DDP records at
construction which parameters need a gradient and reduces only those. A wrapper built in
a head-only phase would therefore never synchronise the gradients of layers unfrozen
later, and the processes would drift apart. Each phase releases accelerate's references
to the previous wrapper and prepares the model and the phase's new optimizer again. The
new wrapper also broadcasts rank 0's parameters and buffers to the other processes.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch
from torch import nn

__all__ = ["check_accelerator", "prepare_data", "prepare_phase", "sum_across"]

logger = logging.getLogger(__name__)


def check_accelerator(accelerator: Any) -> None:
    """Raise unless ``accelerator`` is an ``accelerate.Accelerator`` the Trainer can use.

    Raises:
        TypeError: If it is not an ``accelerate.Accelerator``.
        ValueError: If it has ``mixed_precision`` or ``gradient_accumulation_steps`` set,
            which the Trainer's own ``precision`` option and loop do not combine with.
    """
    from accelerate import Accelerator

    if not isinstance(accelerator, Accelerator):
        raise TypeError(
            f"accelerator={accelerator!r} is not an accelerate.Accelerator. Pass Accelerator(), "
            "or None for one process."
        )
    if accelerator.mixed_precision != "no":
        raise ValueError(
            f"Accelerator(mixed_precision={accelerator.mixed_precision!r}) is not supported by the Trainer, "
            f"whose precision option sets autocast itself. Build Accelerator() without mixed_precision and pass "
            f"Trainer(precision={'bf16' if accelerator.mixed_precision == 'bf16' else 'fp16'!r})."
        )
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(
            f"Accelerator(gradient_accumulation_steps={accelerator.gradient_accumulation_steps}) is not "
            "supported by the Trainer, which steps the optimizer after every batch. Use a larger batch size."
        )


def prepare_data(accelerator: Any, data: Any) -> Any:
    """Shard a ``DataLoader`` over the processes; return other data unchanged, with a warning log."""
    if data is None:
        return None
    if isinstance(data, torch.utils.data.DataLoader):
        return accelerator.prepare_data_loader(data)
    if accelerator.num_processes > 1:
        logger.warning(
            "%s is not a DataLoader, so every process trains on all of it; pass a DataLoader to shard it",
            type(data).__name__,
        )
    return data


def prepare_phase(
    accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Wrap ``model`` and ``optimizer`` for this phase's trainable set; return the wrapped pair.

    accelerate's references to the previous phase's wrappers are released first.
    """
    accelerator.free_memory()
    gc.collect()
    wrapped = accelerator.prepare_model(model)
    prepared = accelerator.prepare_optimizer(optimizer)
    logger.info(
        "prepared the model for %d processes on %s (%s)",
        accelerator.num_processes,
        accelerator.device,
        type(wrapped).__name__,
    )
    return wrapped, prepared


def sum_across(accelerator: Any, *values: float) -> list[float]:
    """Return each value summed over all processes."""
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()
