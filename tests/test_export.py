from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from conftest import bert_inputs, make_bert
from safetensors.torch import load_file

import finetunekit as ftk
from finetunekit._norms import _keep_eval
from finetunekit.export import export_model


def has_lock_hooks(model: torch.nn.Module) -> bool:
    return any(hook is _keep_eval for m in model.modules() for hook in m._forward_pre_hooks.values())


def make_tuned_resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    ftk.freeze_to(model, -2)
    # Running statistics that differ from a fresh model's, as after fine-tuning.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def tuned_resnet() -> torch.nn.Module:
    return make_tuned_resnet()


@pytest.fixture(scope="module")
def resnet_export(tmp_path_factory) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """A tuned ResNet-18, exported once with a torch.export program, since tracing takes seconds."""
    model = make_tuned_resnet()
    directory = tmp_path_factory.mktemp("resnet")
    exported = export_model(model, directory, example_input=torch.randn(2, 3, 32, 32))
    return model, exported, directory


def test_export_removes_lock_hooks_from_copy(resnet_export):
    tuned_resnet, exported, _ = resnet_export

    assert has_lock_hooks(tuned_resnet)
    assert not has_lock_hooks(exported)
    assert not any(k.startswith("_finetunekit") for m in exported.modules() for k in vars(m))
    assert not exported.training
    assert exported is not tuned_resnet


def test_export_resnet_reloads_state_dict(resnet_export):
    _, exported, tmp_path = resnet_export
    # Another batch size than the traced one: the program's batch dimension is dynamic.
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = exported(x)

    plain = torchvision.models.resnet18(weights=None, num_classes=5)
    plain.load_state_dict(load_file(tmp_path / "model.safetensors"))
    program = torch.export.load(tmp_path / "model.pt2").module()

    torch.testing.assert_close(plain.eval()(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(program(x), expected, rtol=1e-5, atol=1e-5)


def test_export_bert_reloads_with_from_pretrained(tmp_path):
    from transformers import BertForSequenceClassification

    model = make_bert()
    ftk.freeze_to(model, -2)
    exported = export_model(model, tmp_path)
    inputs = bert_inputs()

    reloaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()

    assert (tmp_path / "config.json").is_file()
    torch.testing.assert_close(reloaded(**inputs).logits, exported(**inputs).logits, rtol=0, atol=0)


def test_export_mean_pooling_needs_example_input(tmp_path):
    model = make_bert()
    ftk.replace_head(model, 4, pooling="mean")

    with pytest.raises(
        ValueError, match="pools tokens with finetunekit's TokenPooler at 'bert.pooler'.*Pass example_input"
    ):
        export_model(model, tmp_path)


def test_export_mean_pooling_program_keeps_pooling(tmp_path):
    model = make_bert()
    ftk.replace_head(model, 4, pooling="mean")
    exported = export_model(model, tmp_path, example_input=bert_inputs())
    other = bert_inputs(batch=6, length=14)

    program = torch.export.load(tmp_path / "model.pt2").module()

    assert not (tmp_path / "config.json").exists()
    torch.testing.assert_close(program(**other).logits, exported(**other).logits, rtol=1e-5, atol=1e-6)
    # The padding must change the pooled vector, or the mask did not reach the pooler.
    unmasked = dict(other, attention_mask=torch.ones_like(other["attention_mask"]))
    assert not torch.allclose(program(**unmasked).logits[0], program(**other).logits[0])


def test_export_merges_lora(tmp_path):
    pytest.importorskip("peft")
    model = make_bert()
    from finetunekit.lora import add_lora

    add_lora(model, r=2)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    inputs = bert_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits

    exported = export_model(model, tmp_path)

    assert not any(type(m).__module__.startswith("peft.") for m in exported.modules())
    assert any(type(m).__module__.startswith("peft.") for m in model.modules())
    torch.testing.assert_close(exported(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
    state = load_file(tmp_path / "model.safetensors")
    assert not any("lora" in key for key in state)


def test_plain_reload_without_finetunekit(resnet_export, tmp_path):
    """Reload both kinds of export in a fresh interpreter that never imports finetunekit."""
    tuned_resnet, _, resnet_dir = resnet_export
    bert = make_bert()
    export_model(bert, tmp_path / "bert")
    inputs = bert_inputs()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.save(
            {"inputs": inputs, "x": x, "bert": bert.eval()(**inputs).logits, "resnet": tuned_resnet.eval()(x)},
            tmp_path / "expected.pt",
        )
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import BertForSequenceClassification
        saved = torch.load({str(tmp_path / "expected.pt")!r})
        bert = BertForSequenceClassification.from_pretrained({str(tmp_path / "bert")!r}).eval()
        resnet = torch.export.load({str(resnet_dir / "model.pt2")!r}).module()
        assert "finetunekit" not in sys.modules
        torch.testing.assert_close(bert(**saved["inputs"]).logits, saved["bert"], rtol=0, atol=0)
        torch.testing.assert_close(resnet(saved["x"]), saved["resnet"], rtol=1e-5, atol=1e-5)
        print("reloaded")
        """
    )

    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "reloaded"


def test_export_rejects_file_path(tuned_resnet, tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_text("")

    with pytest.raises(ValueError, match="is a file; export_model writes several files, so pass a directory"):
        export_model(tuned_resnet, target)


def test_export_rejects_list_example_input(tuned_resnet, tmp_path):
    with pytest.raises(TypeError, match="example_input is a list; pass a tensor, a tuple"):
        export_model(tuned_resnet, tmp_path, example_input=[torch.randn(1, 3, 32, 32)])


def test_export_unwraps_peft_model(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    model = peft.get_peft_model(make_bert(), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    inputs = bert_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits

    exported = export_model(model, tmp_path)
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()

    assert type(exported) is BertForSequenceClassification
    torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
