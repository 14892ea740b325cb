from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import finetunekit as ftk
from finetunekit.__main__ import main


def module_param_total(model: nn.Module, names: tuple[str, ...]) -> int:
    return sum(p.numel() for name in names for p in model.get_submodule(name).parameters())


def tiny_groups(model: nn.Sequential, names: tuple[str, str, str]) -> list[ftk.LayerGroup]:
    """Hand-made groups for ``tiny_model``, so format tests do not depend on group discovery."""
    return [
        ftk.LayerGroup(names[0], [("0", model[0]), ("1", model[1])], list(model[0].named_parameters(prefix="0"))),
        ftk.LayerGroup(names[1], [("2", model[2])], list(model[2].named_parameters(prefix="2"))),
        ftk.LayerGroup(names[2], [("3", model[3])], list(model[3].named_parameters(prefix="3")), is_head=True),
    ]


@pytest.fixture
def tiny_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3))


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=500, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


# --- rows -------------------------------------------------------------------------------


def test_counts_match_module_parameters(resnet):
    report = ftk.describe(resnet)

    for row in report.rows:
        assert row.num_params == module_param_total(resnet, row.modules), row.name
    assert report.num_params == 11_689_512
    assert report.num_trainable == 11_689_512


def test_resnet_rows_follow_layer_groups(resnet):
    report = ftk.describe(resnet)
    groups = ftk.layer_groups(resnet)

    assert [row.name for row in report.rows] == [g.name for g in groups]
    assert [row.index for row in report.rows] == list(range(len(groups)))
    assert report.rows[0].modules == ("conv1", "bn1", "relu", "maxpool")
    assert [row.is_head for row in report.rows] == [False] * (len(groups) - 1) + [True]


def test_trainable_counts_after_freeze_to(resnet):
    ftk.freeze_to(resnet, -3)

    report = ftk.describe(resnet)

    assert [row.num_trainable for row in report.rows[:-3]] == [0] * (len(report.rows) - 3)
    assert [row.num_trainable for row in report.rows[-3:]] == [3_673_088, 4_720_640, 513_000]
    assert report.num_trainable == 3_673_088 + 4_720_640 + 513_000


def test_locked_norms_in_frozen_groups_only(resnet):
    ftk.freeze_to(resnet, -3)

    rows = {row.name: row for row in ftk.describe(resnet).rows}

    assert rows["stem"].locked_norms == ("bn1",)
    assert rows["layer1.0"].locked_norms == ("layer1.0.bn1", "layer1.0.bn2")
    assert rows["layer3.0"].locked_norms == ("layer3.0.bn1", "layer3.0.bn2", "layer3.0.downsample.1")
    assert rows["layer4.0"].locked_norms == ()
    assert rows["layer4.1"].locked_norms == ()
    assert rows["fc"].locked_norms == ()


def test_locked_norms_cleared_by_unfreezing(resnet):
    ftk.freeze_to(resnet, -1)
    ftk.freeze_to(resnet, 0)

    report = ftk.describe(resnet)

    assert all(row.locked_norms == () for row in report.rows)


def test_non_affine_norm_follows_block():
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False)),
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False)),
        nn.Linear(4, 2),
    )
    ftk.freeze_to(model, 1)

    rows = ftk.describe(model).rows

    assert [row.locked_norms for row in rows] == [("0.1",), (), ()]


def test_tied_lm_head_row():
    model = tiny_gpt2()

    report = ftk.describe(model)
    head = report.rows[-1]

    assert head.name == "lm_head"
    assert head.is_head
    assert head.tied == ("lm_head.weight",)
    assert head.num_params == 0
    assert report.rows[0].num_params == 500 * 32 + 64 * 32
    assert report.num_params == sum(p.numel() for p in model.parameters())
    assert all(row.tied == () for row in report.rows[:-1])


def test_groups_override_is_used(tiny_model):
    groups = tiny_groups(tiny_model, ("body", "norm", "out"))

    report = ftk.describe(tiny_model, groups=groups)

    assert [row.name for row in report.rows] == ["body", "norm", "out"]
    assert [row.num_params for row in report.rows] == [40, 16, 27]
    assert report.rows[0].modules == ("0", "1")


def test_groups_override_must_match_model(tiny_model, resnet):
    groups = tiny_groups(tiny_model, ("body", "norm", "out"))

    with pytest.raises(ValueError, match="groups= does not match the parameters of ResNet"):
        ftk.describe(resnet, groups=groups)


# --- optimizer --------------------------------------------------------------------------


def test_optimizer_lrs_match_param_groups(resnet):
    ftk.freeze_to(resnet, -3)
    param_groups = ftk.param_groups(resnet, slice(1e-5, 1e-3), weight_decay=0.05)

    report = ftk.describe(resnet, torch.optim.AdamW(param_groups))

    expected = {g["name"]: (g["lr"],) for g in param_groups}
    rows = {row.name: row for row in report.rows}
    for name, lrs in expected.items():
        assert rows[name].lrs == lrs, name
        assert rows[name].weight_decays == (0.05, 0.0), name
    assert rows["layer4.0"].lrs == (pytest.approx(1e-5),)
    assert rows["layer4.1"].lrs == (pytest.approx(1e-4),)
    assert rows["fc"].lrs == (pytest.approx(1e-3),)
    assert [row.lrs for row in report.rows[:-3]] == [()] * (len(report.rows) - 3)
    assert report.missing_from_optimizer == ()
    assert report.frozen_in_optimizer == ()
    assert report.warnings == []


