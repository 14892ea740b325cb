"""Time ``import finetunekit`` over ``import torch``, in fresh interpreters, interleaved.

Each round starts two new Python processes: one runs ``import torch``, the other
``import torch; import finetunekit``. The script prints the median of each and the
difference, and lists which optional heavy packages ``import finetunekit`` loaded.

Run:
    python benchmarks/import_time.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

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


def time_statement(statement: str) -> float:
    code = _TIMED.format(statement=statement)
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved pairs of fresh interpreters")
    args = parser.parse_args()

    time_statement("import torch")  # warm-up: brings the files into the page cache
    torch_only, with_package = [], []
    for _ in range(args.rounds):
        torch_only.append(time_statement("import torch"))
        with_package.append(time_statement("import torch\nimport finetunekit"))

    base, total = statistics.median(torch_only), statistics.median(with_package)
    loaded = subprocess.run([sys.executable, "-c", _LOADED], check=True, capture_output=True, text=True).stdout.strip()
    print(f"import torch               : {base:.3f} s (median of {args.rounds})")
    print(f"import torch + finetunekit : {total:.3f} s (median of {args.rounds})")
    print(f"added by finetunekit       : {total - base:.3f} s")
    print(f"optional packages loaded by import finetunekit: {loaded}")


if __name__ == "__main__":
    main()
