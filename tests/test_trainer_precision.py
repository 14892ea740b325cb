from __future__ import annotations

import pytest
import torch
from torch import nn

import finetunekit as ftk


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)) for _ in range(count)
    ]


def test_bf16_keeps_fp32_master_weights():
    model = mlp().to(torch.bfloat16)
    frozen_before = model[0].weight.detach().clone()
    head = model[5].weight
    dtypes_in_forward: list[torch.dtype] = []
    model[5].register_forward_hook(lambda module, args, output: dtypes_in_forward.append(output.dtype))
    trainer = ftk.Trainer(
        model, [ftk.Phase(2, train_groups=2, lr=1e-2)], batches(), batches(1), precision="bf16", progress=False
    )

    history = trainer.fit()

    assert model[5].weight is head
    assert {name: p.dtype for name, p in model.named_parameters()} == {
        "0.weight": torch.bfloat16,
        "0.bias": torch.bfloat16,
        "1.weight": torch.bfloat16,
        "1.bias": torch.bfloat16,
        "3.weight": torch.float32,
        "3.bias": torch.float32,
        "5.weight": torch.float32,
        "5.bias": torch.float32,
    }
    assert set(dtypes_in_forward) == {torch.bfloat16}
    assert trainer.optimizer.state[head]["exp_avg"].dtype == torch.float32
    assert torch.equal(model[0].weight, frozen_before)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_bf16_master_weights_take_small_updates():
    # An update of 1e-4 on a weight of 1 is under half of bfloat16's spacing there (2**-7), so only
    # a float32 master weight records it.
    model = mlp().to(torch.bfloat16)
    with torch.no_grad():
        model[5].weight.fill_(1.0)
    trainer = ftk.Trainer(
        model,
        [ftk.Phase(1, train_groups=1, lr=1e-4)],
        batches(1),
        precision="bf16",
        progress=False,
        optimizer=torch.optim.SGD,
    )

    trainer.fit()

    changed = model[5].weight != 1.0
    assert model[5].weight.dtype == torch.float32
    assert changed.any()
    assert (model[5].weight - 1.0).abs().max() < 2**-8


def test_fp32_run_leaves_dtypes_alone():
    model = mlp().to(torch.bfloat16)
    data = [(x.to(torch.bfloat16), y) for x, y in batches(1)]

    ftk.Trainer(model, [ftk.Phase(1, train_groups=1)], data, progress=False).fit()

    assert model[5].weight.dtype == torch.bfloat16


def test_fp16_on_cpu_raises():
    with pytest.raises(ValueError, match="precision='fp16' needs a CUDA device, but the Trainer runs on cpu"):
        ftk.Trainer(mlp(), [ftk.Phase(1)], batches(1), precision="fp16")


def test_unknown_precision_raises():
    with pytest.raises(ValueError, match=r"precision='half' is not one of \['fp32', 'bf16', 'fp16'\]"):
        ftk.Trainer(mlp(), [ftk.Phase(1)], batches(1), precision="half")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a gradient scaler needs CUDA")
def test_fp16_scaler_trains_fp32_weights_on_cuda():
    model = mlp().half()
    trainer = ftk.Trainer(
        model,
        [ftk.Phase(2, train_groups=2, lr=1e-2)],
        batches(),
        device="cuda",
        precision="fp16",
        max_grad_norm=1.0,
        progress=False,
    )

    history = trainer.fit()

    assert trainer.scaler is not None
    assert model[5].weight.dtype == torch.float32
    assert model[0].weight.dtype == torch.float16
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_compile_retraces_after_unfreeze():
    model = mlp()
    first = model[0].weight.detach().clone()
    middle = model[3].weight.detach().clone()
    phases = [ftk.Phase(1, train_groups=1, lr=1e-2), ftk.Phase(1, train_groups="all", lr=1e-2)]
    trainer = ftk.Trainer(model, phases, batches(2), progress=False, compile={"backend": "aot_eager"})

    trainer.fit()

    assert trainer._compiled_for == frozenset(n for n, _ in model.named_parameters())
    assert not torch.equal(model[0].weight, first)
    assert not torch.equal(model[3].weight, middle)