def test_lrs_read_from_optimizer(resnet):
    ftk.freeze_to(resnet, -2)
    optimizer = torch.optim.SGD(ftk.param_groups(resnet, slice(1e-4, 1e-3)), lr=0.1)
    optimizer.param_groups[-1]["lr"] = 0.5  # as a scheduler would change it

    rows = ftk.describe(resnet, optimizer).rows

    assert rows[-1].lrs == (1e-3, 0.5)
    assert rows[-2].lrs == (1e-4,)
    assert rows[-1].weight_decays == (0,)


def test_unfrozen_late_reported_missing(resnet):
    ftk.freeze_to(resnet, -3)
    optimizer = torch.optim.AdamW(ftk.param_groups(resnet, slice(1e-5, 1e-3)))
    ftk.unfreeze(resnet, "layer3.1")

    report = ftk.describe(resnet, optimizer)

    expected = tuple(f"layer3.1.{name}" for name, _ in resnet.layer3[1].named_parameters())
    assert report.missing_from_optimizer == expected
    assert len(expected) == 6
    assert report.frozen_in_optimizer == ()
    assert report.warnings[0].startswith("6 trainable parameters are not in the optimizer, so they will not train:")


def test_frozen_in_optimizer_reported(resnet):
    optimizer = torch.optim.SGD(resnet.parameters(), lr=0.1)
    ftk.freeze_to(resnet, -1)

    report = ftk.describe(resnet, optimizer)

    expected = tuple(name for name, _ in resnet.named_parameters() if not name.startswith("fc."))
    assert report.frozen_in_optimizer == expected
    assert report.missing_from_optimizer == ()
    assert report.warnings == []  # the stable layout of param_groups(include_frozen=True)


def test_optimizer_built_before_replace_head(resnet):
    optimizer = torch.optim.SGD(resnet.parameters(), lr=0.1)
    ftk.replace_head(resnet, 5)

    report = ftk.describe(resnet, optimizer)

    assert report.missing_from_optimizer == ("fc.weight", "fc.bias")
    assert report.num_foreign_tensors == 2
    assert report.warnings[1].startswith("The optimizer contains 2 tensors that are not parameters of ResNet")


def test_parameters_matched_by_identity():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    for param in model.parameters():
        nn.init.zeros_(param)
    # Equal values, different tensors: only model[1] is in the optimizer.
    optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1)

    report = ftk.describe(model, optimizer)

    assert report.missing_from_optimizer == ("0.weight", "0.bias")
    assert [row.lrs for row in report.rows] == [(), (0.1,)]


def test_non_optimizer_rejected(resnet):
    with pytest.raises(TypeError, match=r"optimizer=\[0.1\] has no param_groups list"):
        ftk.describe(resnet, [0.1])  # type: ignore[arg-type]


def test_no_trainable_parameter_warned(tiny_model):
    ftk.freeze(tiny_model)

    report = ftk.describe(tiny_model, groups=tiny_groups(tiny_model, ("body", "norm", "out")))

    assert report.warnings == [
        "No parameter is trainable, so training changes nothing. "
        "Unfreeze some layer groups, for example finetunekit.freeze_to(model, -1)."
    ]


# --- text and HTML ----------------------------------------------------------------------


def test_text_table_exact(tiny_model):
    groups = tiny_groups(tiny_model, ("body", "norm", "out"))
    ftk.freeze(tiny_model, "0", "2", groups=groups)
    optimizer = torch.optim.AdamW(ftk.param_groups(tiny_model, slice(1e-4, 1e-3), weight_decay=0.1, groups=groups))
    ftk.unfreeze(tiny_model, "2", groups=groups)

    text = str(ftk.describe(tiny_model, optimizer, groups=groups))

    assert text.splitlines() == [
        "Sequential: 3 layer groups, 83 parameters, 43 trainable",
        "#  group  modules  params  trainable  locked norms  tied  head  lr     weight decay",
        "0  body   0, 1         40          0                            -      -",
        "1  norm   2            16         16                            -      -",
        "2  out    3            27         27                      yes   0.001  0.1, 0",
        "   total               83         43",
        "warning: 2 trainable parameters are not in the optimizer, so they will not train: 2.weight, 2.bias. "
        "Build the optimizer after the last freeze or unfreeze, pass optimizer= to finetunekit.unfreeze, or use param_groups(..., include_frozen=True).",
    ]


def test_text_shortens_long_module_lists(resnet):
    ftk.freeze_to(resnet, -1)

    lines = str(ftk.describe(resnet)).splitlines()

    assert lines[2].startswith("0  stem      conv1, bn1, relu +1 more  ")
    assert "layer2.0.bn1, layer2.0.bn2 +1 more" in lines[5]


