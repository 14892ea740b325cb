"""Find and replace the output layer (the head) of a model."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn

from .errors import HeadNotFoundError

__all__ = ["TokenPooler", "find_head", "replace_head"]

logger = logging.getLogger(__name__)

# Attribute names under which torchvision, timm and Hugging Face models keep their head,
# tried in this order. A container found here is searched for its last output layer, so
# ``classifier`` covers both MobileNet's ``classifier[1]`` and RoBERTa's ``classifier.out_proj``.
_HEAD_ATTRIBUTES = ("classifier", "fc", "heads", "head", "score", "lm_head", "last_linear")

Pooling = Literal["pooler", "cls", "mean"]


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """Find the output layer of ``model``.

    The head is looked up under the usual attribute names (``classifier``, ``fc``,
    ``heads``, ``head``, ``score``, ``lm_head``, ``last_linear``); inside such a container
    the last ``nn.Linear`` (or 1x1 ``nn.Conv2d``, as in SqueezeNet) is the output layer.
    A model with none of these attributes falls back to its last child with parameters,
    when that child is, or ends in, a linear layer. The model is not modified.

    Args:
        model: Any module.

    Returns:
        The head's qualified name, as in ``model.named_modules()``, and the module.

    Raises:
        HeadNotFoundError: If no output layer can be recognised, for example in a bare
            Hugging Face encoder loaded with ``AutoModel``, or in a torchvision model
            whose ``fc`` was set to ``nn.Identity()``.

    Example:
        >>> import torchvision
        >>> find_head(torchvision.models.mobilenet_v2(weights=None))
        ('classifier.1', Linear(in_features=1280, out_features=1000, bias=True))
    """
    name = _find_head_name(model)
    if name is None:
        raise HeadNotFoundError(_no_head_message(model))
    return name, model.get_submodule(name)


def replace_head(
    model: nn.Module,
    num_classes: int | nn.Module,
    *,
    head: str | None = None,
    pooling: Pooling | None = None,
) -> nn.Module:
    """Replace the output layer of ``model`` in place and return the new layer.

    Only the output layer itself is swapped, so a dropout or hidden layer in front of it
    (MobileNetV2's ``classifier[0]``, RoBERTa's ``classifier.dense``) stays. The new layer
    is created on the old layer's device and dtype with the same bias setting. Attributes
    that record the class count (``model.num_classes``, ``model.num_labels`` and a Hugging
    Face ``config.num_labels``) are updated. Setting ``out_features`` on the existing layer
    does not resize its weight, which is why this function builds a new layer.

    Args:
        model: The model to change. Modified in place.
        num_classes: Number of output classes, or a ready module to use as the head.
        head: Qualified name of the output layer, when :func:`find_head` does not find it.
        pooling: For Hugging Face encoders with a ``pooler`` (the BERT family), how the
            token states become one vector: ``"pooler"`` keeps the pretrained pooler,
            ``"cls"`` takes the first token's state, ``"mean"`` averages the states of the
            tokens that ``attention_mask`` marks as real. ``"cls"`` and ``"mean"`` drop the
            pooler's parameters. ``None`` leaves the pooling as it is.

    Returns:
        The new head module, already attached to ``model``.

    Raises:
        HeadNotFoundError: If ``head`` is None and no output layer can be recognised.
        TypeError: If ``num_classes`` is neither an int nor a module.
        ValueError: If ``num_classes`` is not a positive integer, ``head`` names no
            module, or ``pooling`` is not one of the values above.
        NotImplementedError: If ``pooling`` is given for a model without a BERT-style
            pooler, or an int ``num_classes`` meets an output layer that is neither
            ``nn.Linear`` nor ``nn.Conv2d``.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(weights=None)
        >>> replace_head(model, 5)
        Linear(in_features=512, out_features=5, bias=True)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 5])
    """
    # Every check runs before the first change, so a call that raises leaves the model as it was.
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, nn.Module)):
        raise TypeError(
            f"num_classes={num_classes!r} is neither an int nor an nn.Module. "
            "Pass the number of classes, or a module to use as the head."
        )
    if isinstance(num_classes, int) and num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer.")
    if pooling not in (None, "pooler", "cls", "mean"):
        raise ValueError(f"pooling={pooling!r} is not one of None, 'pooler', 'cls' or 'mean'.")

    head_name = head if head is not None else find_head(model)[0]
    old = _get_module(model, head_name)
    base = _pooling_base(model, pooling) if pooling is not None else None

    new = _build_head(old, num_classes)
    parent_name, _, child_name = head_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)
    if isinstance(num_classes, int):
        _record_num_classes(model, num_classes)
    if base is not None:
        _set_pooling(base, pooling)

    logger.info("replaced head %r: %s -> %s", head_name, _describe(old), _describe(new))
    return new


class TokenPooler(nn.Module):
    """Pool a transformer's token states into one vector per sequence, without parameters.

    It takes the place of a BERT-style ``pooler``. The attention mask reaches it through a
    forward pre-hook on the encoder, because the encoder calls its pooler with the hidden
    states alone.

    Args:
        mode: ``"cls"`` for the first token's state, ``"mean"`` for the mean over the tokens
            that the attention mask marks as real (all tokens when no mask is given).
    """

    def __init__(self, mode: Literal["cls", "mean"]) -> None:
        super().__init__()
        self.mode = mode
        self._mask: torch.Tensor | None = None

    def capture_mask(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Store the ``attention_mask`` of the encoder call that is about to run."""
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        self._mask = mask

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask, self._mask = self._mask, None
        if self.mode == "cls":
            return hidden_states[:, 0]
        if mask is None or mask.shape != hidden_states.shape[:2]:
            return hidden_states.mean(dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def _find_head_name(model: nn.Module) -> str | None:
    if _is_bare_hf_model(model):
        return None

    children = dict(model.named_children())
    for attribute in _HEAD_ATTRIBUTES:
        if attribute in children:
            found = _last_output_layer(children[attribute], attribute)
            # A known head attribute holding no output layer (``fc = nn.Identity()``) means
            # the head was removed on purpose; searching the body would pick a wrong layer.
            return found

    # Hugging Face language models name their output layer through get_output_embeddings().
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if isinstance(output, nn.Module):
        for name, module in model.named_modules():
            if module is output:
                return name

    for name, child in reversed(children.items()):
        if not any(True for _ in child.parameters()):
            continue
        if isinstance(child, (nn.Sequential, nn.Linear)):
            return _last_output_layer(child, name)
        return None
    return None


def _last_output_layer(module: nn.Module, prefix: str) -> str | None:
    """Return the qualified name of the last linear layer in ``module``, else of its last 1x1 conv."""
    linear = conv = None
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, nn.Linear):
            linear = name
        elif isinstance(sub, nn.Conv2d) and sub.kernel_size == (1, 1):
            conv = name
    return linear if linear is not None else conv


