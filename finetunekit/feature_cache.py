"""Feature caching: run the frozen front of a model once and train its trainable tail on the stored outputs.

In a phase that trains only the last part of a model (the head, or the last children of
an ``nn.Sequential``), the frozen front computes the same outputs every epoch. A
:class:`FeatureCache` runs the front once over the training and validation data, stores
the input of the trainable tail for every sample, and then serves batches of stored
inputs in the order that the data loader would have produced, so the run equals an
uncached one up to float rounding.

The cache is only correct when the front is deterministic: no active dropout, no
normalization layer that updates running statistics, and data without random
augmentation. :func:`build_feature_cache` checks these conditions in ``"auto"`` mode and
returns ``None``, with an INFO log of the reason, when one fails or the model's shape is
not supported.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.data import DataLoader

from ._batches import logits_of, to_device
from ._norms import has_running_stats, is_locked
from .errors import FinetuneKitWarning

__all__ = ["CacheMode", "FeatureCache", "build_feature_cache", "check_cache_mode"]

logger = logging.getLogger(__name__)

CacheMode = bool | Literal["auto"]
"""``"auto"`` caches when the checks pass, ``True`` runs the frozen front in eval mode and
caches unless the model or data cannot be cached, ``False`` never caches."""

AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the tail's input is known."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


@dataclass
class _Split:
    """Where the model is cut: ``entry`` is the first module of the tail, ``tail`` runs it all."""

    name: str
    entry: nn.Module
    tail: nn.Module


class _Unsupported(Exception):
    pass


@dataclass
class _Stored:
    """Tail inputs and labels of one dataset, stored per sample or per batch."""

    features: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor | list[torch.Tensor]
    source: Any

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.features, list):
            assert isinstance(self.labels, list)
            yield from zip(self.features, self.labels)
            return
        assert isinstance(self.labels, torch.Tensor)
        for indices in _epoch_indices(self.source):
            index = torch.as_tensor(indices, dtype=torch.long, device=self.features.device)
            yield self.features[index], self.labels[index.to(self.labels.device)]

    def __len__(self) -> int:
        if isinstance(self.features, list):
            return len(self.features)
        return len(self.source)

    @property
    def num_bytes(self) -> int:
        features = self.features if isinstance(self.features, list) else [self.features]
        return sum(f.numel() * f.element_size() for f in features)


class FeatureCache:
    """The stored tail inputs of one phase and the tail module that consumes them.

    Built by :func:`build_feature_cache`; the ``Trainer`` builds one in the first epoch of each
    phase that can use it and drops it at the phase's end.

    Attributes:
        name: Qualified name of the first module of the tail (``"classifier"``, ``"fc"``,
            or ``"4"`` for the fifth child of an ``nn.Sequential``).
        tail: The module that maps a stored input to the model's logits.
    """

    def __init__(self, split: _Split, train: _Stored, val: _Stored | None) -> None:
        self.name = split.name
        self.tail = split.tail
        self._train = train
        self._val = val

    def train_batches(self) -> _Batches:
        """Return the stored training batches, in the order of this epoch's data loader."""
        return _Batches(self._train)

    def val_batches(self) -> _Batches | None:
        """Return the stored validation batches, or ``None`` when validation is not cached."""
        return _Batches(self._val) if self._val is not None else None

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the tail on a stored batch; return its logits and labels."""
        features, labels = batch
        return logits_of(self.tail(features)), labels

    @property
    def num_bytes(self) -> int:
        """Memory taken by the stored inputs, in bytes."""
        return self._train.num_bytes + (self._val.num_bytes if self._val is not None else 0)


class _Batches:
    """A re-iterable view of stored batches with a ``len()``, for progress bars."""

    def __init__(self, stored: _Stored) -> None:
        self._stored = stored

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._stored.batches()

    def __len__(self) -> int:
        if isinstance(self._stored.features, list):
            return len(self._stored.features)
        return len(self._stored.source)


def check_cache_mode(mode: object) -> None:
    """Raise ``ValueError`` unless ``mode`` is ``"auto"``, ``True`` or ``False``."""
    if mode not in ("auto", True, False) or (mode in (0, 1) and not isinstance(mode, bool)):
        raise ValueError(
            f"cache_features={mode!r} is not 'auto', True or False. Pass 'auto' to cache the "
            "frozen front's outputs when the checks pass, True to run it in eval mode and cache, "
            "or False to never cache."
        )


def build_feature_cache(
    model: nn.Module,
    train_data: Any,
    val_data: Any = None,
    *,
    mode: CacheMode = "auto",
    device: torch.device | None = None,
    autocast: AutocastFactory = contextlib.nullcontext,
) -> FeatureCache | None:
    """Run the frozen front of ``model`` over the data once and store the trainable tail's inputs.

    The tail is the smallest module that contains every trainable parameter, when the model
    returns that module's output as its logits and calls it once with one tensor (a head
    such as ``fc`` or ``classifier``). For an ``nn.Sequential`` it is the run of children
    from the first one with a trainable parameter to the end. Any other layout, or a model
    with no frozen front, is not cached.

    With ``mode="auto"`` the front must be deterministic in training mode: every
    normalization layer in it with running statistics must be locked by the freezing (as
    ``freeze`` does with ``bn="frozen"``), and two passes over one batch must give
    bit-equal inputs to the tail, which fails when dropout is active. With ``mode=True``
    the front runs in eval mode, so its dropout is off and its BatchNorm layers use their
    running statistics, without these checks. In both modes, fetching the first batch of a
    ``DataLoader``'s samples twice must give equal tensors, which fails under random data
    augmentation.

    ``train_data`` and ``val_data`` may be ``DataLoader``s over a map-style dataset
    (without persistent workers), whose samples are stored per index and served in the
    order of the loader's sampler, or lists and tuples of batches, stored per batch.
    The model's random number generators are left as they were, so the rest of the run
    draws the same numbers as without a cache.

    Args:
        model: The model with this phase's freezing applied. It is run but not changed.
        train_data: The training batches: ``(inputs, labels)`` pairs or mappings with
            ``"labels"``, as the ``Trainer`` takes them.
        val_data: The validation batches, or ``None``. Validation runs in eval mode,
            which is always deterministic, so only the data check applies.
        mode: ``"auto"``, ``True`` or ``False`` as above; ``False`` returns ``None``.
        device: Device for the batches and the stored inputs; the model's by default.
        autocast: A function returning the autocast context to run the front under, so
            the stored inputs have the dtype of an uncached run.

    Returns:
        The cache, or ``None`` when caching is off, unsafe or unsupported. The reason is
        logged at INFO, and warned with :class:`FinetuneKitWarning` when ``mode=True``.

    Raises:
        ValueError: If ``mode`` is not ``"auto"``, ``True`` or ``False``.

    Example:
        >>> freeze_to(model, -1)  # head only
        >>> cache = build_feature_cache(model, train_loader)
        >>> cache.name, next(iter(cache.train_batches()))[0].shape
        ('fc', torch.Size([64, 512]))
    """
    check_cache_mode(mode)
    if mode is False:
        return None
    device = device if device is not None else next(model.parameters()).device
    try:
        split = _find_split(model)
        _check_source(train_data, "train_data")
        if mode == "auto":
            _check_front(model, split)
        _check_structure(model, split, _first_batch(train_data), device, autocast)
        train = _store(model, split, train_data, device, autocast, eval_front=mode is True, check_repeat=mode == "auto")
    except _Unsupported as reason:
        _report(str(reason), mode)
        return None

    val = None
    if val_data is not None:
        try:
            _check_source(val_data, "val_data")
            val = _store(model, split, val_data, device, autocast, eval_front=True)
        except _Unsupported as reason:
            logger.info("not caching the validation features: %s", reason)

    cache = FeatureCache(split, train, val)
    logger.info(
        "caching the input of %r for %d training%s batches (%.1f MiB)%s",
        split.name,
        len(train),
        f" and {len(val)} validation" if val is not None else "",
        cache.num_bytes / 2**20,
        "; the frozen front ran in eval mode" if mode is True else "",
    )
    return cache


def _report(reason: str, mode: CacheMode) -> None:
    if mode is True:
        warnings.warn(
            f"cache_features=True, but the features are not cached: {reason}. Training goes on "
            "without the cache; pass cache_features=False to silence this.",
            FinetuneKitWarning,
            stacklevel=4,
        )
    else:
        logger.info("not caching features: %s", reason)


# --- where to cut ---------------------------------------------------------------------------


def _find_split(model: nn.Module) -> _Split:
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if not trainable:
        raise _Unsupported("no parameter is trainable")

    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        children = list(model.named_children())
        first = next(i for i, (_, child) in enumerate(children) if any(id(p) in trainable for p in child.parameters()))
        if first == 0:
            raise _Unsupported("the first child of the nn.Sequential is trainable, so no frozen front is left")
        return _Split(children[first][0], children[first][1], model[first:])

    best: tuple[str, nn.Module] | None = None
    best_size = None
    for name, module in model.named_modules():
        ids = {id(p) for p in module.parameters()}
        if name and trainable <= ids and (best_size is None or len(ids) < best_size):
            best, best_size = (name, module), len(ids)
    if best is None:
        raise _Unsupported(
            f"the trainable parameters of {type(model).__name__} are not all inside one submodule, "
            "as they are when only the head trains"
        )
    return _Split(best[0], best[1], best[1])


def _check_front(model: nn.Module, split: _Split) -> None:
    """Raise unless every dropout and normalization layer of the front is inactive in training mode."""
    if not model.training:
        return
    tail_modules = {id(m) for m in split.tail.modules()}
    for name, module in model.named_modules():
        if id(module) in tail_modules:
            continue
        if isinstance(module, _DropoutNd) and module.p > 0:
            raise _Unsupported(
                f"{name!r} in the frozen front is a dropout layer with p={module.p}; pass "
                "cache_features=True to run the front in eval mode, which turns it off"
            )
        if has_running_stats(module) and not is_locked(module):
            raise _Unsupported(
                f"{name!r} in the frozen front updates its running statistics in training mode; "
                "freeze it with bn='frozen', or pass cache_features=True to run the front in eval mode"
            )


def _check_structure(
    model: nn.Module,
    split: _Split,
    batch: Any,
    device: torch.device,
    autocast: AutocastFactory,
) -> None:
    """Run one batch in eval mode and check that the tail is called once, on one tensor, and gives the logits."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    outputs: list[Any] = []
    pre = split.entry.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    post = split.entry.register_forward_hook(lambda m, a, o: outputs.append(o))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _kept_rng(device), autocast():
            output = _run(model, batch, device)
    finally:
        pre.remove()
        post.remove()
        model.train(was_training)

    if len(calls) != 1:
        raise _Unsupported(f"{split.name!r} runs {len(calls)} times in one forward pass, not once")
    args, kwargs = calls[0]
    if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
        raise _Unsupported(f"{split.name!r} is called with more than one tensor, so its input cannot be stored")
    if split.tail is split.entry and logits_of(output) is not outputs[0]:
        raise _Unsupported(f"the model changes the output of {split.name!r} before returning it as the logits")


