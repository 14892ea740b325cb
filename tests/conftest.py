"""Small seeded models shared by the tests: torchvision models built without weights and a tiny BERT."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

RESNET18_GROUPS = [
    "stem",
    "layer1.0",
    "layer1.1",
    "layer2.0",
    "layer2.1",
    "layer3.0",
    "layer3.1",
    "layer4.0",
    "layer4.1",
    "fc",
]
"""The layer groups that ``layer_groups`` finds in torchvision's ResNet-18, in order."""


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def resnet() -> nn.Module:
    return torchvision.models.resnet18(weights=None)


@pytest.fixture
def mobilenet() -> nn.Module:
    return torchvision.models.mobilenet_v2(weights=None)


def make_bert(num_layers: int = 3, num_labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def bert() -> nn.Module:
    return make_bert()


def bert_inputs(batch: int = 4, length: int = 10) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(5, 120, (batch, length))
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, length // 2 :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copy every parameter and buffer, to compare bit for bit later."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()}
