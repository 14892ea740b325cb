"""Checkpoints of a Trainer run: what is saved, the frozen-base fingerprint and the RNG states.

A checkpoint contains only what a run changed: the parameters that were trainable in any
phase so far, and the buffers whose values differ from the base model's (such as
BatchNorm running statistics). The rest of the model, the frozen base, is identified by
a SHA-256 fingerprint, so a checkpoint loaded onto another base is rejected instead of
mixing two models. Optimizer state is keyed by parameter name through
:func:`finetunekit.optim_state.optimizer_state_dict`, so it survives a new frozen set.

This module does not import the Trainer; the Trainer passes itself in.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ._utils import named_parameters_once
from .errors import FinetuneKitError
from .optim_state import load_optimizer_state_dict, optimizer_state_dict

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["CheckpointMismatchError"]

FORMAT = "finetunekit.trainer-checkpoint/1"


class CheckpointMismatchError(FinetuneKitError, ValueError):
    """A Trainer checkpoint does not fit the model or the phases it is loaded into."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """Return the SHA-256 hex digest of a tensor's dtype, shape and bytes."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def buffer_digests(model: nn.Module) -> dict[str, str]:
    """Return the digest of each persistent buffer, by state-dict name."""
    persistent = model.state_dict(keep_vars=True)
    return {name: tensor_digest(buffer) for name, buffer in model.named_buffers() if name in persistent}


def base_fingerprint(model: nn.Module, trained: Iterable[str], base_buffers: Mapping[str, str]) -> str:
    """Fingerprint the frozen base: every parameter never trained, and the base buffers.

    Args:
        model: The model.
        trained: Names of the parameters that trained, which the fingerprint leaves out.
        base_buffers: Digests of the buffers as they were before training.
    """
    trained = set(trained)
    digest = hashlib.sha256()
    for name, param in sorted(named_parameters_once(model)):
        if name not in trained:
            digest.update(f"{name}:{tensor_digest(param)};".encode())
    for name in sorted(base_buffers):
        digest.update(f"{name}:{base_buffers[name]};".encode())
    return digest.hexdigest()


def data_generators(data: object) -> list[torch.Generator]:
    """Return the ``torch.Generator`` objects that shuffle ``data``, each once.

    A ``DataLoader`` built with ``generator=`` keeps it on itself and on its sampler;
    without one, its shuffling draws from the global RNG, which is saved anyway.
    """
    found: list[torch.Generator] = []
    batch_sampler = getattr(data, "batch_sampler", None)
    candidates = (
        getattr(data, "generator", None),
        getattr(getattr(data, "sampler", None), "generator", None),
        getattr(getattr(batch_sampler, "sampler", None), "generator", None),
    )
    for candidate in candidates:
        if isinstance(candidate, torch.Generator) and all(candidate is not g for g in found):
            found.append(candidate)
    return found