# --- data -----------------------------------------------------------------------------------


def _check_source(data: Any, argument: str) -> None:
    if isinstance(data, DataLoader):
        if data.batch_sampler is None:
            raise _Unsupported(f"{argument} is a DataLoader without automatic batching (batch_size=None)")
        if data.persistent_workers:
            raise _Unsupported(f"{argument} is a DataLoader with persistent_workers=True")
        try:
            size = len(data.dataset)  # type: ignore[arg-type]
        except TypeError:
            raise _Unsupported(f"{argument} is a DataLoader over an iterable dataset, whose samples have no index")
        if size == 0:
            raise _Unsupported(f"the dataset of {argument} is empty")
        return
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return
    raise _Unsupported(f"{argument} is a {type(data).__name__}, not a DataLoader, list or tuple of batches")


def _first_batch(data: Any) -> Any:
    if isinstance(data, DataLoader):
        # Index order, not the sampler's, so that no random number is drawn.
        return _collate(data, next(_index_chunks(data)))
    if not data:
        raise _Unsupported("train_data has no batches")
    return data[0]


def _collate(loader: DataLoader, indices: Sequence[int]) -> Any:
    return loader.collate_fn([loader.dataset[i] for i in indices])


def _index_chunks(loader: DataLoader) -> Iterator[list[int]]:
    size = loader.batch_size or 64
    total = len(loader.dataset)  # type: ignore[arg-type]
    for start in range(0, total, size):
        yield list(range(start, min(start + size, total)))


