"""Fingerprint the base weights, digest the buffers, and select and check the tensors of an adapter file."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch
from torch import nn

from ._lora_inject import _adapter_parameters, _LoraState
from ._lora_targets import _under
from ._utils import named_parameters_once

# The fingerprint hashes every base parameter's name, shape and dtype, and the values of
# this many tensors, spread evenly over the sorted names, at this many evenly spaced
# positions each. So it costs the same on a 100M and a 10B parameter model.
_FINGERPRINT_TENSORS = 32
_FINGERPRINT_VALUES = 256

_BASE_LAYER = re.compile(r"\.base_layer(?=\.|$)")


# --- fingerprint ----------------------------------------------------------------------------


def _plain_name(name: str) -> str:
    """Return a parameter's name as it was before peft moved its layer under ``base_layer``."""
    return _BASE_LAYER.sub("", name)


def _fingerprint(model: nn.Module, state: _LoraState) -> str:
    """Hash the base weights that the adapter file does not contain, cheaply.

    Every such parameter's name, shape and dtype go in, and so do the values of a fixed
    sample of tensors. NOTE: a sample detects another model or another pretrained
    checkpoint, but can miss a base that differs in a few values only.
    """
    skip = state.modules_to_save + state.trained_norms
    adapter_ids = {id(p) for _, p in _adapter_parameters(model)}
    base = sorted(
        ((_plain_name(n), p) for n, p in named_parameters_once(model) if id(p) not in adapter_ids),
        key=lambda item: item[0],
    )
    base = [(n, p) for n, p in base if not _under(n, skip)]

    digest = hashlib.sha256()
    for name, param in base:
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}\n".encode())
    if base:
        count = min(_FINGERPRINT_TENSORS, len(base))
        for index in _spread(len(base), count).tolist():
            digest.update(_sample_bytes(base[index][1]))
    return digest.hexdigest()


def _sample_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return b""
    positions = _spread(flat.numel(), _FINGERPRINT_VALUES).to(flat.device)
    values = flat[positions].cpu().contiguous()
    return values.view(torch.uint8).numpy().tobytes()


def _spread(size: int, count: int) -> torch.Tensor:
    """Return up to ``count`` evenly spaced indexes into ``range(size)``, first and last included."""
    # Integer arithmetic, because float32 positions round past the last index above 2**24.
    count = min(count, size)
    return torch.arange(count, dtype=torch.int64) * (size - 1) // max(count - 1, 1)


def _buffer_digests(model: nn.Module) -> dict[str, str]:
    """Hash every persistent buffer in full, to find at save time the buffers that training changed."""
    parameter_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {
        _plain_name(name): _tensor_digest(tensor)
        for name, tensor in model.state_dict(keep_vars=True).items()
        if name not in parameter_names
    }


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(
        f"{tuple(tensor.shape)}|{tensor.dtype}".encode() + data.view(torch.uint8).numpy().tobytes()
    ).hexdigest()


# --- save and load --------------------------------------------------------------------------


def _check_untracked_training(model: nn.Module, state: _LoraState) -> None:
    saved = state.modules_to_save + state.trained_norms
    adapter_ids = {id(p) for _, p in _adapter_parameters(model)}
    untracked = [
        n
        for n, p in named_parameters_once(model)
        if p.requires_grad and id(p) not in adapter_ids and not _under(_plain_name(n), saved)
    ]
    if untracked:
        raise ValueError(
            f"{len(untracked)} trainable parameters are neither adapters nor in saved modules, so save_adapter "
            f"would lose their training: {untracked[:5]}. Freeze them, or name their modules in "
            "add_lora(modules_to_save=...)."
        )


def _tensors_to_save(model: nn.Module, state: _LoraState) -> dict[str, torch.Tensor]:
    whole = model.state_dict()
    keep = {name for name, _ in _adapter_parameters(model)}
    keep.update(
        n
        for n in whole
        if _under(
            _plain_name(n).rpartition(".")[0],
            state.modules_to_save + state.trained_norms,
        )
    )
    parameter_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, tensor in whole.items():
        if name in parameter_names or name in keep:
            continue
        if state.buffer_digests.get(_plain_name(name)) != _tensor_digest(tensor):
            keep.add(name)
    # safetensors rejects tensors that share memory, so each one is copied.
    return {name: whole[name].detach().clone().contiguous() for name in whole if name in keep}


def _check_base(model: nn.Module, state: _LoraState, config: dict[str, Any]) -> None:
    modules = {n for n, _ in model.named_modules()}
    missing = [n for n in state.targets + state.modules_to_save + list(state.norm_policies) if n not in modules]
    if missing or _fingerprint(model, state) != state.fingerprint:
        detail = f" It lacks the modules {missing[:3]}." if missing else ""
        raise ValueError(
            f"This adapter was trained on a different base model than this {type(model).__name__} "
            f"(the adapter's base was a {config.get('model_class')}, and the base weights' fingerprints differ).{detail} "
            "Load the same pretrained weights the adapter was trained on, with the same head shape."
        )


def _check_shapes(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = {_plain_name(n): t for n, t in model.state_dict().items()}
    wrong = []
    for name, tensor in tensors.items():
        target = expected.get(_plain_name(name))
        if target is not None and target.shape != tensor.shape:
            wrong.append(f"{name}: file {tuple(tensor.shape)}, model {tuple(target.shape)}")
    if wrong:
        raise ValueError(
            f"Saved tensors do not fit {type(model).__name__}: {wrong[:3]}. If the head differs, call "
            "replace_head(model, num_classes) with the trained class count before load_adapter."
        )
