"""Load a pretrained checkpoint into a model whose head was replaced."""

from __future__ import annotations

import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import FinetuneKitWarning
from .heads import _head_names

__all__ = ["load_pretrained"]

logger = logging.getLogger(__name__)

# How many keys a load_pretrained error or warning lists before "and N more".
_MAX_LISTED_KEYS = 10

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def load_pretrained(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike[str],
    *,
    strict: bool = True,
) -> list[str]:
    """Load a pretrained checkpoint into a model whose head was replaced.

    Every tensor of the checkpoint is copied into ``model`` in place, except the keys of
    the head and of the auxiliary heads (see :func:`finetunekit.replace_head`) whose shapes no longer
    match the model's. Those keep their new initialization, and one
    :class:`FinetuneKitWarning` lists them. Head keys whose shapes still match are loaded.
    Any other difference raises before the model is changed: a shape mismatch outside the
    head, a model key that the checkpoint lacks (missing), or a checkpoint key that the
    model lacks (unexpected). A missing key is accepted when the checkpoint has another
    key for the same tensor, as for tied weights that ``safetensors`` files store once.

    Args:
        model: The model to load into, usually after :func:`finetunekit.replace_head`. Modified in place.
        state_dict: A state dict, or the path to a file containing one: ``.pt``, ``.pth`` or
            ``.bin`` (read with ``torch.load(path, map_location="cpu", weights_only=True)``)
            or ``.safetensors`` (read with ``safetensors.torch.load_file``).
        strict: If True, missing and unexpected keys raise ``ValueError``. If False, the
            checkpoint's unexpected keys are ignored and the missing keys keep their current
            values; both are logged at INFO. A shape mismatch outside the head raises either way.

    Returns:
        The skipped head keys, in the model's state-dict order; empty when every key loaded.

    Raises:
        TypeError: If ``state_dict`` is neither a mapping nor a path, or a value in it is
            not a tensor (for example a training checkpoint that contains the state dict
            under a key of its own).
        ValueError: If the file suffix is not one of those above, a tensor outside the head
            has a different shape, or, with ``strict=True``, keys are missing or unexpected.
            The message names the keys.
        FileNotFoundError: If ``state_dict`` is a path that does not exist.

    Warns:
        FinetuneKitWarning: If head keys were skipped, naming them and both shapes.

    Example:
        >>> import torchvision
        >>> pretrained = torchvision.models.resnet18(weights=None).state_dict()
        >>> model = torchvision.models.resnet18(weights=None)
        >>> replace_head(model, 5)
        Linear(in_features=512, out_features=5, bias=True)
        >>> load_pretrained(model, pretrained)  # warns that fc.weight and fc.bias were skipped
        ['fc.weight', 'fc.bias']
    """
    checkpoint = _read_state_dict(state_dict)
    expected = model.state_dict(keep_vars=True)
    head_names = _head_names(model)
    head_prefixes = tuple(f"{name}." for name in head_names)

    # Every check runs before the first copy, so a call that raises leaves the model as it was.
    skipped: list[str] = []
    mismatched: list[str] = []
    for key, tensor in expected.items():
        if key not in checkpoint or checkpoint[key].shape == tensor.shape:
            continue
        if key.startswith(head_prefixes):
            skipped.append(key)
        else:
            mismatched.append(key)
    if mismatched:
        raise ValueError(_mismatch_message(model, checkpoint, expected, mismatched, head_names))

    missing = _missing_keys(expected, checkpoint)
    unexpected = [key for key in checkpoint if key not in expected]
    if strict and (missing or unexpected):
        raise ValueError(_missing_message(model, missing, unexpected, head_prefixes))

    skipped_keys = set(skipped)
    filtered = OrderedDict((key, value) for key, value in checkpoint.items() if key not in skipped_keys)
    metadata = getattr(checkpoint, "_metadata", None)
    if metadata is not None:
        # Modules read their state-dict version from here, as in nn.Module.load_state_dict.
        filtered._metadata = metadata  # type: ignore[attr-defined]
    model.load_state_dict(filtered, strict=False)

    if skipped:
        warnings.warn(_skipped_message(model, checkpoint, expected, skipped), FinetuneKitWarning, stacklevel=2)
    if missing or unexpected:
        logger.info(
            "strict=False: left %d missing keys at their current values (%s) and ignored %d unexpected keys (%s)",
            len(missing),
            _format_keys(missing),
            len(unexpected),
            _format_keys(unexpected),
        )
    logger.info(
        "loaded %d tensors into %s and skipped %d head keys whose shape changed",
        len(filtered) - len(unexpected),
        type(model).__name__,
        len(skipped),
    )
    return skipped


def _read_state_dict(source: object) -> Mapping[str, torch.Tensor]:
    """Return ``source`` as a state dict, reading it from a file when it is a path."""
    if isinstance(source, (str, os.PathLike)):
        checkpoint = _load_file(Path(source))
    elif isinstance(source, Mapping):
        checkpoint = source
    else:
        hint = " Pass its .state_dict() instead." if isinstance(source, nn.Module) else ""
        raise TypeError(
            f"state_dict has type {type(source).__name__}, but load_pretrained needs a mapping from "
            f"names to tensors or the path of a .pt, .pth, .bin or .safetensors file.{hint}"
        )

    if not isinstance(checkpoint, Mapping):
        raise TypeError(
            f"The file {str(source)!r} contains an object of type {type(checkpoint).__name__}, not a "
            "state dict. Save the model with torch.save(model.state_dict(), path)."
        )
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(_not_a_tensor_message(checkpoint, key, value))
    return checkpoint