def test_text_without_optimizer_columns(resnet):
    lines = str(ftk.describe(resnet)).splitlines()

    assert lines[0] == "ResNet: 10 layer groups, 11,689,512 parameters, 11,689,512 trainable"
    assert lines[1].split() == ["#", "group", "modules", "params", "trainable", "locked", "norms", "tied", "head"]
    assert lines[-1].split() == ["total", "11,689,512", "11,689,512"]


def test_html_table_escapes_names(tiny_model):
    groups = tiny_groups(tiny_model, ("<body>", "a & b", 'out "x"'))

    page = ftk.describe(tiny_model, groups=groups)._repr_html_()

    assert page.startswith("<table>\n<caption>Sequential: 3 layer groups</caption>")
    assert "<td>&lt;body&gt;</td>" in page
    assert "<td>a &amp; b</td>" in page
    assert "<td>out &quot;x&quot;</td>" in page
    assert "<body>" not in page
    assert page.count("<tr>") == 1 + 3 + 1  # header, rows, totals


def test_html_lists_warnings(resnet):
    optimizer = torch.optim.SGD(resnet.fc.parameters(), lr=0.1)

    page = ftk.describe(resnet, optimizer)._repr_html_()

    assert "<th>lr</th>" in page
    assert "<ul><li>60 trainable parameters are not in the optimizer" in page


# --- command line -----------------------------------------------------------------------


@pytest.fixture
def in_process_cli(monkeypatch):
    """Undo what main() changes in this process: HF_HUB_OFFLINE and the factory's sys.path entry."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "path", list(sys.path))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-m", "finetunekit", "describe", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_cli_torchvision_with_options():
    result = run_cli("torchvision:resnet18", "--num-classes", "5", "--freeze-to", "-3")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "torchvision:resnet18"
    assert lines[1] == "ResNet: 10 layer groups, 11,179,077 parameters, 8,396,293 trainable"
    assert lines[-2].split() == ["9", "fc", "fc", "2,565", "2,565", "yes"]
    assert "layer3.1.bn1, layer3.1.bn2" in lines[-5]
    assert lines[-4].split() == ["7", "layer4.0", "layer4.0", "3,673,088", "3,673,088"]


def test_cli_transformers_bert():
    result = run_cli("transformers:bert")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "BertForSequenceClassification: 5 layer groups, 168,258 parameters, 168,258 trainable"
    assert [line.split()[1] for line in lines[3:-1]] == [
        "bert.embeddings",
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
        "bert.pooler",
        "classifier",
    ]


FACTORY = '''
import os

from torch import nn


def make_model():
    # The command line must keep the Hugging Face hub offline for user code too.
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        raise RuntimeError("HF_HUB_OFFLINE is not set")
    return Classifier()


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 2)
'''


def test_cli_factory_file(tmp_path):
    (tmp_path / "factory.py").write_text(FACTORY)

    result = run_cli("factory.py:make_model", "--freeze-to", "-1", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "factory.py:make_model"
    assert lines[1] == "Classifier: 2 layer groups, 58 parameters, 18 trainable"
    assert lines[3].split() == ["0", "body", "body,", "act", "40", "0"]
    assert lines[4].split() == ["1", "fc", "fc", "18", "18", "yes"]


def test_cli_bad_spec_exits_2():
    result = run_cli("resnet50")

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "python -m finetunekit describe: error: invalid MODEL 'resnet50': expected torchvision:NAME "
        "(torchvision:resnet50), transformers:TYPE (transformers:bert) or path/to/file.py:FUNCTION.\n"
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("torchvision:resnt18", "torchvision has no model 'resnt18'. Did you mean 'resnet18'"),
        ("transformers:brt", "transformers has no model type 'brt'. Did you mean 'bert'"),
        ("onnx:resnet18", "'onnx' is not a known source"),
        ("missing.py:make_model", "the file 'missing.py' does not exist"),
    ],
)
def test_cli_unknown_names_exit_2(spec, message, capsys, in_process_cli):
    status = main(["describe", spec])

    err = capsys.readouterr().err
    assert status == 2
    assert f"invalid MODEL '{spec}'" in err
    assert message in err
    assert err.count("\n") == 1


def test_cli_missing_factory_function(tmp_path, capsys, in_process_cli):
    path = tmp_path / "factory.py"
    path.write_text(FACTORY)

    status = main(["describe", f"{path}:make_modle"])

    assert status == 2
    assert f"{str(path)!r} has no function 'make_modle'. Did you mean 'make_model'?" in capsys.readouterr().err


def test_cli_freeze_to_out_of_range(tmp_path, capsys, in_process_cli):
    path = tmp_path / "factory.py"
    path.write_text(FACTORY)

    status = main(["describe", f"{path}:make_model", "--freeze-to", "7"])

    assert status == 1
    assert "freeze_to(n=7) is out of range" in capsys.readouterr().err
