from __future__ import annotations

import pytest
import torch
from conftest import make_bert
from torch import nn

import finetunekit as ftk


def ids(params) -> list[int]:
    return [id(p) for p in params]


def test_slice_is_exact_geometric_sequence(resnet):
    groups = ftk.param_groups(resnet, lr=slice(1e-5, 1e-3))

    names = [g.name for g in ftk.layer_groups(resnet)]
    lr_by_name = {g["name"]: g["lr"] for g in groups}
    expected = [1e-5 * 100 ** (i / 9) for i in range(10)]
    assert list(lr_by_name) == names
    assert list(lr_by_name.values()) == pytest.approx(expected, rel=1e-12)
    assert lr_by_name["stem"] == 1e-5
    assert lr_by_name["fc"] == 1e-3


def test_slice_spans_trainable_groups_only(resnet):
    ftk.freeze_to(resnet, -3)

    groups = ftk.param_groups(resnet, lr=slice(1e-5, 1e-3))

    assert {g["name"]: g["lr"] for g in groups} == pytest.approx({"layer4.0": 1e-5, "layer4.1": 1e-4, "fc": 1e-3})


def test_slice_stop_only_follows_fastai(bert):
    groups = ftk.param_groups(bert, lr=slice(1e-3))

    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs.pop("classifier") == 1e-3
    assert list(lrs.values()) == pytest.approx([1e-4] * len(lrs))


def test_float_lr_everywhere(bert):
    groups = ftk.param_groups(bert, lr=3e-4)

    assert {g["lr"] for g in groups} == {3e-4}


def test_no_decay_holds_biases_and_norm_weights(resnet):
    groups = ftk.param_groups(resnet, lr=1e-3, weight_decay=0.05)

    no_decay = {id(p) for g in groups if g["no_decay"] for p in g["params"]}
    expected = {id(p) for n, p in resnet.named_parameters() if n.endswith("bias") or ".bn" in n or n.startswith("bn")}
    expected |= {id(p) for n, p in resnet.named_parameters() if "downsample.1" in n}
    assert no_decay == expected
    assert all(g["weight_decay"] == 0.0 for g in groups if g["no_decay"])
    assert all(g["weight_decay"] == 0.05 for g in groups if not g["no_decay"])


def test_no_decay_on_bert_layernorm_and_biases(bert):
    groups = ftk.param_groups(bert, lr=1e-3, weight_decay=0.01)

    no_decay = {id(p) for g in groups if g["no_decay"] for p in g["params"]}
    expected = {id(p) for n, p in bert.named_parameters() if n.endswith("bias") or "LayerNorm" in n}
    assert no_decay == expected


def test_weight_decay_none_uses_optimizer_default(resnet):
    groups = ftk.param_groups(resnet, lr=1e-3)

    optimizer = torch.optim.AdamW(groups, weight_decay=0.02)

    assert {g["weight_decay"] for g in optimizer.param_groups if not g["no_decay"]} == {0.02}
    assert {g["weight_decay"] for g in optimizer.param_groups if g["no_decay"]} == {0.0}


def test_union_is_trainable_parameters_once(mobilenet):
    ftk.freeze_to(mobilenet, -4)

    groups = ftk.param_groups(mobilenet, lr=slice(1e-4, 1e-2), weight_decay=0.1)

    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in mobilenet.parameters() if p.requires_grad}


def test_tied_parameter_appears_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight

    groups = ftk.param_groups(model, lr=1e-3)

    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len({id(p) for p in model.parameters()})


def test_custom_norm_class_gets_no_decay():
    class MyRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4, 4))

    module = MyRMSNorm()

    assert ftk.is_no_decay(module, "scale", module.scale)
    assert not ftk.is_no_decay(nn.Linear(4, 4), "weight", nn.Linear(4, 4).weight)
    assert ftk.is_no_decay(nn.LayerNorm(4), "weight", nn.LayerNorm(4).weight)


@pytest.mark.parametrize(
    "optimizer",
    [torch.optim.SGD, torch.optim.AdamW, torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adagrad],
)
def test_groups_accepted_by_torch_optimizers(optimizer):
    model = make_bert()

    opt = optimizer(ftk.param_groups(model, lr=slice(1e-4, 1e-2), weight_decay=0.01))

    assert [g["lr"] for g in opt.param_groups][-1] == 1e-2
    assert all("name" in g for g in opt.param_groups)


def test_no_trainable_parameters_raises(resnet):
    ftk.freeze(resnet)

    with pytest.raises(ftk.NoParametersError, match=r"No parameter of ResNet is trainable.*freeze_to\(model, -1\)"):
        ftk.param_groups(resnet, lr=1e-3)


@pytest.mark.parametrize(
    ("lr", "message"),
    [
        (0.0, r"lr=0.0 must be a positive finite number"),
        (-1e-3, r"lr=-0.001 must be a positive finite number"),
        (float("nan"), r"lr=nan must be a positive finite number"),
        (slice(0, 1e-3), r"start=0 must be a positive finite number"),
        (slice(1e-5, 1e-3, 2), r"has a step"),
        (slice(1e-3, 1e-5), r"falls toward the head"),
    ],
)
def test_bad_lr_raises(resnet, lr, message):
    with pytest.raises(ValueError, match=message):
        ftk.param_groups(resnet, lr=lr)


def test_layer_lrs_values():
    assert ftk.layer_lrs(slice(1e-5, 1e-3), 3) == pytest.approx([1e-5, 1e-4, 1e-3], rel=1e-12)
    assert ftk.layer_lrs(slice(1e-3), 3) == pytest.approx([1e-4, 1e-4, 1e-3])
    assert ftk.layer_lrs(slice(1e-5, 1e-3), 1) == [1e-3]
