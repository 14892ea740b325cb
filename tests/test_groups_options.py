"""layer_groups options: a user's split, merging into fewer groups, forward execution order."""

from __future__ import annotations

import pytest
import torch
from conftest import bert_inputs
from torch import nn

import finetunekit as ftk


def param_names(group: ftk.LayerGroup) -> set[str]:
    return {name for name, _ in group.named_parameters()}


def test_split_mapping_of_patterns(resnet):
    groups = ftk.layer_groups(
        resnet, split={"early": ["conv1", "bn1", "layer1", "layer2"], "late": "layer[34]", "head": "fc"}
    )

    assert [g.name for g in groups] == ["early", "late", "head"]
    assert param_names(groups[2]) == {"fc.weight", "fc.bias"}
    assert [n for n, _ in groups[1].modules] == ["layer3", "layer4"]
    assert groups[2].is_head
    assert sum(len(g.params) for g in groups) == len(list(resnet.parameters()))


def test_split_callable_returning_modules(resnet):
    def splitter(model: nn.Module) -> list[list[nn.Module]]:
        return [[model.conv1, model.bn1, model.layer1, model.layer2, model.layer3], [model.layer4], [model.fc]]

    groups = ftk.layer_groups(resnet, split=splitter)

    assert [g.name for g in groups] == ["group0", "layer4", "fc"]
    assert param_names(groups[1]) == {n for n, _ in resnet.named_parameters() if n.startswith("layer4.")}


def test_split_drives_freeze_to(resnet):
    groups = ftk.layer_groups(resnet, split={"body": ["conv1", "bn1", "layer*"], "head": "fc"})

    ftk.freeze_to(resnet, -1, groups=groups)

    assert {n for n, p in resnet.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}


def test_split_pattern_without_match_names_close(resnet):
    with pytest.raises(ftk.NoMatchingTargetError, match=r"split pattern 'layr4' matched no module .*Did you mean 'layer4'"):
        ftk.layer_groups(resnet, split={"body": "layr4", "head": "fc"})


def test_split_leaving_parameters_out_names_them(resnet):
    with pytest.raises(ValueError, match=r"split leaves 3 parameters of ResNet out of every group: \['conv1.weight', 'bn1.weight', 'bn1.bias'\]"):
        ftk.layer_groups(resnet, split={"body": "layer*", "head": "fc"})


def test_split_repeating_parameter_names_it(resnet):
    with pytest.raises(ValueError, match=r"split puts parameter 'layer4.1.conv1.weight' in two groups, 'a' and 'b'"):
        ftk.layer_groups(resnet, split={"a": ["conv1", "bn1", "layer*"], "b": "layer4.1", "head": "fc"})


def test_split_keeps_tied_weight_once():
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 10)
            self.lm_head.weight = self.embed.weight

    model = TinyLM()

    groups = ftk.layer_groups(model, split={"embed": "embed", "body": "body", "head": "lm_head"})

    assert param_names(groups[2]) == {"lm_head.bias"}
    assert groups[2].tied == ["lm_head.weight"]


def test_split_bad_item_type_raises(resnet):
    with pytest.raises(TypeError, match="split item 3 has type int"):
        ftk.layer_groups(resnet, split=[[3], ["fc"]])


def test_merge_into_near_equal_runs(resnet):
    groups = ftk.layer_groups(resnet, num_groups=4)

    assert [g.name for g in groups] == ["stem..layer1.1", "layer2.0..layer3.0", "layer3.1..layer4.1", "fc"]
    assert groups[-1].is_head
    assert sum(len(g.params) for g in groups) == len(list(resnet.parameters()))


def test_merge_drives_param_groups(bert):
    groups = ftk.layer_groups(bert, num_groups=3)

    lrs = {g["name"]: g["lr"] for g in ftk.param_groups(bert, lr=slice(1e-4, 1e-2), groups=groups)}

    assert lrs == pytest.approx(
        {"bert.embeddings..bert.encoder.layer.1": 1e-4, "bert.encoder.layer.2..bert.pooler": 1e-3, "classifier": 1e-2}
    )


@pytest.mark.parametrize("num_groups", [1, 11, 0])
def test_merge_out_of_range_raises(resnet, num_groups):
    with pytest.raises(ValueError, match=rf"num_groups={num_groups} is out of range.*Pass 2 <= num_groups <= 10"):
        ftk.layer_groups(resnet, num_groups=num_groups)


class Registered(nn.Module):
    """Registers its blocks in another order than forward runs them."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.early = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.middle = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.late(self.middle(self.early(x))))


def test_example_input_orders_by_forward():
    model = Registered().train()

    without = [g.name for g in ftk.layer_groups(model)]
    with_input = [g.name for g in ftk.layer_groups(model, example_input=torch.randn(2, 4))]

    assert without == ["late", "early", "middle", "fc"]
    assert with_input == ["early", "middle", "late", "fc"]
    assert model.training


def test_example_input_as_kwargs(bert):
    groups = ftk.layer_groups(bert, example_input=bert_inputs())

    assert [g.name for g in groups] == [g.name for g in ftk.layer_groups(bert)]


def test_example_input_removes_hooks(resnet):
    ftk.layer_groups(resnet, example_input=torch.randn(1, 3, 32, 32))

    assert all(not m._forward_pre_hooks for m in resnet.modules())
