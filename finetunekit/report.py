"""Describe a fine-tuning plan: layer groups, trainable counts, locked statistics and optimizer settings."""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from ._norms import FROZEN_STATS
from ._utils import named_parameters_once, shorten_names
from .groups import LayerGroup, resolve_groups
from .optim_state import check_optimizer

__all__ = ["GroupRow", "Report", "describe"]

logger = logging.getLogger(__name__)

# Names shown per cell of the text and HTML tables before the rest is counted as "+N more".
_MAX_MODULES_SHOWN = 3
_MAX_NAMES_SHOWN = 2
# Parameter names listed in one warning line before the rest is counted.
_MAX_WARNING_NAMES = 5


@dataclass(frozen=True)
class GroupRow:
    """One layer group of a :class:`Report`.

    Attributes:
        index: Position of the group, 0 for the input side.
        name: The layer group's name.
        modules: Qualified names of the group's modules, in the group's order.
        num_params: Number of scalar values in the group's parameters.
        num_trainable: How many of those values have ``requires_grad=True``.
        locked_norms: Qualified names of the normalization layers in the group whose
            running statistics freezing has locked (they run in eval mode).
        tied: Names under which the group reaches parameters owned by an earlier group.
        is_head: Whether the group is the model's output layer.
        lrs: Learning rates of the optimizer param groups that hold the group's
            parameters, in optimizer order without repeats. Empty without an optimizer,
            or when the optimizer contains none of the group's parameters.
        weight_decays: Weight decays of those param groups, in the same order without
            repeats. ``None`` stands for a param group without a ``weight_decay`` key.
    """

    index: int
    name: str
    modules: tuple[str, ...]
    num_params: int
    num_trainable: int
    locked_norms: tuple[str, ...]
    tied: tuple[str, ...]
    is_head: bool
    lrs: tuple[float, ...] = ()
    weight_decays: tuple[float | None, ...] = ()


@dataclass(frozen=True)
class Report:
    """A model's layer groups with their sizes, freezing state and optimizer settings.

    ``str(report)`` is an aligned plain-text table with a totals line and one line per
    warning. In a notebook the report displays as an HTML table.

    Attributes:
        model_name: Class name of the described model.
        rows: One row per layer group, input side first and head last.
        has_optimizer: Whether an optimizer was described along with the model.
        missing_from_optimizer: Names of trainable parameters that are not in the
            optimizer, so they never change during training. Empty without an optimizer.
        frozen_in_optimizer: Names of frozen parameters that are in the optimizer. Not a
            warning: the stable layout of ``param_groups(..., include_frozen=True)`` puts
            them there on purpose, and they stay fixed while their ``.grad`` is ``None``.
        num_foreign_tensors: Number of tensors in the optimizer that are not
            parameters of the model, such as the old head after ``replace_head``.
        duplicated_in_optimizer: Names of parameters in more than one param group.
        frozen_with_state: Names of frozen parameters that still have optimizer state.
    """

    model_name: str
    rows: tuple[GroupRow, ...]
    has_optimizer: bool = False
    missing_from_optimizer: tuple[str, ...] = ()
    frozen_in_optimizer: tuple[str, ...] = ()
    num_foreign_tensors: int = 0
    duplicated_in_optimizer: tuple[str, ...] = ()
    frozen_with_state: tuple[str, ...] = ()

    @property
    def num_params(self) -> int:
        """Number of scalar values in all parameters, each tied parameter counted once."""
        return sum(row.num_params for row in self.rows)

    @property
    def num_trainable(self) -> int:
        """Number of trainable scalar values, each tied parameter counted once."""
        return sum(row.num_trainable for row in self.rows)

    @property
    def warnings(self) -> list[str]:
        """Problems found, one sentence each, such as trainable parameters missing from the optimizer."""
        found = []
        if self.num_trainable == 0:
            found.append(
                "No parameter is trainable, so training changes nothing. "
                "Unfreeze some layer groups, for example finetunekit.freeze_to(model, -1)."
            )
        if self.missing_from_optimizer:
            found.append(
                f"{len(self.missing_from_optimizer)} trainable parameters are not in the optimizer, so they "
                f"will not train: {shorten_names(self.missing_from_optimizer, _MAX_WARNING_NAMES)}. "
                "Build the optimizer after the last freeze or unfreeze, pass optimizer= to "
                "finetunekit.unfreeze, or use param_groups(..., include_frozen=True)."
            )
        if self.duplicated_in_optimizer:
            found.append(
                f"{len(self.duplicated_in_optimizer)} parameters are in more than one param group, so each "
                f"step updates them more than once: {shorten_names(self.duplicated_in_optimizer, _MAX_WARNING_NAMES)}. "
                "Build the groups with finetunekit.param_groups, which puts each parameter in exactly one."
            )
        if self.frozen_with_state:
            found.append(
                f"{len(self.frozen_with_state)} frozen parameters still have optimizer state: "
                f"{shorten_names(self.frozen_with_state, _MAX_WARNING_NAMES)}. They resume with it if unfrozen."
            )
        if self.num_foreign_tensors:
            found.append(
                f"The optimizer contains {self.num_foreign_tensors} tensors that are not parameters of "
                f"{self.model_name}, for example an old head after replace_head. "
                "Build the optimizer again from the current model."
            )
        return found

    def __str__(self) -> str:
        header = list(_COLUMNS)
        if self.has_optimizer:
            header += list(_OPTIMIZER_COLUMNS)
        table = [header] + [self._cells(row) for row in self.rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]

        lines = [
            (
                f"{self.model_name}: {len(self.rows)} layer groups, {self.num_params:,} parameters, "
                f"{self.num_trainable:,} trainable"
            )
        ]
        for line in table:
            lines.append(_align(line, widths, header))
        totals = ["", "total", "", f"{self.num_params:,}", f"{self.num_trainable:,}"]
        lines.append(_align(totals + [""] * (len(header) - len(totals)), widths, header))
        lines += [f"warning: {text}" for text in self.warnings]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        header = list(_COLUMNS)
        if self.has_optimizer:
            header += list(_OPTIMIZER_COLUMNS)
        parts = [
            "<table>",
            f"<caption>{html.escape(self.model_name)}: {len(self.rows)} layer groups</caption>",
            "<thead><tr>" + "".join(f"<th>{html.escape(name)}</th>" for name in header) + "</tr></thead>",
            "<tbody>",
        ]
        for row in self.rows:
            cells = self._cells(row)
            full = self._full_cells(row)
            parts.append("<tr>" + "".join(_html_cell(c, f, name) for c, f, name in zip(cells, full, header)) + "</tr>")
        parts.append("</tbody>")
        parts.append(
            f"<tfoot><tr><td></td><td>total</td><td></td><td>{self.num_params:,}</td>"
            f"<td>{self.num_trainable:,}</td>" + "<td></td>" * (len(header) - 5) + "</tr></tfoot>"
        )
        parts.append("</table>")
        if self.warnings:
            items = "".join(f"<li>{html.escape(text)}</li>" for text in self.warnings)
            parts.append(f"<ul>{items}</ul>")
        return "\n".join(parts)

    def _cells(self, row: GroupRow) -> list[str]:
        cells = [
            str(row.index),
            row.name,
            shorten_names(row.modules, _MAX_MODULES_SHOWN),
            f"{row.num_params:,}",
            f"{row.num_trainable:,}",
            shorten_names(row.locked_norms, _MAX_NAMES_SHOWN),
            shorten_names(row.tied, _MAX_NAMES_SHOWN),
            "yes" if row.is_head else "",
        ]
        if self.has_optimizer:
            cells += [_format_numbers(row.lrs), _format_numbers(row.weight_decays)]
        return cells

    def _full_cells(self, row: GroupRow) -> list[str]:
        """Return the cells with every name listed, for the HTML tooltips."""
        cells = self._cells(row)
        cells[2] = ", ".join(row.modules)
        cells[5] = ", ".join(row.locked_norms)
        cells[6] = ", ".join(row.tied)
        return cells


