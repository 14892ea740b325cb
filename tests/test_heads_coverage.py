"""find_head and replace_head on every torchvision classification model, tiny Hugging Face
models and custom modules.

Most torchvision models are built on the meta device, where they allocate no memory and a
forward pass only computes shapes, so all of them fit in a few seconds.
"""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
import transformers
from torch import nn

import finetunekit as ftk
from finetunekit.heads import _auxiliary_head_names

NUM_CLASSES = 7

TORCHVISION_MODELS = torchvision.models.list_models(module=torchvision.models)

# Head of each torchvision family, looked up by the longest family name that starts the model name.
HEAD_BY_FAMILY = {
    "alexnet": "classifier.6",
    "convnext": "classifier.2",
    "densenet": "classifier",
    "efficientnet": "classifier.1",
    "googlenet": "fc",
    "inception_v3": "fc",
    "maxvit": "classifier.5",
    "mnasnet": "classifier.1",
    "mobilenet_v2": "classifier.1",
    "mobilenet_v3": "classifier.3",
    "regnet": "fc",
    "resnet": "fc",
    "resnext": "fc",
    "shufflenet": "fc",
    "squeezenet": "classifier.1",
    "swin": "head",
    "vgg": "classifier.6",
    "vit": "heads.head",
    "wide_resnet": "fc",
}

# RegNet builders compute their block widths with tensor operations and .tolist(), which
# fails on the meta device, so RegNets are built on the CPU.
# RegNets whose CPU build and forward pass take about a second or more; regnet_y_128gf
# allocates its 645M parameters (about 2.6 GB).
SLOW = {"regnet_x_16gf", "regnet_x_32gf", "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf"}

IMAGE_SIZE = {"inception_v3": 299}

# GoogLeNet and Inception v3 warn that their default initialization will change.
ignore_init_warning = pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")


def expected_head(name: str) -> str:
    families = [family for family in HEAD_BY_FAMILY if name.startswith(family)]
    assert families, f"no expected head for torchvision model {name!r}; add its family to HEAD_BY_FAMILY"
    return HEAD_BY_FAMILY[max(families, key=len)]


def builds_on_cpu(name: str) -> bool:
    return name.startswith("regnet_")


def build_torchvision(name: str, **kwargs) -> nn.Module:
    if builds_on_cpu(name):
        return torchvision.models.get_model(name, weights=None, **kwargs)
    with torch.device("meta"):
        return torchvision.models.get_model(name, weights=None, **kwargs)


def torchvision_params() -> list:
    params = []
    for name in TORCHVISION_MODELS:
        marks = []
        if name in SLOW:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@ignore_init_warning
@pytest.mark.parametrize("name", torchvision_params())
def test_torchvision_head_replaced(name):
    model = build_torchvision(name)
    device = "cpu" if builds_on_cpu(name) else "meta"
    # A RegNet ends in adaptive average pooling, so 64 px images are enough on the CPU.
    size = 64 if builds_on_cpu(name) else IMAGE_SIZE.get(name, 224)

    head_name, head = ftk.find_head(model)
    new = ftk.replace_head(model, NUM_CLASSES)

    assert head_name == expected_head(name)
    assert type(new) is type(head)
    assert model.get_submodule(head_name) is new
    assert out_features(new) == NUM_CLASSES
    assert new.weight.device.type == device
    with torch.no_grad():
        logits = model.eval()(torch.randn(2, 3, size, size, device=device))
    assert logits.shape == (2, NUM_CLASSES)


def test_torchvision_list_has_classifiers():
    # Guards the parametrization above against an empty or renamed model list.
    assert len(TORCHVISION_MODELS) >= 80
    assert {"resnet18", "googlenet", "inception_v3", "regnet_y_128gf", "vit_h_14"} <= set(TORCHVISION_MODELS)


@ignore_init_warning
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("googlenet", ["aux1.fc2", "aux2.fc2"]),
        ("inception_v3", ["AuxLogits.fc"]),
        ("resnet18", []),
    ],
)
def test_auxiliary_head_names(name, expected):
    assert _auxiliary_head_names(build_torchvision(name)) == expected


@ignore_init_warning
def test_auxiliary_head_names_without_aux_logits():
    model = build_torchvision("googlenet", aux_logits=False)

    assert _auxiliary_head_names(model) == []


