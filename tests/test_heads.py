from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import bert_inputs, make_bert
from torch import nn

import finetunekit as ftk


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: torchvision.models.resnet18(weights=None), "fc"),
        (lambda: torchvision.models.mobilenet_v2(weights=None), "classifier.1"),
        (lambda: torchvision.models.vit_b_16(weights=None, image_size=32), "heads.head"),
        (lambda: torchvision.models.squeezenet1_0(weights=None), "classifier.1"),
        (lambda: torchvision.models.convnext_tiny(weights=None), "classifier.2"),
        (lambda: make_bert(), "classifier"),
    ],
    ids=["resnet18", "mobilenet_v2", "vit_b_16", "squeezenet1_0", "convnext_tiny", "bert"],
)
def test_find_head_names_output_layer(build, expected):
    model = build()

    name, module = ftk.find_head(model)

    assert name == expected
    assert module is model.get_submodule(expected)


def test_find_head_on_hf_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )

    name, _ = ftk.find_head(LlamaForCausalLM(config))

    assert name == "lm_head"


def test_replace_head_resnet_output_shape(resnet):
    new = ftk.replace_head(resnet, 5)

    assert resnet.fc is new
    assert (new.in_features, new.out_features) == (512, 5)
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_replace_head_mobilenet_keeps_dropout(mobilenet):
    dropout = mobilenet.classifier[0]

    ftk.replace_head(mobilenet, 7)

    assert mobilenet.classifier[0] is dropout
    assert mobilenet.classifier[1].out_features == 7
    assert mobilenet.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_replace_head_bert_output_and_config(bert):
    ftk.replace_head(bert, 6)

    logits = bert(**bert_inputs(batch=4)).logits

    assert logits.shape == (4, 6)
    assert bert.config.num_labels == 6
    assert bert.num_labels == 6
    assert len(bert.config.id2label) == 6


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_replace_head_keeps_dtype(arch, dtype):
    model = getattr(torchvision.models, arch)(weights=None).to(dtype)

    new = ftk.replace_head(model, 3)

    assert new.weight.dtype == dtype
    output = model.eval()(torch.randn(2, 3, 32, 32, dtype=dtype))
    assert output.shape == (2, 3)
    assert output.dtype == dtype


def test_replace_head_keeps_device():
    model = torchvision.models.resnet18(weights=None).to("meta")

    new = ftk.replace_head(model, 3)

    assert new.weight.device.type == "meta"


def test_replace_head_bert_keeps_dtype():
    model = make_bert().to(torch.float64)

    ftk.replace_head(model, 4)

    assert model(**bert_inputs()).logits.dtype == torch.float64


def test_replace_head_with_module(resnet):
    head = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 2))

    new = ftk.replace_head(resnet, head)

    assert new is head
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_replace_head_squeezenet_conv():
    model = torchvision.models.squeezenet1_0(weights=None)

    new = ftk.replace_head(model, 4)

    assert isinstance(new, nn.Conv2d)
    assert new.out_channels == 4
    assert model.num_classes == 4
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def test_mean_pooling_averages_real_tokens(bert):
    inputs = bert_inputs()
    ftk.replace_head(bert, 3, pooling="mean")

    logits = bert(**inputs).logits

    hidden = bert.bert(**inputs).last_hidden_state
    expected = bert.classifier(masked_mean(hidden, inputs["attention_mask"]))
    torch.testing.assert_close(logits, expected)
    assert isinstance(bert.bert.pooler, ftk.TokenPooler)


def test_cls_pooling_takes_first_token(bert):
    inputs = bert_inputs()
    ftk.replace_head(bert, 3, pooling="cls")

    logits = bert(**inputs).logits

    hidden = bert.bert(**inputs).last_hidden_state
    torch.testing.assert_close(logits, bert.classifier(hidden[:, 0]))


def test_mean_pooling_twice_keeps_one_hook(bert):
    ftk.replace_head(bert, 3, pooling="mean")
    ftk.replace_head(bert, 3, pooling="mean")

    assert len(bert.bert._forward_pre_hooks) == 1


def test_mean_pooling_survives_deepcopy(bert):
    inputs = bert_inputs()
    ftk.replace_head(bert, 3, pooling="mean")

    clone = copy.deepcopy(bert)

    torch.testing.assert_close(clone(**inputs).logits, bert(**inputs).logits)


def test_identity_fc_has_no_head(resnet):
    resnet.fc = nn.Identity()

    with pytest.raises(ftk.HeadNotFoundError, match="Found no output layer in ResNet"):
        ftk.find_head(resnet)


def test_bare_hf_encoder_has_no_head():
    model = make_bert().bert

    with pytest.raises(ftk.HeadNotFoundError, match="AutoModelForSequenceClassification"):
        ftk.replace_head(model, 3)


def test_replace_head_bad_count_leaves_model(resnet):
    head = resnet.fc

    with pytest.raises(ValueError, match="num_classes=0 must be a positive integer"):
        ftk.replace_head(resnet, 0)

    assert resnet.fc is head


def test_replace_head_unknown_name_raises(resnet):
    with pytest.raises(ValueError, match="head='fcc' names no module of ResNet"):
        ftk.replace_head(resnet, 3, head="fcc")


def test_pooling_on_cnn_leaves_model(resnet):
    head = resnet.fc

    with pytest.raises(NotImplementedError, match="pooling='mean' needs a Hugging Face encoder"):
        ftk.replace_head(resnet, 3, pooling="mean")

    assert resnet.fc is head


def test_replace_head_with_explicit_name():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Softmax(dim=-1))

    ftk.replace_head(model, 2, head="2")

    assert model(torch.randn(3, 4)).shape == (3, 2)


def test_pooling_on_roberta_raises():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48
    )
    model = RobertaForSequenceClassification(config)
    head = model.classifier.out_proj

    with pytest.raises(NotImplementedError, match="RobertaForSequenceClassification has none"):
        ftk.replace_head(model, 3, pooling="mean")

    assert model.classifier.out_proj is head


def test_roberta_head_is_out_proj():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48
    )
    model = RobertaForSequenceClassification(config)

    ftk.replace_head(model, 4)

    assert ftk.find_head(model)[0] == "classifier.out_proj"
    assert model.classifier.out_proj.out_features == 4
    assert isinstance(model.classifier.dense, nn.Linear)
