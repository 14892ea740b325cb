"""Rates per group (decay factor, mapping, scale), stable layout, merging, no-decay options, L2-SP and schedulers."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from conftest import RESNET18_GROUPS, make_bert
from torch import nn

import finetunekit as ftk


def make_llama(tied: bool = False) -> nn.Module:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_labels=3,
        pad_token_id=0,
        tie_word_embeddings=tied,
    )
    return (LlamaForCausalLM if tied else LlamaForSequenceClassification)(config)


def rates(groups) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in groups}


def test_layer_decay_gives_head_lr_and_powers_below(resnet):
    groups = ftk.param_groups(resnet, lr=1e-3, layer_decay=0.5, merge=False)

    expected = {name: 1e-3 * 0.5 ** (9 - i) for i, name in enumerate(RESNET18_GROUPS)}
    assert rates(groups) == pytest.approx(expected, rel=1e-12)
    assert all(g["initial_lr"] == g["lr"] for g in groups)


def test_layer_decay_on_llama_spans_trainable_groups():
    model = make_llama()
    ftk.freeze_to(model, -3)  # model.layers.2, model.norm, score

    groups = ftk.param_groups(model, lr=2e-4, layer_decay=0.8)

    assert {g["name"]: g["lr"] for g in groups} == pytest.approx(
        {"model.layers.2": 2e-4 * 0.64, "model.norm": 2e-4 * 0.8, "score": 2e-4},
        rel=1e-12,
    )


def test_mapping_exact_name_beats_pattern(bert):
    lr = {
        "bert.encoder.*": 1e-4,
        "bert.*": 1e-5,
        "classifier": 1e-3,
        "bert.encoder.layer.2": 5e-4,
    }

    groups = ftk.param_groups(bert, lr=lr, merge=False)

    assert rates(groups) == {
        "bert.embeddings": 1e-5,
        "bert.encoder.layer.0": 1e-4,
        "bert.encoder.layer.1": 1e-4,
        "bert.encoder.layer.2": 5e-4,
        "bert.pooler": 1e-5,
        "classifier": 1e-3,
    }


def test_lr_scale_multiplies_matched_groups_only():
    model = make_llama()
    groups = ftk.param_groups(
        model,
        lr=slice(1e-3),
        lr_scale={"model.embed_tokens": 0.1, "score": 2},
        merge=False,
    )

    assert rates(groups) == pytest.approx(
        {
            "model.embed_tokens": 1e-5,
            "model.layers.0": 1e-4,
            "model.layers.1": 1e-4,
            "model.layers.2": 1e-4,
            "model.norm": 1e-4,
            "score": 2e-3,
        },
        rel=1e-12,
    )


def test_equal_rates_merge(resnet):
    groups = ftk.param_groups(resnet, lr=1e-3, weight_decay=0.1)

    assert [(g["name"], g["no_decay"]) for g in groups] == [
        ("stem..fc", False),
        ("stem..fc", True),
    ]
    assert groups[0]["layer_groups"] == RESNET18_GROUPS
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(resnet.parameters()))


def test_merge_keeps_different_rates_apart(resnet):
    groups = ftk.param_groups(resnet, lr={"fc": 1e-3, "layer4.*": 1e-4, "*": 1e-5})

    assert [(g["name"], g["lr"]) for g in groups if not g["no_decay"]] == [
        ("stem..layer3.1", 1e-5),
        ("layer4.0..layer4.1", 1e-4),
        ("fc", 1e-3),
    ]


def test_no_decay_set_on_llama():
    model = make_llama()

    groups = ftk.param_groups(model, lr=1e-3, weight_decay=0.1)

    no_decay = {id(p) for g in groups if g["no_decay"] for p in g["params"]}
    expected = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert expected and no_decay == expected
    assert all(p.ndim == 2 for g in groups if not g["no_decay"] for p in g["params"])


def test_batchnorm_weights_get_no_decay(resnet):
    groups = ftk.param_groups(resnet, lr=1e-3, weight_decay=0.1)

    no_decay = {id(p) for g in groups if g["no_decay"] for p in g["params"]}
    bn_weights = {id(m.weight) for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(bn_weights) == 20
    assert bn_weights <= no_decay


def test_no_decay_embeddings_option(bert):
    plain = ftk.param_groups(bert, lr=1e-3, weight_decay=0.1)
    exempt = ftk.param_groups(bert, lr=1e-3, weight_decay=0.1, no_decay_embeddings=True)

    def no_decay_names(groups):
        ids = {id(p) for g in groups if g["no_decay"] for p in g["params"]}
        return {n for n, p in bert.named_parameters() if id(p) in ids}

    assert no_decay_names(exempt) - no_decay_names(plain) == {
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
    }


def test_no_decay_embeddings_covers_vit_tokens():
    model = torchvision.models.vit_b_16(weights=None, image_size=32, num_classes=3)
    groups = ftk.param_groups(model, lr=1e-3, weight_decay=0.1, no_decay_embeddings=True)

    ids = {id(p) for g in groups if g["no_decay"] for p in g["params"]}
    assert id(model.class_token) in ids
    assert id(model.encoder.pos_embedding) in ids
    assert id(model.conv_proj.weight) not in ids


def test_custom_no_decay_rule_replaces_the_default(resnet):
    groups = ftk.param_groups(
        resnet,
        lr=1e-3,
        weight_decay=0.1,
        no_decay=lambda module, name, p: name == "bias",
    )

    no_decay = {id(p) for g in groups if g["no_decay"] for p in g["params"]}
    assert no_decay == {id(p) for n, p in resnet.named_parameters() if n.endswith("bias")}


def test_tied_lm_head_in_one_group():
    model = make_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight

    groups = ftk.param_groups(model, lr=slice(1e-4, 1e-3), weight_decay=0.1, merge=False)
    optimizer = torch.optim.AdamW(groups)  # torch raises on a parameter in two groups

    holders = [g["name"] for g in optimizer.param_groups if any(p is model.lm_head.weight for p in g["params"])]
    assert holders == ["model.embed_tokens"]


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9**step),
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 6], gamma=0.3),
        lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=20
        ),
        lambda opt: ftk.warmup_schedule(opt, total_steps=20, warmup_steps=4),
        lambda opt: ftk.one_cycle(opt, total_steps=20),
        lambda opt: ftk.slanted_triangular(opt, total_steps=20),
    ],
    ids=[
        "LambdaLR",
        "StepLR",
        "MultiStepLR",
        "ExponentialLR",
        "CosineAnnealingLR",
        "OneCycleLR",
        "warmup",
        "one_cycle",
        "slanted_triangular",
    ],
)
def test_schedulers_keep_ratios_between_groups(resnet, make_scheduler):
    groups = ftk.param_groups(resnet, lr=slice(1e-5, 1e-3), weight_decay=0.01)
    optimizer = torch.optim.SGD(groups, momentum=0.9)
    start = [g["lr"] for g in optimizer.param_groups]
    scheduler = make_scheduler(optimizer)

    for _ in range(10):
        optimizer.step()
        scheduler.step()

    now = [g["lr"] for g in optimizer.param_groups]
    assert now != pytest.approx(start)  # the scheduler did change the rates
    assert [n / now[-1] for n in now] == pytest.approx([s / start[-1] for s in start], rel=1e-9)


def test_reduce_on_plateau_keeps_ratios(resnet):
    optimizer = torch.optim.AdamW(ftk.param_groups(resnet, lr=slice(1e-5, 1e-3)))
    start = [g["lr"] for g in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)

    for _ in range(10):
        optimizer.step()
        scheduler.step(1.0)

    now = [g["lr"] for g in optimizer.param_groups]
    assert now[-1] < start[-1] / 4
    assert [n / now[-1] for n in now] == pytest.approx([s / start[-1] for s in start], rel=1e-9)


def test_stable_layout_unfreezes_mid_run(resnet):
    ftk.freeze_to(resnet, -1)
    groups = ftk.param_groups(resnet, lr=slice(1e-4, 1e-2), include_frozen=True, merge=False)
    assert sum(len(g["params"]) for g in groups) == len(list(resnet.parameters()))
    assert rates(groups)["stem"] == 1e-4  # the spread covers every group
    optimizer = torch.optim.AdamW(groups)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.95**step)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
    x = torch.randn(2, 3, 32, 32)

    def step() -> None:
        optimizer.zero_grad()
        resnet(x).square().mean().backward()
        optimizer.step()
        lambda_lr.step()
        plateau.step(1.0)

    resnet.train()
    for _ in range(3):
        step()
    layer4 = resnet.layer4[1].conv2.weight
    before = layer4.detach().clone()
    fc_state = {k: v.clone() for k, v in optimizer.state[resnet.fc.weight].items()}
    num_groups = len(optimizer.param_groups)

    ftk.unfreeze(resnet, "layer4.1", optimizer=optimizer)
    assert len(optimizer.param_groups) == num_groups
    assert all(torch.equal(optimizer.state[resnet.fc.weight][k], v) for k, v in fc_state.items())
    step()

    assert not torch.equal(layer4, before)
    assert float(optimizer.state[layer4]["step"]) == 1.0
    assert float(optimizer.state[resnet.fc.weight]["step"]) == 4.0
    assert resnet.layer4[0].conv1.weight.grad is None  # still frozen, so never stepped


def test_l2sp_pulls_toward_pretrained_not_zero(resnet):
    pretrained = resnet.layer1[0].conv1.weight.detach().clone()
    groups = ftk.param_groups(resnet, lr=0.1, weight_decay=0.5, decay_toward="pretrained")
    optimizer = torch.optim.AdamW(groups)
    with torch.no_grad():
        resnet.layer1[0].conv1.weight.add_(1.0)
        resnet.fc.weight.fill_(2.0)
    moved = resnet.layer1[0].conv1.weight.detach().clone()

    for p in resnet.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only the decay moves weights
    optimizer.step()

    # p -= lr * wd * (p - p0) = p - 0.05 * (p - p0); toward zero would give 0.95 * p.
    expected = moved - 0.05 * (moved - pretrained)
    assert torch.allclose(resnet.layer1[0].conv1.weight, expected, atol=1e-6)
    assert torch.allclose(resnet.fc.weight, torch.full_like(resnet.fc.weight, 2.0 * 0.95))  # the head decays to 0
    assert all(g["weight_decay"] == 0.0 for g in groups if g.get("l2sp"))


def test_l2sp_anchor_from_state_dict_for_resumed_runs(resnet):
    pretrained = {k: v.clone() for k, v in resnet.state_dict().items()}
    with torch.no_grad():
        resnet.layer2[0].conv1.weight.mul_(3.0)
    optimizer = torch.optim.SGD(ftk.param_groups(resnet, lr=1.0, weight_decay=1.0, decay_toward=pretrained))

    resnet.layer2[0].conv1.weight.grad = torch.zeros_like(resnet.layer2[0].conv1.weight)
    optimizer.step()

    assert torch.equal(resnet.layer2[0].conv1.weight, pretrained["layer2.0.conv1.weight"])


def test_l2sp_leaves_frozen_parameters_alone(resnet):
    ftk.freeze_to(resnet, -1)
    frozen_before = resnet.layer1[0].conv1.weight.detach().clone()
    optimizer = torch.optim.AdamW(
        ftk.param_groups(
            resnet,
            lr=0.1,
            weight_decay=0.5,
            decay_toward="pretrained",
            include_frozen=True,
        )
    )
    with torch.no_grad():
        resnet.fc.weight.add_(1.0)
    resnet.fc.weight.grad = torch.zeros_like(resnet.fc.weight)
    resnet.fc.bias.grad = torch.zeros_like(resnet.fc.bias)
    optimizer.step()

    assert torch.equal(resnet.layer1[0].conv1.weight, frozen_before)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"lr": {"layer9.*": 1e-3, "*": 1e-4}},
            ftk.NoMatchingTargetError,
            r"lr key 'layer9.\*' matches no layer group.*Did you mean",
        ),
        (
            {"lr": {"fc": 1e-3}},
            ftk.NoMatchingTargetError,
            r"no rate for layer group 'stem' and 8 more.*'\*': 1e-4",
        ),
        (
            {"lr": {"*": -1e-3}},
            ValueError,
            r"lr\['\*'\]=-0.001 must be a positive finite number",
        ),
        (
            {"lr": 1e-3, "lr_scale": {"head": 2.0}},
            ftk.NoMatchingTargetError,
            r"lr_scale key 'head' matches no",
        ),
        (
            {"lr": 1e-3, "lr_scale": {"fc": float("inf")}},
            ValueError,
            r"lr_scale\['fc'\]=inf must be",
        ),
        (
            {"lr": slice(1e-5, 1e-3), "layer_decay": 0.8},
            ValueError,
            r"layer_decay=0.8 needs a float lr",
        ),
        (
            {"lr": 1e-3, "layer_decay": 1.5},
            ValueError,
            r"layer_decay=1.5 must be in \(0, 1\]",
        ),
        ({"lr": float("inf")}, ValueError, r"lr=inf must be a positive finite number"),
        (
            {"lr": 1e-3, "weight_decay": -0.1},
            ValueError,
            r"weight_decay=-0.1 must be a non-negative",
        ),
        (
            {"lr": 1e-3, "decay_toward": "pretrained"},
            ValueError,
            r"decay_toward='pretrained' needs a positive weight_decay",
        ),
        (
            {"lr": 1e-3, "weight_decay": 0.1, "decay_toward": "origin"},
            ValueError,
            r"decay_toward='origin' is not",
        ),
        (
            {
                "lr": 1e-3,
                "weight_decay": 0.1,
                "decay_toward": {"fc.weight": torch.zeros(1)},
            },
            ValueError,
            r"decay_toward has no value for 20 decayed parameters, such as 'conv1.weight'",
        ),
    ],
)
def test_bad_input_names_the_value(resnet, kwargs, error, message):
    with pytest.raises(error, match=message):
        ftk.param_groups(resnet, **kwargs)


def test_rates_are_finite_and_ordered_for_deep_decay():
    model = make_bert(num_layers=6)
    groups = ftk.param_groups(model, lr=1e-3, layer_decay=0.65, merge=False)

    lrs = list(rates(groups).values())
    assert all(math.isfinite(r) and r > 0 for r in lrs)
    assert lrs == sorted(lrs)


def test_lora_plus_trains_b_matrices_at_a_multiple(bert):
    from finetunekit.lora import add_lora

    add_lora(bert, r=4, targets=["query", "value"])
    groups = ftk.param_groups(bert, lr=1e-4, lora_plus_ratio=16, merge=False)

    names = {id(p): n for n, p in bert.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    b_names = [n for n in lr_of if ".lora_B." in n]
    a_names = [n for n in lr_of if ".lora_A." in n]
    assert len(b_names) == len(a_names) == 6  # query and value in each of 3 layers
    assert {lr_of[n] for n in b_names} == {1.6e-3}
    assert {lr_of[n] for n in a_names} == {1e-4}
    assert all(g.get("lora_plus", False) == all(".lora_B." in names[id(p)] for p in g["params"]) for g in groups)


def test_lora_plus_without_adapters_is_an_error(resnet):
    with pytest.raises(ftk.NoMatchingTargetError, match=r"lora_plus_ratio=16 was given.*add_lora\(model\)"):
        ftk.param_groups(resnet, lr=1e-3, lora_plus_ratio=16)


@pytest.mark.parametrize("family", ["resnet", "bert", "llama"])
@pytest.mark.parametrize("form", ["slice", "layer_decay", "mapping"])
def test_every_rate_form_on_each_family(family, form):
    model = {"resnet": lambda: torchvision.models.resnet18(weights=None), "bert": make_bert, "llama": make_llama}[
        family
    ]()
    names = [g.name for g in ftk.layer_groups(model)]
    count = len(names)
    if form == "slice":
        groups = ftk.param_groups(model, lr=slice(1e-6, 1e-3), merge=False)
        expected = {n: 1e-6 * 1000 ** (i / (count - 1)) for i, n in enumerate(names)}
    elif form == "layer_decay":
        groups = ftk.param_groups(model, lr=1e-3, layer_decay=0.7, merge=False)
        expected = {n: 1e-3 * 0.7 ** (count - 1 - i) for i, n in enumerate(names)}
    else:
        groups = ftk.param_groups(model, lr={names[-1]: 1e-3, names[0]: 1e-6, "*": 1e-4}, merge=False)
        expected = {n: 1e-4 for n in names} | {names[0]: 1e-6, names[-1]: 1e-3}

    assert rates(groups) == pytest.approx(expected, rel=1e-12)