@ignore_init_warning
@pytest.mark.parametrize(
    ("name", "size", "auxiliary"),
    [("googlenet", 224, ["aux1.fc2", "aux2.fc2"]), ("inception_v3", 299, ["AuxLogits.fc"])],
)
def test_replace_head_replaces_aux_heads(name, size, auxiliary):
    model = build_torchvision(name)

    ftk.replace_head(model, NUM_CLASSES)
    outputs = model.train()(torch.randn(2, 3, size, size, device="meta"))

    assert ftk.find_head(model)[0] == "fc"
    assert [model.get_submodule(aux).out_features for aux in auxiliary] == [NUM_CLASSES] * len(auxiliary)
    assert len(outputs) == 1 + len(auxiliary)
    for output in outputs:
        assert output.shape == (2, NUM_CLASSES)


@ignore_init_warning
def test_replace_head_with_module_warns_about_aux():
    model = build_torchvision("googlenet")
    aux = model.aux1.fc2

    with pytest.warns(ftk.FinetuneKitWarning, match=re.escape("auxiliary heads ['aux1.fc2', 'aux2.fc2']")):
        ftk.replace_head(model, nn.Linear(1024, NUM_CLASSES))

    assert model.aux1.fc2 is aux
    assert model.fc.out_features == NUM_CLASSES


@ignore_init_warning
def test_failed_replace_leaves_aux_heads():
    model = build_torchvision("googlenet")
    aux = [model.aux1.fc2, model.aux2.fc2, model.fc]

    with pytest.raises(NotImplementedError, match="pooling='mean'"):
        ftk.replace_head(model, NUM_CLASSES, pooling="mean")

    assert [model.aux1.fc2, model.aux2.fc2, model.fc] == aux


# Tiny Hugging Face configs. Each case below is a model builder, a function returning the
# keyword arguments of one forward pass over a batch of 2, and the expected head.
TEXT = {"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
DECODER = {**TEXT, "num_key_value_heads": 2, "pad_token_id": 0}


def text_inputs() -> dict[str, torch.Tensor]:
    # Token ids from 3 up avoid the pad, bos and eos ids of the configs below.
    return {"input_ids": torch.randint(3, 100, (2, 6))}


def image_inputs() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 32, 32)}


def bart_inputs() -> dict[str, torch.Tensor]:
    inputs = text_inputs()
    # BartForSequenceClassification reads the state at each sequence's eos token.
    inputs["input_ids"][:, -1] = 2
    return inputs


def t5_inputs() -> dict[str, torch.Tensor]:
    inputs = text_inputs()
    inputs["decoder_input_ids"] = inputs["input_ids"][:, :3]
    return inputs


HF_CASES = {
    "bert": (
        lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**TEXT)),
        text_inputs,
        "classifier",
    ),
    "roberta": (
        lambda: transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**TEXT)),
        text_inputs,
        "classifier.out_proj",
    ),
    "electra": (
        lambda: transformers.ElectraForSequenceClassification(transformers.ElectraConfig(embedding_size=16, **TEXT)),
        text_inputs,
        "classifier.out_proj",
    ),
    "llama": (
        lambda: transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**DECODER)),
        text_inputs,
        "score",
    ),
    "mistral": (
        lambda: transformers.MistralForSequenceClassification(transformers.MistralConfig(**DECODER)),
        text_inputs,
        "score",
    ),
    "qwen2": (
        lambda: transformers.Qwen2ForSequenceClassification(transformers.Qwen2Config(**DECODER)),
        text_inputs,
        "score",
    ),
    "distilbert": (
        lambda: transformers.DistilBertForSequenceClassification(
            transformers.DistilBertConfig(vocab_size=100, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
        ),
        text_inputs,
        "classifier",
    ),
    "deberta_v2": (
        lambda: transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(**TEXT)),
        text_inputs,
        "classifier",
    ),
    "bart": (
        lambda: transformers.BartForSequenceClassification(
            transformers.BartConfig(
                vocab_size=100,
                d_model=16,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=32,
                decoder_ffn_dim=32,
            )
        ),
        bart_inputs,
        "classification_head.out_proj",
    ),
    "vit": (
        lambda: transformers.ViTForImageClassification(
            transformers.ViTConfig(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                image_size=32,
                patch_size=8,
            )
        ),
        image_inputs,
        "classifier",
    ),
    "convnext": (
        lambda: transformers.ConvNextForImageClassification(
            transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
        ),
        image_inputs,
        "classifier",
    ),
    "swin": (
        lambda: transformers.SwinForImageClassification(
            transformers.SwinConfig(
                image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4
            )
        ),
        image_inputs,
        "classifier",
    ),
    "gpt2": (
        lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
        ),
        text_inputs,
        "lm_head",
    ),
    "llama_causal_lm": (
        lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER)),
        text_inputs,
        "lm_head",
    ),
    "t5": (
        lambda: transformers.T5ForConditionalGeneration(
            transformers.T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
        ),
        t5_inputs,
        "lm_head",
    ),
}

