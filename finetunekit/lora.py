"""LoRA adapters on any module, built on peft: add, merge, save and load them.

The adapters are injected in place with ``peft.inject_adapter_in_model``, so the model
keeps its class, its module names and its head. ``layer_groups``, ``freeze``,
``param_groups``, ``describe`` and the ``Trainer`` therefore work on the result. A LoRA
layer keeps its pretrained layer as ``<name>.base_layer`` and adds ``<name>.lora_A.default``
and ``<name>.lora_B.default``. peft computes the adapter output and merges the weights;
this module picks the targets, sets what trains, and saves what training changed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ._lora_inject import (
    _STATE,
    _adapter_parameters,
    _check_options,
    _inject,
    _lora_layers,
    _LoraState,
    _remove_lora_layers,
    _require_lora_layers,
    _require_peft,
    _require_state,
)
from ._lora_io import (
    _buffer_digests,
    _check_base,
    _check_shapes,
    _check_untracked_training,
    _fingerprint,
    _sample_bytes,  # noqa: F401 (tests/test_lora.py imports it from finetunekit.lora)
    _tensors_to_save,
)
from ._lora_targets import _fan_in_fan_out, _norm_policies, _resolve_targets, _saved_modules
from ._norms import check_policy
from ._utils import named_parameters_once
from .groups import LayerGroup, layer_groups

__all__ = [
    "add_lora",
    "enable_gradient_checkpointing",
    "load_adapter",
    "lora_groups",
    "merge_lora",
    "save_adapter",
    "unmerge_lora",
]

logger = logging.getLogger(__name__)

LoraTarget = str | type[nn.Module] | LayerGroup
"""One LoRA target: a module name, a peft-style name suffix, a glob or ``"re:"`` pattern,
a module class, or a layer group."""

ADAPTER_FILE = "finetunekit_adapter.safetensors"
CONFIG_FILE = "finetunekit_adapter.json"
_FORMAT = "finetunekit-lora"
_FORMAT_VERSION = 1

# Name segments of the two LoRA matrices inside a peft LoRA layer.
_A_SEGMENTS = frozenset({"lora_A", "lora_embedding_A"})
_B_SEGMENTS = frozenset({"lora_B", "lora_embedding_B"})


# --- add_lora -------------------------------------------------------------------------------


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: Literal["auto"] | LoraTarget | Sequence[LoraTarget] = "auto",
    *,
    groups: int | Sequence[int | str] | None = None,
    modules_to_save: Sequence[str] = (),
    train_head: bool | None = None,
    bn: Literal["frozen", "train", "stats"] | None = None,
    use_dora: bool = False,
    use_rslora: bool = False,
    init_lora_weights: bool | str = True,
    **lora_options: Any,
) -> nn.Module:
    """Add LoRA adapters to ``model`` in place, through peft, and freeze the base weights.

    Each targeted layer becomes a peft LoRA layer: its output is the frozen layer's output
    plus ``(alpha / r) * B(A(x))``, where ``A`` maps to ``r`` dimensions and ``B`` maps back
    (``alpha / sqrt(r)`` with ``use_rslora=True``). ``B`` starts at zero, so the model's
    output does not change until training. The model keeps its class and its module names,
    and a LoRA layer keeps the pretrained layer as ``<name>.base_layer``.

    After the call the adapters and the saved modules are trainable and every other
    parameter is frozen, as by :func:`finetunekit.freeze`. The saved modules are the head
    (when ``train_head``) and ``modules_to_save``: they train fully and
    :func:`save_adapter` stores them with the adapters. Normalization layers with running
    statistics follow the BatchNorm policy ``bn``. Checks run before the first change, and
    a failure inside peft removes the adapters again, so a call that raises leaves the
    model as it was.

    Args:
        model: The model to change, in place. The same object is returned.
        r: Rank of the adapters.
        alpha: Scale numerator: the update is multiplied by ``alpha / r``.
        dropout: Dropout probability on the adapter input.
        targets: The layers that get adapters:

            - ``"auto"``: every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and transformers
              ``Conv1D`` outside the head and the saved modules. Grouped convolutions
              (``groups > 1``, such as depthwise ones) are left out, because peft cannot
              merge them.
            - a ``str``: a module's qualified name, a name suffix as in peft
              (``"query"`` matches ``"bert.encoder.layer.0.attention.self.query"``), a glob
              pattern (``"layer4.*"``) or a regular expression after ``"re:"`` that must
              match a whole name. A name or pattern that reaches a container selects the
              supported layers inside it.
            - a module class, such as ``nn.Conv2d``: every layer of that class outside the
              head and the saved modules.
            - a :class:`~finetunekit.LayerGroup`: the supported layers in that group.
            - a list of the above. Each item must select at least one layer.
        groups: Restrict the targets to some layer groups of ``layer_groups(model)``. An
            int ``n`` keeps the groups from index ``n`` on, as in
            :func:`finetunekit.freeze_to`, so ``groups=-3`` is the top two groups below the
            head. A list keeps the groups at those indexes or with those names.
        modules_to_save: Names or patterns of further modules that train fully and are
            saved with the adapters, such as a LayerNorm or an embedding.
        train_head: Whether the head found by :func:`finetunekit.find_head` (and any
            auxiliary head) trains fully and is saved. ``None`` trains it unless it is the
            model's output embedding layer (a language model's ``lm_head``), which is
            pretrained and often tied to the input embeddings.
        bn: BatchNorm policy of the frozen normalization layers with running statistics:
            ``"frozen"`` locks their statistics, ``"train"`` trains their affine parameters
            and statistics, and ``"stats"`` lets the statistics adapt. ``None`` keeps the
            policy an earlier freezing call set, ``"frozen"`` by default. Parameters and
            statistics that can change are saved by :func:`save_adapter`.
        use_dora: Use DoRA, which also learns a magnitude vector per output.
        use_rslora: Scale the update by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        init_lora_weights: peft's initialisation: ``True`` (``B`` at zero), ``False``,
            ``"gaussian"``, ``"orthogonal"``, or one of the options that rewrite the base
            weights (``"pissa"``, ``"olora"``, ...). :func:`save_adapter` rejects a model
            whose base weights changed, so merge and save the whole model after those.
        **lora_options: Other fields of ``peft.LoraConfig``, such as ``rank_pattern`` or
            ``lora_bias``. They must be JSON values for :func:`save_adapter`.

    Returns:
        ``model`` itself, with adapters.

    Raises:
        NoMatchingTargetError: If a target, a name in ``modules_to_save`` or a group in
            ``groups`` matches nothing. The message names it and the closest module names.
        ValueError: If a target selects only layers that LoRA cannot adapt (the message
            lists the supported types), names the head or a saved module, the model already
            has adapters, or ``r``, ``alpha``, ``dropout`` or ``bn`` is out of range.
        TypeError: If a target has an unsupported kind, or ``lora_options`` contains a
            key that ``LoraConfig`` lacks or that add_lora sets itself.
        ImportError: If peft is not installed.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(weights=None)
        >>> replace_head(model, 5)
        Linear(in_features=512, out_features=5, bias=True)
        >>> model = add_lora(model, r=4)
        >>> type(model.layer1[0].conv1).__name__, model.fc.weight.requires_grad
        ('Conv2d', True)
        >>> sum(p.numel() for p in model.parameters() if p.requires_grad)
        157733
    """
    _require_peft()
    if getattr(model, _STATE, None) is not None or _lora_layers(model):
        raise ValueError(
            f"{type(model).__name__} already has LoRA adapters. Call add_lora once per model, or "
            "merge_lora(model) first to fold the adapters into the weights."
        )
    options = _check_options(r, alpha, dropout, use_dora, use_rslora, init_lora_weights, lora_options)
    check_policy(bn)

    saved = _saved_modules(model, modules_to_save, train_head)
    target_names = _resolve_targets(model, targets, groups, saved)
    options["fan_in_fan_out"] = _fan_in_fan_out(model, target_names)
    norm_policies = _norm_policies(model, saved, bn)

    state = _LoraState(
        options=options,
        targets=target_names,
        modules_to_save=saved,
        norm_policies=norm_policies,
        fingerprint="",
        buffer_digests=_buffer_digests(model),
    )
    state.fingerprint = _fingerprint(model, state)
    _inject(model, state, trainable=True)

    trainable = sum(p.numel() for _, p in named_parameters_once(model) if p.requires_grad)
    total = sum(p.numel() for _, p in named_parameters_once(model))
    logger.info(
        "added LoRA (r=%d, alpha=%g) to %d layers of %s; saved modules %s; %s of %s values trainable (%.2f%%)",
        r,
        alpha,
        len(target_names),
        type(model).__name__,
        saved,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return model


# --- merge ----------------------------------------------------------------------------------


def merge_lora(model: nn.Module, *, keep_adapters: bool = False) -> nn.Module:
    """Fold the LoRA updates into the base weights of ``model``, in place.

    By default each LoRA layer is then replaced by its base layer, so the model has no
    adapter modules left and runs as fast as the base model. Every parameter keeps its
    ``requires_grad`` flag, so the base weights stay frozen and the head stays trainable.
    peft does the merging.

    Args:
        model: A model with adapters from :func:`add_lora` or :func:`load_adapter`.
        keep_adapters: Keep the LoRA layers, with their weights merged, so that
            :func:`unmerge_lora` can undo the merge.

    Returns:
        ``model`` itself. The object does not change, only its LoRA layers.

    Raises:
        ValueError: If ``model`` has no LoRA layers.
        NotImplementedError: If peft cannot merge a layer.

    Example:
        >>> model = add_lora(torchvision.models.resnet18(weights=None))
        >>> model = merge_lora(model)
        >>> type(model.layer1[0].conv1)
        <class 'torch.nn.modules.conv.Conv2d'>
    """
    layers = _require_lora_layers(model, "merge_lora")
    for _, layer in layers:
        if not layer.merged:
            layer.merge()
    if not keep_adapters:
        _remove_lora_layers(model, getattr(model, _STATE, None))
        if hasattr(model, _STATE):
            delattr(model, _STATE)
    logger.info(
        "merged LoRA into %d layers of %s%s",
        len(layers),
        type(model).__name__,
        "" if keep_adapters else " and removed the adapters",
    )
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract the LoRA updates from the base weights again, in place.

    This undoes ``merge_lora(model, keep_adapters=True)``. Layers that are not merged are
    left as they are. NOTE: adding and subtracting the update in floating point can change
    the last bits of a base weight, and :func:`save_adapter` then rejects the model because
    its base no longer matches the fingerprint taken by :func:`add_lora`.

    Args:
        model: A model with LoRA layers.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: If ``model`` has no LoRA layers, for example after ``merge_lora``
            without ``keep_adapters=True``, which removes them.

    Example:
        >>> _ = merge_lora(model, keep_adapters=True)
        >>> unmerge_lora(model).layer1[0].conv1.merged
        False
    """
    layers = _require_lora_layers(model, "unmerge_lora")
    for _, layer in layers:
        if layer.merged:
            layer.unmerge()
    return model


