"""Exception and warning classes raised by finetunekit.

Each exception also subclasses the builtin it stands for, so ``except ValueError``
keeps working for callers who do not import finetunekit's classes. Plain ``TypeError``,
``ValueError`` and ``IndexError`` are still raised for wrongly typed or out-of-range
arguments that need no class of their own.
"""

from __future__ import annotations

__all__ = [
    "FinetuneKitError",
    "FinetuneKitWarning",
    "HeadNotFoundError",
    "NoMatchingTargetError",
    "NoParametersError",
]


class FinetuneKitError(Exception):
    """Base class of finetunekit's own exceptions."""


class FinetuneKitWarning(UserWarning):
    """Category of every warning finetunekit emits, so users can filter them in one line."""


class NoMatchingTargetError(FinetuneKitError, ValueError):
    """A freeze target, group name or pattern matched no parameter of the model."""


class HeadNotFoundError(FinetuneKitError, ValueError):
    """The model has no output layer that finetunekit can recognise."""


class NoParametersError(FinetuneKitError, ValueError):
    """The model, or the requested selection, contains no parameters."""
