from __future__ import annotations

import pytest
import torch
from conftest import snapshot, trainable_names
from torch import nn

import finetunekit as ftk


def names_under(model: nn.Module, *prefixes: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def test_freeze_to_head_only_resnet(resnet):
    summary = ftk.freeze_to(resnet, -1)

    assert trainable_names(resnet) == {"fc.weight", "fc.bias"}
    assert summary.num_trainable == 512 * 1000 + 1000
    assert summary.num_frozen == sum(p.numel() for p in resnet.parameters()) - summary.num_trainable


def test_freeze_to_top_three_resnet(resnet):
    ftk.freeze_to(resnet, -3)

    assert trainable_names(resnet) == names_under(resnet, "layer4.0.", "layer4.1.", "fc.")


def test_freeze_to_head_only_mobilenet(mobilenet):
    ftk.freeze_to(mobilenet, -1)

    assert trainable_names(mobilenet) == {"classifier.1.weight", "classifier.1.bias"}


def test_freeze_to_top_three_mobilenet(mobilenet):
    ftk.freeze_to(mobilenet, -3)

    assert trainable_names(mobilenet) == names_under(mobilenet, "features.17.", "features.18.", "classifier.")


def test_freeze_to_bert(bert):
    ftk.freeze_to(bert, -1)
    assert trainable_names(bert) == {"classifier.weight", "classifier.bias"}

    ftk.freeze_to(bert, -3)
    assert trainable_names(bert) == names_under(bert, "bert.encoder.layer.2.", "bert.pooler.", "classifier.")


def test_freeze_to_positive_index(bert):
    ftk.freeze_to(bert, 1)

    assert trainable_names(bert) == set(dict(bert.named_parameters())) - names_under(bert, "bert.embeddings.")


def test_freeze_to_zero_trains_everything(resnet):
    ftk.freeze_to(resnet, -1)

    summary = ftk.freeze_to(resnet, 0)

    assert trainable_names(resnet) == set(dict(resnet.named_parameters()))
    assert "conv1.weight" in summary.unfrozen
    assert summary.frozen == ()


def test_freeze_all_then_unfreeze_pattern(resnet):
    ftk.freeze(resnet)

    summary = ftk.unfreeze(resnet, "layer4.*")

    assert trainable_names(resnet) == names_under(resnet, "layer4.")
    assert summary.unfrozen[0] == "layer4.0.conv1.weight"


def test_freeze_by_module_name_and_type(resnet):
    ftk.freeze(resnet, "layer1", nn.BatchNorm2d)

    frozen = set(dict(resnet.named_parameters())) - trainable_names(resnet)
    batchnorm = {n for n, _ in resnet.named_parameters() if ".bn" in n or n.startswith("bn") or "downsample.1" in n}
    assert frozen == names_under(resnet, "layer1.") | batchnorm


def test_freeze_by_group_index_and_name(bert):
    ftk.freeze(bert, 0, "bert.encoder.layer.1", -1)

    frozen = set(dict(bert.named_parameters())) - trainable_names(bert)
    assert frozen == names_under(bert, "bert.embeddings.", "bert.encoder.layer.1.", "classifier.")


def test_head_alias_selects_head_group(mobilenet):
    ftk.freeze(mobilenet)

    ftk.unfreeze(mobilenet, "head")

    assert trainable_names(mobilenet) == {"classifier.1.weight", "classifier.1.bias"}


def test_freeze_by_predicate(resnet):
    ftk.freeze(resnet, lambda name, p: name.endswith("bias"))

    assert all(not p.requires_grad for n, p in resnet.named_parameters() if n.endswith("bias"))
    assert all(p.requires_grad for n, p in resnet.named_parameters() if not n.endswith("bias"))


def test_freeze_clears_gradients(resnet):
    resnet(torch.randn(2, 3, 32, 32)).sum().backward()

    ftk.freeze_to(resnet, -1)

    assert all(p.grad is None for n, p in resnet.named_parameters() if not n.startswith("fc."))
    assert resnet.fc.weight.grad is not None


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, *, set_to_none: bool) -> None:
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=set_to_none)
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 1000, (4,)))
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd-momentum", "adamw-wd"],
)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_frozen_weights_bit_identical_after_steps(resnet, make_optimizer, set_to_none):
    # The optimizer holds every parameter and has momentum or Adam state for them, as in a
    # loop that built it before freezing.
    optimizer = make_optimizer(resnet.parameters())
    train_steps(resnet, optimizer, 2, set_to_none=set_to_none)
    ftk.freeze_to(resnet, -1)
    before = snapshot(resnet)

    train_steps(resnet, optimizer, 3, set_to_none=set_to_none)

    after = snapshot(resnet)
    for name in before:
        if name.startswith("fc."):
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name


def test_frozen_batchnorm_keeps_running_stats(resnet):
    ftk.freeze_to(resnet, -1)
    before = snapshot(resnet.bn1)

    resnet.train()
    for _ in range(3):
        resnet(torch.randn(4, 3, 32, 32) * 5 + 2)

    assert resnet.bn1.training is False
    for name, value in snapshot(resnet.bn1).items():
        assert torch.equal(value, before[name]), name