def _is_bare_hf_model(model: nn.Module) -> bool:
    # A Hugging Face base model (``AutoModel``) is its own ``base_model``; task models wrap one.
    return hasattr(model, "base_model_prefix") and getattr(model, "base_model", None) is model


def _no_head_message(model: nn.Module) -> str:
    name = type(model).__name__
    if _is_bare_hf_model(model):
        return (
            f"{name} is a Hugging Face base model without a task head. Load it with a task "
            "class such as AutoModelForSequenceClassification.from_pretrained(path, num_labels=N), "
            "or pass head='<module name>'."
        )
    children = [n for n, _ in model.named_children()]
    return (
        f"Found no output layer in {name}: it has no child named one of {list(_HEAD_ATTRIBUTES)} "
        f"holding an nn.Linear or 1x1 nn.Conv2d, and its last child is not one (children: {children}). "
        "Pass head='<module name>' with a name from [n for n, _ in model.named_modules()]."
    )


def _get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(
            f"head={name!r} names no module of {type(model).__name__}. "
            f"Pass one of the names in model.named_modules(), for example {names[-3:]}."
        ) from None


def _build_head(old: nn.Module, num_classes: int | nn.Module) -> nn.Module:
    reference = next(old.parameters(), None)
    if isinstance(num_classes, nn.Module):
        if reference is None:
            return num_classes
        return num_classes.to(device=reference.device, dtype=reference.dtype)

    if isinstance(old, nn.Linear):
        return nn.Linear(
            old.in_features,
            num_classes,
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
    if isinstance(old, nn.Conv2d):
        return nn.Conv2d(
            old.in_channels,
            num_classes,
            kernel_size=old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
    raise NotImplementedError(
        f"Cannot build a head with num_classes={num_classes} in place of {type(old).__name__}; "
        "only nn.Linear and nn.Conv2d output layers are rebuilt automatically. "
        "Pass a ready module as num_classes instead."
    )


def _record_num_classes(model: nn.Module, num_classes: int) -> None:
    for attribute in ("num_classes", "num_labels"):
        value = getattr(model, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(model, attribute, num_classes)

    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "num_labels", None), int):
        # The config setter also rebuilds id2label and label2id for the new count.
        config.num_labels = num_classes


def _pooling_base(model: nn.Module, pooling: Pooling) -> nn.Module:
    base = getattr(model, "base_model", None)
    # RoBERTa-style models keep a `pooler` attribute set to None because their classifier
    # reads the first token itself, so a pooler put there would never run.
    if base is None or getattr(base, "pooler", None) is None:
        raise NotImplementedError(
            f"pooling={pooling!r} needs a Hugging Face encoder with a BERT-style `pooler` "
            f"(BERT, MiniLM, ...) whose classifier reads the pooled output; {type(model).__name__} has "
            "none. Pass pooling=None."
        )
    if pooling == "pooler" and isinstance(base.pooler, TokenPooler):
        raise ValueError(
            f"pooling='pooler' needs the pretrained pooler, but {type(base).__name__}.pooler "
            f"is {base.pooler!r}. Reload the model, or pass pooling='cls' or 'mean'."
        )
    return base


def _set_pooling(base: nn.Module, pooling: Pooling | None) -> None:
    _remove_mask_hooks(base)
    if pooling == "pooler":
        return

    device = next(base.parameters()).device
    pooler = TokenPooler(pooling).to(device)
    base.pooler = pooler
    base.register_forward_pre_hook(pooler.capture_mask, with_kwargs=True)


def _remove_mask_hooks(base: nn.Module) -> None:
    """Remove the mask hooks of a ``TokenPooler`` set by an earlier call."""
    for hook_id, hook in list(base._forward_pre_hooks.items()):
        if isinstance(getattr(hook, "__self__", None), TokenPooler):
            del base._forward_pre_hooks[hook_id]
            base._forward_pre_hooks_with_kwargs.pop(hook_id, None)


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}->{module.out_features})"
    if isinstance(module, nn.Conv2d):
        return f"Conv2d({module.in_channels}->{module.out_channels})"
    return type(module).__name__
