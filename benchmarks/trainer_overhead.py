"""Time the Trainer against a hand-written PyTorch loop doing the same work.

Both loops train the same ResNet-18 (built without weights) on the same batches with the
same AdamW parameter groups: first the head alone, then the top three layer groups. They
alternate over several rounds, so load on the shared machine hits both alike, and the
script prints each one's median time per step and the ratio Trainer / plain loop.

Run:
    python benchmarks/trainer_overhead.py [--steps 20] [--rounds 3] [--image-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

import finetunekit as ftk


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    ftk.replace_head(model, 10)
    return model


def plain_loop(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
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


def trainer_loop(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    start = time.perf_counter()
    phases = [ftk.Phase(1, train_groups=1, lr=1e-3), ftk.Phase(1, train_groups=3, lr=slice(1e-4, 1e-3))]
    # No feature caching: its head-only phase would skip the backbone that the plain loop runs.
    ftk.Trainer(model, phases, batches, progress=False, cache_features=False).fit()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="batches per phase")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds of each loop")
    parser.add_argument("--image-size", type=int, default=64, help="side of the random images in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator),
            torch.randint(0, 10, (args.batch_size,), generator=generator),
        )
        for _ in range(args.steps)
    ]

    plain_loop(make_model(0), batches[:2])  # warm-up: allocator and thread pools
    times: dict[str, list[float]] = {"plain": [], "trainer": []}
    for round_index in range(args.rounds):
        times["plain"].append(plain_loop(make_model(round_index), batches))
        times["trainer"].append(trainer_loop(make_model(round_index), batches))

    steps = 2 * args.steps
    plain = statistics.median(times["plain"]) / steps
    trainer = statistics.median(times["trainer"]) / steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, {args.image_size}px")
    print(f"plain loop : {plain * 1000:.1f} ms/step (median of {args.rounds})")
    print(f"Trainer    : {trainer * 1000:.1f} ms/step (median of {args.rounds})")
    print(f"ratio Trainer / plain: {trainer / plain:.3f}")


if __name__ == "__main__":
    main()