def test_frozen_batchnorm_normalizes_like_eval(resnet):
    ftk.freeze_to(resnet, -1)
    x = torch.randn(4, 64, 8, 8)
    reference = nn.BatchNorm2d(64).eval()
    reference.load_state_dict(resnet.bn1.state_dict())

    resnet.train()

    torch.testing.assert_close(resnet.bn1(x), reference(x))


def test_trainable_batchnorm_still_updates(resnet):
    ftk.freeze_to(resnet, -3)
    before = resnet.layer4[1].bn1.running_mean.clone()

    resnet.train()
    resnet(torch.randn(4, 3, 32, 32))

    assert resnet.layer4[1].bn1.training
    assert not torch.equal(resnet.layer4[1].bn1.running_mean, before)


def test_unfreeze_returns_batchnorm_to_training(resnet):
    ftk.freeze_to(resnet, -1)
    before = resnet.bn1.running_mean.clone()

    ftk.unfreeze(resnet)
    resnet(torch.randn(4, 3, 32, 32))

    assert resnet.bn1.training
    assert not torch.equal(resnet.bn1.running_mean, before)


def test_unknown_target_names_close_matches(resnet):
    with pytest.raises(ftk.NoMatchingTargetError, match=r"'layr4' matched no layer group.*Did you mean 'layer4'"):
        ftk.freeze(resnet, "layr4")


def test_unknown_pattern_raises(resnet):
    with pytest.raises(ValueError, match=r"'blocks\.\*' matched no layer group"):
        ftk.freeze(resnet, "blocks.*")


def test_type_without_parameters_raises(resnet):
    with pytest.raises(ftk.NoMatchingTargetError, match="LayerNorm matched no module with parameters in ResNet"):
        ftk.freeze(resnet, nn.LayerNorm)


def test_failed_freeze_leaves_model_unchanged(resnet):
    with pytest.raises(ValueError, match="'nope'"):
        ftk.freeze(resnet, "fc", "nope")

    assert trainable_names(resnet) == set(dict(resnet.named_parameters()))


def test_freeze_to_out_of_range_names_valid_range(resnet):
    with pytest.raises(IndexError, match=r"ResNet has 10 layer groups .* Pass -10 <= n <= 10"):
        ftk.freeze_to(resnet, 11)

    assert trainable_names(resnet) == set(dict(resnet.named_parameters()))


def test_group_index_out_of_range_raises(bert):
    with pytest.raises(IndexError, match="Layer-group index 6 is out of range"):
        ftk.freeze(bert, 6)


def test_freeze_to_all_groups_warns(resnet):
    with pytest.warns(ftk.FinetuneKitWarning, match="freezes all 10 layer groups"):
        ftk.freeze_to(resnet, 10)

    assert trainable_names(resnet) == set()


def test_bad_target_type_raises(resnet):
    with pytest.raises(TypeError, match="has type float"):
        ftk.freeze(resnet, 1.5)


def test_model_without_parameters_raises():
    model = nn.Sequential(nn.ReLU())

    with pytest.raises(ftk.NoParametersError, match="has no parameters"):
        ftk.freeze_to(model, -1)
    with pytest.raises(ftk.NoParametersError, match="has no parameters"):
        ftk.freeze(model)


def test_regex_target_matches_whole_names(resnet):
    ftk.freeze(resnet, r"re:layer[12]\.\d+")

    frozen = set(dict(resnet.named_parameters())) - trainable_names(resnet)
    assert frozen == names_under(resnet, "layer1.", "layer2.")


def test_invalid_regex_raises(resnet):
    with pytest.raises(ValueError, match=r"Freeze target 're:layer\[' is not a valid regular expression"):
        ftk.freeze(resnet, "re:layer[")


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.lm_head = nn.Linear(4, 10)
        self.lm_head.weight = self.embed.weight


def test_freezing_tied_head_warns_about_embedding():
    model = TiedLM()

    with pytest.warns(ftk.FinetuneKitWarning, match=r"Freezing 'lm_head.weight' also freezes \['embed.weight'\]"):
        ftk.freeze(model, "lm_head")

    assert not model.embed.weight.requires_grad
    assert not model.lm_head.bias.requires_grad


def test_freezing_tied_embedding_names_head():
    model = TiedLM()

    with pytest.warns(ftk.FinetuneKitWarning, match=r"Freezing 'embed.weight' also freezes \['lm_head.weight'\]"):
        ftk.freeze(model, "embed")


def test_freezing_both_tied_sides_is_silent():
    model = TiedLM()

    summary = ftk.freeze(model, "embed", "lm_head")

    assert set(summary.frozen) == {"embed.weight", "lm_head.bias"}


def test_frozen_context_restores_state(resnet):
    ftk.freeze(resnet, "layer1")
    before = {n: p.requires_grad for n, p in resnet.named_parameters()}

    with ftk.frozen(resnet, "layer4", "fc") as summary:
        assert not resnet.fc.weight.requires_grad
        assert not resnet.layer4[1].bn2.training
        assert "fc.weight" in summary.frozen

    assert {n: p.requires_grad for n, p in resnet.named_parameters()} == before
    assert resnet.layer4[1].bn2.training
    assert not resnet.layer1[0].bn1.training


def test_frozen_context_restores_after_error(resnet):
    with pytest.raises(RuntimeError, match="boom"):
        with ftk.frozen(resnet):
            raise RuntimeError("boom")

    assert trainable_names(resnet) == set(dict(resnet.named_parameters()))