# Language models return one row of logits per token: 6 input tokens, or 3 decoder tokens for T5.
LOGITS_SHAPE = {"gpt2": (2, 6, NUM_CLASSES), "llama_causal_lm": (2, 6, NUM_CLASSES), "t5": (2, 3, NUM_CLASSES)}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_head_replaced(case):
    build, inputs, expected = HF_CASES[case]
    model = build().eval()

    head_name, _ = ftk.find_head(model)
    new = ftk.replace_head(model, NUM_CLASSES)
    logits = model(**inputs()).logits

    assert head_name == expected
    assert model.get_submodule(head_name) is new
    assert new.out_features == NUM_CLASSES
    assert model.config.num_labels == NUM_CLASSES
    assert logits.shape == LOGITS_SHAPE.get(case, (2, NUM_CLASSES))


def test_gpt2_replaced_head_stays_untied():
    model = HF_CASES["gpt2"][0]()
    embeddings = model.transformer.wte.weight
    assert model.lm_head.weight is embeddings

    ftk.replace_head(model, NUM_CLASSES)
    model.tie_weights()

    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.shape == (NUM_CLASSES, 16)
    assert model.transformer.wte.weight is embeddings
    assert embeddings.shape == (100, 16)


def test_untied_head_keeps_config():
    model = HF_CASES["llama_causal_lm"][0]()
    model.config.tie_word_embeddings = True

    ftk.replace_head(model, NUM_CLASSES)

    # This head never shared its weight, so the config keeps requesting tied embeddings.
    assert model.config.tie_word_embeddings is True


def test_t5_base_model_has_no_head():
    config = transformers.T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)

    with pytest.raises(ftk.HeadNotFoundError, match="T5Model is a Hugging Face base model"):
        ftk.find_head(transformers.T5Model(config))


def test_qa_outputs_is_head():
    model = transformers.BertForQuestionAnswering(transformers.BertConfig(**TEXT))

    assert ftk.find_head(model)[0] == "qa_outputs"


def test_sequential_head_is_last_linear():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(dim=-1))

    new = ftk.replace_head(model, NUM_CLASSES)

    assert ftk.find_head(model)[0] == "2"
    assert model[2] is new
    assert model(torch.randn(2, 4)).shape == (2, NUM_CLASSES)


class HeadFirst(nn.Module):
    """A model whose head attribute is registered before the body."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_head_before_body_is_found():
    model = HeadFirst()

    new = ftk.replace_head(model, NUM_CLASSES)

    assert ftk.find_head(model)[0] == "fc"
    assert model.fc is new
    assert model(torch.randn(2, 4)).shape == (2, NUM_CLASSES)


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)


class EncoderDecoder(nn.Module):
    """A model whose output layer sits inside a custom module class, where find_head does not look."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
        self.decoder = Decoder()


def test_no_head_error_lists_candidates():
    expected = (
        "Its last nn.Linear and 1x1 nn.Conv2d layers, in registration order, are "
        "['encoder.0', 'encoder.2', 'decoder.hidden', 'decoder.out']. If one of them is the output "
        "layer, pass its name, for example head='decoder.out'."
    )

    with pytest.raises(ftk.HeadNotFoundError, match=re.escape(expected)):
        ftk.find_head(EncoderDecoder())


def test_no_head_error_lists_last_five():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(7)], nn.Conv2d(4, 4, 3))

    with pytest.raises(ftk.HeadNotFoundError, match=re.escape("are ['2', '3', '4', '5', '6']")):
        ftk.find_head(model)


def test_no_head_error_without_candidates():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))

    with pytest.raises(ftk.HeadNotFoundError, match=re.escape("It contains no nn.Linear or 1x1 nn.Conv2d.")):
        ftk.find_head(model)


def test_removed_head_error_names_attribute():
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Identity()
    expected = (
        "its child 'fc' is Identity and contains no nn.Linear or 1x1 nn.Conv2d, so the head looks removed. "
        "To add one, pass a ready layer: replace_head(model, nn.Linear(in_features, num_classes), head='fc')."
    )

    with pytest.raises(ftk.HeadNotFoundError, match=re.escape(expected)):
        ftk.find_head(model)

    # The fix that the message suggests works.
    ftk.replace_head(model, nn.Linear(512, NUM_CLASSES), head="fc")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)
