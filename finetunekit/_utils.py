"""Private helpers shared by the building blocks."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Sequence

from torch import nn


def named_parameters_once(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield each parameter of ``model`` once, under the first name it is registered with.

    ``nn.Module.named_parameters`` already skips repeats of a tied parameter; this wrapper
    exists so every building block agrees on that rule and on the name it keeps.
    """
    yield from model.named_parameters(remove_duplicate=True)


def close_matches(word: str, candidates: Iterable[str], limit: int = 3) -> list[str]:
    """Return up to ``limit`` names from ``candidates`` that look like ``word``."""
    unique = list(dict.fromkeys(c for c in candidates if c))
    matches = difflib.get_close_matches(word, unique, n=limit, cutoff=0.5)
    if matches:
        return matches
    # A short target such as "layer" is far from "layer4.1.conv2" by ratio, so fall back
    # to the names that contain it.
    return [c for c in unique if word in c][:limit]


def format_suggestions(names: list[str]) -> str:
    """Format close matches for an error message."""
    if not names:
        return ""
    return " Did you mean " + " or ".join(repr(n) for n in names) + "?"


def join_name(prefix: str, name: str) -> str:
    """Join a parent's qualified name and a child's name as ``named_modules`` does."""
    return f"{prefix}.{name}" if prefix else name


def shorten_names(names: Sequence[str], limit: int) -> str:
    """Join up to ``limit`` names with commas, counting the rest as ``+N more``."""
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" +{len(names) - limit} more"
