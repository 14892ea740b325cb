"""Layer groups across architectures: every torchvision classifier and many Hugging Face model types."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

import finetunekit as ftk

TORCHVISION_MODELS = torchvision.models.list_models(module=torchvision.models)
# RegNets compute their block widths with tensors while they are built, which fails on the
# meta device, so they are built for real. The largest ones take seconds and gigabytes.
BUILT_ON_CPU = {name for name in TORCHVISION_MODELS if name.startswith("regnet")}
LARGE_ON_CPU = {"regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf", "regnet_x_32gf", "regnet_x_16gf"}


def build_torchvision(name: str) -> nn.Module:
    kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    if name in BUILT_ON_CPU:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torchvision.models.get_model(name, weights=None, **kwargs).to("meta")
    with torch.device("meta"):
        return torchvision.models.get_model(name, weights=None, **kwargs)


def first_calls(model: nn.Module, run: Callable[[], object]) -> dict[int, int]:
    """Return, for each module id, the position of its first call in one forward pass."""
    order: dict[int, int] = {}

    def record(module: nn.Module, args: object) -> None:
        order.setdefault(id(module), len(order))

    handles = [m.register_forward_pre_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return order


def assert_groups_follow_forward(groups: list[ftk.LayerGroup], order: dict[int, int]) -> None:
    starts = []
    for group in groups:
        calls = [order[id(m)] for _, m in group.modules if id(m) in order]
        if calls:
            starts.append((min(calls), group.name))
    assert starts == sorted(starts), f"groups out of forward order: {[name for _, name in starts]}"


def assert_each_parameter_once(model: nn.Module, groups: list[ftk.LayerGroup]) -> None:
    grouped = [id(p) for g in groups for p in g.parameters()]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}


def torchvision_params() -> list:
    return [
        pytest.param(name, marks=pytest.mark.slow) if name in LARGE_ON_CPU else name for name in TORCHVISION_MODELS
    ]


@pytest.mark.parametrize("name", torchvision_params())
def test_torchvision_groups(name):
    model = build_torchvision(name).eval()
    ftk.replace_head(model, 7)

    groups = ftk.layer_groups(model)

    size = 299 if name == "inception_v3" else 224
    order = first_calls(model, lambda: model(torch.empty(2, 3, size, size, device="meta")))
    assert len(groups) >= 3
    assert groups[-1].is_head
    assert groups[-1].name == ftk.find_head(model)[0]
    assert_each_parameter_once(model, groups)
    assert_groups_follow_forward(groups, order)


def test_torchvision_list_is_complete():
    assert len(TORCHVISION_MODELS) >= 80
    assert "resnet50" in TORCHVISION_MODELS


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_auxiliary_heads_join_head_group(name):
    model = build_torchvision(name)

    head = ftk.layer_groups(model)[-1]

    aux = {"googlenet": ["aux1", "aux2"], "inception_v3": ["AuxLogits"]}[name]
    assert [n for n, _ in head.modules] == ["fc", *aux]


# --- Hugging Face -------------------------------------------------------------------------

SMALL = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 48, "vocab_size": 100}


def hf_cases() -> dict[str, tuple[Callable[[], nn.Module], list[str]]]:
    """Model type -> (builder, expected group names)."""
    import transformers as tf

    def seq(prefix: str, layer: str) -> list[str]:
        return [f"{prefix}.{layer}.{i}" for i in range(3)]

    return {
        "bert": (
            lambda: tf.BertForSequenceClassification(tf.BertConfig(**SMALL)),
            ["bert.embeddings", *seq("bert.encoder", "layer"), "bert.pooler", "classifier"],
        ),
        "roberta": (
            lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**SMALL)),
            ["roberta.embeddings", *seq("roberta.encoder", "layer"), "classifier.dense", "classifier.out_proj"],
        ),
        "distilbert": (
            lambda: tf.DistilBertForSequenceClassification(
                tf.DistilBertConfig(dim=32, n_layers=3, n_heads=2, hidden_dim=48, vocab_size=100)
            ),
            ["distilbert.embeddings", *seq("distilbert.transformer", "layer"), "pre_classifier", "classifier"],
        ),
        "albert": (
            lambda: tf.AlbertForSequenceClassification(tf.AlbertConfig(embedding_size=16, **SMALL)),
            ["albert.embeddings", "albert.encoder", "albert.pooler", "classifier"],
        ),
        "electra": (
            lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=16, **SMALL)),
            ["stem", *seq("electra.encoder", "layer"), "classifier.dense", "classifier.out_proj"],
        ),
        "deberta-v2": (
            lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**SMALL)),
            ["deberta.embeddings", *seq("deberta.encoder", "layer"), "pooler", "classifier"],
        ),
        "gpt2": (
            lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=100, n_positions=64)),
            ["stem", *seq("transformer", "h"), "transformer.ln_f", "lm_head"],
        ),
        "llama": (
            lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **SMALL)),
            ["model.embed_tokens", *seq("model", "layers"), "model.norm", "lm_head"],
        ),
        "mistral": (
            lambda: tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, **SMALL)),
            ["model.embed_tokens", *seq("model", "layers"), "model.norm", "lm_head"],
        ),
        "qwen2": (
            lambda: tf.Qwen2ForSequenceClassification(tf.Qwen2Config(num_key_value_heads=2, pad_token_id=0, **SMALL)),
            ["model.embed_tokens", *seq("model", "layers"), "model.norm", "score"],
        ),
        "phi": (
            lambda: tf.PhiForCausalLM(tf.PhiConfig(num_key_value_heads=2, **SMALL)),
            ["model.embed_tokens", *seq("model", "layers"), "model.final_layernorm", "lm_head"],
        ),
        "t5": (
            lambda: tf.T5ForConditionalGeneration(
                tf.T5Config(d_model=32, d_ff=48, num_layers=3, num_heads=2, d_kv=16, vocab_size=100)
            ),
            [
                "stem",
                *seq("encoder", "block"),
                "encoder.final_layer_norm",
                *seq("decoder", "block"),
                "decoder.final_layer_norm",
                "lm_head",
            ],
        ),
        "bart": (
            lambda: tf.BartForSequenceClassification(
                tf.BartConfig(
                    d_model=32,
                    encoder_layers=3,
                    decoder_layers=3,
                    encoder_attention_heads=2,
                    decoder_attention_heads=2,
                    encoder_ffn_dim=48,
                    decoder_ffn_dim=48,
                    vocab_size=100,
                )
            ),
            [
                "stem",
                *seq("model.encoder", "layers"),
                "model.encoder.layernorm_embedding",
                "model.decoder.embed_tokens+model.decoder.embed_positions",
                *seq("model.decoder", "layers"),
                "model.decoder.layernorm_embedding",
                "classification_head.dense",
                "classification_head.out_proj",
            ],
        ),
        "vit": (
            lambda: tf.ViTForImageClassification(
                tf.ViTConfig(image_size=32, patch_size=8, **{k: v for k, v in SMALL.items() if k != "vocab_size"})
            ),
            ["vit.embeddings", *seq("vit", "layers"), "vit.layernorm", "classifier"],
        ),
        "convnext": (
            lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[2, 2])),
            [
                "convnext.embeddings",
                "convnext.encoder.stages.0.layers.0",
                "convnext.encoder.stages.0.layers.1",
                "convnext.encoder.stages.1.downsampling_layer",
                "convnext.encoder.stages.1.layers.0",
                "convnext.encoder.stages.1.layers.1",
                "convnext.layernorm",
                "classifier",
            ],
        ),
        "swin": (
            lambda: tf.SwinForImageClassification(
                tf.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4)
            ),
            [
                "swin.embeddings",
                "swin.encoder.layers.0.blocks.0",
                "swin.encoder.layers.0.blocks.1",
                "swin.encoder.layers.0.downsample",
                "swin.encoder.layers.1.blocks.0",
                "swin.encoder.layers.1.blocks.1",
                "swin.layernorm",
                "classifier",
            ],
        ),
    }


HF_TYPES = [
    "bert", "roberta", "distilbert", "albert", "electra", "deberta-v2", "gpt2", "llama",
    "mistral", "qwen2", "phi", "t5", "bart", "vit", "convnext", "swin",
]  # fmt: skip


@pytest.mark.parametrize("model_type", HF_TYPES)
def test_hf_groups(model_type):
    build, expected = hf_cases()[model_type]
    model = build()

    groups = ftk.layer_groups(model)

    assert [g.name for g in groups] == expected
    assert groups[-1].is_head
    assert_each_parameter_once(model, groups)


def test_t5_tied_embeddings_reported():
    build, _ = hf_cases()["t5"]

    groups = ftk.layer_groups(build())

    assert {n for n, _ in groups[0].named_parameters()} == {"shared.weight"}
    assert groups[0].tied == ["encoder.embed_tokens.weight"]
    assert groups[-1].tied == ["lm_head.weight"]


def test_gpt2_tied_head_reported():
    build, _ = hf_cases()["gpt2"]

    head = ftk.layer_groups(build())[-1]

    assert head.tied == ["lm_head.weight"]
    assert head.params == []


def test_custom_parallel_towers():
    class Towers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
            self.text = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
            self.classifier = nn.Linear(16, 3)

        def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.cat([self.image(image), self.text(text)], dim=-1))

    model = Towers()

    groups = ftk.layer_groups(model, example_input=(torch.randn(2, 8), torch.randn(2, 6)))

    assert [g.name for g in groups] == ["image.0", "image.2", "text.0", "text.2", "classifier"]
    assert_each_parameter_once(model, groups)


def test_custom_head_not_last_attribute():
    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = nn.Linear(8, 3)
            self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.classifier(x)

    groups = ftk.layer_groups(HeadFirst())

    assert [g.name for g in groups] == ["blocks.0", "blocks.1", "blocks.2", "classifier"]
