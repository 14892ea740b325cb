"""LoRA adapters through peft: targets, trainable counts, merging, saving and loading."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from conftest import bert_inputs, make_bert, snapshot, trainable_names
from torch import nn

import finetunekit as ftk
from finetunekit.lora import (
    ADAPTER_FILE,
    CONFIG_FILE,
    _lora_role,
    _sample_bytes,
    add_lora,
    enable_gradient_checkpointing,
    load_adapter,
    lora_groups,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.fc2(self.act(self.fc1(x)))))


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def make_resnet(seed: int = 0, num_classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    ftk.replace_head(model, num_classes)
    return model


def make_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def lora_names(model: nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_size(layer: nn.Module, r: int) -> int:
    """Number of values in the A and B matrices peft adds to ``layer``."""
    if isinstance(layer, nn.Linear):
        return r * (layer.in_features + layer.out_features)
    # A is a conv with the layer's kernel into r channels; B is a 1x1 conv back out.
    kernel = layer.kernel_size[0] * layer.kernel_size[1]
    return r * layer.in_channels * kernel + r * layer.out_channels


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Give every B matrix values, so the adapters change the output as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if _lora_role(name) == "B":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


# --- which layers get adapters --------------------------------------------------------------


def test_auto_mlp_adapts_body_not_head():
    model = add_lora(make_mlp(), r=4)

    assert lora_names(model) == {"fc1", "fc2"}
    assert type(model.head) is nn.Linear
    assert trainable_names(model) == {
        "fc1.lora_A.default.weight",
        "fc1.lora_B.default.weight",
        "fc2.lora_A.default.weight",
        "fc2.lora_B.default.weight",
        "head.weight",
        "head.bias",
    }
    # fc1: 4 * (8 + 16), fc2: 4 * (16 + 16), head: 16 * 3 + 3.
    assert num_trainable(model) == 96 + 128 + 51


def test_auto_resnet_adapts_every_conv_not_fc():
    base = make_resnet()
    convs = {name: module for name, module in base.named_modules() if isinstance(module, nn.Conv2d)}

    model = add_lora(make_resnet(), r=4)

    assert lora_names(model) == set(convs)
    assert type(model.fc) is nn.Linear
    expected = sum(lora_size(conv, 4) for conv in convs.values()) + 512 * 5 + 5
    assert num_trainable(model) == expected
    assert expected == 146257


def test_auto_bert_adapts_linears_not_classifier():
    base = make_bert()
    linears = {
        name: module for name, module in base.named_modules() if isinstance(module, nn.Linear) and name != "classifier"
    }

    model = add_lora(make_bert(), r=8)

    assert lora_names(model) == set(linears)
    assert "bert.pooler.dense" in lora_names(model)
    assert num_trainable(model) == sum(lora_size(m, 8) for m in linears.values()) + 32 * 3 + 3


def test_llama_lm_head_stays_frozen():
    model = add_lora(make_llama(), r=4)

    expected = {
        f"model.layers.{i}.{part}"
        for i in range(2)
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert lora_names(model) == expected
    assert not model.lm_head.weight.requires_grad
    assert all(_lora_role(name) is not None for name in trainable_names(model))


def test_suffix_targets_match_peft():
    model = add_lora(make_bert(), targets=["query", "value"])

    assert lora_names(model) == {
        f"bert.encoder.layer.{i}.attention.self.{part}" for i in range(3) for part in ("query", "value")
    }


def test_glob_and_regex_targets():
    glob = add_lora(make_resnet(), targets="layer4.*")
    regex = add_lora(make_resnet(), targets=r"re:layer4\.1\.conv\d")

    assert lora_names(glob) == {
        "layer4.0.conv1",
        "layer4.0.conv2",
        "layer4.0.downsample.0",
        "layer4.1.conv1",
        "layer4.1.conv2",
    }
    assert lora_names(regex) == {"layer4.1.conv1", "layer4.1.conv2"}


def test_container_name_selects_layers_inside():
    model = add_lora(make_resnet(), targets=["layer3.1"])

    assert lora_names(model) == {"layer3.1.conv1", "layer3.1.conv2"}


def test_type_target_leaves_head_out():
    model = add_lora(make_mlp(), targets=nn.Linear)

    assert lora_names(model) == {"fc1", "fc2"}


def test_groups_restrict_targets():
    top = add_lora(make_resnet(), groups=-2)
    listed = add_lora(make_resnet(), groups=["layer1.0", 0])

    assert lora_names(top) == {"layer4.1.conv1", "layer4.1.conv2"}
    assert lora_names(listed) == {"conv1", "layer1.0.conv1", "layer1.0.conv2"}


def test_layer_group_target():
    model = make_resnet()
    group = ftk.layer_groups(model)[-3]

    add_lora(model, targets=[group])

    assert group.name == "layer4.0"
    assert lora_names(model) == {"layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0"}


def test_modules_to_save_train_fully():
    model = add_lora(make_mlp(), modules_to_save=["norm"])

    assert model.norm.weight.requires_grad
    assert model.norm.bias.requires_grad
    assert not model.fc1.base_layer.weight.requires_grad


def test_train_head_false_freezes_head():
    model = add_lora(make_mlp(), train_head=False)

    assert not model.head.weight.requires_grad
    assert lora_names(model) == {"fc1", "fc2"}


def test_options_pass_through_to_peft():
    plain = add_lora(make_mlp(), r=4, alpha=8)
    rslora = add_lora(make_mlp(), r=4, alpha=8, use_rslora=True)
    dora = add_lora(make_mlp(), r=4, use_dora=True)
    pattern = add_lora(make_mlp(), r=4, rank_pattern={"fc2": 2})

    assert plain.fc1.scaling["default"] == pytest.approx(2.0)
    assert rslora.fc1.scaling["default"] == pytest.approx(4.0)
    assert dora.fc1.lora_magnitude_vector["default"].weight.shape == (16,)
    assert "fc1.lora_magnitude_vector.default.weight" in trainable_names(dora)
    assert pattern.fc2.lora_A["default"].weight.shape == (2, 16)
    assert pattern.fc1.lora_A["default"].weight.shape == (4, 8)


def test_fresh_adapters_keep_base_output():
    model = make_resnet().eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)

    add_lora(model)

    assert torch.allclose(model(x), expected, atol=1e-6)


# --- errors -------------------------------------------------------------------------------


def test_misspelled_target_names_closest():
    with pytest.raises(
        ftk.NoMatchingTargetError,
        match=r"'layer4\.0\.conv3' matched no module of ResNet\. Did you mean 'layer4\.0\.conv2' or 'layer4\.0\.conv1'",
    ):
        add_lora(make_resnet(), targets=["layer4.0.conv3"])


def test_one_bad_target_in_list_leaves_model_unchanged():
    model = make_mlp()
    before = snapshot(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    with pytest.raises(
        ftk.NoMatchingTargetError, match=r"'fc3' matched no module of MLP\. Did you mean 'fc2' or 'fc1'\?"
    ):
        add_lora(model, targets=["fc1", "fc3"])

    assert lora_names(model) == set()
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "peft_config")
    assert not hasattr(model, "_finetunekit_lora")


def test_failure_inside_peft_removes_adapters(monkeypatch):
    import peft

    real = peft.inject_adapter_in_model

    def inject_then_fail(config, model, *args, **kwargs):
        real(config, model, *args, **kwargs)
        raise RuntimeError("injection failed")

    monkeypatch.setattr(peft, "inject_adapter_in_model", inject_then_fail)
    model = make_mlp()
    before = snapshot(model)

    with pytest.raises(RuntimeError, match="injection failed"):
        add_lora(model)

    assert lora_names(model) == set()
    assert type(model.fc1) is nn.Linear
    assert all(p.requires_grad for p in model.parameters())
    assert set(model.state_dict()) == set(before)
    assert not hasattr(model, "peft_config")


def test_unsupported_type_lists_supported():
    with pytest.raises(ValueError, match=r"cannot adapt BatchNorm1d.*nn\.Linear.*nn\.Conv2d"):
        add_lora(make_mlp(), targets=nn.BatchNorm1d)
    with pytest.raises(ValueError, match=r"'norm' selects \['norm'\] of type \['BatchNorm1d'\].*Supported types"):
        add_lora(make_mlp(), targets=["norm"])


def test_grouped_conv_is_unsupported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.LazyLinear(2))

    with pytest.raises(ValueError, match=r"'0' selects.*groups=1 only"):
        add_lora(model, targets=["0"])


def test_head_as_target_rejected():
    with pytest.raises(ValueError, match=r"'head' selects \['head'\], which train fully.*train_head=False"):
        add_lora(make_mlp(), targets=["fc1", "head"])


def test_type_matching_nothing_lists_types():
    with pytest.raises(ftk.NoMatchingTargetError, match=r"Conv2d matched no layer.*\['Linear'\]"):
        add_lora(make_mlp(), targets=nn.Conv2d)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"r=0 must be a positive integer"):
        add_lora(make_mlp(), r=0)
    with pytest.raises(ValueError, match=r"alpha=-1 must be a positive number"):
        add_lora(make_mlp(), alpha=-1)
    with pytest.raises(ValueError, match=r"dropout=1.0 must be a probability"):
        add_lora(make_mlp(), dropout=1.0)
    with pytest.raises(ValueError, match=r"bn='none' is not a BatchNorm policy"):
        add_lora(make_mlp(), bn="none")
    with pytest.raises(TypeError, match=r"use_dorra=True, which is not a LoraConfig field\. Did you mean 'use_dora'"):
        add_lora(make_mlp(), use_dorra=True)
    with pytest.raises(TypeError, match=r"sets LoraConfig\.target_modules itself; pass targets="):
        add_lora(make_mlp(), target_modules=["fc1"])
    with pytest.raises(TypeError, match=r"targets=3 has type int"):
        add_lora(make_mlp(), targets=3)
    with pytest.raises(ftk.NoMatchingTargetError, match=r"modules_to_save item 'nrom'.*Did you mean 'norm'"):
        add_lora(make_mlp(), modules_to_save=["nrom"])
    with pytest.raises(IndexError, match=r"groups=7 is out of range: MLP has 4 layer groups"):
        add_lora(make_mlp(), groups=7)


def test_second_add_lora_rejected():
    model = add_lora(make_mlp())

    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model)


# --- merging ------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [make_mlp, make_resnet, make_bert])
def test_merge_equals_unmerged(build):
    model = add_lora(build(), r=4).eval()
    randomize_adapters(model)
    inputs = {
        make_mlp: lambda: (torch.randn(6, 8),),
        make_resnet: lambda: (torch.randn(2, 3, 32, 32),),
        make_bert: lambda: (),
    }[build]()
    kwargs = bert_inputs() if build is make_bert else {}
    base_output = _logits(build().eval(), inputs, kwargs)
    expected = _logits(model, inputs, kwargs)

    merged = merge_lora(model)

    assert merged is model
    assert lora_names(model) == set()
    assert not hasattr(model, "peft_config")
    assert torch.allclose(_logits(model, inputs, kwargs), expected, atol=1e-5)
    assert not torch.allclose(expected, base_output, atol=1e-3)


def _logits(model, inputs, kwargs):
    with torch.no_grad():
        output = model(*inputs, **kwargs)
    return getattr(output, "logits", output)


def test_unmerge_restores_base_weights():
    model = add_lora(make_mlp(), r=4).eval()
    randomize_adapters(model)
    base_weight = model.fc2.base_layer.weight.detach().clone()
    x = torch.randn(5, 8)
    expected = model(x)

    merge_lora(model, keep_adapters=True)
    merged_weight = model.fc2.base_layer.weight.detach().clone()
    unmerge_lora(model)

    assert lora_names(model) == {"fc1", "fc2"}
    assert not torch.allclose(merged_weight, base_weight)
    assert torch.allclose(model.fc2.base_layer.weight, base_weight, atol=1e-6)
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_unmerge_after_full_merge_raises():
    model = merge_lora(add_lora(make_mlp()))

    with pytest.raises(ValueError, match=r"unmerge_lora found no LoRA layer in MLP.*keep_adapters=True"):
        unmerge_lora(model)


# --- BatchNorm ----------------------------------------------------------------------------


def _train_steps(model: nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 32, 32) * 3 + 1).logsumexp(dim=1).mean().backward()
        optimizer.step()


def test_bn_statistics_frozen_by_default():
    model = add_lora(make_resnet())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}

    _train_steps(model)

    assert len(before) == 40
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not model.bn1.weight.requires_grad


def test_bn_stats_policy_saves_changed_statistics(tmp_path):
    model = add_lora(make_resnet(), bn="stats")
    before = model.layer1[0].bn1.running_mean.clone()
    _train_steps(model)
    save_adapter(model, tmp_path)

    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / ADAPTER_FILE)))
    assert not torch.equal(model.layer1[0].bn1.running_mean, before)
    assert "layer1.0.bn1.running_mean" in keys
    assert "layer1.0.bn1.weight" not in keys

    fresh = load_adapter(make_resnet(), tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_bn_train_policy_trains_and_saves_affine(tmp_path):
    model = add_lora(make_resnet(), bn="train")
    _train_steps(model)
    save_adapter(model, tmp_path)

    fresh = load_adapter(make_resnet(), tmp_path, trainable=True)
    x = torch.randn(2, 3, 32, 32)
    assert model.bn1.weight.requires_grad
    assert fresh.bn1.weight.requires_grad
    assert torch.equal(fresh.eval()(x), model.eval()(x))


# --- saving and loading -------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path):
    model = add_lora(make_resnet(), r=4)
    _train_steps(model)
    x = torch.randn(2, 3, 32, 32)
    expected = model.eval()(x)

    save_adapter(model, tmp_path)
    fresh = load_adapter(make_resnet(), tmp_path)

    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / ADAPTER_FILE)))
    adapter_keys = {name for name, p in model.named_parameters() if _lora_role(name) is not None}
    assert keys == adapter_keys | {"fc.weight", "fc.bias"}
    assert torch.equal(fresh.eval()(x), expected)
    assert num_trainable(fresh) == 0


def test_saved_config_records_targets(tmp_path):
    model = add_lora(make_mlp(), r=4, alpha=8, use_dora=True)
    save_adapter(model, tmp_path)

    config = json.loads((tmp_path / CONFIG_FILE).read_text())

    assert config["targets"] == ["fc1", "fc2"]
    assert config["modules_to_save"] == ["head"]
    assert config["lora"]["r"] == 4
    assert config["lora"]["lora_alpha"] == 8
    assert config["lora"]["use_dora"] is True
    assert config["norm_policies"] == {"norm": "frozen"}
    assert len(config["base_fingerprint"]) == 64


def test_load_trainable_restores_training_set(tmp_path):
    model = add_lora(make_mlp(), modules_to_save=["norm"])
    save_adapter(model, tmp_path)

    fresh = load_adapter(make_mlp(), tmp_path, trainable=True)

    assert trainable_names(fresh) == trainable_names(model)


def test_llama_save_load_round_trip(tmp_path):
    model = add_lora(make_llama(), r=4)
    randomize_adapters(model)
    ids = torch.randint(0, 64, (2, 12))
    expected = model(input_ids=ids).logits

    save_adapter(model, tmp_path)
    fresh = load_adapter(make_llama(), tmp_path)

    assert torch.equal(fresh(input_ids=ids).logits, expected)


def test_different_base_rejected(tmp_path):
    save_adapter(add_lora(make_resnet(seed=0)), tmp_path)
    other = make_resnet(seed=1)
    before = snapshot(other)

    with pytest.raises(ValueError, match=r"different base model than this ResNet"):
        load_adapter(other, tmp_path)

    assert lora_names(other) == set()
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_other_architecture_rejected(tmp_path):
    save_adapter(add_lora(make_mlp()), tmp_path)

    with pytest.raises(ValueError, match=r"different base model.*adapter's base was a MLP.*lacks the modules"):
        load_adapter(make_resnet(), tmp_path)


def test_head_size_mismatch_suggests_replace_head(tmp_path):
    save_adapter(add_lora(make_resnet(num_classes=5)), tmp_path)

    with pytest.raises(ValueError, match=r"fc\.weight: file \(5, 512\), model \(7, 512\).*replace_head"):
        load_adapter(make_resnet(num_classes=7), tmp_path)


def test_load_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"finetunekit_adapter\.json does not exist"):
        load_adapter(make_mlp(), tmp_path)


def test_load_into_lora_model_rejected(tmp_path):
    save_adapter(add_lora(make_mlp()), tmp_path)

    with pytest.raises(ValueError, match="already has LoRA adapters; load the adapter into a fresh base"):
        load_adapter(add_lora(make_mlp()), tmp_path)


def test_save_rejects_trained_base_weights(tmp_path):
    model = add_lora(make_resnet())
    ftk.unfreeze(model, "layer1")

    with pytest.raises(
        ValueError, match=r"neither adapters nor in saved modules.*layer1\.0\.conv1\.base_layer\.weight"
    ):
        save_adapter(model, tmp_path)


def test_save_rejects_changed_base(tmp_path):
    model = add_lora(make_mlp())
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad:
                param.add_(1.0)

    with pytest.raises(ValueError, match="base weights of this model changed after add_lora"):
        save_adapter(model, tmp_path)


def test_save_rejects_merged_layers(tmp_path):
    model = merge_lora(add_lora(make_mlp()), keep_adapters=True)

    with pytest.raises(ValueError, match=r"merged LoRA layers \(\['fc1', 'fc2'\]\).*unmerge_lora"):
        save_adapter(model, tmp_path)


def test_save_without_adapters_raises(tmp_path):
    with pytest.raises(ValueError, match="save_adapter needs a model with adapters"):
        save_adapter(make_mlp(), tmp_path)


def test_fingerprint_sample_on_large_tensor():
    # Above 2**24 values, float32 positions round to even numbers and miss or pass the last index.
    tensor = torch.zeros(2**24 + 2, dtype=torch.uint8)
    tensor[-1] = 7

    sample = _sample_bytes(tensor)

    assert len(sample) == 256
    assert sample[-1] == 7
    assert sample[0] == 0


# --- the other building blocks on a LoRA model ----------------------------------------------


@pytest.mark.parametrize("build", [make_resnet, make_bert, make_llama])
def test_layer_groups_unchanged_by_lora(build):
    names = [g.name for g in ftk.layer_groups(build())]

    model = add_lora(build())

    assert [g.name for g in ftk.layer_groups(model)] == names


def test_layer_groups_unchanged_on_flat_mlp():
    names = [g.name for g in ftk.layer_groups(make_mlp())]

    model = add_lora(make_mlp())

    assert [g.name for g in ftk.layer_groups(model)] == names


def test_param_groups_hold_exactly_trainable():
    model = add_lora(make_resnet())

    groups = ftk.param_groups(model, lr=slice(1e-4, 1e-2))

    grouped_ids = {id(p) for g in groups for p in g["params"]}
    assert grouped_ids == {id(p) for p in model.parameters() if p.requires_grad}
    assert groups[0]["name"] == "stem"
    assert groups[0]["lr"] == pytest.approx(1e-4)
    assert groups[-1]["name"] == "fc"
    assert groups[-1]["lr"] == pytest.approx(1e-2)


def test_describe_counts_adapters():
    model = add_lora(make_mlp(), r=4)

    report = ftk.describe(model)

    assert report.num_trainable == 96 + 128 + 51
    assert report.rows[-1].name == "head"
    assert report.rows[-1].num_trainable == 51


def test_freeze_acts_on_lora_model():
    model = add_lora(make_resnet())

    ftk.freeze(model, "layer4")

    assert not model.layer4[0].conv1.lora_A["default"].weight.requires_grad
    assert model.layer3[0].conv1.lora_A["default"].weight.requires_grad


def test_lora_groups_put_base_first():
    model = add_lora(make_resnet(), r=4)
    base_names = [g.name for g in ftk.layer_groups(make_resnet())]

    groups = lora_groups(model)

    assert [g.name for g in groups] == ["base", *base_names]
    assert groups[-1].is_head
    assert {n for n, _ in groups[-1].params} == {"fc.weight", "fc.bias"}
    assert {n for n, _ in groups[0].params} == {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(p.requires_grad for g in groups[1:] for p in g.parameters())


def test_trainer_trains_adapters_only():
    model = add_lora(make_mlp(), r=4)
    groups = lora_groups(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if _lora_role(n) == "A"}
    torch.manual_seed(0)
    data = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(4)]

    trainer = ftk.Trainer(
        model, [ftk.Phase(epochs=2, train_groups=len(groups) - 1, lr=1e-2)], data, data, groups=groups, progress=False
    )
    history = trainer.fit()

    assert history[0]["trainable_params"] == 96 + 128 + 51
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert all(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


# --- gradient checkpointing and the causal LM path ------------------------------------------


def _encoder_adapter_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    model.train()
    model(**bert_inputs()).logits.sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if _lora_role(n) and ".encoder." in n}


def test_checkpointing_without_input_grads_loses_adapter_grads():
    # The failure the helper prevents: reentrant checkpointing after frozen embeddings.
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    model = add_lora(make_bert())
    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=partial(checkpoint, use_reentrant=True))

    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        grads = _encoder_adapter_grads(model)

    assert len(grads) == 3 * 6 * 2
    assert all(g is None for g in grads.values())


def test_checkpointing_helper_keeps_adapter_grads():
    model = enable_gradient_checkpointing(add_lora(make_bert()), use_reentrant=True)

    grads = _encoder_adapter_grads(model)

    assert model.bert.encoder.layer[0].gradient_checkpointing
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    assert len(grads) == 3 * 6 * 2
    assert all(g is not None for g in grads.values())
    # B starts at zero, so only the B matrices get non-zero gradients on the first step.
    assert all(g.abs().sum() > 0 for n, g in grads.items() if _lora_role(n) == "B")


def test_checkpointing_helper_rejects_plain_module():
    with pytest.raises(TypeError, match=r"MLP is not a transformers model.*torch\.utils\.checkpoint"):
        enable_gradient_checkpointing(make_mlp())


def test_llama_causal_lm_held_out_loss_falls():
    model = add_lora(make_llama(), r=8, alpha=16)
    torch.manual_seed(0)
    # A repeating sequence is easy to learn, so a few steps lower the held-out loss.
    pattern = torch.arange(16).repeat(4)
    train = torch.stack([pattern.roll(i)[:32] for i in range(8)])
    held_out = torch.stack([pattern.roll(i)[:32] for i in range(8, 12)])
    optimizer = torch.optim.AdamW(ftk.param_groups(model, lr=1e-2))

    def held_out_loss() -> float:
        with torch.no_grad():
            return model(input_ids=held_out, labels=held_out).loss.item()

    before = held_out_loss()
    model.train()
    for _ in range(10):
        optimizer.zero_grad()
        model(input_ids=train, labels=train).loss.backward()
        optimizer.step()

    assert held_out_loss() < before - 0.3


# --- LoRA+ roles --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("layer1.0.conv1.lora_A.default.weight", "A"),
        ("bert.encoder.layer.0.attention.self.query.lora_B.default.weight", "B"),
        ("fc1.lora_B.default.bias", "B"),
        ("embed.lora_embedding_A.default", "A"),
        ("embed.lora_embedding_B.default", "B"),
        ("fc1.lora_magnitude_vector.default.weight", None),
        ("fc1.base_layer.weight", None),
        ("head.weight", None),
    ],
)
def test_lora_role_from_name(name, role):
    assert _lora_role(name) == role


def test_lora_role_covers_every_adapter_matrix():
    model = add_lora(make_bert(), r=4)

    roles = [_lora_role(n) for n, p in model.named_parameters() if p.requires_grad]

    assert roles.count("A") == roles.count("B") == 3 * 6 + 1
    assert roles.count(None) == 2


def test_load_adapter_names_a_forgotten_pooling(tmp_path):
    def base():
        torch.manual_seed(0)
        return make_bert()

    model = base()
    ftk.replace_head(model, 3, pooling="mean")
    add_lora(model, r=4)
    save_adapter(model, tmp_path)

    fresh = base()
    ftk.replace_head(fresh, 3)  # pooling="mean" forgotten
    with pytest.raises(
        ValueError,
        match=r"pooling='mean'.*'bert.pooler'.*original pooler.*replace_head\(model, num_classes, pooling='mean'\)",
    ):
        load_adapter(fresh, tmp_path)
    assert not any(".lora_" in name for name, _ in fresh.named_parameters())


def test_misspelled_target_suggests_the_short_name():
    with pytest.raises(ftk.NoMatchingTargetError, match=r"'querry' matched no module.*Did you mean 'query'\?"):
        add_lora(make_bert(), targets=["querry"])
