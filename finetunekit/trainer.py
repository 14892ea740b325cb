"""A thin training loop that runs fine-tuning phases: head first, then more layer groups."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, trainer_checkpoint
from ._batches import forward_batch
from ._precision import (
    Precision,
    autocast,
    check_precision,
    make_scaler,
    upcast_trainable,
)
from ._utils import named_parameters_once
from .callbacks import Callback
from .feature_cache import CacheMode, FeatureCache, build_feature_cache, check_cache_mode
from .groups import LayerGroup, resolve_groups
from .history import History
from .param_groups import param_groups
from .phase import Metric, Phase, accuracy

__all__ = ["Phase", "Trainer", "accuracy"]

logger = logging.getLogger(__name__)


class Trainer:
    """Run fine-tuning phases over a model, validating after each epoch.

    At the start of each phase the trainer applies the phase's freezing, builds parameter
    groups with :func:`finetunekit.param_groups` and a new optimizer, and gives every
    parameter that trained in an earlier phase its optimizer state (such as Adam's
    moments) back. Batches are ``(inputs, labels)`` pairs, or mappings with a ``"labels"``
    key whose other entries are passed to the model as keyword arguments (Hugging Face
    style). A model output with a ``logits`` attribute is read through it.

    Callbacks see the run at its boundaries (see :class:`finetunekit.callbacks.Callback`)
    and can end a phase or the run through :attr:`stop_phase` and :attr:`stop_training`.
    With ``checkpoint_dir`` the trainer saves a checkpoint after every
    ``checkpoint_every`` epochs and at the end of each phase; ``fit(resume_from=path)``
    continues from one.

    Args:
        model: The model to train, in place. It is moved to ``device`` when one is given.
        phases: The phases to run, in order.
        train_data: An iterable of training batches, such as a ``DataLoader``.
        val_data: An iterable of validation batches, or ``None`` to skip validation.
        loss_fn: ``loss_fn(logits, labels)``; cross-entropy by default.
        metrics: Functions of all validation logits and labels, by name; accuracy by default.
        optimizer: Optimizer class, called with the parameter groups and ``optimizer_kwargs``.
        optimizer_kwargs: Extra keyword arguments for the optimizer, such as ``betas``.
        device: Device for the model and batches; the model's current device by default.
        max_grad_norm: Clip the gradient norm of the trainable parameters to this value.
        groups: Layer groups to use instead of ``layer_groups(model)``, which is called
            at the start of each phase.
        progress: Show a tqdm progress bar for each epoch, with the running training
            loss and the running value of the first metric.
        callbacks: Objects with any of the hooks of ``Callback``, called in this order.
        checkpoint_dir: Directory for automatic checkpoints; ``None`` saves none.
        checkpoint_every: Save after every this many epochs of a phase, and always at
            the phase's end.
        precision: ``"fp32"``; ``"bf16"`` for bfloat16 autocast on CPU or GPU; or
            ``"fp16"`` for float16 autocast with a gradient scaler, on CUDA only. Under
            ``"bf16"`` and ``"fp16"`` each phase casts its trainable float16 and bfloat16
            parameters to float32, so the optimizer updates float32 weights.
        compile: Run the forward pass through ``torch.compile``; a dict is passed to it as
            keyword arguments. A phase that changes the trainable set runs a newly
            traced graph, never the previous phase's.
        cache_features: In a phase that trains only the model's last module (or the last
            children of an ``nn.Sequential``), run the frozen front once, at the start of
            the phase's first epoch, and train on its stored outputs, as :mod:`finetunekit.feature_cache`
            describes. ``"auto"`` caches when the front is deterministic in training mode
            and the data is not randomly augmented, ``True`` runs the front in eval mode
            (dropout off) and caches, ``False`` never caches. Each phase logs whether it
            caches and why not.
        accelerator: An ``accelerate.Accelerator`` for runs in several processes, started
            with ``accelerate launch``. The trainer then shards ``DataLoader`` data over
            the processes, wraps the model (in ``DistributedDataParallel`` on several
            processes) again at the start of each phase, so that newly unfrozen layers
            are synchronised, sums the training loss and gathers the validation outputs
            of all processes, and writes checkpoints from the main process only. The
            device is the accelerator's, and feature caching is off.

    Raises:
        ValueError: If ``phases`` is empty, or ``precision``, ``checkpoint_every`` or
            ``cache_features`` is invalid.

    Example:
        >>> trainer = Trainer(model, [Phase(1, train_groups=1, lr=1e-2),
        ...                           Phase(2, train_groups=3, lr=slice(1e-4, 1e-3))],
        ...                   train_loader, val_loader)
        >>> history = trainer.fit()
        >>> history[-1]["val_accuracy"]
        0.97
    """

    def __init__(
        self,
        model: nn.Module,
        phases: Sequence[Phase],
        train_data: Iterable[Any],
        val_data: Iterable[Any] | None = None,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metrics: Mapping[str, Metric] | None = None,
        optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        max_grad_norm: float | None = None,
        groups: Sequence[LayerGroup] | None = None,
        progress: bool = True,
        callbacks: Sequence[Callback] = (),
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 1,
        precision: Precision = "fp32",
        compile: bool | Mapping[str, Any] = False,
        cache_features: CacheMode = "auto",
        accelerator: Any = None,
    ) -> None:
        if not phases:
            raise ValueError("Trainer needs at least one Phase, for example [Phase(epochs=1, train_groups=1)].")
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every!r} must be a positive integer (epochs).")
        self.model = model
        self.phases = list(phases)
        self.train_data = train_data
        self.val_data = val_data
        self.loss_fn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
        self.metrics = dict(metrics) if metrics is not None else {"accuracy": accuracy}
        self.optimizer_class = optimizer
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.accelerator = accelerator
        if accelerator is not None:
            distributed.check_accelerator(accelerator)
            if device is not None or compile is not False:
                raise ValueError(
                    "Trainer(accelerator=...) takes its device from the accelerator and does not support "
                    f"compile; got device={device!r}, compile={compile!r}. Drop these arguments."
                )
            device = accelerator.device
            train_data = distributed.prepare_data(accelerator, train_data)
            val_data = distributed.prepare_data(accelerator, val_data)
            self.train_data, self.val_data = train_data, val_data
            if cache_features is not False:
                logger.info("feature caching is off because the Trainer runs through an accelerator")
                cache_features = False
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        check_precision(precision, self.device)
        check_cache_mode(cache_features)
        self.cache_features: CacheMode = cache_features
        self.max_grad_norm = max_grad_norm
        self.groups = list(groups) if groups is not None else None
        self.progress = progress
        self.callbacks = list(callbacks)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.precision: Precision = precision
        self.compile_options: dict[str, Any] | None = None
        if compile is True:
            self.compile_options = {}
        elif compile is not False:
            self.compile_options = dict(compile)

        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.scaler = make_scaler(precision, self.device)
        self.history = History()
        self.last_checkpoint: Path | None = None
        """Path of the most recent checkpoint this trainer wrote."""

        # Position of the run, read by callbacks and saved in checkpoints.
        self.phase: Phase | None = None
        self.phase_index = -1
        self.epoch = 0
        self.global_step = 0
        self.stop_phase = False
        """Set by a callback to end the current phase after the current epoch."""
        self.stop_training = False
        """Set by a callback to end the run after the current epoch."""

        self._saved_state: dict[torch.Tensor, Any] = {}
        self._trained_names: set[str] = set()
        self._base_buffers: dict[str, str] | None = None
        self._phase_ended = False
        self._in_epoch = False
        self._forward_model: nn.Module = model
        self._compiled_for: frozenset[str] | None = None
        self._cache: FeatureCache | None = None
        self._cache_due = False

    def fit(self, *, resume_from: str | os.PathLike[str] | None = None) -> History:
        """Run every phase and return one record per epoch.

        Args:
            resume_from: A checkpoint written by this kind of run. The model must be
                built and loaded exactly as for the saved run; the trainer then loads the
                trained weights, optimizer, scheduler, callback and RNG states, and goes on
                after the saved epoch. The history starts with the saved records.

        Returns:
            The history: dicts with ``phase``, ``epoch`` (counted within the phase),
            ``trainable_params``, ``train_loss``, and, with validation data, ``val_loss``
            and ``val_<metric>`` for each metric.

        Raises:
            CheckpointMismatchError: If the checkpoint was saved from another frozen base,
                another list of phases or another number of callbacks.
        """
        self.model.to(self.device)
        self.stop_training = False
        if resume_from is not None:
            first_phase, first_epoch = self._resume(resume_from)
        else:
            if self._base_buffers is None:
                self._base_buffers = trainer_checkpoint.buffer_digests(self.model)
            first_phase, first_epoch = 0, 1
        self._call("on_fit_start")

        for index in range(first_phase, len(self.phases)):
            phase = self.phases[index]
            if index != first_phase or first_epoch == 1:
                self._begin_phase(index, phase)
                first_epoch = 1
            for epoch in range(first_epoch, phase.epochs + 1):
                if self.stop_phase or self.stop_training:
                    break
                self._run_epoch(phase, epoch)
            self._end_phase(phase)
            if self.stop_training:
                break

        self._call("on_fit_end")
        return self.history

    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Save a checkpoint of the run to ``path`` now, between two epochs.

        Call it after ``fit()`` or from a callback's ``on_epoch_end``, ``on_phase_end``
        or ``on_fit_end``. The file contains the trainable state only: see
        :mod:`finetunekit.trainer_checkpoint`.

        Returns:
            The path written.

        Raises:
            RuntimeError: If called before ``fit()`` started or in the middle of an epoch.
        """
        if self._in_epoch:
            raise RuntimeError(
                "save_checkpoint() was called in the middle of an epoch, which a resumed run "
                "cannot continue from. Call it from on_epoch_end or after fit()."
            )
        if self.phase is None:
            raise RuntimeError("save_checkpoint() was called before fit() started; there is no run to save.")
        if not self._is_main_process:
            # The processes hold the same weights, so the main process writes for all.
            self.last_checkpoint = Path(path)
            return Path(path)
        path = trainer_checkpoint.save(trainer_checkpoint.build(self), path)
        self.last_checkpoint = path
        logger.info(
            "saved checkpoint %s (phase %s, epoch %d)",
            path,
            self.phase.name,
            self.epoch,
        )
        return path

    @torch.no_grad()
    def evaluate(self, data: Iterable[Any] | None = None) -> dict[str, float]:
        """Compute the loss and metrics over ``data`` (the validation data by default).

        The model is put in eval mode and returned to its previous mode afterwards.

        Returns:
            ``{"loss": ..., <metric>: ...}``.
        """
        forward = self._forward
        # Only the trainer's own validation data is sharded, so only its outputs are gathered.
        gather = self.accelerator is not None and data is None
        cached = self._cache.val_batches() if data is None and self._cache is not None else None
        if cached is not None:
            data, forward = cached, self._cache.forward  # type: ignore[union-attr]
        data = self.val_data if data is None else data
        if data is None:
            raise ValueError("evaluate() needs data: pass it, or give the Trainer val_data.")
        was_training = self.model.training
        self.model.eval()
        all_logits, all_labels = [], []
        try:
            for batch in data:
                with autocast(self.precision, self.device):
                    logits, labels = forward(batch)
                if gather:
                    logits, labels = self.accelerator.gather_for_metrics((logits, labels))
                all_logits.append(logits.float().cpu())
                all_labels.append(labels.cpu())
        finally:
            self.model.train(was_training)

        logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        results = {"loss": float(self.loss_fn(logits, labels))}
        results.update({name: float(fn(logits, labels)) for name, fn in self.metrics.items()})
        return results

    @property
    def _is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def _begin_phase(self, index: int, phase: Phase) -> None:
        self.phase_index, self.phase, self.epoch = index, phase, 0
        self.stop_phase = False
        self._phase_ended = False
        self._start_phase(phase)
        self.scheduler = self._scheduler(phase)
        self._call("on_phase_start", phase)

    def _run_epoch(self, phase: Phase, epoch: int) -> None:
        self.epoch = epoch
        self._call("on_epoch_start", phase, epoch)
        self._in_epoch = True
        train_loss = self._train_epoch(phase, epoch, self.scheduler)
        self._in_epoch = False
        record: dict[str, Any] = {
            "phase": phase.name,
            "epoch": epoch,
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "train_loss": train_loss,
        }
        if self.val_data is not None:
            record.update({f"val_{k}": v for k, v in self.evaluate().items()})
        self.history.append(record)
        logger.info("%s", _format_record(record))
        self._call("on_epoch_end", record)

        # The last epoch of a phase is saved after on_phase_end, in _end_phase.
        ends_phase = epoch == phase.epochs or self.stop_phase or self.stop_training
        due = epoch % self.checkpoint_every == 0
        if self.checkpoint_dir is not None and due and not ends_phase:
            self.save_checkpoint(self._checkpoint_path(phase, epoch))

    def _end_phase(self, phase: Phase) -> None:
        self._call("on_phase_end", phase)
        # The next phase may train the front, which makes the stored features stale.
        self._cache = None
        self._phase_ended = True
        if self.checkpoint_dir is not None:
            self.save_checkpoint(self._checkpoint_path(phase, self.epoch))

    def _checkpoint_path(self, phase: Phase, epoch: int) -> Path:
        assert self.checkpoint_dir is not None
        return self.checkpoint_dir / f"phase{self.phase_index:02d}-{phase.name}-epoch{epoch:03d}.pt"

    def _resume(self, path: str | os.PathLike[str]) -> tuple[int, int]:
        """Load a checkpoint into the trainer; return the phase index and epoch to go on from."""
        checkpoint = trainer_checkpoint.read(path)
        trainer_checkpoint.check(self, checkpoint)
        trainer_checkpoint.load_tensors(self.model, checkpoint["tensors"])
        self._base_buffers = dict(checkpoint["base_buffers"])
        self._trained_names = set(checkpoint["trained"])
        self._saved_state = {}
        self.history = History(checkpoint["history"])
        self.history.steps = list(checkpoint["history_steps"])
        position = checkpoint["position"]
        self.global_step = position["global_step"]
        index = position["phase_index"]

        if position["phase_ended"]:
            trainer_checkpoint.load_optimizer(self, checkpoint, into_optimizer=False)
            self.phase_index, self.phase = index, self.phases[index]
            self.epoch, self._phase_ended = position["epoch"], True
            first = (index + 1, 1)
        else:
            phase = self.phases[index]
            self.phase_index, self.phase = index, phase
            self._phase_ended = False
            self._start_phase(phase)
            self.scheduler = self._scheduler(phase)
            trainer_checkpoint.load_optimizer(self, checkpoint, into_optimizer=True)
            if self.scheduler is not None:
                self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.epoch = position["epoch"]
            self.stop_phase = position["stop_phase"]
            first = (index, position["epoch"] + 1)
        if self.scaler is not None and checkpoint["scaler"] is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        for callback, state in zip(self.callbacks, checkpoint["callbacks"]):
            callback.load_state_dict(state)

        # The RNG states come last, so nothing above draws from them.
        trainer_checkpoint.set_rng_state(checkpoint["rng"], trainer_checkpoint.data_generators(self.train_data))
        logger.info(
            "resumed from %s after epoch %d of phase %s",
            path,
            position["epoch"],
            self.phases[index].name,
        )
        return first

    def _start_phase(self, phase: Phase) -> None:
        # Groups are found per phase, so a head replaced after the Trainer was built is seen.
        layers = resolve_groups(self.model, self.groups)
        before = _trainable_names(self.model)
        summary = phase.apply(self.model, groups=layers)
        if self.precision != "fp32":
            upcast_trainable(self.model)
        after = _trainable_names(self.model)
        self._trained_names |= after
        groups = param_groups(self.model, phase.lr, weight_decay=phase.weight_decay, groups=layers)
        new = self.optimizer_class(groups, **self.optimizer_kwargs)

        # A parameter that trained in any earlier phase gets its optimizer state (moments,
        # step count) back, also after a phase in which it was frozen.
        if self.optimizer is not None:
            self._saved_state.update(self.optimizer.state)
        for group in new.param_groups:
            for param in group["params"]:
                if param in self._saved_state:
                    new.state[param] = self._saved_state[param]
        self.optimizer = new
        logger.info(
            "phase %s: %s trainable values in %d param groups",
            phase.name,
            f"{summary.num_trainable:,}",
            len(new.param_groups),
        )
        _log_transition(phase, layers, before, after)
        self._prepare_forward(after)
        if self.accelerator is not None:
            self._forward_model, self.optimizer = distributed.prepare_phase(self.accelerator, self.model, new)
        # Filled by the phase's first epoch, after the on_phase_start and on_epoch_start callbacks.
        self._cache = None
        self._cache_due = True

    def _prepare_forward(self, trainable: set[str]) -> None:
        if self.compile_options is None:
            return
        if self._compiled_for is None:
            self._forward_model = torch.compile(self.model, **self.compile_options)  # type: ignore[assignment]
            logger.info("compiled the model with torch.compile(%s)", self.compile_options)
        elif frozenset(trainable) != self._compiled_for:
            # NOTE: Dynamo guards on each parameter's requires_grad, so the first forward pass
            # of this phase traces a new graph whose backward reaches the newly trainable
            # parameters; test_compile_retraces_after_unfreeze checks this on torch 2.14.
            logger.info("the trainable set changed, so torch.compile traces the model again")
        self._compiled_for = frozenset(trainable)

    def _scheduler(self, phase: Phase) -> torch.optim.lr_scheduler.LRScheduler | None:
        if phase.schedule == "constant":
            return None
        try:
            total = phase.epochs * len(self.train_data)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"Phase {phase.name!r} uses schedule='cosine', which needs train_data with a len(). "
                "Pass a DataLoader or a list, or use schedule='constant'."
            ) from None
        assert self.optimizer is not None

        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def _train_epoch(
        self,
        phase: Phase,
        epoch: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    ) -> float:
        assert self.optimizer is not None
        self.model.train()
        if self._cache_due:
            self._fill_cache()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        metric_name, metric = next(iter(self.metrics.items()), (None, None))
        total_loss, total_metric, total_count = 0.0, 0.0, 0
        batches: Iterable[Any] = self.train_data
        forward = self._forward
        if self._cache is not None:
            batches, forward = self._cache.train_batches(), self._cache.forward
        total = len(batches) if hasattr(batches, "__len__") else None
        # tqdm.auto's asyncio class calls iter() on what it gets, so it gets an iterator: a
        # DataLoader iterated twice would start its workers and draw its worker seed twice.
        bar = tqdm(
            iter(batches),
            total=total,
            desc=f"{phase.name} {epoch}/{phase.epochs}",
            disable=not self.progress or not self._is_main_process,
            leave=False,
        )
        for batch in bar:
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(self.precision, self.device):
                logits, labels = forward(batch)
                loss = self.loss_fn(logits, labels)
            self._step(loss, trainable)
            if scheduler is not None:
                scheduler.step()

            count = labels.shape[0]
            batch_loss = loss.item()
            total_loss += batch_loss * count
            total_count += count
            self.global_step += 1
            self._record_step(phase, batch_loss)
            if self.progress:
                postfix = {"loss": f"{total_loss / total_count:.4f}"}
                if metric is not None:
                    total_metric += float(metric(logits.detach().float(), labels)) * count
                    postfix[str(metric_name)] = f"{total_metric / total_count:.4f}"
                bar.set_postfix(postfix)
            self._call("on_step_end", batch_loss)
        if self.accelerator is not None:
            total_loss, total_count = distributed.sum_across(self.accelerator, total_loss, total_count)
        if total_count == 0:
            raise ValueError("train_data yielded no batches.")
        return total_loss / total_count

    def _fill_cache(self) -> None:
        self._cache = build_feature_cache(
            self.model,
            self.train_data,
            self.val_data,
            mode=self.cache_features,
            device=self.device,
            autocast=lambda: autocast(self.precision, self.device),
        )
        self._cache_due = False

    def _step(self, loss: torch.Tensor, trainable: list[nn.Parameter]) -> None:
        assert self.optimizer is not None
        if self.scaler is None:
            if self.accelerator is not None:
                self.accelerator.backward(loss)
            else:
                loss.backward()
            if self.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(trainable, self.max_grad_norm)
            self.optimizer.step()
            return

        self.scaler.scale(loss).backward()
        if self.max_grad_norm is not None:
            # Clipping needs the true gradients, so they are unscaled first.
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(trainable, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _record_step(self, phase: Phase, loss: float) -> None:
        assert self.optimizer is not None
        rates: dict[str, float] = {}
        for index, group in enumerate(self.optimizer.param_groups):
            rates.setdefault(str(group.get("name", f"group{index}")), float(group["lr"]))
        self.history.steps.append({"step": self.global_step, "phase": phase.name, "loss": loss, "lr": rates})

    def _forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_batch(self._forward_model, batch, self.device)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)


def _trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in named_parameters_once(model) if p.requires_grad}


def _log_transition(phase: Phase, layers: Sequence[LayerGroup], before: set[str], after: set[str]) -> None:
    """Log which layer groups became trainable and which became frozen."""
    unfrozen, frozen = after - before, before - after
    if not unfrozen and not frozen:
        return
    became_trainable = [g.name for g in layers if any(n in unfrozen for n, _ in g.named_parameters())]
    became_frozen = [g.name for g in layers if any(n in frozen for n, _ in g.named_parameters())]
    logger.info(
        "phase %s: layer groups now trainable %s, now frozen %s",
        phase.name,
        became_trainable,
        became_frozen,
    )


def _format_record(record: Mapping[str, Any]) -> str:
    parts = [
        f"phase {record['phase']}",
        f"epoch {record['epoch']}",
        f"trainable {record['trainable_params']:,}",
    ]
    for key, value in record.items():
        if key not in ("phase", "epoch", "trainable_params"):
            parts.append(f"{key} {value:.4f}")
    return "  ".join(parts)