_COLUMNS = ("#", "group", "modules", "params", "trainable", "locked norms", "tied", "head")
_OPTIMIZER_COLUMNS = ("lr", "weight decay")
_NUMERIC_COLUMNS = frozenset({"#", "params", "trainable"})


def describe(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    groups: Sequence[LayerGroup] | None = None,
) -> Report:
    """Describe the layer groups of ``model`` and, optionally, how ``optimizer`` covers them.

    Each row gives a layer group's modules, its parameter and trainable counts, the
    normalization layers whose running statistics freezing has locked, its tied
    parameter names and whether it is the head. With an optimizer, each row also gives
    the learning rates and weight decays of the optimizer param groups that hold the
    layer group's parameters (a layer group often maps to a decay and a no-decay param
    group). The report then lists the trainable parameters that the optimizer does not
    hold, as after unfreezing a group once the optimizer was built, and the frozen
    parameters it does hold. Parameters are matched by identity, never by value.
    Neither the model nor the optimizer is modified, and no warning is emitted: the
    report carries its warnings in :attr:`Report.warnings`.

    Args:
        model: The model to describe. Parameters on the meta device are counted too.
        optimizer: An optimizer built for ``model``, such as
            ``torch.optim.AdamW(finetunekit.param_groups(model, lr))``.
        groups: Layer groups to use instead of ``layer_groups(model)``.

    Returns:
        The report. ``print(report)`` shows it as a table.

    Raises:
        NoParametersError: If ``model`` has no parameters.
        TypeError: If ``optimizer`` has no ``param_groups`` list.
        ValueError: If ``groups`` does not match the model's parameters.

    Example:
        >>> model = torchvision.models.resnet18(weights=None)
        >>> _ = freeze_to(model, -3)
        >>> report = describe(model, torch.optim.AdamW(param_groups(model, slice(1e-5, 1e-3))))
        >>> [(row.name, row.num_trainable, row.lrs) for row in report.rows[-3:]]
        [('layer4.0', 3673088, (1e-05,)), ('layer4.1', 4720640, (0.0001,)), ('fc', 513000, (0.001,))]
    """
    settings = _optimizer_settings(optimizer) if optimizer is not None else None
    groups = resolve_groups(model, groups)
    locked = _locked_norms_by_group(model, groups)

    rows = tuple(_row(index, group, locked[index], settings) for index, group in enumerate(groups))
    if settings is None:
        report = Report(type(model).__name__, rows)
    else:
        check = check_optimizer(model, optimizer)
        report = Report(
            type(model).__name__,
            rows,
            has_optimizer=True,
            missing_from_optimizer=check.missing,
            frozen_in_optimizer=_frozen_in_optimizer(model, settings),
            num_foreign_tensors=check.num_foreign_tensors,
            duplicated_in_optimizer=check.duplicated,
            frozen_with_state=check.frozen_with_state,
        )

    logger.info(
        "described %s: %d layer groups, %s of %s parameter values trainable, warnings: %d",
        report.model_name,
        len(rows),
        f"{report.num_trainable:,}",
        f"{report.num_params:,}",
        len(report.warnings),
    )
    return report


