"""Exact rates of the schedule helpers, and their errors."""

from __future__ import annotations

import pytest
import torch

import finetunekit as ftk


def optimizer_with(*rates: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [
            {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": r, "initial_lr": r}
            for r in rates
        ]
    )


def lrs_over(scheduler, steps: int) -> list[list[float]]:
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return seen


def test_warmup_then_cosine_values():
    scheduler = ftk.warmup_schedule(
        optimizer_with(1e-4, 1e-3), total_steps=10, warmup_steps=2
    )

    seen = lrs_over(scheduler, 12)

    head = [s[1] for s in seen]
    assert head[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert head[6] == pytest.approx(1e-3 * 0.5)  # half way through the cosine
    assert head[10:] == pytest.approx([0.0, 0.0])  # stays at the end value
    assert [s[0] * 10 for s in seen] == pytest.approx(head)


def test_warmup_linear_to_final_ratio():
    scheduler = ftk.warmup_schedule(
        optimizer_with(1.0), total_steps=5, decay="linear", final_ratio=0.2
    )

    assert [s[0] for s in lrs_over(scheduler, 6)] == pytest.approx(
        [1.0, 0.84, 0.68, 0.52, 0.36, 0.2]
    )


def test_slanted_triangular_follows_ulmfit():
    scheduler = ftk.slanted_triangular(
        optimizer_with(32.0), total_steps=20, cut_frac=0.1, ratio=32
    )

    seen = [s[0] for s in lrs_over(scheduler, 21)]

    assert seen[0] == pytest.approx(1.0)  # peak / ratio
    assert seen[1] == pytest.approx(16.5)  # half way up
    assert seen[2] == pytest.approx(32.0)  # the peak at cut = 2
    assert seen[20] == pytest.approx(1.0)
    assert seen[2:] == sorted(seen[2:], reverse=True)


def test_one_cycle_peaks_at_each_groups_own_rate():
    scheduler = ftk.one_cycle(
        optimizer_with(1e-5, 1e-3), total_steps=20, pct_start=0.25
    )

    seen = lrs_over(scheduler, 20)

    peaks = [max(s[i] for s in seen) for i in range(2)]
    assert peaks == pytest.approx([1e-5, 1e-3])
    assert seen[0] == pytest.approx([1e-5 / 25, 1e-3 / 25])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda o: ftk.warmup_schedule(o, total_steps=0),
            r"total_steps=0 must be a positive integer",
        ),
        (
            lambda o: ftk.warmup_schedule(o, total_steps=5, warmup_steps=6),
            r"warmup_steps=6 is more than total_steps=5",
        ),
        (
            lambda o: ftk.warmup_schedule(o, total_steps=5, decay="exp"),
            r"decay='exp' is not",
        ),
        (
            lambda o: ftk.warmup_schedule(o, total_steps=5, final_ratio=2),
            r"final_ratio=2 must be between 0 and 1",
        ),
        (
            lambda o: ftk.slanted_triangular(o, total_steps=5, cut_frac=1.0),
            r"cut_frac=1.0 must be strictly",
        ),
        (
            lambda o: ftk.slanted_triangular(o, total_steps=5, ratio=0.5),
            r"ratio=0.5 must be a finite number",
        ),
        (
            lambda o: ftk.one_cycle(o, total_steps=2.5),
            r"total_steps=2.5 must be a positive integer",
        ),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(optimizer_with(1e-3))
