"""Record a model's LoRA state, check the LoRA options, and inject adapters through peft and set what trains."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ._norms import POLICY, set_policy, sync_norm_layers
from ._utils import close_matches, format_suggestions, named_parameters_once

# Attribute name under which finetunekit stores a model's LoRA settings.
_STATE = "_finetunekit_lora"

# LoraConfig fields that add_lora sets itself or does not support.
_MANAGED_OPTIONS = {
    "r": "pass r=",
    "lora_alpha": "pass alpha=",
    "lora_dropout": "pass dropout=",
    "target_modules": "pass targets=",
    "target_parameters": "pass targets= with module names",
    "exclude_modules": "pass targets= without the modules to leave out",
    "layers_to_transform": "pass groups=",
    "layers_pattern": "pass groups=",
    "modules_to_save": "pass modules_to_save= to add_lora",
    "fan_in_fan_out": "add_lora sets it from the layer types",
    "bias": "name the layers whose biases should train in modules_to_save=",
    "inference_mode": "use load_adapter(..., trainable=False)",
    "peft_type": "add_lora always adds LoRA",
    "task_type": "add_lora works on any module and needs no task type",
}


@dataclass
class _LoraState:
    """LoRA settings of a model: enough to save the adapter and to rebuild it on a fresh base."""

    options: dict[str, Any]
    targets: list[str]
    modules_to_save: list[str]
    norm_policies: dict[str, str]
    fingerprint: str
    buffer_digests: dict[str, str] = field(default_factory=dict)
    # Whether peft's injection created the model's ``peft_config`` attribute, which unloading removes.
    owns_peft_config: bool = False

    @property
    def trained_norms(self) -> list[str]:
        """Normalization layers outside the saved modules whose affine parameters train (policy ``"train"``)."""
        return [name for name, policy in self.norm_policies.items() if policy == "train"]


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise ImportError("LoRA needs peft: pip install peft") from error


def _check_options(
    r: int,
    alpha: float,
    dropout: float,
    use_dora: bool,
    use_rslora: bool,
    init_lora_weights: bool | str,
    lora_options: dict[str, Any],
) -> dict[str, Any]:
    from peft import LoraConfig

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r={r!r} must be a positive integer rank, such as 8.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha={alpha!r} must be a positive number, such as 2 * r.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r} must be a probability in [0, 1).")

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    for key, value in lora_options.items():
        if key in _MANAGED_OPTIONS:
            raise TypeError(f"add_lora sets LoraConfig.{key} itself; {_MANAGED_OPTIONS[key]}.")
        if key not in fields:
            suggestions = format_suggestions(close_matches(key, fields - set(_MANAGED_OPTIONS)))
            raise TypeError(f"add_lora got {key}={value!r}, which is not a LoraConfig field.{suggestions}")

    options = {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(dropout),
        "use_dora": bool(use_dora),
        "use_rslora": bool(use_rslora),
        "init_lora_weights": init_lora_weights,
        **lora_options,
    }
    # LoraConfig checks the values itself (an unknown init_lora_weights, for example), and
    # building it here raises before the model changes.
    _lora_config(options, ["x"])
    return options


def _lora_config(options: dict[str, Any], targets: list[str]) -> Any:
    from peft import LoraConfig

    # A string target_modules is a regular expression that must match a whole module name,
    # so each name selects exactly that module.
    pattern = "|".join(re.escape(name) for name in targets)
    return LoraConfig(target_modules=f"(?:{pattern})", **options)


# --- injection and trainability -------------------------------------------------------------


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Return the adapter parameters (``lora_A``, ``lora_B``, DoRA magnitudes), found by module structure."""
    found = []
    for name, layer in _lora_layers(model):
        for attribute in layer.adapter_layer_names:
            container = getattr(layer, attribute, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                found.extend(container.named_parameters(prefix=f"{name}.{attribute}"))
    return found


def _inject(model: nn.Module, state: _LoraState, *, trainable: bool) -> None:
    """Inject the adapters that ``state`` describes, set what trains, and record ``state`` on the model."""
    from peft import inject_adapter_in_model

    config = _lora_config(dict(state.options), state.targets)
    flags = [(p, p.requires_grad) for _, p in named_parameters_once(model)]
    state.owns_peft_config = not hasattr(model, "peft_config")
    try:
        inject_adapter_in_model(config, model)
    except Exception:
        _remove_lora_layers(model, state)
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)
        raise

    _set_trainable(model, state, trainable=trainable)
    setattr(model, _STATE, state)


def _set_trainable(model: nn.Module, state: _LoraState, *, trainable: bool) -> None:
    """Freeze the base weights and make the adapters and saved modules trainable (or freeze everything)."""
    for name, policy in state.norm_policies.items():
        setattr(model.get_submodule(name), POLICY, policy)

    train_ids = {id(p) for _, p in _adapter_parameters(model)}
    for name in state.modules_to_save:
        train_ids.update(id(p) for p in model.get_submodule(name).parameters())
    named = list(named_parameters_once(model))
    base_ids = {id(p) for _, p in named if id(p) not in train_ids}
    # The "train" policy keeps the affine parameters of the frozen normalization layers trainable.
    train_ids.update(id(p) for p in set_policy(model, base_ids, None))

    for _, param in named:
        requires_grad = trainable and id(param) in train_ids
        param.requires_grad_(requires_grad)
        if not requires_grad:
            param.grad = None
    sync_norm_layers(model)


def _remove_lora_layers(model: nn.Module, state: _LoraState | None) -> None:
    """Put each LoRA layer's base layer back in its place, dropping the adapters and peft's config."""
    for name, layer in _lora_layers(model):
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.get_base_layer())
    if state is not None and state.owns_peft_config and hasattr(model, "peft_config"):
        delattr(model, "peft_config")


def _require_lora_layers(model: nn.Module, caller: str) -> list[tuple[str, nn.Module]]:
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            f"{caller} found no LoRA layer in {type(model).__name__}. Add adapters with add_lora or "
            "load_adapter; merge_lora(model) removes them unless keep_adapters=True."
        )
    return layers


def _require_state(model: nn.Module, caller: str) -> _LoraState:
    state = getattr(model, _STATE, None)
    if not isinstance(state, _LoraState) or not _lora_layers(model):
        raise ValueError(
            f"{caller} needs a model with adapters from finetunekit's add_lora or load_adapter; "
            f"{type(model).__name__} has none."
        )
    return state