def rng_state(generators: list[torch.Generator]) -> dict[str, Any]:
    """Capture Python's, NumPy's, torch's CPU and CUDA RNG states, and ``generators``."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        # NumPy's key array is stored as a tensor, so torch.load(weights_only=True) reads it.
        "numpy": (
            name,
            torch.from_numpy(keys.astype(np.int64)),
            position,
            has_gauss,
            cached_gaussian,
        ),
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], generators: list[torch.Generator]) -> None:
    """Restore the states that :func:`rng_state` captured."""
    if len(state["generators"]) != len(generators):
        raise CheckpointMismatchError(
            f"The checkpoint saved {len(state['generators'])} data-loader generators, but the "
            f"train_data has {len(generators)}. Build train_data as in the saved run, with or "
            "without DataLoader(generator=...) alike."
        )
    random.setstate(_as_tuples(state["python"]))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    for generator, saved in zip(generators, state["generators"]):
        generator.set_state(saved)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build(trainer: Trainer) -> dict[str, Any]:
    """Collect everything a resumed run needs from ``trainer``, between two epochs."""
    model = trainer.model
    trained = trainer._trained_names
    params = dict(named_parameters_once(model))
    buffers = dict(model.named_buffers())
    current = buffer_digests(model)
    changed = [n for n, d in current.items() if d != trainer._base_buffers.get(n)]
    tensors = {name: params[name].detach().clone() for name in sorted(trained)}
    tensors.update({name: buffers[name].detach().clone() for name in changed})

    names = {id(p): n for n, p in params.items()}
    held_ids: set[int] = set()
    optimizer = None
    if trainer.optimizer is not None:
        optimizer = optimizer_state_dict(model, trainer.optimizer)
        held_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    carried = {
        names[id(param)]: dict(state)
        for param, state in trainer._saved_state.items()
        if id(param) not in held_ids and state
    }
    return {
        "format": FORMAT,
        "position": {
            "phase_index": trainer.phase_index,
            "epoch": trainer.epoch,
            "stop_phase": trainer.stop_phase,
            "phase_ended": trainer._phase_ended,
            "global_step": trainer.global_step,
        },
        "phase_names": [phase.name for phase in trainer.phases],
        "tensors": tensors,
        "trained": sorted(trained),
        "base_fingerprint": base_fingerprint(model, trained, trainer._base_buffers),
        "base_buffers": dict(trainer._base_buffers),
        "optimizer": optimizer,
        "carried_optimizer_state": carried,
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None,
        "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
        "callbacks": [callback.state_dict() for callback in trainer.callbacks],
        "history": [dict(record) for record in trainer.history],
        "history_steps": [dict(step) for step in trainer.history.steps],
        "rng": rng_state(data_generators(trainer.train_data)),
    }


def save(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` to ``path`` through a temporary file, so a crash leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(dict(checkpoint), partial)
    os.replace(partial, path)
    return path


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`, with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"resume_from={str(path)!r} is not a file. Pass the path of a checkpoint that "
            "Trainer.save_checkpoint() or checkpoint_dir= wrote."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointMismatchError(
            f"{str(path)!r} has format {found!r}, not {FORMAT!r}: it is not a Trainer "
            "checkpoint. To load plain weights use model.load_state_dict() or "
            "finetunekit.load_pretrained()."
        )
    return dict(checkpoint)


def check(trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``checkpoint`` fits the trainer's model and phases."""
    model = trainer.model
    phase_names = [phase.name for phase in trainer.phases]
    if checkpoint["phase_names"] != phase_names:
        raise CheckpointMismatchError(
            f"The checkpoint was saved from a run with phases {checkpoint['phase_names']}, but "
            f"this Trainer has {phase_names}. Resume with the same list of phases."
        )
    params = {name for name, _ in named_parameters_once(model)}
    buffers = set(buffer_digests(model))
    missing = sorted(set(checkpoint["trained"]) - params | set(checkpoint["base_buffers"]) - buffers)
    if missing:
        raise CheckpointMismatchError(
            f"{type(model).__name__} lacks {len(missing)} tensors that the checkpoint has, "
            f"such as {missing[0]!r}. Build the model exactly as for the saved run, with the "
            "same head, before resuming."
        )
    fingerprint = base_fingerprint(model, checkpoint["trained"], buffer_digests(model))
    if fingerprint != checkpoint["base_fingerprint"]:
        raise CheckpointMismatchError(
            f"The frozen base of this {type(model).__name__} differs from the one the "
            "checkpoint was saved from (fingerprint "
            f"{fingerprint[:12]} != {checkpoint['base_fingerprint'][:12]}): its frozen "
            "weights or buffers are not the same. Load the same pretrained weights, and "
            "nothing else, before resuming."
        )
    if len(checkpoint["callbacks"]) != len(trainer.callbacks):
        raise CheckpointMismatchError(
            f"The checkpoint holds the state of {len(checkpoint['callbacks'])} callbacks, "
            f"but this Trainer has {len(trainer.callbacks)}. Pass the same callbacks, "
            "in the same order."
        )


def load_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy the saved parameters and buffers into ``model`` in place."""
    targets: dict[str, torch.Tensor] = dict(named_parameters_once(model))
    targets.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name, value in tensors.items():
            targets[name].copy_(value)


def load_optimizer(trainer: Trainer, checkpoint: Mapping[str, Any], *, into_optimizer: bool) -> None:
    """Give the saved optimizer state back: to the current optimizer, or kept for later phases.

    Args:
        trainer: The trainer, whose optimizer of the resumed phase exists when
            ``into_optimizer`` is true.
        checkpoint: The checkpoint.
        into_optimizer: Load the saved optimizer into ``trainer.optimizer``; otherwise
            keep all saved state for the phases still to start.
    """
    params = dict(named_parameters_once(trainer.model))
    carried = dict(checkpoint["carried_optimizer_state"])
    saved = checkpoint["optimizer"]
    if into_optimizer and trainer.optimizer is not None and saved is not None:
        load_optimizer_state_dict(trainer.model, trainer.optimizer, saved)
    elif saved is not None:
        carried.update(saved["state"])
    for name, state in carried.items():
        trainer._saved_state[params[name]] = _to_parameter(state, params[name])


def _to_parameter(state: Mapping[str, Any], param: nn.Parameter) -> dict[str, Any]:
    """Move optimizer state onto the parameter's device, as ``Optimizer.load_state_dict`` does."""
    moved: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or key == "step":
            moved[key] = value
        elif value.is_floating_point():
            moved[key] = value.to(device=param.device, dtype=param.dtype)
        else:
            moved[key] = value.to(device=param.device)
    return moved


def _as_tuples(value: Any) -> Any:
    """Turn lists back into the tuples ``random.setstate`` needs."""
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_as_tuples(v) for v in value)
    return value
