from __future__ import annotations

import re

import pytest
import torch
import torchvision
from conftest import bert_inputs, make_bert, snapshot
from safetensors.torch import save_file
from torch import nn

import finetunekit as ftk

RESNET_SKIP_WARNING = (
    "load_pretrained skipped 2 head keys of ResNet whose shape differs from the checkpoint: "
    "fc.weight (checkpoint [1000, 512], model [5, 512]), fc.bias (checkpoint [1000], model [5]). "
    "They keep their new initialization, so train the head before using the model."
)


@pytest.fixture
def pretrained() -> dict[str, torch.Tensor]:
    """The state dict of a ResNet-18 with 1000 classes, standing in for downloaded weights."""
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture
def resnet5() -> nn.Module:
    """A ResNet-18 with another random initialization and a new 5-class head."""
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None)
    ftk.replace_head(model, 5)
    return model


def assert_loaded_except_head(model: nn.Module, checkpoint: dict[str, torch.Tensor], head: str) -> None:
    loaded = model.state_dict()
    for key, tensor in checkpoint.items():
        if not key.startswith(f"{head}."):
            assert torch.equal(loaded[key], tensor), key


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_resnet_file_skips_head(tmp_path, pretrained, resnet5, suffix):
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(pretrained, path)
    else:
        torch.save(pretrained, path)
    head = snapshot(resnet5.fc)

    with pytest.warns(ftk.FinetuneKitWarning, match=re.escape(RESNET_SKIP_WARNING)):
        skipped = ftk.load_pretrained(resnet5, path)

    assert skipped == ["fc.weight", "fc.bias"]
    assert_loaded_except_head(resnet5, pretrained, "fc")
    assert_unchanged(resnet5.fc, head)
    assert resnet5.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_str_path_is_read(tmp_path, pretrained, resnet5):
    path = tmp_path / "resnet18.pt"
    torch.save(pretrained, path)

    with pytest.warns(ftk.FinetuneKitWarning):
        skipped = ftk.load_pretrained(resnet5, str(path))

    assert skipped == ["fc.weight", "fc.bias"]
    assert_loaded_except_head(resnet5, pretrained, "fc")


def test_matching_head_is_loaded(pretrained):
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None)
    ftk.replace_head(model, 1000)

    skipped = ftk.load_pretrained(model, pretrained)

    assert skipped == []
    assert torch.equal(model.fc.weight, pretrained["fc.weight"])
    assert_loaded_except_head(model, pretrained, "fc")


def test_bert_skips_classifier():
    source = make_bert(num_labels=3)
    pretrained = source.state_dict()
    torch.manual_seed(1)
    model = make_bert(num_labels=3)
    ftk.replace_head(model, 5)
    inputs = bert_inputs()

    with pytest.warns(ftk.FinetuneKitWarning, match=re.escape("classifier.weight (checkpoint [3, 32], model [5, 32])")):
        skipped = ftk.load_pretrained(model, pretrained)

    assert skipped == ["classifier.weight", "classifier.bias"]
    assert_loaded_except_head(model, pretrained, "classifier")
    torch.testing.assert_close(model.bert(**inputs).pooler_output, source.bert(**inputs).pooler_output)
    assert model(**inputs).logits.shape == (4, 5)


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
def test_googlenet_skips_aux_heads():
    with torch.device("meta"):
        pretrained = torchvision.models.googlenet(weights=None).state_dict()
        model = torchvision.models.googlenet(weights=None)
    ftk.replace_head(model, 5)

    with pytest.warns(ftk.FinetuneKitWarning, match="skipped 6 head keys of GoogLeNet"):
        skipped = ftk.load_pretrained(model, pretrained)

    assert skipped == [
        "aux1.fc2.weight",
        "aux1.fc2.bias",
        "aux2.fc2.weight",
        "aux2.fc2.bias",
        "fc.weight",
        "fc.bias",
    ]


def test_mismatch_outside_head_raises():
    pretrained = make_bert().state_dict()
    pretrained["bert.embeddings.word_embeddings.weight"] = torch.zeros(100, 32)
    model = make_bert()
    ftk.replace_head(model, 5)
    before = snapshot(model)
    expected = (
        "Cannot load the checkpoint into BertForSequenceClassification: shape mismatch outside the "
        "head in 1 tensor: bert.embeddings.word_embeddings.weight (checkpoint [100, 32], model [120, 32]). "
        "Only the keys of the head ['classifier'] may change shape, because replace_head rebuilds it. "
        "The model was not changed."
    )

    with pytest.raises(ValueError, match=re.escape(expected)):
        ftk.load_pretrained(model, pretrained)

    assert_unchanged(model, before)


