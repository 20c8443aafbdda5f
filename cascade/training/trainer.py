"""One training loop for every objective, with typed hooks.

Logging, progress, checkpointing and the AppealNet lambda controller are hooks
(:class:`~cascade.training.hooks.HookBase`), not trainer subclasses.

Resuming: :meth:`Trainer.state_dict` holds everything that decides what the rest of a
training phase computes: the weights, the optimizer and scheduler, the position (epoch
and batch within it), the hooks' and the objective's state, and every random number
generator training draws from (torch's global one, the data loader's shuffling
generator, NumPy's and Python's). A trainer that loads it continues exactly where the
saved one stopped, so a resumed run ends with the same numbers as an uninterrupted one.
:class:`CheckpointStore` keeps one such file per training phase of a run.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cascade.core.errors import CheckpointError, TrainingError
from cascade.nn.objectives import Objective, SupervisedObjective
from cascade.training import distributed
from cascade.training.hooks import HookBase
from cascade.training.rng import loader_generators, rng_state, set_rng_state

log = logging.getLogger(__name__)


class SchedulerInterval(enum.StrEnum):
    """When the learning-rate scheduler steps."""

    EPOCH = "epoch"
    STEP = "step"


class Trainer:
    """Runs ``objective`` over ``loader`` for ``epochs`` epochs.

    Ctrl-C (SIGINT) during :meth:`train` is deferred to the end of the current step, so
    that the state hooks save on it
    (:meth:`~cascade.training.hooks.HookBase.on_interrupt`) is consistent; a second
    Ctrl-C stops at once. So is SIGTERM where the process made it an interrupt
    (``cascade run`` does). The objective's state is saved with the trainer's: its
    ``state_dict()`` if it has one, else its plain scalar attributes (a running baseline,
    a multiplier), which is where objectives keep what they update while training.

    A training step moves the batch to ``device``, applies ``augment`` to its inputs (and
    the channels-last layout), runs the objective under autocast when ``amp_dtype`` is
    set, and steps the optimizer. When several processes train together
    (:mod:`cascade.training.distributed`), the objective sees the network wrapped in
    DistributedDataParallel, and the hooks see the losses averaged over the processes
    (what the AppealNet lambda controller reads is then the same on every rank, and close
    to what a single process reads: the mean over the whole batch); Ctrl-C is not
    deferred (each process stops at once; ``--resume`` continues from the last epoch).

    Args:
        model: the network being trained (frozen parts have ``requires_grad=False``).
        objective: batch -> dict of losses with a ``loss`` key.
        optimizer: over the trainable parameters.
        loader: yields ``(x, y)`` batches.
        epochs: number of passes over ``loader``.
        hooks: called in order at each hook point.
        scheduler: stepped once per epoch, or after every step (``scheduler_interval``).
        device: where batches go.
        name: the phase's name, in messages and checkpoint file names.
        scheduler_interval: ``epoch`` or ``step``.
        augment: random augmentation of a training batch's inputs on ``device``
            (``Task.augment``); it must draw from torch's global generator, which the
            checkpoints save. None: none.
        amp_dtype: autocast dtype of the objective's forward (``torch.bfloat16``), or None.
        channels_last: the network and its 4-D input batches in channels-last layout.

    Attributes:
        epoch: epochs completed.
        step: optimizer steps taken.
        batch: batches completed in the current epoch (non-zero only mid-epoch).
        last_checkpoint: where the last checkpoint of this phase was written, for messages.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        epochs: int,
        hooks: Sequence[HookBase] = (),
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        device: torch.device | str = "cpu",
        name: str = "train",
        scheduler_interval: SchedulerInterval = SchedulerInterval.EPOCH,
        augment: Callable[[Tensor], Tensor] | None = None,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ):
        self.model = model
        self.objective = objective
        self.optimizer = optimizer
        self.loader = loader
        self.epochs = epochs
        self.hooks = list(hooks)
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.name = name
        self.scheduler_interval = SchedulerInterval(scheduler_interval)
        self.augment = augment
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)  # in place: 4-D weights change layout
        self._net: nn.Module = model  # what the objective calls: the DDP wrapper while training
        self.epoch = 0
        self.step = 0
        self.batch = 0
        self.last_checkpoint: str | None = None
        self._epoch_rng: dict[str, Any] | None = None  # RNG state when the current epoch began
        self._interrupt_requested = False

    def train(self) -> None:
        """Train up to ``epochs``, from wherever the trainer's state says it is.

        Raises:
            TrainingError: the loss became NaN or infinite (the message names the step and
                the last good checkpoint, which is left as it was).
            KeyboardInterrupt: Ctrl-C, after the hooks' ``on_interrupt``.
        """
        for hook in self.hooks:
            hook.before_train(self)
        self._interrupt_requested = False
        if self.epoch < self.epochs:  # a collective call under DDP: every rank has the same epoch
            # supervised phases use every trainable parameter; other objectives may leave some unused
            self._net = distributed.wrap(self.model, self.device,
                                         find_unused_parameters=not isinstance(self.objective, SupervisedObjective))
        try:
            with self._deferred_interrupts():
                while self.epoch < self.epochs:
                    self.model.train()
                    for batch in self._epoch_batches():
                        self._train_step(batch)
                        if self._interrupt_requested:
                            self._stop()
                    if self.scheduler is not None and self.scheduler_interval == SchedulerInterval.EPOCH:
                        self.scheduler.step()
                    self.epoch += 1
                    self.batch = 0
                    for hook in self.hooks:
                        hook.after_epoch(self)
                if self._interrupt_requested:  # Ctrl-C during the last epoch's hooks
                    self._stop()
        finally:
            self._net = self.model  # drop the DDP wrapper (and its gradient hooks) with the phase
        for hook in self.hooks:
            hook.after_train(self)

    def _train_step(self, batch: Sequence[torch.Tensor]) -> None:
        batch = [t.to(self.device, non_blocking=True) for t in batch]
        x = batch[0]
        if self.augment is not None:
            x = self.augment(x)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        batch[0] = x
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            losses = self.objective(self._net, batch)
        logged = self._logged(losses)
        if not math.isfinite(logged["loss"]):
            raise TrainingError(self._nonfinite_message(logged["loss"], batch))
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        if self.scheduler is not None and self.scheduler_interval == SchedulerInterval.STEP:
            self.scheduler.step()
        self.step += 1
        self.batch += 1
        for hook in self.hooks:
            hook.after_step(self, logged)

    def _logged(self, losses: dict[str, Tensor]) -> dict[str, float]:
        """The losses as floats for the hooks, in one copy from the device (one wait for the
        GPU a step). Under DDP they are averaged over the processes, before the backward
        pass, so that a non-finite loss on any rank stops every rank."""
        names = list(losses)
        device = losses["loss"].device
        values = torch.stack([losses[k].detach().reshape(()).to(device, torch.float64) for k in names])  # exact
        return dict(zip(names, distributed.all_reduce_mean(values).tolist()))

    def _nonfinite_message(self, value: float, batch: Sequence[torch.Tensor]) -> str:
        bad_input = any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in batch[:1])
        cause = ("this batch's inputs hold NaN/inf; check the data" if bad_input
                 else "lower the learning rate or check the data for NaN/inf")
        kept = (f"last good checkpoint kept: {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint of this phase yet (earlier phases' are kept)")
        return f"{self.name}: loss became {value} at epoch {self.epoch + 1}, step {self.step + 1}; {kept}; {cause}"

    def _epoch_batches(self) -> Iterator:
        """An iterator over this epoch's batches; mid-epoch (a resumed trainer), the epoch's
        shuffling is replayed from its start and the batches already trained on skipped."""
        generators = loader_generators(self.loader)
        if self.batch == 0:
            self._epoch_rng = rng_state(generators)
            return iter(self.loader)
        if self._epoch_rng is None or self.batch > len(self.loader):
            raise CheckpointError(f"{self.name}: the checkpoint stopped at batch {self.batch} of an epoch, but the "
                                  f"data now gives {len(self.loader)} batches per epoch")
        now = rng_state(generators)
        set_rng_state(self._epoch_rng, generators)
        batches = iter(self.loader)
        for _ in range(self.batch):
            next(batches)
        set_rng_state(now, generators)
        return batches

    @contextlib.contextmanager
    def _deferred_interrupts(self) -> Iterator[None]:
        """Turn the first Ctrl-C (or SIGTERM) into a request honoured at the next step boundary.

        SIGINT is deferred unless it is ignored; SIGTERM only where the process turned it
        into an interrupt (``cascade`` does, so that ``kill`` stops a run as Ctrl-C does):
        left at its default, it still ends the process at once.
        """
        if threading.current_thread() is not threading.main_thread() or distributed.is_distributed():
            # not ours to handle (a thread); under DDP, a rank that stopped alone would
            # leave the others waiting for it
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        ours = [s for s, handler in previous.items() if handler not in (None, signal.SIG_IGN, signal.SIG_DFL)]

        def request(signum: int, frame: Any) -> None:
            if self._interrupt_requested:  # a second one: stop now, without a checkpoint
                raise KeyboardInterrupt
            self._interrupt_requested = True
            what = "interrupted" if signum == signal.SIGINT else f"{signal.Signals(signum).name} received"
            log.warning("%s: %s; stopping after this step and saving a checkpoint "
                        "(Ctrl-C again to stop at once)", self.name, what)

        for s in ours:
            signal.signal(s, request)
        try:
            yield
        finally:
            for s in ours:
                signal.signal(s, previous[s])

    def _stop(self) -> None:
        for hook in self.hooks:
            hook.on_interrupt(self)
        raise KeyboardInterrupt

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here (see the module docstring)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "batch": self.batch,
            "hooks": [h.state_dict() for h in self.hooks],
            "objective": _objective_state(self.objective),
            "rng": rng_state(loader_generators(self.loader)),
            "epoch_rng": self._epoch_rng if self.batch else None,
        }

    def load_finished(self, model_state: dict[str, torch.Tensor], steps: int,
                      hook_states: dict[HookBase, dict[str, Any]]) -> None:
        """Mark the phase as done with a network trained before (the network cache): its
        weights, its step count and the given hooks' state (e.g. the loss history). The
        optimizer and the RNGs are left as they are: nothing trains any more.

        Raises:
            CheckpointError: the weights are of a different network (the differences named).
        """
        differences = state_differences(model_state, self.model.state_dict())
        if differences:
            raise CheckpointError(f"{self.name}: the network differs from the cached one: {differences}")
        self.model.load_state_dict(model_state)
        self.epoch, self.step, self.batch, self._epoch_rng = self.epochs, steps, 0, None
        for hook, state in hook_states.items():
            hook.load_state_dict(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (see :meth:`state_dict`); RNGs are restored at once.

        Raises:
            CheckpointError: the state is of a different network (the keys or shapes that
                differ are named), optimizer or set of hooks.
        """
        differences = state_differences(state["model"], self.model.state_dict())
        if differences:
            raise CheckpointError(f"{self.name}: the network differs from the checkpoint's: {differences}")
        if len(state["hooks"]) != len(self.hooks):
            raise CheckpointError(f"{self.name}: the checkpoint has {len(state['hooks'])} hooks' state, "
                                  f"the trainer {len(self.hooks)} hooks")
        self.model.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.name}: the optimizer differs from the checkpoint's ({exc})") from None
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.batch = state["epoch"], state["step"], state.get("batch", 0)
        for hook, hook_state in zip(self.hooks, state["hooks"]):
            hook.load_state_dict(hook_state)
        _load_objective_state(self.objective, state.get("objective", {}))
        self._epoch_rng = state.get("epoch_rng")
        set_rng_state(state["rng"], loader_generators(self.loader))


def _objective_state(objective: Objective) -> dict[str, Any]:
    if hasattr(objective, "state_dict"):
        return objective.state_dict()
    attrs = getattr(objective, "__dict__", {})
    # an enum member (a mode) as its plain value: the checkpoint stays plain data (weights_only)
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in attrs.items()
            if v is None or isinstance(v, (bool, int, float, str))}


def _load_objective_state(objective: Objective, state: dict[str, Any]) -> None:
    if hasattr(objective, "load_state_dict"):
        objective.load_state_dict(state)
        return
    for k, v in state.items():
        if k in getattr(objective, "__dict__", {}):
            setattr(objective, k, v)


def state_differences(saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor], limit: int = 4) -> str:
    """How two networks' state dicts differ (missing or extra entries, shapes), or ``""``."""
    out = []
    missing = [k for k in current if k not in saved]
    extra = [k for k in saved if k not in current]
    if missing:
        out.append(f"not in the checkpoint: {', '.join(missing[:limit])}{' ...' if len(missing) > limit else ''}")
    if extra:
        out.append(f"only in the checkpoint: {', '.join(extra[:limit])}{' ...' if len(extra) > limit else ''}")
    shapes = [f"{k} {list(saved[k].shape)} in the checkpoint, {list(v.shape)} now"
              for k, v in current.items() if k in saved and hasattr(saved[k], "shape") and saved[k].shape != v.shape]
    out += shapes[:limit] + (["..."] if len(shapes) > limit else [])
    return "; ".join(out)
