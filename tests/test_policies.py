"""Freezing policies: exactly which parameters train after each policy and each epoch."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision
from conftest import make_bert, snapshot, trainable_names
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import finetunekit as ftk

# Each model with the name prefixes of its layer groups, input side first and head last,
# written out from the architecture rather than taken from layer_groups.
RESNET_GROUPS = [("conv1.", "bn1."), *[(f"layer{s}.{b}.",) for s in range(1, 5) for b in range(2)], ("fc.",)]
MOBILENET_GROUPS = [*[(f"features.{i}.",) for i in range(19)], ("classifier.1.",)]
BERT_GROUPS = [
    ("bert.embeddings.",),
    *[(f"bert.encoder.layer.{i}.",) for i in range(3)],
    ("bert.pooler.",),
    ("classifier.",),
]
MLP_GROUPS = [("0.",), ("2.",), ("4.",), ("6.",)]


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], list[tuple[str, ...]]]] = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), RESNET_GROUPS),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), MOBILENET_GROUPS),
    "bert": (make_bert, BERT_GROUPS),
    "mlp": (make_mlp, MLP_GROUPS),
}


@pytest.fixture(params=list(MODELS))
def case(request: pytest.FixtureRequest) -> tuple[nn.Module, list[tuple[str, ...]]]:
    factory, prefixes = MODELS[request.param]
    return factory(), prefixes


def names_in(model: nn.Module, prefixes: list[tuple[str, ...]], indexes: range | list[int]) -> set[str]:
    """Names of the parameters of the groups at ``indexes``."""
    chosen = tuple(prefix for i in indexes for prefix in prefixes[i])
    return {name for name, _ in model.named_parameters() if name.startswith(chosen)}


def top(model: nn.Module, prefixes: list[tuple[str, ...]], k: int) -> set[str]:
    """Names of the parameters of the top ``k`` groups."""
    return names_in(model, prefixes, range(len(prefixes) - k, len(prefixes)))


def all_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters()}


def requires_grad_state(model: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def test_group_prefixes_cover_every_parameter(case):
    model, prefixes = case

    assert names_in(model, prefixes, range(len(prefixes))) == all_names(model)
    assert len(ftk.layer_groups(model)) == len(prefixes)


# --- static policies ----------------------------------------------------------------------


def test_feature_extraction_trains_head_only(case):
    model, prefixes = case

    summary = ftk.FeatureExtraction().apply(model)

    assert trainable_names(model) == top(model, prefixes, 1)
    assert set(summary.frozen) == all_names(model) - top(model, prefixes, 1)
    assert summary.unfrozen == ()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_partial_trains_top_k_groups(case, k):
    model, prefixes = case

    ftk.PartialFineTuning(k).apply(model)

    assert trainable_names(model) == top(model, prefixes, k)


def test_partial_all_groups_trains_everything(case):
    model, prefixes = case
    ftk.freeze(model)

    summary = ftk.PartialFineTuning(len(prefixes)).apply(model)

    assert trainable_names(model) == all_names(model)
    assert summary.num_frozen == 0


def test_full_trains_everything_after_freezing(case):
    model, _ = case
    ftk.FeatureExtraction().apply(model)

    summary = ftk.FullFineTuning().apply(model)

    assert trainable_names(model) == all_names(model)
    assert summary.num_frozen == 0
    assert summary.num_trainable == sum(p.numel() for p in model.parameters())


def test_bitfit_trains_biases_and_head(case):
    model, prefixes = case
    biases = {name for name in all_names(model) if name.endswith(".bias")}

    summary = ftk.BitFit().apply(model)

    assert trainable_names(model) == biases | top(model, prefixes, 1)
    assert set(summary.frozen) == all_names(model) - biases - top(model, prefixes, 1)
    assert summary.unfrozen == ()


def test_bitfit_summary_lists_unfrozen_biases(resnet):
    ftk.freeze(resnet)

    summary = ftk.BitFit().apply(resnet)

    assert set(summary.unfrozen) == {n for n in all_names(resnet) if n.endswith(".bias")} | {"fc.weight"}
    assert summary.frozen == ()


def test_bitfit_keeps_batchnorm_with_trainable_bias_unlocked(resnet):
    ftk.BitFit().apply(resnet)
    resnet.train()
    before = resnet.bn1.running_mean.clone()

    resnet(torch.randn(2, 3, 32, 32))

    assert not torch.equal(resnet.bn1.running_mean, before)


def test_surgical_trains_listed_groups_without_head(case):
    model, prefixes = case
    second = ftk.layer_groups(model)[1].name

    ftk.SurgicalFineTuning([0, second]).apply(model)

    assert trainable_names(model) == names_in(model, prefixes, [0, 1])


def test_surgical_trains_head_when_listed(case):
    model, prefixes = case

    ftk.SurgicalFineTuning([-2, "head"]).apply(model)

    assert trainable_names(model) == top(model, prefixes, 2)


def test_surgical_stores_entries_as_tuple():
    entries = [0, "head"]

    policy = ftk.SurgicalFineTuning(entries)
    entries.append(1)

    assert policy.groups_to_train == (0, "head")


# --- schedules ----------------------------------------------------------------------------


@pytest.mark.parametrize(("every", "start"), [(1, 0), (2, 1)])
def test_gradual_unfreezing_adds_one_group_per_step(case, every, start):
    model, prefixes = case
    policy = ftk.GradualUnfreezing(every=every, start=start)
    policy.apply(model)
    previous = 1

    for epoch in range(start + every * len(prefixes) + 1):
        summary = policy.on_epoch(model, epoch)

        expected = min(len(prefixes), 1 + max(0, epoch - start) // every)
        assert trainable_names(model) == top(model, prefixes, expected), f"epoch {epoch}"
        if expected == previous:
            assert summary is None, f"epoch {epoch}"
        else:
            assert set(summary.unfrozen) == top(model, prefixes, expected) - top(model, prefixes, previous)
        previous = expected


def test_gradual_unfreezing_first_epoch_without_apply(resnet):
    summary = ftk.GradualUnfreezing().on_epoch(resnet, 0)

    assert trainable_names(resnet) == {"fc.weight", "fc.bias"}
    assert len(summary.frozen) == len(all_names(resnet)) - 2


def test_gradual_unfreezing_jumps_to_later_epoch(resnet):
    ftk.GradualUnfreezing(every=2).on_epoch(resnet, 5)

    assert trainable_names(resnet) == top(resnet, RESNET_GROUPS, 3)


def test_linear_probe_then_finetune_epochs(case):
    model, prefixes = case
    policy = ftk.LinearProbeThenFinetune(probe_epochs=2)
    policy.apply(model)
    results = []

    for epoch in range(4):
        results.append(policy.on_epoch(model, epoch))
        expected = top(model, prefixes, 1) if epoch < 2 else all_names(model)
        assert trainable_names(model) == expected, f"epoch {epoch}"

    assert results[0] is None
    assert results[1] is None
    assert set(results[2].unfrozen) == all_names(model) - top(model, prefixes, 1)
    assert results[3] is None


def test_gradual_unfreezing_bn_train_keeps_batchnorm_trainable(resnet):
    bn = {f"{n}.{k}" for n, m in resnet.named_modules() if isinstance(m, nn.BatchNorm2d) for k in ("weight", "bias")}

    ftk.GradualUnfreezing(bn="train").apply(resnet)

    assert trainable_names(resnet) == {"fc.weight", "fc.bias"} | bn


# --- frozen parameters do not move under an optimizer ----------------------------------------

OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "adamw_decay": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, *, set_to_none: bool) -> None:
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=set_to_none)
        loss = model(torch.randn(8, 6)).pow(2).mean()
        loss.backward()
        optimizer.step()


def frozen_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in before.items():
        assert torch.equal(params[name], value), name


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_gradual_unfreezing_frozen_params_bit_identical(optimizer_name, set_to_none):
    model = make_mlp()
    policy = ftk.GradualUnfreezing()
    policy.apply(model)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())

    for epoch in range(4):
        policy.on_epoch(model, epoch)
        before = frozen_snapshot(model)
        trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        train_steps(model, optimizer, 3, set_to_none=set_to_none)

        assert_unchanged(model, before)
        params = dict(model.named_parameters())
        assert all(not torch.equal(params[name], value) for name, value in trained.items()), f"epoch {epoch}"

    # Back to the head only: groups with momentum and Adam moments are frozen after training.
    policy.apply(model)
    before = frozen_snapshot(model)
    train_steps(model, optimizer, 3, set_to_none=set_to_none)

    assert set(before) == all_names(model) - {"6.weight", "6.bias"}
    assert_unchanged(model, before)


# --- bad arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: ftk.PartialFineTuning(0), ValueError, r"PartialFineTuning\(k=0\) is out of range: pass k >= 1"),
        (lambda: ftk.GradualUnfreezing(every=0), ValueError, r"GradualUnfreezing\(every=0\).*every >= 1"),
        (lambda: ftk.GradualUnfreezing(start=-1), ValueError, r"GradualUnfreezing\(start=-1\).*start >= 0"),
        (lambda: ftk.LinearProbeThenFinetune(0), ValueError, r"probe_epochs=0\).*probe_epochs >= 1"),
        (lambda: ftk.PartialFineTuning("3"), TypeError, r"k must be an int, not str"),
        (lambda: ftk.GradualUnfreezing(every=True), TypeError, r"every must be an int, not bool"),
        (lambda: ftk.SurgicalFineTuning([]), ValueError, r"would train nothing"),
        (lambda: ftk.SurgicalFineTuning([1.0]), TypeError, r"entry 1.0 has type float"),
        (lambda: ftk.FeatureExtraction(bn="freeze"), ValueError, r"bn='freeze' is not a BatchNorm policy"),
    ],
)
def test_invalid_constructor_argument_raises(build, error, message):
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda m: ftk.PartialFineTuning(11).apply(m),
            IndexError,
            r"PartialFineTuning\(k=11\) trains 11 layer groups, but ResNet has 10\. Pass 1 <= k <= 10\.",
        ),
        (
            lambda m: ftk.SurgicalFineTuning([0, "layr4.0"]).apply(m),
            ftk.NoMatchingTargetError,
            r"'layr4\.0' is not a layer-group name of ResNet\. Did you mean 'layer4\.0'",
        ),
        (
            lambda m: ftk.SurgicalFineTuning([0, 10]).apply(m),
            IndexError,
            r"index 10 is out of range for ResNet, which has 10 groups\. Pass -10 <= index < 10\.",
        ),
        (
            lambda m: ftk.GradualUnfreezing().on_epoch(m, -1),
            ValueError,
            r"on_epoch\(epoch=-1\) is out of range: pass epoch >= 0",
        ),
        (
            lambda m: ftk.LinearProbeThenFinetune(1).on_epoch(m, -1),
            ValueError,
            r"on_epoch\(epoch=-1\) is out of range",
        ),
    ],
)
def test_invalid_apply_leaves_model_unchanged(resnet, call, error, message):
    ftk.freeze_to(resnet, -3)
    resnet.fc.weight.grad = torch.ones_like(resnet.fc.weight)
    state = requires_grad_state(resnet)
    before = snapshot(resnet)

    with pytest.raises(error, match=message):
        call(resnet)

    assert requires_grad_state(resnet) == state
    assert resnet.fc.weight.grad is not None
    after = snapshot(resnet)
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_missing_group_name_is_value_error(resnet):
    with pytest.raises(ValueError, match="not a layer-group name"):
        ftk.SurgicalFineTuning(["layer5"]).apply(resnet)


# --- properties of freeze_to, freeze and unfreeze on random module trees -------------------


def module_trees() -> st.SearchStrategy[nn.Module]:
    linear = st.tuples(st.integers(1, 5), st.integers(1, 5)).map(lambda shape: nn.Linear(*shape))
    containers = st.one_of(
        st.lists(linear, min_size=1, max_size=3).map(lambda children: nn.Sequential(*children)),
        st.lists(linear, min_size=1, max_size=3).map(nn.ModuleList),
    )
    nested = st.recursive(
        st.one_of(linear, containers),
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=3).map(lambda children: nn.Sequential(*children)),
            st.lists(inner, min_size=1, max_size=3).map(nn.ModuleList),
        ),
        max_leaves=8,
    )
    return st.lists(nested, min_size=2, max_size=4).map(lambda children: nn.Sequential(*children))


PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(model=module_trees(), data=st.data())
def test_freeze_to_trains_groups_from_n(model, data):
    groups = ftk.layer_groups(model)
    n = data.draw(st.integers(-len(groups), len(groups) - 1), label="n")
    start = n % len(groups)

    ftk.freeze_to(model, n)

    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups[start:] for p in g.parameters()}


@PROPERTY_SETTINGS
@given(model=module_trees(), data=st.data())
def test_freeze_then_unfreeze_restores_state(model, data):
    groups = ftk.layer_groups(model)
    modules = {name: m for name, m in model.named_modules() if name and next(m.parameters(), None) is not None}
    params = dict(model.named_parameters())
    kind = data.draw(st.sampled_from(["group", "module", "parameter"]), label="kind")
    if kind == "group":
        target = data.draw(st.integers(-len(groups), len(groups) - 1), label="group index")
        selected = {id(p) for p in groups[target].parameters()}
    elif kind == "module":
        target = data.draw(st.sampled_from(sorted(modules)), label="module")
        selected = {id(p) for p in modules[target].parameters()}
    else:
        target = data.draw(st.sampled_from(sorted(params)), label="parameter")
        selected = {id(params[target])}
    # Parameters outside the target start in a random state; the target starts trainable.
    flags = data.draw(st.lists(st.booleans(), min_size=len(params), max_size=len(params)), label="flags")
    for flag, param in zip(flags, params.values()):
        param.requires_grad_(flag or id(param) in selected)
    original = requires_grad_state(model)

    ftk.freeze(model, target)
    frozen_now = {id(p) for p in model.parameters() if not p.requires_grad}
    ftk.unfreeze(model, target)

    assert selected <= frozen_now
    assert requires_grad_state(model) == original


# --- ReinitializeTop ------------------------------------------------------------------------


def perturb(model: nn.Module) -> None:
    """Move every parameter and running statistic off its initial value, so a reset shows."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.25)
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.add_(0.5)


