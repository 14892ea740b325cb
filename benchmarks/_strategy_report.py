"""Tables and a plot of the strategy benchmark's results, read back from its CSV files."""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    std = float(tensor.std()) if len(values) > 1 else 0.0
    return float(tensor.mean()), std


def _accuracies(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[float]]:
    """Group the validation accuracies by data set, strategy and size, the key in that order."""
    accuracies: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        accuracies[row["dataset"], row["strategy"], row["size"]].append(float(row["val_accuracy"]))
    return accuracies


def summary_tables(rows: list[dict[str, Any]], strategies: Sequence[str]) -> str:
    """Format one Markdown table per data set: accuracy per size, and the cost at the largest size."""
    accuracies = _accuracies(rows)
    lines = []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        mine = [row for row in rows if row["dataset"] == dataset]
        sizes = list(dict.fromkeys(row["size"] for row in mine))
        largest = sizes[-1]
        header = [f"accuracy, {size} examples" for size in sizes]
        lines += [
            f"### {dataset}",
            "",
            "| strategy | " + " | ".join(header) + f" | trained parameters | train time, s ({largest}) "
            f"| peak RSS, MiB ({largest}) |",
            "| --- | " + " | ".join("---:" for _ in header) + " | ---: | ---: | ---: |",
        ]
        best = {
            size: max(_mean_std(scores)[0] for (d, _, s), scores in accuracies.items() if (d, s) == (dataset, size))
            for size in sizes
        }
        for strategy in strategies:
            runs = [row for row in mine if row["strategy"] == strategy]
            if not runs:
                continue
            cells = []
            for size in sizes:
                scores = accuracies.get((dataset, strategy, size))
                if not scores:
                    cells.append("")
                    continue
                mean, std = _mean_std(scores)
                cell = f"{mean:.3f} ± {std:.3f}" if len(scores) > 1 else f"{mean:.3f} (1 seed)"
                cells.append(f"**{cell}**" if math.isclose(mean, best[size]) else cell)
            at_largest = [row for row in runs if row["size"] == largest]
            trainable = int(runs[-1]["trainable"])
            share = trainable / int(runs[-1]["total_parameters"])
            seconds = _mean_std([row["train_seconds"] for row in at_largest])[0] if at_largest else math.nan
            peak = _mean_std([row["peak_rss_mb"] for row in at_largest])[0] if at_largest else math.nan
            lines.append(
                f"| {strategy} | "
                + " | ".join(cells)
                + f" | {trainable:,} ({share:.2%}) | {seconds:.0f} | {peak:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_plot(rows: list[dict[str, Any]], strategies: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracies = _accuracies(rows)
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        mine = [row for row in rows if row["dataset"] == dataset]
        sizes = list(dict.fromkeys(row["size"] for row in mine))
        for strategy in strategies:
            points = [
                (i, _mean_std(accuracies[dataset, strategy, size]))
                for i, size in enumerate(sizes)
                if (dataset, strategy, size) in accuracies
            ]
            if not points:
                continue
            style = "--" if strategy.startswith("pitfall") else "-"
            ax.errorbar(
                [i for i, _ in points],
                [m for _, (m, _) in points],
                yerr=[s for _, (_, s) in points],
                linestyle=style,
                marker="o",
                capsize=3,
                label=strategy,
            )
        ax.set_xticks(range(len(sizes)), [f"{size}" for size in sizes])
        ax.set_xlabel("training examples")
        ax.set_ylabel("validation accuracy")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    rows: list[dict[str, Any]],
    strategies: Sequence[str],
    out: Path,
    command: str,
    settings: str,
    seconds: float,
    *,
    quick: bool = False,
) -> None:
    """Write ``strategies.md`` and ``strategies.png`` into ``out``; ``quick`` marks the page as a smoke test."""
    import peft
    import transformers

    machine = f"{platform.machine()}, {platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    header = [
        "# Strategy benchmark results",
        "",
        "Generated by `benchmarks/strategies.py`; the method is described in its docstring and on",
        "the [Choosing a strategy](../strategies.md) page. Each cell is the mean ± standard",
        "deviation of the validation accuracy over the seeds; the best mean of each column is bold.",
        "Train time and peak RSS are means at the largest size. The times come from one machine whose",
        "load may change during a run, so compare them only between strategies at one size.",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine}, no GPU",
        f"- versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
        f"- command: `{command}`",
        f"- settings: {settings}",
        f"- total wall time: {seconds / 60:.0f} min",
        "",
    ]
    if quick:
        header += [
            "NOTE: quick mode, a smoke test: one seed and 8 steps per run, on 96 validation examples.",
            "Its accuracies do not rank the strategies.",
            "",
        ]
    header += [
        "![Validation accuracy per strategy and training-set size](strategies.png)",
        "",
        "",
    ]
    (out / "strategies.md").write_text("\n".join(header) + summary_tables(rows, strategies))
    write_plot(rows, strategies, out / "strategies.png")
