"""Export a fine-tuned model for inference, loadable with plain torch or transformers.

:func:`export_model` folds LoRA adapters into the base weights and removes the forward
pre-hooks and attributes with which finetunekit locks frozen BatchNorm layers in eval
mode. It writes the weights as safetensors, through ``save_pretrained`` for a Hugging
Face model. With ``example_input`` it also writes a ``torch.export`` program, which runs
the model's forward pass without its Python class.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._norms import FROZEN_STATS, POLICY, _keep_eval
from .heads import TokenPooler

__all__ = ["export_model"]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
PROGRAM_FILE = "model.pt2"


def export_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    example_input: Any = None,
    inplace: bool = False,
) -> nn.Module:
    """Write ``model`` to the directory ``path`` for inference without finetunekit.

    The exported model is in eval mode, has its LoRA adapters merged into the base
    weights (through :func:`finetunekit.lora.merge_lora`, or ``merge_and_unload`` for a
    ``PeftModel`` from ``peft.get_peft_model``, which is replaced by its base model), and
    carries none of the
    forward pre-hooks and attributes with which finetunekit keeps frozen BatchNorm layers
    in eval mode. The files written are:

    - a Hugging Face model (one with ``save_pretrained`` and a ``config``):
      ``save_pretrained(path)``, that is ``config.json`` and ``model.safetensors``, which
      ``AutoModelFor<Task>.from_pretrained(path)`` reloads;
    - any other model: ``model.safetensors`` with its state dict, which
      ``model.load_state_dict(safetensors.torch.load_file(...))`` loads into a model
      built as before the fine-tuning (with the replaced head);
    - with ``example_input``: ``model.pt2``, a ``torch.export`` program that
      ``torch.export.load(path).module()`` runs with plain torch. Every input dimension
      is exported as dynamic where the model allows it, so other batch sizes (and, for
      text, other sequence lengths) work.

    A BERT-style model whose pooler :func:`finetunekit.replace_head` replaced with
    ``pooling="cls"`` or ``"mean"`` has no equivalent in transformers' classes, which
    would reload it with a new, random pooler. Such a model needs ``example_input``; the
    program in ``model.pt2`` keeps the pooling, and no ``save_pretrained`` files are
    written.

    Args:
        model: The fine-tuned model.
        path: Directory to write to; created when missing.
        example_input: Inputs for one forward pass, used to trace the ``torch.export``
            program: a tensor, a tuple of positional arguments, or a dict of keyword
            arguments (such as a tokenizer's output without ``labels``).
        inplace: Change ``model`` itself instead of a copy. Saves memory for a large
            model, but the model then has its adapters merged and is in eval mode.

    Returns:
        The exported model: a copy of ``model``, or ``model`` itself with ``inplace=True``.

    Raises:
        ValueError: If the model uses finetunekit's ``pooling="cls"``/``"mean"`` head and
            ``example_input`` is None, or ``path`` is an existing file.
        TypeError: If ``example_input`` is of an unsupported type.

    Example:
        >>> exported = export_model(model, "out", example_input=torch.randn(1, 3, 224, 224))
        >>> reloaded = torch.export.load("out/model.pt2").module()
        >>> torch.equal(reloaded(x), exported(x))
        True
    """
    directory = Path(path)
    if directory.is_file():
        raise ValueError(f"path={str(path)!r} is a file; export_model writes several files, so pass a directory.")
    poolers = [name for name, module in model.named_modules() if isinstance(module, TokenPooler)]
    is_hf = hasattr(model, "save_pretrained") and hasattr(model, "config")
    if poolers and is_hf and example_input is None:
        raise ValueError(
            f"{type(model).__name__} pools tokens with finetunekit's TokenPooler at {poolers[0]!r}, which "
            "transformers would reload as a new, random pooler. Pass example_input (for example the "
            "tokenizer's output for one batch) to export a torch.export program that keeps the pooling."
        )

    exported = model if inplace else copy.deepcopy(model)
    if type(exported).__module__.startswith("peft.") and hasattr(exported, "merge_and_unload"):
        # A PeftModel from peft.get_peft_model: its save_pretrained would write the adapters only.
        exported = exported.merge_and_unload()
        is_hf = hasattr(exported, "save_pretrained") and hasattr(exported, "config")
    _merge_adapters(exported)
    removed = _remove_norm_locks(exported)
    exported.eval()
    directory.mkdir(parents=True, exist_ok=True)

    if is_hf and not poolers:
        exported.save_pretrained(directory)
    else:
        from safetensors.torch import save_model

        save_model(exported, str(directory / WEIGHTS_FILE))
    if example_input is not None:
        _save_program(exported, example_input, directory / PROGRAM_FILE)

    logger.info(
        "exported %s to %s (%s%s); removed %d BatchNorm eval locks",
        type(exported).__name__,
        directory,
        "save_pretrained" if is_hf and not poolers else WEIGHTS_FILE,
        f" and {PROGRAM_FILE}" if example_input is not None else "",
        removed,
    )
    return exported


def _merge_adapters(model: nn.Module) -> None:
    """Merge LoRA layers through finetunekit.lora when the model has any; skip otherwise."""
    if not any(type(m).__module__.startswith("peft.") for m in model.modules()):
        return
    try:
        lora = importlib.import_module("finetunekit.lora")
    except ImportError:
        logger.info("finetunekit.lora is not available, so LoRA layers are exported unmerged")
        return
    lora.merge_lora(model)


def _remove_norm_locks(model: nn.Module) -> int:
    """Delete the BatchNorm eval-lock pre-hooks and the attributes set by finetunekit's freezing."""
    removed = 0
    for module in model.modules():
        for hook_id, hook in list(module._forward_pre_hooks.items()):
            if hook is _keep_eval:
                del module._forward_pre_hooks[hook_id]
                removed += 1
        for attribute in (FROZEN_STATS, POLICY):
            if attribute in module.__dict__:
                delattr(module, attribute)
    return removed


def _save_program(model: nn.Module, example_input: Any, path: Path) -> None:
    from torch.export import Dim
    from torch.utils._pytree import tree_map_only

    device = next(model.parameters()).device
    if isinstance(example_input, torch.Tensor):
        args, kwargs = (example_input,), {}
    elif isinstance(example_input, tuple):
        args, kwargs = example_input, {}
    elif isinstance(example_input, dict):
        args, kwargs = (), {k: v for k, v in example_input.items() if k != "labels"}
    else:
        raise TypeError(
            f"example_input is a {type(example_input).__name__}; pass a tensor, a tuple of positional "
            "arguments or a dict of keyword arguments."
        )
    args, kwargs = tree_map_only(torch.Tensor, lambda t: t.to(device), (args, kwargs))

    def dynamic(tensor: torch.Tensor) -> dict[int, Any]:
        return {dim: Dim.AUTO for dim in range(tensor.dim())}

    shapes = tree_map_only(torch.Tensor, dynamic, kwargs if kwargs else args)
    with torch.no_grad():
        program = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=shapes)
    torch.export.save(program, str(path))
