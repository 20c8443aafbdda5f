"""One training loop for every objective, with typed hooks.

Logging, progress, checkpointing and the AppealNet lambda controller are hooks
(:class:`HookBase`), not trainer subclasses.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from cascade.errors import CascadeError
from cascade.objectives import AppealNetObjective, Objective


class HookBase:
    """Called by :class:`Trainer` at fixed points; override what you need."""

    def before_train(self, trainer: "Trainer") -> None: ...

    def after_step(self, trainer: "Trainer", losses: dict[str, float]) -> None: ...

    def after_epoch(self, trainer: "Trainer") -> None: ...

    def after_train(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Trainer:
    """Runs ``objective`` over ``loader`` for ``epochs`` epochs.

    Args:
        model: the network being trained (frozen parts have ``requires_grad=False``).
        objective: batch -> dict of losses with a ``loss`` key.
        optimizer: over the trainable parameters.
        loader: yields ``(x, y)`` batches.
        epochs: number of passes over ``loader``.
        hooks: called in order at each hook point.
        scheduler: stepped once per epoch.
        device: where batches go.

    Raises:
        CascadeError: the loss became NaN or infinite (the step is named).
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
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken

    def train(self) -> None:
        for hook in self.hooks:
            hook.before_train(self)
        while self.epoch < self.epochs:
            self.model.train()
            for batch in self.loader:
                batch = [t.to(self.device, non_blocking=True) for t in batch]
                losses = self.objective(self.model, batch)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise CascadeError(
                        f"{self.name}: loss became {loss.item()} at epoch {self.epoch + 1}, step {self.step + 1}; "
                        "lower the learning rate or check the data for NaN/inf"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                logged = {k: float(v.detach()) for k, v in losses.items()}
                for hook in self.hooks:
                    hook.after_step(self, logged)
            if self.scheduler is not None:
                self.scheduler.step()
            self.epoch += 1
            for hook in self.hooks:
                hook.after_epoch(self)
        for hook in self.hooks:
            hook.after_train(self)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "hooks": [h.state_dict() for h in self.hooks],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = state["epoch"], state["step"]
        for hook, hook_state in zip(self.hooks, state["hooks"]):
            hook.load_state_dict(hook_state)


class LambdaControllerHook(HookBase):
    """Dynamic Lagrange multiplier (AppealNet App. B.2, after DeVries & Taylor 2018).

    After each step: if ``L_P > budget`` raise lambda (``lambda /= up``), else lower it
    (``lambda /= down``). This holds ``E[-log q]`` near the budget and keeps the predictor
    from collapsing to ``q = 1``.

    Args:
        objective: the AppealNet objective whose ``lam`` is adjusted.
        budget: the target for ``L_P`` (the paper's beta, 0.5).
        up: divisor applied when ``L_P`` is over budget (< 1 raises lambda).
        down: divisor applied otherwise (> 1 lowers lambda).
    """

    def __init__(self, objective: AppealNetObjective, budget: float = 0.5, up: float = 0.99, down: float = 1.01):
        self.objective = objective
        self.budget, self.up, self.down = budget, up, down

    def after_step(self, trainer: Trainer, losses: dict[str, float]) -> None:
        self.objective.lam /= self.up if losses["L_P"] > self.budget else self.down

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.objective.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.objective.lam = state["lam"]


class ProgressHook(HookBase):
    """A tqdm progress bar over the steps, showing the running losses."""

    def __init__(self, desc: str, disable: bool = False):
        self.desc, self.disable = desc, disable
        self.bar = None

    def before_train(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        total = len(trainer.loader) * trainer.epochs
        self.bar = tqdm(total=total, initial=trainer.step, desc=self.desc, leave=False, disable=self.disable)

    def after_step(self, trainer: Trainer, losses: dict[str, float]) -> None:
        self.bar.update(1)
        if trainer.step % 20 == 0:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)

    def after_train(self, trainer: Trainer) -> None:
        self.bar.close()


class HistoryHook(HookBase):
    """Keeps the mean of every logged loss per epoch (``history[epoch][name]``)."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, float] = {}
        self._n = 0

    def after_step(self, trainer: Trainer, losses: dict[str, float]) -> None:
        for k, v in losses.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._n += 1

    def after_epoch(self, trainer: Trainer) -> None:
        self.history.append({k: v / max(self._n, 1) for k, v in self._sums.items()})
        self._sums, self._n = {}, 0

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class CheckpointHook(HookBase):
    """Writes the trainer's state atomically to ``path`` after every epoch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def after_epoch(self, trainer: Trainer) -> None:
        atomic_save(trainer.state_dict(), self.path)

