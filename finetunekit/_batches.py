"""Run a model on one batch: ``(inputs, labels)`` pairs or Hugging Face style mappings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def forward_batch(model: nn.Module, batch: Any, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the model's logits and the labels of ``batch``, both on ``device``.

    A batch is an ``(inputs, labels)`` pair, or a mapping with a ``"labels"`` entry whose
    other entries are passed to the model as keyword arguments. A model output with a
    ``logits`` attribute is read through it.
    """
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise KeyError(f"A mapping batch needs a 'labels' entry; this one has keys {sorted(batch)}.")
        labels = to_device(batch["labels"], device)
        inputs = {k: to_device(v, device) for k, v in batch.items() if k != "labels"}
        output = model(**inputs)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = to_device(batch[0], device), to_device(batch[1], device)
        output = model(inputs)
    else:
        raise TypeError(
            f"A batch must be an (inputs, labels) pair or a mapping with 'labels'; got {type(batch).__name__}."
        )
    return logits_of(output), labels


def to_device(value: Any, device: torch.device | None) -> Any:
    """Move a tensor to ``device``; return anything else, or everything when ``device`` is None, as it is."""
    if device is not None and isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    return value


def logits_of(output: Any) -> torch.Tensor:
    """Return the logits tensor of a model output: the tensor itself, ``.logits`` or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"Cannot find logits in a model output of type {type(output).__name__}.")