def _load_file(path: Path) -> object:
    suffix = path.suffix.lower()
    if suffix not in (*_TORCH_SUFFIXES, ".safetensors"):
        raise ValueError(
            f"state_dict={str(path)!r} has the suffix {suffix!r}, but load_pretrained reads only "
            ".pt, .pth and .bin files (with torch.load) and .safetensors files. Load the file "
            "yourself and pass the state dict."
        )
    if not path.is_file():
        raise FileNotFoundError(f"state_dict={str(path)!r} is not a file. Check the path.")

    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _not_a_tensor_message(checkpoint: Mapping[str, object], key: str, value: object) -> str:
    nested = [k for k, v in checkpoint.items() if isinstance(v, Mapping)]
    hint = f", for example checkpoint[{nested[0]!r}]" if nested else ""
    return (
        f"state_dict[{key!r}] has type {type(value).__name__}, not a tensor, so this is not a model's "
        f"state dict. If it is a training checkpoint (keys {_format_keys(list(checkpoint))}), pass "
        f"the entry that contains the model's state dict{hint}."
    )


def _missing_keys(expected: Mapping[str, torch.Tensor], checkpoint: Mapping[str, torch.Tensor]) -> list[str]:
    """Return the model keys absent from the checkpoint whose tensor no present key shares."""
    present = {id(tensor) for key, tensor in expected.items() if key in checkpoint}
    return [key for key, tensor in expected.items() if key not in checkpoint and id(tensor) not in present]


def _shape_change(key: str, checkpoint: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    return f"{key} (checkpoint {list(checkpoint[key].shape)}, model {list(expected[key].shape)})"


def _mismatch_message(
    model: nn.Module,
    checkpoint: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    mismatched: list[str],
    head_names: list[str],
) -> str:
    changes = ", ".join(_shape_change(key, checkpoint, expected) for key in mismatched[:_MAX_LISTED_KEYS])
    more = f" and {len(mismatched) - _MAX_LISTED_KEYS} more" if len(mismatched) > _MAX_LISTED_KEYS else ""
    name = type(model).__name__
    if head_names:
        rule = f"Only the keys of the head {head_names} may change shape, because replace_head rebuilds it."
    else:
        rule = (
            f"find_head finds no head in {name}, so every shape must match. If these keys belong to a "
            "head you replaced yourself, remove them from the state dict and pass strict=False."
        )
    return (
        f"Cannot load the checkpoint into {name}: shape mismatch outside the head in "
        f"{_count(len(mismatched), 'tensor')}: {changes}{more}. {rule} The model was not changed. "
        "Check that the checkpoint comes from the same architecture and configuration."
    )


def _missing_message(
    model: nn.Module, missing: list[str], unexpected: list[str], head_prefixes: tuple[str, ...]
) -> str:
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}), in the model but not the checkpoint: {_format_keys(missing)}")
    if unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}), in the checkpoint but not the model: {_format_keys(unexpected)}"
        )
    hint = _prefix_hint(missing, unexpected)
    if missing and not unexpected and all(key.startswith(head_prefixes) for key in missing):
        hint = (
            " Only head keys are missing. A checkpoint of a model with tied embeddings (GPT-2, T5) "
            "stores the output layer once, under the input embeddings, so its head key can be absent."
        )
    return (
        f"Cannot load the checkpoint into {type(model).__name__}: {'; '.join(problems)}.{hint} "
        "The model was not changed. Pass strict=False to load the matching keys, leave the missing "
        "ones at their current values and ignore the unexpected ones."
    )


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Return a sentence naming a key prefix that only one side has, or "" when none is found."""
    if not missing or not unexpected:
        return ""
    for key in missing:
        if key.endswith(f".{unexpected[0]}"):
            prefix = key[: -len(unexpected[0])]
            return f" The model's keys start with {prefix!r} where the checkpoint's do not; add it to each key."
    for key in unexpected:
        if key.endswith(f".{missing[0]}"):
            prefix = key[: -len(missing[0])]
            return (
                f" The checkpoint's keys start with {prefix!r} where the model's do not; remove it from each "
                "key (DistributedDataParallel adds 'module.', torch.compile adds '_orig_mod.')."
            )
    return ""


def _skipped_message(
    model: nn.Module,
    checkpoint: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    skipped: list[str],
) -> str:
    changes = ", ".join(_shape_change(key, checkpoint, expected) for key in skipped)
    return (
        f"load_pretrained skipped {_count(len(skipped), 'head key')} of {type(model).__name__} "
        f"whose shape differs from the checkpoint: {changes}. They keep their new initialization, "
        "so train the head before using the model."
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _format_keys(keys: list[str]) -> str:
    listed = repr(keys[:_MAX_LISTED_KEYS])
    if len(keys) > _MAX_LISTED_KEYS:
        listed += f" and {len(keys) - _MAX_LISTED_KEYS} more"
    return listed
