"""Two CPU processes on the gloo backend, over 127.0.0.1, running the Trainer through accelerate."""

from __future__ import annotations

import os
import socket
import time
from unittest import mock

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import finetunekit as ftk

pytest.importorskip("accelerate")

WORLD_SIZE = 2


def small_cnn() -> nn.Sequential:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(1, 8), block(8, 16), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_rank(rank: int, port: int, out_dir: str) -> None:
    """Train with gradual unfreezing in one process and save its final state."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    # Each rank starts from other weights; the DDP wrapper must broadcast rank 0's.
    torch.manual_seed(rank)
    model = small_cnn()
    torch.manual_seed(0)
    images, labels = torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))
    train = DataLoader(
        TensorDataset(images, labels), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val = DataLoader(TensorDataset(images[:40], labels[:40]), batch_size=16)
    phases = [ftk.Phase(1, train_groups=1, lr=1e-2), ftk.Phase(2, train_groups=2, lr=1e-2)]

    trainer = ftk.Trainer(model, phases, train, val, progress=False, accelerator=accelerator)
    history = trainer.fit()

    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    torch.save(
        {"state": state, "history": list(history), "shard_batches": len(trainer.train_data)},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    # Destroys the process group, so the port is free for the next run.
    accelerator.end_training()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ranks")
    context = torch.multiprocessing.start_processes(
        run_rank, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, start_method="spawn", join=False
    )
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail("the two training processes did not finish within 120 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def test_ranks_hold_identical_weights(ranks):
    first, second = ranks[0]["state"], ranks[1]["state"]

    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_frozen_group_unchanged(ranks):
    torch.manual_seed(0)
    initial = small_cnn().state_dict()

    for rank in ranks:
        for name in ("0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias", "0.1.running_mean", "0.1.running_var"):
            assert torch.equal(rank["state"][name], initial[name]), name


def test_unfrozen_group_trained(ranks):
    torch.manual_seed(0)
    initial = small_cnn().state_dict()

    for name in ("1.0.weight", "1.1.weight", "4.weight"):
        assert not torch.equal(ranks[0]["state"][name], initial[name]), name


def test_history_agrees_across_ranks(ranks):
    first, second = ranks[0]["history"], ranks[1]["history"]

    assert [(r["phase"], r["epoch"]) for r in first] == [("head", 1), ("top2", 1), ("top2", 2)]
    assert first == second
    assert ranks[0]["shard_batches"] == 4


def test_accelerator_type_checked():
    with pytest.raises(TypeError, match="accelerator='cpu' is not an accelerate.Accelerator"):
        ftk.Trainer(small_cnn(), [ftk.Phase(1)], [], accelerator="cpu")


@pytest.mark.parametrize(
    ("mixed_precision", "steps", "message"),
    [
        ("bf16", 1, r"mixed_precision='bf16'\) is not supported by the Trainer.*Trainer\(precision='bf16'\)"),
        ("no", 4, r"gradient_accumulation_steps=4\) is not supported by the Trainer"),
    ],
)
def test_accelerator_options_rejected(mixed_precision, steps, message):
    from accelerate import Accelerator

    accelerator = mock.Mock(spec=Accelerator)
    accelerator.mixed_precision = mixed_precision
    accelerator.gradient_accumulation_steps = steps

    with pytest.raises(ValueError, match=message):
        ftk.Trainer(small_cnn(), [ftk.Phase(1)], [], accelerator=accelerator)
