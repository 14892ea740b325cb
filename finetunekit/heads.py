"""Find and replace the output layer (the head) of a model."""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any, Literal

import torch
from torch import nn

from .errors import FinetuneKitWarning, HeadNotFoundError

__all__ = ["TokenPooler", "find_head", "replace_head"]

logger = logging.getLogger(__name__)

# Attribute names under which torchvision, timm and Hugging Face models keep their head,
# tried in this order. A container found here is searched for its last output layer, so
# ``classifier`` covers both MobileNet's ``classifier[1]`` and RoBERTa's ``classifier.out_proj``.
_HEAD_ATTRIBUTES = (
    "classifier",
    "fc",
    "heads",
    "head",
    "score",
    "lm_head",
    "last_linear",
    "classification_head",
    "qa_outputs",
)

# Hugging Face names its task classes "<Arch>For<Task>" (BertForSequenceClassification) or
# "<Arch>LMHeadModel" (GPT2LMHeadModel). The capital after "For" keeps MaskFormerModel out.
_HF_TASK_CLASS_NAME = re.compile(r"For[A-Z]|LMHead")

# How many candidate layers a HeadNotFoundError lists.
_MAX_CANDIDATES = 5

Pooling = Literal["pooler", "cls", "mean"]


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """Find the output layer of ``model``.

    The head is looked up under the usual attribute names (``classifier``, ``fc``,
    ``heads``, ``head``, ``score``, ``lm_head``, ``last_linear``, ``classification_head``,
    ``qa_outputs``). Inside such a container the last ``nn.Linear`` (or 1x1 ``nn.Conv2d``,
    as in SqueezeNet) is the output layer. A model with none of these attributes falls back
    to its last child with parameters, when that child is, or ends in, a linear layer.
    Auxiliary heads, such as GoogLeNet's ``aux1.fc2``, are never returned. The model is
    not modified.

    Args:
        model: Any module.

    Returns:
        The head's qualified name, as in ``model.named_modules()``, and the module.

    Raises:
        HeadNotFoundError: If no output layer can be recognised, for example in a bare
            Hugging Face encoder loaded with ``AutoModel``, or in a torchvision model
            whose ``fc`` was set to ``nn.Identity()``. The message lists the model's last
            linear and 1x1 convolution layers as candidates for ``head=``.

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

    With an int ``num_classes``, the output layers of auxiliary heads (direct children
    whose name starts with ``aux``: GoogLeNet's ``aux1.fc2`` and ``aux2.fc2``, Inception
    v3's ``AuxLogits.fc``) are replaced too, with the same class count, so training with
    ``aux_logits=True`` works. With a ready module they are left as they are, with a
    :class:`FinetuneKitWarning`.

    When the old head shared its weight with another layer, as GPT-2's ``lm_head`` shares
    the input embeddings' weight, the new head gets a weight of its own. A Hugging Face
    ``config.tie_word_embeddings`` is then set to False, so that ``tie_weights()``,
    ``save_pretrained`` and ``from_pretrained`` do not tie the head back.

    Args:
        model: The model to change. Modified in place.
        num_classes: Number of output classes, or a ready module to use as the head.
        head: Qualified name of the output layer, when :func:`find_head` does not find it.
        pooling: How the token states become one vector, for Hugging Face encoders with
            a ``pooler`` (the BERT family). ``"pooler"`` keeps the pretrained pooler.
            ``"cls"`` takes the first token's state. ``"mean"`` averages the states of the
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

    Warns:
        FinetuneKitWarning: If ``num_classes`` is a module and the model has auxiliary
            heads, which keep their old class count.

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
    auxiliary = {name: model.get_submodule(name) for name in _auxiliary_head_names(model) if name != head_name}
    tied = _shares_parameters(model, head_name)

    new = _build_head(old, num_classes)
    new_auxiliary: dict[str, nn.Module] = {}
    if isinstance(num_classes, int):
        new_auxiliary = {name: _build_head(layer, num_classes) for name, layer in auxiliary.items()}
    elif auxiliary:
        warnings.warn(
            f"replace_head left the auxiliary heads {list(auxiliary)} of {type(model).__name__} "
            "unchanged because num_classes is a module; in training mode they still return logits "
            "with the old class count. Replace them yourself, or pass num_classes as an int.",
            FinetuneKitWarning,
            stacklevel=2,
        )

    _set_submodule(model, head_name, new)
    for name, layer in new_auxiliary.items():
        _set_submodule(model, name, layer)
    if isinstance(num_classes, int):
        _record_num_classes(model, num_classes)
    if tied:
        _untie_word_embeddings(model)
    if base is not None:
        _set_pooling(base, pooling)

    logger.info(
        "replaced head %r: %s -> %s%s",
        head_name,
        _describe(old),
        _describe(new),
        f"; also auxiliary heads {list(new_auxiliary)}" if new_auxiliary else "",
    )
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


def _auxiliary_head_names(model: nn.Module) -> list[str]:
    """Return the qualified names of the output layers of ``model``'s auxiliary heads.

    An auxiliary head is a direct child whose name starts with ``aux`` (any case), such as
    GoogLeNet's ``aux1`` and ``aux2`` or Inception v3's ``AuxLogits``. Its output layer is
    found as in the main head: the last ``nn.Linear``, else the last 1x1 ``nn.Conv2d``.
    Children with neither are left out, and so is the main head. The names are in
    registration order, for example ``['aux1.fc2', 'aux2.fc2']``.
    """
    main = _find_head_name(model)
    names = []
    for child_name, child in model.named_children():
        if not child_name.lower().startswith("aux"):
            continue
        name = _last_output_layer(child, child_name)
        if name is not None and name != main:
            names.append(name)
    return names


def _is_bare_hf_model(model: nn.Module) -> bool:
    # A Hugging Face base model (``AutoModel``) is its own ``base_model``, and task models
    # usually wrap one. T5ForConditionalGeneration is its own ``base_model`` too, because it
    # has no attribute named after its ``base_model_prefix``, so the class name decides.
    if not hasattr(model, "base_model_prefix") or getattr(model, "base_model", None) is not model:
        return False
    return _HF_TASK_CLASS_NAME.search(type(model).__name__) is None


def _no_head_message(model: nn.Module) -> str:
    name = type(model).__name__
    if _is_bare_hf_model(model):
        return (
            f"{name} is a Hugging Face base model without a task head. Load it with a task "
            "class such as AutoModelForSequenceClassification.from_pretrained(path, num_labels=N), "
            "or pass head='<module name>'."
        )

    children = dict(model.named_children())
    emptied = next((attribute for attribute in _HEAD_ATTRIBUTES if attribute in children), None)
    if emptied is not None:
        reason = (
            f"its child {emptied!r} is {type(children[emptied]).__name__} and contains no nn.Linear or "
            f"1x1 nn.Conv2d, so the head looks removed. To add one, pass a ready layer: "
            f"replace_head(model, nn.Linear(in_features, num_classes), head={emptied!r}). "
        )
    else:
        reason = (
            f"it has no child named one of {list(_HEAD_ATTRIBUTES)}, and its last child with parameters "
            f"is not an nn.Linear or an nn.Sequential containing one (children: {list(children)}). "
        )

    candidates = _candidate_head_names(model)
    if not candidates:
        return (
            f"Found no output layer in {name}: {reason}It contains no nn.Linear or 1x1 nn.Conv2d. "
            "Pass head='<module name>' with a name from [n for n, _ in model.named_modules()]."
        )
    return (
        f"Found no output layer in {name}: {reason}Its last nn.Linear and 1x1 nn.Conv2d layers, in "
        f"registration order, are {candidates}. If one of them is the output layer, pass its name, "
        f"for example head={candidates[-1]!r}."
    )


def _candidate_head_names(model: nn.Module) -> list[str]:
    """Return the names of the last few linear and 1x1 convolution layers, in registration order."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))
    ]
    return names[-_MAX_CANDIDATES:]


def _head_names(model: nn.Module) -> list[str]:
    """Return the qualified names of the head and the auxiliary heads' output layers."""
    main = _find_head_name(model)
    return ([main] if main is not None else []) + _auxiliary_head_names(model)


def _get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(
            f"head={name!r} names no module of {type(model).__name__}. "
            f"Pass one of the names in model.named_modules(), for example {names[-3:]}."
        ) from None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def _shares_parameters(model: nn.Module, head_name: str) -> bool:
    """Return whether a parameter of the head is also registered outside it (a tied weight)."""
    head_params = {id(p) for p in model.get_submodule(head_name).parameters()}
    prefix = f"{head_name}."
    return any(
        id(param) in head_params
        for name, param in model.named_parameters(remove_duplicate=False)
        if not name.startswith(prefix)
    )


def _untie_word_embeddings(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", None) is True:
        # transformers re-ties the output layer to the input embeddings in tie_weights(),
        # which save_pretrained and from_pretrained call, and that would undo the replacement.
        config.tie_word_embeddings = False


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
