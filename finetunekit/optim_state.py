"""Check an optimizer against its model, and save and load its state keyed by parameter names."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._utils import close_matches, format_suggestions, named_parameters_once, shorten_names

__all__ = ["OptimizerCheck", "check_optimizer", "load_optimizer_state_dict", "optimizer_state_dict"]

logger = logging.getLogger(__name__)

_FORMAT = "finetunekit.optimizer/1"
# State entries that are counters rather than per-element tensors, so their shape is not checked.
_SCALAR_KEYS = frozenset({"step"})
# Parameter names listed in one problem sentence before the rest is counted.
_MAX_NAMES_SHOWN = 5


@dataclass(frozen=True)
class OptimizerCheck:
    """Problems that :func:`check_optimizer` found between a model and its optimizer.

    Attributes:
        missing: Names of trainable parameters that are in no param group, so they never change.
        duplicated: Names of parameters that are in more than one param group, so each
            step updates them more than once.
        frozen_with_state: Names of frozen parameters that still have optimizer state
            (such as Adam's moments), which they resume with if unfrozen.
        num_foreign_tensors: Number of tensors in the optimizer that are not parameters
            of the model, such as the old head after ``replace_head``.
    """

    missing: tuple[str, ...] = ()
    duplicated: tuple[str, ...] = ()
    frozen_with_state: tuple[str, ...] = ()
    num_foreign_tensors: int = 0

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not (self.missing or self.duplicated or self.frozen_with_state or self.num_foreign_tensors)

    @property
    def problems(self) -> list[str]:
        """The problems found, one sentence each with the fix."""
        found = []
        if self.missing:
            found.append(
                f"{len(self.missing)} trainable parameters are in no param group, so they will not train: "
                f"{shorten_names(self.missing, _MAX_NAMES_SHOWN)}. Build the optimizer after the last freeze or "
                "unfreeze, pass optimizer= to finetunekit.unfreeze, or use param_groups(..., include_frozen=True)."
            )
        if self.duplicated:
            found.append(
                f"{len(self.duplicated)} parameters are in more than one param group, so each step updates "
                f"them more than once: {shorten_names(self.duplicated, _MAX_NAMES_SHOWN)}. Build the groups with "
                "finetunekit.param_groups, which puts each parameter in exactly one."
            )
        if self.frozen_with_state:
            found.append(
                f"{len(self.frozen_with_state)} frozen parameters still have optimizer state: "
                f"{shorten_names(self.frozen_with_state, _MAX_NAMES_SHOWN)}. They resume with it if unfrozen; pass "
                "keep_state=False to finetunekit.unfreeze to start them fresh."
            )
        if self.num_foreign_tensors:
            found.append(
                f"The optimizer contains {self.num_foreign_tensors} tensors that are not parameters of the "
                "model, for example an old head after replace_head. Build the optimizer again from the model."
            )
        return found


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> OptimizerCheck:
    """Compare an optimizer with its model and report every parameter it mishandles.

    Parameters are matched by identity. Neither the model nor the optimizer is modified.

    Args:
        model: The model the optimizer trains.
        optimizer: Any ``torch.optim`` optimizer.

    Returns:
        The names of trainable parameters missing from the optimizer, of parameters in
        more than one param group and of frozen parameters with optimizer state, and the
        number of tensors that are not parameters of the model.

    Example:
        >>> optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3))
        >>> _ = unfreeze(model)  # without optimizer=, the new parameters are left out
        >>> check_optimizer(model, optimizer).problems[0]
        '11 trainable parameters are in no param group, so they will not train: ...'
    """
    named = list(named_parameters_once(model))
    count: dict[int, int] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            count[id(param)] = count.get(id(param), 0) + 1
    state = getattr(optimizer, "state", {})
    return OptimizerCheck(
        missing=tuple(name for name, p in named if p.requires_grad and id(p) not in count),
        duplicated=tuple(name for name, p in named if count.get(id(p), 0) > 1),
        frozen_with_state=tuple(name for name, p in named if not p.requires_grad and state.get(p)),
        num_foreign_tensors=len(count.keys() - {id(p) for _, p in named}),
    )


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Return the optimizer's state keyed by parameter names instead of positions.

    ``optimizer.state_dict()`` numbers parameters by their position in the optimizer,
    so loading it into an optimizer built over a different set of trainable parameters
    hands one layer's moments to another. This dict names each parameter as
    ``model.named_parameters()`` does (a tied parameter under its first name) and can
    be saved with ``torch.save``. Nothing is copied: the tensors are the optimizer's own.

    Args:
        model: The model whose parameters the optimizer holds. Not modified.
        optimizer: Any ``torch.optim`` optimizer over parameters of ``model``.

    Returns:
        A dict with ``"state"`` (parameter name to that parameter's state, such as
        ``exp_avg``) and ``"param_groups"`` (each group's settings and the names of its
        parameters).

    Raises:
        ValueError: If the optimizer contains a tensor that is not a parameter of ``model``.

    Example:
        >>> torch.save(optimizer_state_dict(model, optimizer), "optimizer.pt")
    """
    names = _names_by_id(model)
    groups = []
    state: dict[str, dict[str, Any]] = {}
    for index, group in enumerate(optimizer.param_groups):
        group_names = [_name_of(p, names, index) for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": group_names})
        for param, name in zip(group["params"], group_names):
            if optimizer.state.get(param):
                state[name] = dict(optimizer.state[param])
    return {"format": _FORMAT, "state": state, "param_groups": groups}


def load_optimizer_state_dict(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
) -> None:
    """Load state saved by :func:`optimizer_state_dict`, matching parameters by name.

    Each parameter in ``optimizer`` gets the state saved under its own name. One with no
    saved state (for example, frozen when the state was saved) starts fresh. A param
    group's settings (``lr``, ``initial_lr``, ``weight_decay``, ...) are restored when all
    of its saved parameters came from one saved group. Otherwise the group keeps the
    settings it was built with. State tensors are cast to each parameter's dtype and
    device, as ``optimizer.load_state_dict`` does. ``optimizer`` is changed in place, and
    only after every check passes.

    Args:
        model: The model whose parameters ``optimizer`` holds. Not modified.
        optimizer: The optimizer to load into. Its param groups may differ from the saved
            ones, for example after freezing or unfreezing layer groups.
        state_dict: A dict returned by :func:`optimizer_state_dict`, possibly loaded with
            ``torch.load``.
        strict: If true, saved state of a parameter that is in ``model`` but not in
            ``optimizer`` (now frozen, or left out) is an error; if false it is dropped
            and logged.

    Raises:
        ValueError: If ``state_dict`` is not in this format, names a parameter that
            ``model`` lacks, holds a state tensor whose shape differs from its
            parameter's, or, with ``strict``, holds state for a parameter missing from
            ``optimizer``; or if ``optimizer`` contains a tensor that is not a parameter of
            ``model``.

    Example:
        >>> optimizer = torch.optim.AdamW(param_groups(model, lr=1e-4))
        >>> load_optimizer_state_dict(model, optimizer, torch.load("optimizer.pt"))
    """
    if not isinstance(state_dict, Mapping) or state_dict.get("format") != _FORMAT:
        found = state_dict.get("format") if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError(
            f"state_dict has format {found!r}, not {_FORMAT!r}. Pass a dict made by "
            "finetunekit.optimizer_state_dict(model, optimizer); for optimizer.state_dict() "
            "output use optimizer.load_state_dict()."
        )
    params = dict(named_parameters_once(model))
    names = _names_by_id(model)
    saved_state: Mapping[str, Mapping[str, Any]] = state_dict["state"]
    saved_groups: list[Mapping[str, Any]] = state_dict["param_groups"]

    unknown = sorted(set(saved_state) - set(params))
    if unknown:
        raise ValueError(
            f"The saved optimizer state names {len(unknown)} parameters that "
            f"{type(model).__name__} does not have, such as {unknown[0]!r}."
            f"{format_suggestions(close_matches(unknown[0], params))} "
            "Load it into the same architecture it was saved from."
        )

    targets = [[_name_of(p, names, i) for p in group["params"]] for i, group in enumerate(optimizer.param_groups)]
    optimized = {name for group in targets for name in group}
    orphans = sorted(set(saved_state) - optimized)
    if orphans and strict:
        raise ValueError(
            f"Saved optimizer state of {len(orphans)} parameters has no place in the optimizer, "
            f"because they are frozen or left out now, such as {orphans[0]!r}. Unfreeze them "
            "before building the optimizer, or pass strict=False to drop their state."
        )
    if orphans:
        logger.info(
            "dropped the saved optimizer state of %d parameters not in the optimizer",
            len(orphans),
        )

    for name in (n for group_names in targets for n in group_names if n in saved_state):
        _check_shapes(name, params[name], saved_state[name])

    group_of = {name: index for index, group in enumerate(saved_groups) for name in group["params"]}
    positional_state: dict[int, Any] = {}
    positional_groups: list[dict[str, Any]] = []
    position = 0
    for group, group_names in zip(optimizer.param_groups, targets):
        settings = {k: v for k, v in group.items() if k != "params"}
        sources = {group_of[name] for name in group_names if name in group_of}
        if len(sources) == 1:
            saved_settings = saved_groups[sources.pop()]
            settings.update({k: v for k, v in saved_settings.items() if k != "params"})
        indices = []
        for name in group_names:
            if name in saved_state:
                positional_state[position] = dict(saved_state[name])
            indices.append(position)
            position += 1
        positional_groups.append({**settings, "params": indices})

    optimizer.load_state_dict({"state": positional_state, "param_groups": positional_groups})
    fresh = sum(1 for name in optimized if name not in saved_state)
    logger.info(
        "loaded optimizer state of %d parameters by name; %d start fresh",
        len(optimized) - fresh,
        fresh,
    )


def _names_by_id(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in named_parameters_once(model)}


def _name_of(param: torch.Tensor, names: Mapping[int, str], group_index: int) -> str:
    name = names.get(id(param))
    if name is None:
        raise ValueError(
            f"Param group {group_index} of the optimizer contains a tensor of shape {tuple(param.shape)} "
            "that is not a parameter of the model. Build the optimizer over model.parameters() "
            "or finetunekit.param_groups(model, ...)."
        )
    return name


def _check_shapes(name: str, param: nn.Parameter, state: Mapping[str, Any]) -> None:
    for key, value in state.items():
        if key in _SCALAR_KEYS or not isinstance(value, torch.Tensor) or value.ndim == 0:
            continue
        if value.shape != param.shape:
            raise ValueError(
                f"Saved optimizer state {key!r} of {name!r} has shape {tuple(value.shape)}, but the "
                f"parameter has shape {tuple(param.shape)}. The state was saved from a different "
                "architecture or head size; rebuild the model as it was when the state was saved."
            )
