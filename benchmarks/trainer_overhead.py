"""Time the Trainer against a hand-written PyTorch loop doing the same work.

Both loops train the same ResNet-18 (built without weights) on the same batches with the
same AdamW parameter groups: first the head alone, then the top three layer groups. They
alternate over several rounds, so load on the shared machine hits both alike, and the
script prints each one's median time per step and the ratio Trainer / plain loop.
``measure_overhead`` returns those figures to ``benchmarks/overhead.py``.

Run:
    python benchmarks/trainer_overhead.py [--steps 20] [--rounds 3] [--image-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

import finetunekit as ftk

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class OverheadResult:
    """Median time per training step of each loop, in milliseconds."""

    plain_ms: float
    trainer_ms: float
    rounds: int

    @property
    def ratio(self) -> float:
        """Trainer time per step over plain-loop time per step."""
        return self.trainer_ms / self.plain_ms


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    ftk.replace_head(model, 10)
    return model


def plain_loop(model: nn.Module, batches: Batches) -> float:
    """The loop a user writes by hand: requires_grad flags, param groups and AdamW per phase."""
    start = time.perf_counter()
    for trainable_prefixes, lrs in ((("fc.",), {"fc.": 1e-3}), (("layer4.", "fc."), {"layer4.": 1e-4, "fc.": 1e-3})):
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(trainable_prefixes))
        groups = [
            {"params": [p for n, p in model.named_parameters() if n.startswith(prefix)], "lr": lr}
            for prefix, lr in lrs.items()
        ]
        optimizer = torch.optim.AdamW(groups)
        model.train()
        for images, labels in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def trainer_loop(model: nn.Module, batches: Batches) -> float:
    start = time.perf_counter()
    phases = [ftk.Phase(1, train_groups=1, lr=1e-3), ftk.Phase(1, train_groups=3, lr=slice(1e-4, 1e-3))]
    # No feature caching: its head-only phase would skip the backbone that the plain loop runs.
    ftk.Trainer(model, phases, batches, progress=False, cache_features=False).fit()
    return time.perf_counter() - start


def make_batches(steps: int, batch_size: int, image_size: int) -> Batches:
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(batch_size, 3, image_size, image_size, generator=generator),
            torch.randint(0, 10, (batch_size,), generator=generator),
        )
        for _ in range(steps)
    ]


def measure_overhead(*, steps: int = 20, rounds: int = 3, image_size: int = 64, batch_size: int = 32) -> OverheadResult:
    """Time both loops in alternating rounds, ``steps`` batches per phase, and return the median times per step."""
    batches = make_batches(steps, batch_size, image_size)
    plain_loop(make_model(0), batches[:2])  # warm-up: allocator and thread pools
    times: dict[str, list[float]] = {"plain": [], "trainer": []}
    for round_index in range(rounds):
        times["plain"].append(plain_loop(make_model(round_index), batches))
        times["trainer"].append(trainer_loop(make_model(round_index), batches))

    steps_per_loop = 2 * steps
    return OverheadResult(
        plain_ms=statistics.median(times["plain"]) / steps_per_loop * 1000,
        trainer_ms=statistics.median(times["trainer"]) / steps_per_loop * 1000,
        rounds=rounds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="batches per phase")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds of each loop")
    parser.add_argument("--image-size", type=int, default=64, help="side of the random images in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    result = measure_overhead(
        steps=args.steps, rounds=args.rounds, image_size=args.image_size, batch_size=args.batch_size
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, {args.image_size}px")
    print(f"plain loop : {result.plain_ms:.1f} ms/step (median of {args.rounds})")
    print(f"Trainer    : {result.trainer_ms:.1f} ms/step (median of {args.rounds})")
    print(f"ratio Trainer / plain: {result.ratio:.3f}")


if __name__ == "__main__":
    main()
