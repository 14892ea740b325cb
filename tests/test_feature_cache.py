from __future__ import annotations

import logging

import pytest
import torch
from conftest import snapshot
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import finetunekit as ftk
from finetunekit.feature_cache import build_feature_cache


def small_cnn() -> nn.Sequential:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(1, 8), block(8, 16), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


class Wrapped(nn.Module):
    """A backbone and a head as named children, like a torchvision model."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.backbone = small_cnn()[:4]
        self.fc = nn.Linear(64, 10)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(self.backbone(x))
        return out if self.scale == 1.0 else out * self.scale


def image_data(samples: int = 96) -> tuple[DataLoader, DataLoader]:
    images = torch.randn(samples, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(samples) % 10
    train = DataLoader(
        TensorDataset(images, labels), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val = DataLoader(TensorDataset(images[:40], labels[:40]), batch_size=32)
    return train, val


def fit(model: nn.Module, phases: list[ftk.Phase], cache, data=None) -> ftk.History:
    train, val = data if data is not None else image_data()
    return ftk.Trainer(model, phases, train, val, progress=False, cache_features=cache).fit()


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def assert_same_run(first: ftk.History, second: ftk.History, model_a: nn.Module, model_b: nn.Module) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["val_accuracy"] == b["val_accuracy"]
    state_a, state_b = snapshot(model_a), snapshot(model_b)
    for name, value in state_a.items():
        torch.testing.assert_close(value, state_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_cached_run_matches_uncached(caplog):
    torch.manual_seed(0)
    cached_model = small_cnn()
    torch.manual_seed(0)
    plain_model = small_cnn()
    phases = [ftk.Phase(3, train_groups=1, lr=1e-2)]

    with caplog.at_level(logging.INFO, logger="finetunekit.feature_cache"):
        cached = fit(cached_model, phases, "auto")
    plain = fit(plain_model, phases, False)

    assert "caching the input of '4' for 6 training and 2 validation batches" in caplog.text
    assert_same_run(cached, plain, cached_model, plain_model)


def test_cache_runs_front_once():
    model = small_cnn()
    front_calls = count_calls(model[0])

    fit(model, [ftk.Phase(3, train_groups=1, lr=1e-2)], "auto")

    # A structure check on one batch, a second pass over the first batch to check that the
    # front is deterministic, then one pass over 96 training and 40 validation samples.
    assert front_calls[0] == 1 + 1 + 6 + 2


def test_uncached_run_runs_front_every_epoch():
    model = small_cnn()
    front_calls = count_calls(model[0])

    fit(model, [ftk.Phase(3, train_groups=1, lr=1e-2)], False)

    assert front_calls[0] == 3 * (6 + 2)


def test_cache_dropped_when_front_trains(caplog):
    torch.manual_seed(0)
    cached_model = small_cnn()
    torch.manual_seed(0)
    plain_model = small_cnn()
    phases = [ftk.Phase(2, train_groups=1, lr=1e-2), ftk.Phase(2, train_groups="all", lr=1e-3)]

    with caplog.at_level(logging.INFO, logger="finetunekit.feature_cache"):
        cached = fit(cached_model, phases, "auto")
    plain = fit(plain_model, phases, False)

    assert caplog.text.count("caching the input of '4'") == 1
    assert "not caching features: the first child of the nn.Sequential is trainable" in caplog.text
    assert_same_run(cached, plain, cached_model, plain_model)


def test_cache_on_submodule_head():
    torch.manual_seed(0)
    cached_model = Wrapped()
    torch.manual_seed(0)
    plain_model = Wrapped()
    phases = [ftk.Phase(2, train_groups=1, lr=1e-2)]
    calls = count_calls(cached_model.backbone)

    cached = fit(cached_model, phases, "auto")
    plain = fit(plain_model, phases, False)

    assert calls[0] == 1 + 1 + 6 + 2
    assert_same_run(cached, plain, cached_model, plain_model)


def test_no_cache_when_output_changed(caplog):
    model = Wrapped(scale=2.0)
    ftk.freeze_to(model, -1)

    with caplog.at_level(logging.INFO, logger="finetunekit.feature_cache"):
        cache = build_feature_cache(model.train(), image_data()[0])

    assert cache is None
    assert "the model changes the output of 'fc' before returning it as the logits" in caplog.text


def test_no_cache_with_unlocked_batchnorm(caplog):
    model = small_cnn()
    ftk.freeze_to(model, -1, bn="stats")

    with caplog.at_level(logging.INFO, logger="finetunekit.feature_cache"):
        cache = build_feature_cache(model.train(), image_data()[0])

    assert cache is None
    assert "'0.1' in the frozen front updates its running statistics" in caplog.text


def test_forced_cache_runs_unlocked_batchnorm_in_eval():
    model = small_cnn()
    ftk.freeze_to(model, -1, bn="stats")
    before = model[0][1].running_mean.clone()

    cache = build_feature_cache(model.train(), image_data()[0], mode=True)

    assert cache is not None
    assert torch.equal(model[0][1].running_mean, before)
    assert model.training


class Augmented(Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(1, 8, 8), torch.tensor(index % 10)


def test_no_cache_with_random_augmentation(caplog):
    model = small_cnn()
    ftk.freeze_to(model, -1)

    with caplog.at_level(logging.INFO, logger="finetunekit.feature_cache"):
        cache = build_feature_cache(model.train(), DataLoader(Augmented(), batch_size=8))

    assert cache is None
    assert "the data is randomly augmented" in caplog.text


def test_forced_cache_warns_when_impossible():
    model = small_cnn()
    ftk.freeze_to(model, -1)

    with pytest.warns(ftk.FinetuneKitWarning, match="cache_features=True, but the features are not cached"):
        cache = build_feature_cache(model.train(), DataLoader(Augmented(), batch_size=8), mode=True)

    assert cache is None


def test_cache_on_list_of_batches():
    train, val = image_data()
    batches = list(train)
    torch.manual_seed(0)
    cached_model = small_cnn()
    torch.manual_seed(0)
    plain_model = small_cnn()
    phases = [ftk.Phase(2, train_groups=1, lr=1e-2)]

    cached = fit(cached_model, phases, "auto", (batches, list(val)))
    plain = fit(plain_model, phases, False, (batches, list(val)))

    assert_same_run(cached, plain, cached_model, plain_model)


@pytest.mark.parametrize("mode", ["yes", 1, None])
def test_invalid_cache_mode(mode):
    train, _ = image_data()

    with pytest.raises(ValueError, match=rf"cache_features={mode!r} is not 'auto', True or False"):
        ftk.Trainer(small_cnn(), [ftk.Phase(1)], train, cache_features=mode)


# --- Hugging Face models ---------------------------------------------------------------------


def tiny_bert(dropout: float) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    ftk.replace_head(model, 3, pooling="mean")
    return model


class TextData(Dataset):
    def __init__(self, samples: int = 48) -> None:
        generator = torch.Generator().manual_seed(3)
        self.input_ids = torch.randint(5, 120, (samples, 12), generator=generator)
        self.attention_mask = torch.ones(samples, 12, dtype=torch.long)
        self.attention_mask[::2, 7:] = 0
        self.labels = torch.arange(samples) % 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def text_data() -> tuple[DataLoader, DataLoader]:
    train = DataLoader(TextData(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    return train, DataLoader(TextData(16), batch_size=8)


def test_bert_mean_pooling_cached_matches_uncached(caplog):
    cached_model, plain_model = tiny_bert(0.0), tiny_bert(0.0)
    phases = [ftk.Phase(3, train_groups=1, lr=1e-2)]

    with caplog.at_level(logging.INFO, logger="finetunekit.feature_cache"):
        cached = fit(cached_model, phases, "auto", text_data())
    plain = fit(plain_model, phases, False, text_data())

    assert "caching the input of 'classifier' for 6 training and 2 validation batches" in caplog.text
    assert_same_run(cached, plain, cached_model, plain_model)


def test_bert_dropout_blocks_auto_cache(caplog):
    model = tiny_bert(0.1)
    ftk.freeze_to(model, -1)

    with caplog.at_level(logging.INFO, logger="finetunekit.feature_cache"):
        cache = build_feature_cache(model.train(), text_data()[0])

    assert cache is None
    assert "'bert.embeddings.dropout' in the frozen front is a dropout layer with p=0.1" in caplog.text


class FunctionalDropout(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, 0.5, self.training)


def test_functional_dropout_blocks_auto_cache(caplog):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), FunctionalDropout(), nn.Linear(16, 10))
    ftk.freeze_to(model, -1)
    rng_before = torch.get_rng_state()

    with caplog.at_level(logging.INFO, logger="finetunekit.feature_cache"):
        cache = build_feature_cache(model.train(), image_data()[0])

    assert cache is None
    assert "two passes of the frozen front over one batch differ" in caplog.text
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_bert_forced_cache_equals_run_without_dropout():
    cached_model, plain_model = tiny_bert(0.1), tiny_bert(0.0)
    phases = [ftk.Phase(2, train_groups=1, lr=1e-2)]

    cached = fit(cached_model, phases, True, text_data())
    plain = fit(plain_model, phases, False, text_data())

    assert_same_run(cached, plain, cached_model, plain_model)


class ScaleFront(ftk.Callback):
    """Change a frozen weight when the phase starts, as a callback restoring weights would."""

    def on_phase_start(self, trainer, phase):
        with torch.no_grad():
            trainer.model[0][0].weight.mul_(2.0)


def test_cache_sees_phase_start_callbacks():
    torch.manual_seed(0)
    cached_model = small_cnn()
    torch.manual_seed(0)
    plain_model = small_cnn()
    phases = [ftk.Phase(2, train_groups=1, lr=1e-2)]
    train, val = image_data()

    cached = ftk.Trainer(cached_model, phases, train, val, progress=False, callbacks=[ScaleFront()]).fit()
    train, val = image_data()
    plain = ftk.Trainer(
        plain_model, phases, train, val, progress=False, callbacks=[ScaleFront()], cache_features=False
    ).fit()

    assert_same_run(cached, plain, cached_model, plain_model)


def test_cache_follows_global_rng_shuffle():
    images = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(96) % 10
    histories, models = [], []
    for mode in ("auto", False):
        torch.manual_seed(0)
        model = small_cnn()
        # No generator: the loader shuffles with the global generator, as the head's dropout would.
        train = DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=True)
        val = DataLoader(TensorDataset(images[:32], labels[:32]), batch_size=32)
        trainer = ftk.Trainer(
            model, [ftk.Phase(3, train_groups=1, lr=1e-2)], train, val, progress=False, cache_features=mode
        )
        histories.append(trainer.fit())
        models.append(model)

    assert_same_run(histories[0], histories[1], models[0], models[1])
