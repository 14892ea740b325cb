"""Time ``import finetunekit`` over ``import torch``, in fresh interpreters, interleaved.

Each round starts two new Python processes: one runs ``import torch``, the other
``import torch; import finetunekit``. The script prints the median of each and the
difference, and lists which optional heavy packages ``import finetunekit`` loaded.
``measure_import`` returns those figures to ``benchmarks/overhead.py``.

Run:
    python benchmarks/import_time.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from dataclasses import dataclass

# Target: time that ``import finetunekit`` adds to ``import torch``, in seconds.
MAX_ADDED_SECONDS = 0.3

_TIMED = """
import time
start = time.perf_counter()
{statement}
print(time.perf_counter() - start)
"""

_LOADED = (
    "import sys, finetunekit; "
    "print(sorted(m for m in ('transformers', 'peft', 'accelerate', 'matplotlib', 'pandas') if m in sys.modules))"
)


@dataclass
class ImportResult:
    """Median import times in seconds and the optional packages that ``import finetunekit`` loaded."""

    torch_only: float
    with_package: float
    rounds: int
    loaded: str

    @property
    def added(self) -> float:
        """Seconds that ``import finetunekit`` adds to ``import torch``."""
        return self.with_package - self.torch_only


def time_statement(statement: str) -> float:
    code = _TIMED.format(statement=statement)
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def measure_import(rounds: int = 15) -> ImportResult:
    """Time both imports in ``rounds`` interleaved pairs of fresh interpreters and return the medians."""
    time_statement("import torch")  # warm-up: brings the files into the page cache
    torch_only, with_package = [], []
    for _ in range(rounds):
        torch_only.append(time_statement("import torch"))
        with_package.append(time_statement("import torch\nimport finetunekit"))

    loaded = subprocess.run([sys.executable, "-c", _LOADED], check=True, capture_output=True, text=True).stdout.strip()
    return ImportResult(statistics.median(torch_only), statistics.median(with_package), rounds, loaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved pairs of fresh interpreters")
    args = parser.parse_args()

    result = measure_import(args.rounds)
    print(f"import torch               : {result.torch_only:.3f} s (median of {args.rounds})")
    print(f"import torch + finetunekit : {result.with_package:.3f} s (median of {args.rounds})")
    print(f"added by finetunekit       : {result.added:.3f} s")
    print(f"optional packages loaded by import finetunekit: {result.loaded}")


if __name__ == "__main__":
    main()