# Learning rate and weight decay of the optimizer param group holding each parameter, by id().
_Settings = dict[int, tuple[float, float | None]]


def _optimizer_settings(optimizer: Any) -> _Settings:
    param_groups = getattr(optimizer, "param_groups", None)
    if not isinstance(param_groups, list):
        raise TypeError(
            f"optimizer={optimizer!r} has no param_groups list. Pass a torch.optim.Optimizer, "
            "such as torch.optim.AdamW(finetunekit.param_groups(model, lr))."
        )

    settings: _Settings = {}
    for param_group in param_groups:
        lr = _as_float(param_group.get("lr"))
        weight_decay = param_group.get("weight_decay")
        entry = (lr, None if weight_decay is None else _as_float(weight_decay))
        for param in param_group["params"]:
            settings[id(param)] = entry
    return settings


def _as_float(value: Any) -> float:
    # torch optimizers also accept a tensor learning rate, which float() converts.
    return float(value) if value is not None else float("nan")


def _row(index: int, group: LayerGroup, locked: list[str], settings: _Settings | None) -> GroupRow:
    num_params = num_trainable = 0
    for param in group.parameters():
        num_params += param.numel()
        if param.requires_grad:
            num_trainable += param.numel()

    lrs: list[float] = []
    weight_decays: list[float | None] = []
    if settings is not None:
        for param in group.parameters():
            entry = settings.get(id(param))
            if entry is None:
                continue
            if entry[0] not in lrs:
                lrs.append(entry[0])
            if entry[1] not in weight_decays:
                weight_decays.append(entry[1])

    return GroupRow(
        index=index,
        name=group.name,
        modules=tuple(name for name, _ in group.modules),
        num_params=num_params,
        num_trainable=num_trainable,
        locked_norms=tuple(locked),
        tied=tuple(group.tied),
        is_head=group.is_head,
        lrs=tuple(lrs),
        weight_decays=tuple(weight_decays),
    )


def _locked_norms_by_group(model: nn.Module, groups: Sequence[LayerGroup]) -> list[list[str]]:
    """Return, per group, the names of its normalization layers whose statistics are locked.

    A layer with parameters belongs to the group that owns its weight. A layer without
    parameters (``affine=False``) belongs to the group that lists its nearest ancestor,
    so a container on the root module does not claim the layers of the later groups.
    """
    result: list[list[str]] = [[] for _ in groups]
    locked = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _NormBase) and getattr(module, FROZEN_STATS, False)
    ]
    if not locked:
        return result

    group_of_param = {id(p): index for index, group in enumerate(groups) for p in group.parameters()}
    group_of_module = {name: index for index, group in enumerate(groups) for name, _ in group.modules}
    for name, module in locked:
        own = next(module.parameters(recurse=False), None)
        index = group_of_param.get(id(own)) if own is not None else _nearest_listed(name, group_of_module)
        if index is not None:
            result[index].append(name)
    return result


def _nearest_listed(name: str, group_of_module: dict[str, int]) -> int | None:
    while True:
        if name in group_of_module:
            return group_of_module[name]
        if not name:
            return None
        name = name.rpartition(".")[0]


def _frozen_in_optimizer(model: nn.Module, settings: _Settings) -> tuple[str, ...]:
    """Return the names of frozen parameters that some param group contains."""
    return tuple(name for name, p in named_parameters_once(model) if not p.requires_grad and id(p) in settings)


def _format_numbers(values: Sequence[float | None]) -> str:
    if not values:
        return "-"
    return ", ".join("none" if value is None else f"{value:g}" for value in values)


def _align(cells: list[str], widths: list[int], header: list[str]) -> str:
    padded = [
        cell.rjust(width) if name in _NUMERIC_COLUMNS else cell.ljust(width)
        for cell, width, name in zip(cells, widths, header)
    ]
    return "  ".join(padded).rstrip()


def _html_cell(shortened: str, full: str, column: str) -> str:
    align = ' style="text-align:right"' if column in _NUMERIC_COLUMNS else ""
    title = f' title="{html.escape(full)}"' if full != shortened else ""
    return f"<td{align}{title}>{html.escape(shortened)}</td>"
