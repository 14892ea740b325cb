"""Measure what a truly frozen backbone saves, and the Trainer's peak memory against a plain loop.

Part 1 times a head-only step on ResNet-18 (built without weights, 10 classes) in two
hand-written loops on the same batches. In the first, ``ftk.freeze_to(model, -1)``
freezes everything but the head and locks BatchNorm in eval mode, so the backward pass
stops at the head. In the second, the BatchNorm weights and biases stay trainable and
BatchNorm stays in training mode, as several training tools leave it by default, so the
backward pass runs through the whole backbone to the first BatchNorm layer. The two loops
alternate over the rounds, and the script prints each one's median time per step and
the ratio frozen / BatchNorm trainable.

Part 2 runs the two-phase recipe of ``trainer_overhead.py`` (head, then the top three
layer groups) once with the plain loop and once with ``ftk.Trainer`` (without feature
caching), each in a fresh process, alternating. It prints the median peak resident
memory each run adds over the memory it had before its loop (``ru_maxrss``), so it
covers CPU memory only.

Run:
    python benchmarks/frozen_backbone.py [--steps 20] [--rounds 3] [--image-size 64] [--skip-memory]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from trainer_overhead import make_model, plain_loop, trainer_loop

import finetunekit as ftk


def make_batches(steps: int, batch_size: int, image_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(batch_size, 3, image_size, image_size, generator=generator),
            torch.randint(0, 10, (batch_size,), generator=generator),
        )
        for _ in range(steps)
    ]


def head_only_step_time(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], *, train_bn: bool) -> float:
    """Train the head alone for one pass over ``batches``; return the seconds per step."""
    if train_bn:
        for module in model.modules():
            for param in module.parameters(recurse=False):
                param.requires_grad_(isinstance(module, nn.BatchNorm2d) or module is model.fc)
        model.train()
    else:
        ftk.freeze_to(model, -1)
        model.train()  # the locked BatchNorm layers still run in eval mode
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    start = time.perf_counter()
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(batches)


def peak_memory_child(loop: str, steps: int, batch_size: int, image_size: int) -> None:
    """Run one loop in this process and print the peak resident memory it added, in MiB."""
    batches = make_batches(steps, batch_size, image_size)
    model = make_model(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (plain_loop if loop == "plain" else trainer_loop)(model, batches)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux.
    print(f"{(after - before) / 1024:.1f}")


def measure_peak_memory(args: argparse.Namespace) -> dict[str, list[float]]:
    peaks: dict[str, list[float]] = {"plain": [], "trainer": []}
    for _ in range(args.rounds):
        for loop in ("plain", "trainer"):
            command = [
                sys.executable,
                __file__,
                "--memory-child",
                loop,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--image-size",
                str(args.image_size),
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            peaks[loop].append(float(output.strip().splitlines()[-1]))
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="batches per pass (and per phase in part 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each variant")
    parser.add_argument("--image-size", type=int, default=64, help="side of the random images in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-memory", action="store_true", help="run part 1 only")
    parser.add_argument("--memory-child", choices=["plain", "trainer"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        peak_memory_child(args.memory_child, args.steps, args.batch_size, args.image_size)
        return

    batches = make_batches(args.steps, args.batch_size, args.image_size)
    head_only_step_time(make_model(0), batches[:2], train_bn=True)  # warm-up: allocator and thread pools
    times: dict[str, list[float]] = {"frozen": [], "bn_trainable": []}
    for round_index in range(args.rounds):
        times["frozen"].append(head_only_step_time(make_model(round_index), batches, train_bn=False))
        times["bn_trainable"].append(head_only_step_time(make_model(round_index), batches, train_bn=True))
    frozen, bn_trainable = statistics.median(times["frozen"]), statistics.median(times["bn_trainable"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, {args.image_size}px")
    print("part 1: head-only step on ResNet-18")
    print(f"  frozen backbone, BatchNorm locked : {frozen * 1000:.1f} ms/step (median of {args.rounds})")
    print(f"  BatchNorm weights trainable       : {bn_trainable * 1000:.1f} ms/step (median of {args.rounds})")
    print(f"  ratio frozen / BatchNorm trainable: {frozen / bn_trainable:.3f}")

    if args.skip_memory:
        return
    peaks = measure_peak_memory(args)
    plain, trainer = statistics.median(peaks["plain"]), statistics.median(peaks["trainer"])
    print("part 2: peak resident memory added by the two-phase run")
    print(f"  plain loop: {plain:.1f} MiB, Trainer: {trainer:.1f} MiB (medians of {args.rounds})")
    print(f"  Trainer - plain: {trainer - plain:+.1f} MiB")


if __name__ == "__main__":
    main()