# --- save and load --------------------------------------------------------------------------


def save_adapter(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save what LoRA training changed in ``model`` to the folder ``path``.

    The folder gets ``finetunekit_adapter.safetensors`` and ``finetunekit_adapter.json``.
    The tensors are the adapter weights, the full state of the saved modules (the trained
    head and ``modules_to_save``), the affine parameters of normalization layers under the
    ``"train"`` policy, and every buffer whose value differs from the one it had at
    :func:`add_lora` (running statistics under the ``"train"`` or ``"stats"`` policy). The
    JSON file contains the LoRA options, the targets and a fingerprint of the frozen base
    weights. The model is not modified.

    Args:
        model: A model with adapters from :func:`add_lora` or :func:`load_adapter`.
        path: Folder to write; created if missing. Existing adapter files are overwritten.

    Returns:
        The folder's path.

    Raises:
        ValueError: If ``model`` has no adapters from finetunekit, a LoRA layer is merged,
            a trainable parameter is neither an adapter nor in a saved module (its training
            would be lost), or the base weights changed since :func:`add_lora`.
        TypeError: If a LoRA option cannot be written as JSON.

    Example:
        >>> save_adapter(model, "runs/bbc-lora")
        PosixPath('runs/bbc-lora')
    """
    from safetensors.torch import save_file

    state = _require_state(model, "save_adapter")
    merged = [name for name, layer in _lora_layers(model) if layer.merged]
    if merged:
        raise ValueError(
            f"save_adapter found merged LoRA layers ({merged[:3]}); their base weights contain the update. "
            "Call unmerge_lora(model) first."
        )
    _check_untracked_training(model, state)
    current = _fingerprint(model, state)
    if current != state.fingerprint:
        raise ValueError(
            "The base weights of this model changed after add_lora, so an adapter alone cannot reproduce "
            "the model. They change when they train outside the adapters, when an init_lora_weights option "
            "such as 'pissa' rewrites them, or in their last bits after merge_lora(keep_adapters=True) and "
            "unmerge_lora. Save the whole state_dict instead."
        )

    tensors = _tensors_to_save(model, state)
    config = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "model_class": type(model).__name__,
        "lora": state.options,
        "targets": state.targets,
        "modules_to_save": state.modules_to_save,
        "norm_policies": state.norm_policies,
        "base_fingerprint": state.fingerprint,
        "token_pooling": _token_pooling(model),
    }
    try:
        text = json.dumps(config, indent=2)
    except TypeError as error:
        raise TypeError(
            f"A LoRA option of this model cannot be saved as JSON ({error}); pass JSON values to add_lora."
        ) from None

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
    logger.info(
        "saved %d adapter tensors (%s values) of %s to %s",
        len(tensors),
        f"{sum(t.numel() for t in tensors.values()):,}",
        type(model).__name__,
        folder,
    )
    return folder


def load_adapter(model: nn.Module, path: str | os.PathLike[str], *, trainable: bool = False) -> nn.Module:
    """Add the adapters saved in the folder ``path`` to ``model``, in place.

    ``model`` must be the base the adapter was trained on, in the state it had when
    :func:`add_lora` was called. It needs the same pretrained weights and, for a replaced
    head, the same head shape, so call :func:`finetunekit.replace_head` first. The head's
    weights come from the file. The adapters are injected as :func:`add_lora` injected them, and the
    saved tensors are loaded, so the model's outputs equal the trained model's.

    Args:
        model: The base model, without adapters. Modified in place.
        path: A folder written by :func:`save_adapter`.
        trainable: Make the adapters and saved modules trainable, to train further. With
            False, every parameter is frozen.

    Returns:
        ``model`` itself, with adapters.

    Raises:
        FileNotFoundError: If the folder lacks the adapter files.
        ValueError: If the files are not a finetunekit adapter, ``model`` already has
            adapters, its base weights differ from the ones the adapter was trained on, or
            a saved tensor does not fit the model (a head of another size).

    Example:
        >>> model = torchvision.models.resnet18(weights=None)   # the same pretrained weights
        >>> replace_head(model, 5)
        Linear(in_features=512, out_features=5, bias=True)
        >>> model = load_adapter(model, "runs/resnet-lora")
    """
    from safetensors.torch import load_file

    _require_peft()
    folder = Path(path)
    for name in (CONFIG_FILE, ADAPTER_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} does not exist; pass the folder that save_adapter wrote.")
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("format") != _FORMAT or config.get("version") != _FORMAT_VERSION:
        raise ValueError(
            f"{folder / CONFIG_FILE} is not a finetunekit adapter config of version {_FORMAT_VERSION} "
            f"(format={config.get('format')!r}, version={config.get('version')!r})."
        )
    if getattr(model, _STATE, None) is not None or _lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; load the adapter into a fresh base model.")

    state = _LoraState(
        options=config["lora"],
        targets=config["targets"],
        modules_to_save=config["modules_to_save"],
        norm_policies=config["norm_policies"],
        fingerprint=config["base_fingerprint"],
    )
    _check_pooling(model, config.get("token_pooling", {}))
    _check_base(model, state, config)
    tensors = load_file(str(folder / ADAPTER_FILE))
    _check_shapes(model, tensors)

    state.buffer_digests = _buffer_digests(model)
    _inject(model, state, trainable=trainable)
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        # _check_shapes and the fingerprint make this unreachable for files save_adapter wrote.
        raise ValueError(f"The adapter file contains keys the model lacks: {result.unexpected_keys[:5]}.")
    logger.info(
        "loaded %d adapter tensors from %s into %s",
        len(tensors),
        folder,
        type(model).__name__,
    )
    return model


# --- fitting the other building blocks -------------------------------------------------------


def lora_groups(model: nn.Module) -> list[LayerGroup]:
    """Return layer groups for training a LoRA model in phases: frozen base first, then adapters by layer.

    The first group, ``"base"``, contains every parameter that LoRA keeps frozen. Each
    automatic layer group of ``model`` that contains adapters or saved modules follows,
    under its own name and with those parameters only, head last. So
    ``freeze_to(model, 1, groups=groups)`` trains everything LoRA trains, and a
    ``Phase(train_groups=len(groups) - 1)`` of the :class:`~finetunekit.Trainer` does too,
    with ``lr=slice(lo, hi)`` spread over the adapter groups. ``Phase(train_groups=1)``
    trains the head alone. The model is not modified.

    Args:
        model: A model with adapters from :func:`add_lora` or :func:`load_adapter`.

    Returns:
        The groups, ``"base"`` first and the head group last when the head trains.

    Raises:
        ValueError: If ``model`` has no adapters from finetunekit.

    Example:
        >>> groups = lora_groups(model)
        >>> [g.name for g in groups][:3], groups[-1].name
        (['base', 'layer1.0', 'layer1.1'], 'fc')
        >>> trainer = Trainer(model, [Phase(3, train_groups=len(groups) - 1, lr=1e-3)],
        ...                   train_loader, groups=groups)
    """
    state = _require_state(model, "lora_groups")
    train_ids = {id(p) for _, p in _adapter_parameters(model)}
    for name in state.modules_to_save + state.trained_norms:
        train_ids.update(id(p) for p in model.get_submodule(name).parameters())

    base = LayerGroup("base", [], [])
    result = [base]
    for group in layer_groups(model):
        trained = [(n, p) for n, p in group.params if id(p) in train_ids]
        base.params.extend((n, p) for n, p in group.params if id(p) not in train_ids)
        base.modules.extend(group.modules)
        if trained:
            result.append(
                LayerGroup(
                    group.name,
                    list(group.modules),
                    trained,
                    is_head=group.is_head,
                    tied=list(group.tied),
                )
            )
    return result


def enable_gradient_checkpointing(model: nn.Module, *, use_reentrant: bool = False) -> nn.Module:
    """Turn on gradient checkpointing in a Hugging Face model so that adapters still get gradients.

    With checkpointing, the layers recompute their activations in the backward pass. With
    ``use_reentrant=True``, a checkpointed block whose input does not require gradients
    (the output of frozen embeddings) gives no gradients to the adapters inside it. So this
    also registers transformers' ``enable_input_require_grads`` hook, which marks the input
    embeddings' output as requiring gradients. The model is modified in place.

    Args:
        model: A transformers ``PreTrainedModel`` that supports gradient checkpointing.
        use_reentrant: Passed to ``torch.utils.checkpoint.checkpoint``.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: If ``model`` is not a transformers model with gradient checkpointing.

    Example:
        >>> model = enable_gradient_checkpointing(add_lora(bert))
        >>> model(**batch).logits.sum().backward()   # the adapters get gradients
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    kwargs_name = "activation_checkpointing_kwargs"
    if not callable(enable):
        enable = getattr(model, "gradient_checkpointing_enable", None)
        kwargs_name = "gradient_checkpointing_kwargs"
    if not callable(enable) or not getattr(model, "supports_gradient_checkpointing", False):
        raise TypeError(
            f"{type(model).__name__} is not a transformers model with gradient checkpointing. For your own "
            "modules, wrap the blocks in torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False), "
            "which gives the adapters gradients without further set-up."
        )
    enable(**{kwargs_name: {"use_reentrant": use_reentrant}})
    # transformers 5 registers the hook itself for models that read input_ids; the check
    # keeps a second hook off those models.
    if not getattr(model, "_require_grads_hooks", None):
        model.enable_input_require_grads()
    return model


def _lora_role(param_name: str) -> Literal["A", "B"] | None:
    """Return which LoRA matrix a parameter is, from its qualified name: ``"A"``, ``"B"`` or None.

    ``"A"`` is the down projection (``lora_A``, ``lora_embedding_A``), ``"B"`` the up projection
    (``lora_B``, ``lora_embedding_B``, including a ``lora_bias`` bias). Anything else, a DoRA
    magnitude vector included, is None. LoRA+ trains the ``"B"`` parameters at a multiple of
    the ``"A"`` rate.

    Example:
        >>> _lora_role("layer1.0.conv1.lora_B.default.weight")
        'B'
    """
    segments = param_name.split(".")
    if _A_SEGMENTS.intersection(segments):
        return "A"
    if _B_SEGMENTS.intersection(segments):
        return "B"
    return None


def _token_pooling(model: nn.Module) -> dict[str, str]:
    """Return the pooling mode of each TokenPooler that ``replace_head(pooling=...)`` installed, by module name."""
    from .heads import TokenPooler

    return {name: module.mode for name, module in model.named_modules() if isinstance(module, TokenPooler)}


def _check_pooling(model: nn.Module, expected: dict[str, str]) -> None:
    found = _token_pooling(model)
    if found == expected:
        return
    if expected:
        name, mode = next(iter(expected.items()))
        raise ValueError(
            f"This adapter was trained after replace_head(..., pooling={mode!r}), which put a TokenPooler at "
            f"{name!r}, but this {type(model).__name__} has "
            f"{'pooling ' + repr(found) if found else 'its original pooler'} there. Call "
            f"finetunekit.replace_head(model, num_classes, pooling={mode!r}) before load_adapter."
        )
    raise ValueError(
        f"This {type(model).__name__} has a TokenPooler at {sorted(found)}, but the adapter was trained with the "
        "model's original pooler. Load it into a model whose head was replaced without pooling=."
    )
