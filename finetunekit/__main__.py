"""Command line: ``python -m finetunekit describe MODEL`` prints a model's layer-group report.

MODEL is one of:

- ``torchvision:NAME``, a torchvision model such as ``torchvision:resnet50``, built with
  ``weights=None`` on the meta device, so no weights are allocated;
- ``transformers:TYPE``, a Hugging Face model type such as ``transformers:bert``, built
  from its default config shrunk to a few small layers. The task model is a sequence
  classifier when the type has one, else a causal language model, else the base model;
- ``path/to/file.py:FUNCTION``, a file whose function builds the model when called
  without arguments.

Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set before transformers is imported.
Exit status 2 means an invalid MODEL or option, 1 a model that could not be built or
changed as requested.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._utils import close_matches, format_suggestions
from .errors import FinetuneKitError
from .freezing import freeze_to
from .heads import replace_head
from .report import describe

__all__ = ["build_model", "main"]

logger = logging.getLogger(__name__)

_PROG = "python -m finetunekit"
_FORMS = "torchvision:NAME (torchvision:resnet50), transformers:TYPE (transformers:bert) or path/to/file.py:FUNCTION"

# Sizes that shrink a transformers default config, set only where the config has the attribute.
_SMALL_CONFIG = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "vocab_size": 1000,
}


class _ModelSpecError(ValueError):
    """Invalid MODEL string: malformed, or naming no model, file or function. The command exits with 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 on success, 2 for an invalid MODEL or option, 1 when building or changing the
        model failed.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    args = _parser().parse_args(argv)
    try:
        model = build_model(args.model)
    except _ModelSpecError as error:
        return _fail(str(error), status=2)
    except Exception as error:
        # Model code of torchvision, transformers or the user's file can raise anything.
        return _fail(f"building {args.model!r} failed: {type(error).__name__}: {error}", status=1)

    try:
        if args.num_classes is not None:
            replace_head(model, args.num_classes)
        if args.freeze_to is not None:
            freeze_to(model, args.freeze_to)
        report = describe(model)
    except (FinetuneKitError, IndexError, NotImplementedError, TypeError, ValueError) as error:
        return _fail(f"{args.model}: {error}", status=1)

    sys.stdout.write(f"{args.model}\n{report}\n")
    return 0


def build_model(spec: str) -> nn.Module:
    """Build the model that a MODEL string names, in one of the forms the module docstring lists.

    Raises:
        ValueError: If ``spec`` has none of the accepted forms, or names no model, file
            or function.
    """
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise _ModelSpecError(f"invalid MODEL {spec!r}: expected {_FORMS}.")
    if source == "torchvision":
        return _torchvision_model(name)
    if source == "transformers":
        return _transformers_model(name)
    if source.endswith(".py"):
        return _factory_model(Path(source), name)
    raise _ModelSpecError(f"invalid MODEL {spec!r}: {source!r} is not a known source. Expected {_FORMS}.")


def _torchvision_model(name: str) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        raise _ModelSpecError(
            f"invalid MODEL 'torchvision:{name}': torchvision has no model {name!r}."
            f"{format_suggestions(close_matches(name, available))} "
            "See torchvision.models.list_models()."
        )
    return _on_meta_if_possible(lambda: torchvision.models.get_model(name, weights=None))


def _transformers_model(model_type: str) -> nn.Module:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise _ModelSpecError(
            f"invalid MODEL 'transformers:{model_type}': transformers has no model type {model_type!r}."
            f"{format_suggestions(close_matches(model_type, CONFIG_MAPPING.keys()))} "
            "Use a config's model_type, such as bert, gpt2 or llama."
        )
    config = transformers.AutoConfig.for_model(model_type)
    _shrink(config)

    auto_classes = (
        transformers.AutoModelForSequenceClassification,
        transformers.AutoModelForCausalLM,
        transformers.AutoModel,
    )
    for auto_class in auto_classes:
        if type(config) in auto_class._model_mapping:
            logger.info("building %s with %s", model_type, auto_class.__name__)
            return _on_meta_if_possible(lambda: auto_class.from_config(config))
    raise _ModelSpecError(
        f"invalid MODEL 'transformers:{model_type}': no AutoModelForSequenceClassification, "
        "AutoModelForCausalLM or AutoModel class builds this type. Build it in a factory file instead."
    )


def _shrink(config: Any) -> None:
    """Set small sizes on a transformers config, keeping the attention shapes consistent."""
    for attribute, value in _SMALL_CONFIG.items():
        if hasattr(config, attribute):
            setattr(config, attribute, value)
    heads = getattr(config, "num_attention_heads", None)
    # Configs such as LLaMA's derive these from the original sizes in __init__.
    if heads and getattr(config, "num_key_value_heads", None) is not None:
        config.num_key_value_heads = heads
    if heads and getattr(config, "head_dim", None) is not None and hasattr(config, "hidden_size"):
        config.head_dim = config.hidden_size // heads


def _factory_model(path: Path, function: str) -> nn.Module:
    if not path.is_file():
        raise _ModelSpecError(f"invalid MODEL '{path}:{function}': the file {str(path)!r} does not exist.")

    # Like ``python path/to/file.py``: the file's folder comes first on sys.path for its imports.
    sys.path.insert(0, str(path.resolve().parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise _ModelSpecError(f"invalid MODEL '{path}:{function}': {str(path)!r} cannot be imported as a module.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    factory = getattr(module, function, None)
    if not callable(factory):
        names = [name for name, value in vars(module).items() if callable(value) and not name.startswith("_")]
        raise _ModelSpecError(
            f"invalid MODEL '{path}:{function}': {str(path)!r} has no function {function!r}."
            f"{format_suggestions(close_matches(function, names))}"
        )
    model = factory()
    if not isinstance(model, nn.Module):
        raise _ModelSpecError(
            f"invalid MODEL '{path}:{function}': {function}() returned {type(model).__name__}, "
            "not an nn.Module. Return the model from the function."
        )
    return model


def _on_meta_if_possible(build: Callable[[], nn.Module]) -> nn.Module:
    """Build on the meta device, so nothing is allocated, or on the CPU where that fails."""
    try:
        with torch.device("meta"):
            return build()
    except Exception as error:
        # Model code can fail on meta tensors in many ways, for example in a weight check.
        logger.info("building on the meta device failed (%s: %s), so building on the CPU", type(error).__name__, error)
        return build()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_PROG, description="Inspect how finetunekit splits a model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    describe_parser = commands.add_parser(
        "describe",
        help="print the layer-group report of a model",
        description="Print each layer group's modules, parameter and trainable counts, locked "
        "normalization layers, tied names and head flag.",
        epilog=f"MODEL is {_FORMS}. Exit status: 2 for an invalid MODEL or option, 1 when building or "
        "changing the model failed.",
    )
    describe_parser.add_argument("model", metavar="MODEL", help="the model to describe")
    describe_parser.add_argument(
        "--num-classes",
        type=_positive_int,
        metavar="N",
        help="replace the head with one of N outputs first (finetunekit.replace_head)",
    )
    describe_parser.add_argument(
        "--freeze-to",
        type=int,
        metavar="N",
        help="freeze the layer groups before index N first, so -1 trains the head only (finetunekit.freeze_to)",
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of classes")
    return value


def _fail(message: str, *, status: int) -> int:
    sys.stderr.write(f"{_PROG} describe: error: {message}\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