def _epoch_indices(loader: DataLoader) -> Iterator[list[int]]:
    """Yield the index batches of one epoch, drawing random numbers as iterating ``loader`` would.

    NOTE: ``DataLoader.__iter__`` (torch 2.14) creates the sampler iterator, then draws one
    int64 from ``loader.generator`` (the global generator when it is None) as the base seed
    of its workers, and the sampler draws its permutation on the first batch. Doing the same
    keeps the batch order and every later random number equal to an uncached run, which
    test_cached_run_matches_uncached checks with a shuffling loader.
    """
    sampler_iter = iter(loader.batch_sampler)  # type: ignore[arg-type]
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    yield from sampler_iter


def _same(first: Any, second: Any) -> bool:
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and first.shape == second.shape and torch.equal(first, second)
    if isinstance(first, Mapping):
        return (
            isinstance(second, Mapping)
            and first.keys() == second.keys()
            and all(_same(first[k], second[k]) for k in first)
        )
    if isinstance(first, (tuple, list)):
        return isinstance(second, (tuple, list)) and len(first) == len(second) and all(map(_same, first, second))
    return bool(first == second)


# --- running the front ----------------------------------------------------------------------


def _store(
    model: nn.Module,
    split: _Split,
    data: Any,
    device: torch.device,
    autocast: AutocastFactory,
    *,
    eval_front: bool,
    check_repeat: bool = False,
) -> _Stored:
    if isinstance(data, DataLoader):
        first = next(_index_chunks(data))
        if not _same(_collate(data, first), _collate(data, first)):
            raise _Unsupported(
                "fetching the same samples twice gave different tensors, so the data is randomly augmented"
            )
        batches: Iterator[Any] = (_collate(data, indices) for indices in _index_chunks(data))
    else:
        batches = iter(data)

    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    was_training = model.training
    if eval_front:
        model.eval()
    # One fork for the whole pass, so that the repeated first batch draws new dropout masks.
    try:
        with _kept_rng(device):
            for number, batch in enumerate(batches):
                value = _capture(model, split, batch, device, autocast)
                if (
                    check_repeat
                    and number == 0
                    and not torch.equal(value, _capture(model, split, batch, device, autocast))
                ):
                    raise _Unsupported(
                        "two passes of the frozen front over one batch differ, most likely because its dropout is "
                        "active; pass cache_features=True to run the front in eval mode"
                    )
                label = to_device(_labels_of(batch), device)
                if not isinstance(label, torch.Tensor) or value.shape[:1] != label.shape[:1]:
                    raise _Unsupported(f"the input of {split.name!r} does not have one row per label")
                features.append(value)
                labels.append(label)
    finally:
        model.train(was_training)

    if isinstance(data, DataLoader):
        return _Stored(torch.cat(features), torch.cat(labels), data)
    return _Stored(features, labels, data)


def _capture(
    model: nn.Module, split: _Split, batch: Any, device: torch.device, autocast: AutocastFactory
) -> torch.Tensor:
    def stop(module: nn.Module, args: tuple[Any, ...]) -> None:
        raise _Captured(args[0].detach())

    handle = split.entry.register_forward_pre_hook(stop)
    try:
        with torch.no_grad(), autocast():
            _run(model, batch, device)
    except _Captured as captured:
        return captured.value
    finally:
        handle.remove()
    raise _Unsupported(f"the forward pass did not reach {split.name!r}")


def _run(model: nn.Module, batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return model(**{k: to_device(v, device) for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return model(to_device(batch[0], device))
    raise _Unsupported(f"a batch is a {type(batch).__name__}, not an (inputs, labels) pair or a mapping")


def _labels_of(batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return batch.get("labels")
    return batch[1]


def _kept_rng(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Restore the global random number generators afterwards, so the run draws as without the cache."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices, device_type=device.type if device.type != "cpu" else "cuda")
