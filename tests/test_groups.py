from __future__ import annotations

import pytest
import torchvision
from conftest import RESNET18_GROUPS, make_bert
from torch import nn

import finetunekit as ftk


def assert_each_parameter_once(model: nn.Module, groups: list[ftk.LayerGroup]) -> None:
    grouped = [id(p) for g in groups for p in g.parameters()]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}


def test_resnet_groups_are_stem_blocks_head(resnet):
    names = [g.name for g in ftk.layer_groups(resnet)]

    assert names == RESNET18_GROUPS


def test_resnet_group_holds_its_modules_parameters(resnet):
    groups = {g.name: g for g in ftk.layer_groups(resnet)}

    assert {id(p) for p in groups["layer4.1"].parameters()} == {id(p) for p in resnet.layer4[1].parameters()}
    assert {n for n, _ in groups["stem"].named_parameters()} == {"conv1.weight", "bn1.weight", "bn1.bias"}
    assert groups["fc"].is_head
    assert not groups["stem"].is_head


def test_mobilenet_groups_follow_features(mobilenet):
    names = [g.name for g in ftk.layer_groups(mobilenet)]

    assert names == [f"features.{i}" for i in range(19)] + ["classifier.1"]


def test_bert_groups_are_embeddings_layers_pooler_classifier(bert):
    names = [g.name for g in ftk.layer_groups(bert)]

    assert names == [
        "bert.embeddings",
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
        "bert.encoder.layer.2",
        "bert.pooler",
        "classifier",
    ]


@pytest.mark.parametrize(
    "build",
    [
        lambda: torchvision.models.resnet18(weights=None),
        lambda: torchvision.models.mobilenet_v2(weights=None),
        lambda: torchvision.models.vit_b_16(weights=None, image_size=32),
        lambda: torchvision.models.convnext_tiny(weights=None),
        lambda: torchvision.models.squeezenet1_0(weights=None),
        lambda: torchvision.models.googlenet(weights=None, init_weights=False),
        lambda: torchvision.models.swin_t(weights=None),
        lambda: make_bert(),
    ],
    ids=["resnet18", "mobilenet_v2", "vit_b_16", "convnext_tiny", "squeezenet1_0", "googlenet", "swin_t", "bert"],
)
def test_every_parameter_in_exactly_one_group(build):
    model = build()

    groups = ftk.layer_groups(model)

    assert_each_parameter_once(model, groups)
    assert groups[-1].is_head
    assert sum(g.is_head for g in groups) == 1


def test_vit_class_token_joins_stem():
    model = torchvision.models.vit_b_16(weights=None, image_size=32)

    groups = ftk.layer_groups(model)

    stem = {n for n, _ in groups[0].named_parameters()}
    assert groups[0].name == "stem"
    assert {"class_token", "conv_proj.weight", "encoder.pos_embedding"} <= stem


def test_model_without_stack_gets_group_per_child():
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3))
    model.add_module("norm", nn.BatchNorm2d(4))
    model.add_module("act", nn.ReLU())
    model.add_module("pool", nn.Flatten())
    model.add_module("out", nn.Linear(4, 2))

    groups = ftk.layer_groups(model)

    assert [g.name for g in groups] == ["conv", "norm", "out"]
    assert [n for n, _ in groups[1].modules] == ["norm", "act", "pool"]
    assert_each_parameter_once(model, groups)


def test_custom_module_falls_back_to_children():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3)
            self.conv2 = nn.Conv2d(4, 8, 3)
            self.fc1 = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 3)

    model = Net()

    groups = ftk.layer_groups(model)

    assert [g.name for g in groups] == ["conv1", "conv2", "fc1", "fc2"]
    assert groups[-1].is_head


def test_tied_weight_belongs_to_first_group():
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
            self.lm_head = nn.Linear(4, 10)
            self.lm_head.weight = self.embed.weight

    model = TinyLM()

    groups = ftk.layer_groups(model)

    assert [g.name for g in groups] == ["embed", "blocks.0", "blocks.1", "lm_head"]
    assert [n for n, _ in groups[0].named_parameters()] == ["embed.weight"]
    assert [n for n, _ in groups[-1].named_parameters()] == ["lm_head.bias"]
    assert groups[-1].tied == ["lm_head.weight"]
    assert_each_parameter_once(model, groups)


def test_model_without_parameters_raises():
    with pytest.raises(ftk.NoParametersError, match="Sequential has no parameters"):
        ftk.layer_groups(nn.Sequential(nn.ReLU()))


def test_layer_groups_do_not_modify_model(resnet):
    before = {n: p.requires_grad for n, p in resnet.named_parameters()}

    ftk.layer_groups(resnet)

    assert {n: p.requires_grad for n, p in resnet.named_parameters()} == before
    assert resnet.training


def test_num_params_counts_values(resnet):
    groups = ftk.layer_groups(resnet)

    assert groups[-1].num_params == 512 * 1000 + 1000
    assert sum(g.num_params for g in groups) == sum(p.numel() for p in resnet.parameters())


def test_fully_tied_head_stays_as_empty_group():
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.embed.weight

    model = TinyLM()

    groups = ftk.layer_groups(model)

    assert [g.name for g in groups] == ["embed", "blocks.0", "blocks.1", "lm_head"]
    assert groups[-1].is_head
    assert groups[-1].params == []
    assert groups[-1].tied == ["lm_head.weight"]
    with pytest.warns(ftk.FinetuneKitWarning, match=r"leaves no parameter trainable.*\['lm_head.weight'\]"):
        ftk.freeze_to(model, -1)


def test_stale_groups_raise(resnet):
    groups = ftk.layer_groups(resnet)
    ftk.replace_head(resnet, 3)

    with pytest.raises(ValueError, match=r"groups= does not match the parameters of ResNet: 2 parameters .*'fc.weight'"):
        ftk.freeze_to(resnet, -1, groups=groups)
    with pytest.raises(ValueError, match="Recompute the groups with layer_groups"):
        ftk.param_groups(resnet, lr=1e-3, groups=groups)


def test_gpt2_embeddings_form_stem_and_head_is_tied():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=100, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)

    groups = ftk.layer_groups(model)

    assert [g.name for g in groups] == ["stem", "transformer.h.0", "transformer.h.1", "transformer.ln_f", "lm_head"]
    assert {n for n, _ in groups[0].named_parameters()} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert groups[-1].is_head
    assert groups[-1].tied == ["lm_head.weight"]
    assert_each_parameter_once(model, groups)


def test_plain_sequential_of_linears():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    groups = ftk.layer_groups(model)

    assert [g.name for g in groups] == ["0", "2", "4"]
    assert groups[-1].is_head