def test_mismatch_raises_without_strict(pretrained, resnet5):
    pretrained["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    before = snapshot(resnet5)

    with pytest.raises(ValueError, match=re.escape("conv1.weight (checkpoint [32, 3, 7, 7], model [64, 3, 7, 7])")):
        ftk.load_pretrained(resnet5, pretrained, strict=False)

    assert_unchanged(resnet5, before)


def test_missing_key_raises(pretrained, resnet5):
    del pretrained["layer1.0.conv1.weight"]
    before = snapshot(resnet5)
    expected = (
        "Cannot load the checkpoint into ResNet: missing keys (1), in the model but not the "
        "checkpoint: ['layer1.0.conv1.weight']. The model was not changed. Pass strict=False"
    )

    with pytest.raises(ValueError, match=re.escape(expected)):
        ftk.load_pretrained(resnet5, pretrained)

    assert_unchanged(resnet5, before)


def test_unexpected_key_raises(pretrained, resnet5):
    pretrained["fc2.weight"] = torch.zeros(5, 512)
    before = snapshot(resnet5)

    with pytest.raises(
        ValueError, match=re.escape("unexpected keys (1), in the checkpoint but not the model: ['fc2.weight']")
    ):
        ftk.load_pretrained(resnet5, pretrained)

    assert_unchanged(resnet5, before)


def test_not_strict_loads_the_rest(pretrained, resnet5):
    del pretrained["layer1.0.conv1.weight"]
    pretrained["fc2.weight"] = torch.zeros(5, 512)
    kept = resnet5.layer1[0].conv1.weight.detach().clone()

    with pytest.warns(ftk.FinetuneKitWarning, match=re.escape(RESNET_SKIP_WARNING)):
        skipped = ftk.load_pretrained(resnet5, pretrained, strict=False)

    assert skipped == ["fc.weight", "fc.bias"]
    assert torch.equal(resnet5.layer1[0].conv1.weight, kept)
    assert torch.equal(resnet5.layer1[0].conv2.weight, pretrained["layer1.0.conv2.weight"])


def test_prefixed_keys_get_hint(pretrained, resnet5):
    wrapped = {f"module.{key}": tensor for key, tensor in pretrained.items()}

    with pytest.raises(
        ValueError, match=re.escape("The checkpoint's keys start with 'module.' where the model's do not")
    ):
        ftk.load_pretrained(resnet5, wrapped)


def test_base_model_checkpoint_gets_hint():
    pretrained = make_bert().bert.state_dict()

    with pytest.raises(
        ValueError, match=re.escape("The model's keys start with 'bert.' where the checkpoint's do not")
    ):
        ftk.load_pretrained(make_bert(), pretrained)


def make_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def test_tied_key_stored_once_loads():
    pretrained = make_gpt2().state_dict()
    del pretrained["lm_head.weight"]
    torch.manual_seed(1)
    model = make_gpt2()

    skipped = ftk.load_pretrained(model, pretrained)

    assert skipped == []
    assert torch.equal(model.lm_head.weight, pretrained["transformer.wte.weight"])


def test_missing_tied_head_gets_hint():
    pretrained = make_gpt2().state_dict()
    del pretrained["lm_head.weight"]
    model = make_gpt2()
    ftk.replace_head(model, 5)

    with pytest.raises(ValueError, match=re.escape("['lm_head.weight']. Only head keys are missing.")):
        ftk.load_pretrained(model, pretrained)


def test_training_checkpoint_raises_type_error(pretrained, resnet5):
    checkpoint = {"epoch": 3, "model": pretrained}

    with pytest.raises(TypeError, match=re.escape("state_dict['epoch'] has type int, not a tensor")) as info:
        ftk.load_pretrained(resnet5, checkpoint)

    assert "for example checkpoint['model']" in str(info.value)


def test_module_instead_of_state_dict_raises(resnet5):
    with pytest.raises(TypeError, match=re.escape("state_dict has type ResNet") + ".*Pass its .state_dict"):
        ftk.load_pretrained(resnet5, torchvision.models.resnet18(weights=None))


def test_unknown_suffix_raises(tmp_path, pretrained, resnet5):
    path = tmp_path / "resnet18.ckpt"
    torch.save(pretrained, path)

    with pytest.raises(ValueError, match=re.escape("has the suffix '.ckpt'")):
        ftk.load_pretrained(resnet5, path)


def test_missing_file_raises(tmp_path, resnet5):
    with pytest.raises(FileNotFoundError, match=re.escape("absent.pt' is not a file")):
        ftk.load_pretrained(resnet5, tmp_path / "absent.pt")
