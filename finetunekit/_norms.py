"""Normalization layers with running statistics under freezing: locking and the BatchNorm policy.

A layer is locked when its statistics must not change: it then runs every forward pass in
eval mode, through a forward pre-hook, whatever ``model.train()`` set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

NormPolicy = Literal["frozen", "train", "stats"]
NORM_POLICIES: tuple[str, ...] = ("frozen", "train", "stats")

FROZEN_STATS = "_finetunekit_frozen_stats"
POLICY = "_finetunekit_norm_policy"


def has_running_stats(module: nn.Module) -> bool:
    return isinstance(module, _NormBase) and module.track_running_stats


def norm_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[nn.Parameter]]]:
    """Yield each normalization layer with running statistics and the parameters it follows.

    A layer with affine parameters follows its own parameters. An ``affine=False`` layer
    follows the nearest enclosing module that has parameters.
    """
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not has_running_stats(module):
            continue
        own = list(module.parameters(recurse=False))
        yield name, module, own if own else _nearest_parameters(name, modules)


def set_policy(model: nn.Module, frozen_ids: set[int], policy: NormPolicy | None) -> list[nn.Parameter]:
    """Record ``policy`` on the layers whose parameters are among ``frozen_ids``.

    With ``policy=None`` each such layer keeps the policy recorded by an earlier call,
    ``"frozen"`` when there is none.

    Returns:
        The affine parameters that must stay trainable: those of the affected layers whose
        policy is ``"train"``.
    """
    keep_trainable: list[nn.Parameter] = []
    for _, module, params in norm_layers(model):
        if not any(id(p) in frozen_ids for p in params):
            continue
        if policy is not None:
            setattr(module, POLICY, policy)
        if getattr(module, POLICY, "frozen") == "train":
            keep_trainable.extend(module.parameters(recurse=False))
    return keep_trainable


def check_policy(policy: object) -> None:
    if policy is not None and policy not in NORM_POLICIES:
        raise ValueError(
            f"bn={policy!r} is not a BatchNorm policy; pass one of {list(NORM_POLICIES)}, "
            "or None to keep each layer's current policy."
        )


def sync_norm_layers(model: nn.Module) -> None:
    """Lock the layers whose parameters are all frozen, unless their policy lets statistics move."""
    for _, module, params in norm_layers(model):
        policy = getattr(module, POLICY, "frozen")
        frozen = bool(params) and not any(p.requires_grad for p in params)
        _set_locked(module, frozen and policy == "frozen", training=model.training)


def is_locked(module: nn.Module) -> bool:
    return bool(getattr(module, FROZEN_STATS, False))


def _keep_eval(module: nn.Module, args: tuple[object, ...]) -> None:
    """Forward pre-hook: run a locked layer in eval mode whatever ``train()`` set."""
    if getattr(module, FROZEN_STATS, False):
        module.training = False


def _nearest_parameters(name: str, modules: dict[str, nn.Module]) -> list[nn.Parameter]:
    while name:
        name = name.rpartition(".")[0]
        params = list(modules[name].parameters())
        if params:
            return params
    return []


def _set_locked(module: nn.Module, locked: bool, *, training: bool) -> None:
    was_locked = getattr(module, FROZEN_STATS, False)
    if locked:
        if not any(hook is _keep_eval for hook in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(_keep_eval)
        setattr(module, FROZEN_STATS, True)
        module.train(False)
    elif was_locked:
        setattr(module, FROZEN_STATS, False)
        module.train(training)
