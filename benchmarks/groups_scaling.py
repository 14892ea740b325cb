"""Time and measure ``layer_groups`` and ``describe`` on LLaMA-shaped models up to the 70B shape.

Each model is a ``transformers.LlamaForCausalLM`` built on the meta device from a
``LlamaConfig``, so no weights are allocated and only the module tree is real. The 7B
shape has hidden size 4096, intermediate size 11008, 32 layers and 32 heads. The 70B
shape has hidden size 8192, intermediate size 28672, 80 layers, 64 heads and 8 key-value
heads. Models of the 70B width with fewer layers show how the cost grows with depth.

For each model the script reports the median time of ``finetunekit.layer_groups(model)``
and ``finetunekit.describe(model)`` over several runs, and the same for a baseline that
sums ``numel()`` over ``model.named_parameters()`` once, with the ratio to that baseline.
The timed calls of the three functions alternate, so load on a shared machine hits all
three alike. Memory comes from separate calls: the tracemalloc peak (Python allocations
only) and the growth of the peak resident set size from ``resource.getrusage``. The peak
is reset through ``/proc/self/clear_refs`` before each call where Linux allows it.
``measure_models`` returns these figures to ``benchmarks/overhead.py``.

Run:
    python benchmarks/groups_scaling.py [--repeats 5] [--layers 10 20 40] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import resource
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import finetunekit as ftk

SHAPE_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}
SHAPE_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8}

# Targets for the 70B shape.
MAX_SECONDS = 2.0
MAX_MEGABYTES = 200.0


@dataclass
class Measurement:
    seconds: float
    tracemalloc_mb: float
    rss_growth_mb: float | None


@dataclass
class ModelResult:
    """One model's size and the measurements of each timed function, by name."""

    label: str
    num_layers: int
    num_params: int
    num_groups: int
    measurements: dict[str, Measurement]

    def ratio(self, name: str) -> float:
        """Median time of the function ``name`` over the median time of the baseline."""
        return self.measurements[name].seconds / self.measurements["baseline"].seconds


def build_llama(shape: dict[str, int], num_layers: int) -> nn.Module:
    config = LlamaConfig(**shape, num_hidden_layers=num_layers)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def count_parameters(model: nn.Module) -> int:
    """Sum ``numel()`` over one pass of ``named_parameters()``, as a hand-written summary would."""
    return sum(param.numel() for _, param in model.named_parameters())


# The timed functions, baseline first.
FUNCTIONS: dict[str, Callable[[nn.Module], Any]] = {
    "baseline": count_parameters,
    "layer_groups": ftk.layer_groups,
    "describe": ftk.describe,
}


def reset_peak_rss() -> bool:
    """Reset the peak resident set size to the current one and return whether that worked.

    Writing 5 to ``/proc/self/clear_refs`` does this on Linux 4.0 and later (see proc(5)).
    """
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(function: Callable[[nn.Module], Any], model: nn.Module) -> tuple[float, float | None]:
    """Return the tracemalloc peak and the peak RSS growth in MB, each from its own call.

    The RSS growth is None where the peak cannot be reset.
    """
    gc.collect()
    can_reset = reset_peak_rss()
    rss_before = peak_rss_mb()
    function(model)
    rss_growth = peak_rss_mb() - rss_before if can_reset else None

    gc.collect()
    tracemalloc.start()
    function(model)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return traced_peak / 2**20, rss_growth


def measure(functions: dict[str, Callable[[nn.Module], Any]], model: nn.Module, repeats: int) -> dict[str, Measurement]:
    """Measure memory of each function, then time ``repeats`` rounds in which each function runs once."""
    memory = {name: measure_memory(function, model) for name, function in functions.items()}

    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function(model)
            times[name].append(time.perf_counter() - start)
    return {name: Measurement(statistics.median(times[name]), *memory[name]) for name in functions}


def measure_models(models: list[tuple[str, dict[str, int], int]], repeats: int) -> dict[str, ModelResult]:
    """Build each ``(label, shape, num_layers)`` model on the meta device and measure the three functions on it."""
    results = {}
    for label, shape, num_layers in models:
        model = build_llama(shape, num_layers)
        results[label] = ModelResult(
            label=label,
            num_layers=num_layers,
            num_params=count_parameters(model),
            num_groups=len(ftk.layer_groups(model)),
            measurements=measure(FUNCTIONS, model, repeats),
        )
        del model
        gc.collect()
    return results


def check_target(result: ModelResult) -> tuple[bool, float, float]:
    """Return whether ``result`` meets the 70B target, its slowest median call in s and largest memory figure in MB."""
    calls = [result.measurements["layer_groups"], result.measurements["describe"]]
    worst_seconds = max(call.seconds for call in calls)
    worst_mb = max(max(call.tracemalloc_mb, call.rss_growth_mb or 0.0) for call in calls)
    return worst_seconds < MAX_SECONDS and worst_mb < MAX_MEGABYTES, worst_seconds, worst_mb


def profile(function: Callable[[nn.Module], Any], model: nn.Module, top: int = 15) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    function(model)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per function and model (median)")
    parser.add_argument(
        "--layers",
        type=int,
        nargs="*",
        default=[10, 20, 40],
        help="layer counts of the extra models with the 70B width",
    )
    parser.add_argument("--profile", action="store_true", help="print a cProfile of describe() on the 70B shape")
    args = parser.parse_args()

    models = [("7B", SHAPE_7B, 32)] + [(f"70B-{n}", SHAPE_70B, n) for n in args.layers] + [("70B", SHAPE_70B, 80)]
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, finetunekit {ftk.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} calls, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    header = (
        f"{'shape':<8} {'layers':>6} {'params':>14} {'groups':>6}  "
        f"{'baseline ms':>11} {'groups ms':>9} {'describe ms':>11} {'ratio groups':>12} {'ratio describe':>14}  "
        f"{'trace MB groups':>15} {'trace MB describe':>17} {'RSS+ MB groups':>14} {'RSS+ MB describe':>16}"
    )
    print(header)

    results = measure_models(models, args.repeats)
    for label, result in results.items():
        base, groups, report = (result.measurements[name] for name in FUNCTIONS)
        print(
            f"{label:<8} {result.num_layers:>6} {result.num_params:>14,} {result.num_groups:>6}  "
            f"{base.seconds * 1e3:>11.2f} {groups.seconds * 1e3:>9.2f} {report.seconds * 1e3:>11.2f} "
            f"{result.ratio('layer_groups'):>12.1f} {result.ratio('describe'):>14.1f}  "
            f"{groups.tracemalloc_mb:>15.2f} {report.tracemalloc_mb:>17.2f} "
            f"{format_rss(groups.rss_growth_mb):>14} {format_rss(report.rss_growth_mb):>16}"
        )

    met, worst_seconds, worst_mb = check_target(results["70B"])
    print(
        f"70B target (< {MAX_SECONDS:g} s, < {MAX_MEGABYTES:g} MB): {'met' if met else 'MISSED'}, "
        f"slowest call {worst_seconds * 1e3:.1f} ms, largest memory figure {worst_mb:.2f} MB"
    )

    if args.profile:
        profile(ftk.describe, build_llama(SHAPE_70B, 80))


def format_rss(megabytes: float | None) -> str:
    return "n/a" if megabytes is None else f"{megabytes:.2f}"


if __name__ == "__main__":
    main()