def changed_names(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    after = model.state_dict()
    return {name for name, value in before.items() if not torch.equal(after[name], value)}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_reinitialize_top_bert_changes_top_k_body_groups(k):
    model = make_bert()
    perturb(model)
    for param in model.parameters():
        param._is_hf_initialized = True  # as from_pretrained leaves loaded weights
    ftk.freeze_to(model, -2)
    before = snapshot(model)

    summary = ftk.ReinitializeTop(k).apply(model)

    # The pooler is the top body group of BertForSequenceClassification, the classifier the head.
    reinitialized = names_in(model, BERT_GROUPS, range(len(BERT_GROUPS) - 1 - k, len(BERT_GROUPS) - 1))
    assert changed_names(model, before) == reinitialized
    assert trainable_names(model) == all_names(model)
    assert summary.num_frozen == 0
    assert all(p._is_hf_initialized is True for p in model.parameters())


def test_reinitialize_top_bert_uses_init_weights_values():
    model = make_bert()
    perturb(model)

    ftk.ReinitializeTop(2).apply(model)

    layer = model.bert.encoder.layer[2]
    assert torch.equal(layer.output.LayerNorm.weight, torch.ones(32))
    assert torch.equal(layer.output.LayerNorm.bias, torch.zeros(32))
    assert torch.equal(layer.intermediate.dense.bias, torch.zeros(48))
    assert torch.equal(model.bert.pooler.dense.bias, torch.zeros(32))
    assert layer.intermediate.dense.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("k", [1, 3])
def test_reinitialize_top_resnet_changes_top_k_blocks(resnet, k):
    perturb(resnet)
    before = snapshot(resnet)

    ftk.ReinitializeTop(k).apply(resnet)

    reinitialized = names_in(resnet, RESNET_GROUPS, range(len(RESNET_GROUPS) - 1 - k, len(RESNET_GROUPS) - 1))
    reset_stats = {
        f"{name}.{stat}"
        for name, module in resnet.named_modules()
        if isinstance(module, nn.BatchNorm2d) and f"{name}.weight" in reinitialized
        for stat in ("running_mean", "running_var")
    }
    assert changed_names(resnet, before) == reinitialized | reset_stats
    assert trainable_names(resnet) == all_names(resnet)
    bn = resnet.layer4[1].bn2
    assert torch.equal(bn.weight, torch.ones(512))
    assert torch.equal(bn.bias, torch.zeros(512))
    assert torch.equal(bn.running_mean, torch.zeros(512))
    assert torch.equal(bn.running_var, torch.ones(512))


def test_reinitialize_top_follows_torch_seed(resnet):
    other = torchvision.models.resnet18(weights=None)
    other.load_state_dict(resnet.state_dict())

    torch.manual_seed(7)
    ftk.ReinitializeTop(2).apply(resnet)
    torch.manual_seed(7)
    ftk.ReinitializeTop(2).apply(other)

    assert changed_names(resnet, other.state_dict()) == set()


@pytest.mark.parametrize("k", [10, 30])
def test_reinitialize_top_out_of_range_changes_nothing(resnet, k):
    ftk.freeze_to(resnet, -3)
    state = requires_grad_state(resnet)
    before = snapshot(resnet)

    with pytest.raises(IndexError, match=rf"ReinitializeTop\(k={k}\) .* but ResNet has 9\. Pass 1 <= k <= 9\."):
        ftk.ReinitializeTop(k).apply(resnet)

    assert requires_grad_state(resnet) == state
    assert changed_names(resnet, before) == set()


class Scale(nn.Module):
    """Elementwise scale with a parameter and no ``reset_parameters``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((size,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_reinitialize_top_warns_on_module_without_reset():
    model = nn.Sequential(nn.Linear(4, 4), Scale(4), nn.Linear(4, 4), nn.Linear(4, 2))

    with pytest.warns(ftk.FinetuneKitWarning, match=r"kept the pretrained values of \['1\.scale'\] \(1 tensors\)"):
        ftk.ReinitializeTop(2).apply(model)

    assert torch.equal(model[1].scale, torch.full((4,), 2.0))


# --- ProgressiveFreezing --------------------------------------------------------------------


def test_progressive_freezing_resnet_schedule(resnet):
    policy = ftk.ProgressiveFreezing(total_epochs=4, first=0.5)
    policy.apply(resnet)
    # Body group i freezes at ceil(2 + 2 * i / 9): the stem at 2, layer1.0-layer2.1 at 3, the rest at 4.
    frozen_from = {0: [], 1: [], 2: [0], 3: [0, 1, 2, 3, 4], 4: list(range(9)), 5: list(range(9))}

    for epoch, frozen_groups in frozen_from.items():
        previous = trainable_names(resnet)
        summary = policy.on_epoch(resnet, epoch)

        expected = all_names(resnet) - names_in(resnet, RESNET_GROUPS, frozen_groups)
        assert trainable_names(resnet) == expected, f"epoch {epoch}"
        if expected == previous:
            assert summary is None, f"epoch {epoch}"
        else:
            assert set(summary.frozen) == previous - expected, f"epoch {epoch}"


def test_progressive_freezing_head_always_trains(case):
    model, prefixes = case
    policy = ftk.ProgressiveFreezing(total_epochs=3, first=0.34)
    policy.apply(model)

    for epoch in range(5):
        policy.on_epoch(model, epoch)
        assert top(model, prefixes, 1) <= trainable_names(model), f"epoch {epoch}"

    assert trainable_names(model) == top(model, prefixes, 1)


def test_progressive_freezing_jumps_to_later_epoch(resnet):
    ftk.ProgressiveFreezing(total_epochs=4).on_epoch(resnet, 3)

    assert trainable_names(resnet) == names_in(resnet, RESNET_GROUPS, range(5, 10))


@pytest.mark.parametrize(
    ("policy", "num_body_groups", "expected"),
    [
        (ftk.ProgressiveFreezing(4, first=0.5), 9, [2, 3, 3, 3, 3, 4, 4, 4, 4]),
        (ftk.ProgressiveFreezing(10, first=0.3), 2, [3, 7]),
        (ftk.ProgressiveFreezing(5, first=1), 3, [5, 5, 5]),
        (ftk.ProgressiveFreezing(1), 0, []),
    ],
)
def test_progressive_freezing_freeze_epochs(policy, num_body_groups, expected):
    assert policy.freeze_epochs(num_body_groups) == expected


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: ftk.ReinitializeTop(0), ValueError, r"ReinitializeTop\(k=0\) is out of range: pass k >= 1"),
        (lambda: ftk.ReinitializeTop(1.0), TypeError, r"k must be an int, not float"),
        (lambda: ftk.ProgressiveFreezing(0), ValueError, r"total_epochs=0\) is out of range: pass total_epochs >= 1"),
        (lambda: ftk.ProgressiveFreezing(True), TypeError, r"total_epochs must be an int, not bool"),
        (lambda: ftk.ProgressiveFreezing(4, first=0), ValueError, r"first=0\) is out of range: pass 0 < first <= 1"),
        (lambda: ftk.ProgressiveFreezing(4, first=1.5), ValueError, r"first=1\.5\) is out of range"),
        (lambda: ftk.ProgressiveFreezing(4, first="0.5"), TypeError, r"first must be a real number, not str"),
        (lambda: ftk.ProgressiveFreezing(4, bn="freeze"), ValueError, r"bn='freeze' is not a BatchNorm policy"),
    ],
)
def test_new_policies_invalid_constructor_argument_raises(build, error, message):
    with pytest.raises(error, match=message):
        build()


# --- SurgicalFineTuning.from_gradients ------------------------------------------------------


class Multiply(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def make_scaled_mlp() -> nn.Module:
    """MLP whose group ``'4'`` sees its input scaled by 50 and has weights scaled by 1/50.

    The output is as without the scaling, but group ``'4'``'s gradient is 50 times larger
    and its weights 50 times smaller, so its relative gradient norm dominates.
    """
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), Multiply(50.0), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    with torch.no_grad():
        model[4].weight.div_(50.0)
    return model


def classification_batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(count)]


def test_from_gradients_chooses_dominant_group():
    model = make_scaled_mlp()

    policy = ftk.SurgicalFineTuning.from_gradients(model, classification_batches(), nn.functional.cross_entropy, 1)

    assert policy.groups_to_train == ("4",)


def test_from_gradients_returns_k_groups_in_model_order():
    model = make_scaled_mlp()

    policy = ftk.SurgicalFineTuning.from_gradients(model, classification_batches(), nn.functional.cross_entropy, 2)

    # Group '4' scores about 46 and the head '6' about 0.7, the next highest.
    assert policy.groups_to_train == ("4", "6")


def test_from_gradients_leaves_model_unchanged():
    model = make_scaled_mlp()
    model.train()
    ftk.freeze_to(model, -2)
    model[6].weight.grad = torch.full_like(model[6].weight, 3.0)
    head_grad = model[6].weight.grad
    model[0].eval()
    modes = {name: module.training for name, module in model.named_modules()}
    state = requires_grad_state(model)
    grads = {name: p.grad for name, p in model.named_parameters()}
    before = snapshot(model)

    ftk.SurgicalFineTuning.from_gradients(model, classification_batches(), nn.functional.cross_entropy, 2)

    assert requires_grad_state(model) == state
    assert all(p.grad is grads[name] for name, p in model.named_parameters())
    assert model[6].weight.grad is head_grad
    assert torch.equal(head_grad, torch.full_like(model[6].weight, 3.0))
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert changed_names(model, before) == set()


def test_from_gradients_batchnorm_stats_unchanged():
    model = make_scaled_mlp().train()
    before = snapshot(model)

    ftk.SurgicalFineTuning.from_gradients(model, classification_batches(), nn.functional.cross_entropy, 1)

    assert changed_names(model, before) == set()
    assert model[1].num_batches_tracked.item() == 0
    assert model.training is True


@pytest.mark.parametrize(
    ("k", "batches", "error", "message"),
    [
        (5, classification_batches(1), IndexError, r"from_gradients\(k=5\) chooses 5 layer groups, but Sequential has 4"),
        (0, classification_batches(1), ValueError, r"from_gradients\(k=0\) is out of range: pass k >= 1"),
        (1, [], ValueError, r"yielded no \(inputs, labels\) pair"),
    ],
)
def test_from_gradients_invalid_argument_changes_nothing(k, batches, error, message):
    model = make_scaled_mlp()
    ftk.freeze_to(model, -2)
    state = requires_grad_state(model)
    before = snapshot(model)

    with pytest.raises(error, match=message):
        ftk.SurgicalFineTuning.from_gradients(model, batches, nn.functional.cross_entropy, k)

    assert requires_grad_state(model) == state
    assert all(p.grad is None for p in model.parameters())
    assert model.training is True
    assert changed_names(model, before) == set()
