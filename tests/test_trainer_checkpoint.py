from __future__ import annotations

import pytest
import torch
from conftest import snapshot, trainable_names
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import finetunekit as ftk
from finetunekit.callbacks import EarlyStopping
from finetunekit.trainer_checkpoint import CheckpointMismatchError


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        block(1, 4),
        block(4, 8),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(32, 3),
    )


def loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(96, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (96,), generator=generator)
    train = DataLoader(
        TensorDataset(images[:64], labels[:64]),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(2),
    )
    return train, DataLoader(TensorDataset(images[64:], labels[64:]), batch_size=32)


PHASES = [
    ftk.Phase(2, train_groups=1, lr=1e-2),
    ftk.Phase(3, train_groups="all", lr=slice(1e-3, 1e-2), schedule="cosine"),
]


def make_trainer(model: nn.Module, checkpoint_dir=None) -> ftk.Trainer:
    train, val = loaders()
    stopper = EarlyStopping("val_loss", patience=5, restore_best_weights=True)
    return ftk.Trainer(
        model,
        PHASES,
        train,
        val,
        progress=False,
        callbacks=[stopper],
        checkpoint_dir=checkpoint_dir,
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run that saves a checkpoint after every epoch."""
    directory = tmp_path_factory.mktemp("checkpoints")
    model = small_cnn()
    trainer = make_trainer(model, directory)
    history = trainer.fit()
    return directory, snapshot(model), history, trainer


def test_checkpoint_files_per_epoch(full_run):
    directory, _, _, _ = full_run

    assert sorted(p.name for p in directory.iterdir()) == [
        "phase00-head-epoch001.pt",
        "phase00-head-epoch002.pt",
        "phase01-all-epoch001.pt",
        "phase01-all-epoch002.pt",
        "phase01-all-epoch003.pt",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "phase00-head-epoch001.pt",
        "phase00-head-epoch002.pt",
        "phase01-all-epoch001.pt",
        "phase01-all-epoch002.pt",
    ],
)
def test_resume_is_bit_identical(full_run, name):
    directory, expected, history, full_trainer = full_run
    model = small_cnn()
    trainer = make_trainer(model)

    resumed = trainer.fit(resume_from=directory / name)

    assert resumed == history
    after = snapshot(model)
    for key, value in expected.items():
        assert torch.equal(after[key], value), key
    assert trainable_names(model) == {n for n, p in model.named_parameters()}
    state, full_state = trainer.optimizer.state, full_trainer.optimizer.state
    for param, full_param in zip(model.parameters(), full_trainer.model.parameters()):
        assert torch.equal(state[param]["exp_avg"], full_state[full_param]["exp_avg"])
        assert float(state[param]["step"]) == float(full_state[full_param]["step"])


def test_checkpoint_keeps_trainable_state_only(full_run):
    directory, _, _, _ = full_run

    head = torch.load(directory / "phase00-head-epoch002.pt", weights_only=True)
    later = torch.load(directory / "phase01-all-epoch001.pt", weights_only=True)

    assert sorted(head["tensors"]) == ["5.bias", "5.weight"]
    assert head["trained"] == ["5.bias", "5.weight"]
    assert head["optimizer"]["param_groups"][0]["params"] == ["5.weight"]
    assert head["position"] == {
        "phase_index": 0,
        "epoch": 2,
        "stop_phase": False,
        "phase_ended": True,
        "global_step": 8,
    }
    bn_buffers = {
        "0.1.running_mean",
        "0.1.running_var",
        "0.1.num_batches_tracked",
        "1.1.running_mean",
        "1.1.running_var",
        "1.1.num_batches_tracked",
    }
    assert set(later["tensors"]) == {n for n, _ in small_cnn().named_parameters()} | bn_buffers
    assert later["scheduler"]["last_epoch"] == 4


def test_resume_on_other_base_raises(full_run):
    directory, _, _, _ = full_run
    trainer = make_trainer(small_cnn(seed=1))

    with pytest.raises(CheckpointMismatchError, match="frozen base of this Sequential differs"):
        trainer.fit(resume_from=directory / "phase00-head-epoch001.pt")


def test_resume_with_other_head_raises(full_run):
    directory, _, _, _ = full_run
    model = small_cnn()
    model[5] = nn.Sequential(nn.Linear(32, 3))
    trainer = make_trainer(model)

    with pytest.raises(
        CheckpointMismatchError,
        match="lacks 2 tensors that the checkpoint has, such as '5.bias'",
    ):
        trainer.fit(resume_from=directory / "phase00-head-epoch001.pt")


def test_resume_with_other_phases_raises(full_run):
    directory, _, _, _ = full_run
    train, _ = loaders()
    trainer = ftk.Trainer(small_cnn(), [ftk.Phase(1)], train, progress=False)

    with pytest.raises(
        CheckpointMismatchError,
        match=r"phases \['head', 'all'\], but this Trainer has \['head'\]",
    ):
        trainer.fit(resume_from=directory / "phase00-head-epoch001.pt")


def test_resume_with_other_callbacks_raises(full_run):
    directory, _, _, _ = full_run
    train, _ = loaders()
    trainer = ftk.Trainer(small_cnn(), PHASES, train, progress=False)

    with pytest.raises(CheckpointMismatchError, match="state of 1 callbacks, but this Trainer has 0"):
        trainer.fit(resume_from=directory / "phase00-head-epoch001.pt")


def test_resume_from_missing_file_raises(tmp_path):
    trainer = make_trainer(small_cnn())

    with pytest.raises(FileNotFoundError, match="resume_from=.*nothing.pt' is not a file"):
        trainer.fit(resume_from=tmp_path / "nothing.pt")


def test_resume_from_plain_state_dict_raises(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(small_cnn().state_dict(), path)
    trainer = make_trainer(small_cnn())

    with pytest.raises(CheckpointMismatchError, match="has format None.*not a Trainer checkpoint"):
        trainer.fit(resume_from=path)


def test_save_checkpoint_on_request(tmp_path):
    model = small_cnn()
    trainer = make_trainer(model)
    trainer.fit()

    path = trainer.save_checkpoint(tmp_path / "sub" / "final.pt")

    assert path == tmp_path / "sub" / "final.pt"
    assert trainer.last_checkpoint == path
    saved = torch.load(path, weights_only=True)
    assert saved["position"]["phase_index"] == 1
    assert saved["position"]["phase_ended"] is True
    assert torch.equal(saved["tensors"]["5.weight"], model[5].weight)


def test_save_checkpoint_mid_epoch_raises(tmp_path):
    from finetunekit.callbacks import Callback

    class SaveEveryStep(Callback):
        def on_step_end(self, trainer, loss):
            trainer.save_checkpoint(tmp_path / "step.pt")

    train, _ = loaders()
    trainer = ftk.Trainer(small_cnn(), [ftk.Phase(1)], train, progress=False, callbacks=[SaveEveryStep()])

    with pytest.raises(RuntimeError, match="in the middle of an epoch"):
        trainer.fit()


def test_save_checkpoint_before_fit_raises(tmp_path):
    with pytest.raises(RuntimeError, match="before fit"):
        make_trainer(small_cnn()).save_checkpoint(tmp_path / "x.pt")


def test_bad_checkpoint_every_raises():
    with pytest.raises(ValueError, match="checkpoint_every=0 must be a positive integer"):
        ftk.Trainer(small_cnn(), PHASES, [], checkpoint_every=0)
