"""The trainer's hooks: the base class every hook derives from, a progress bar, and the
per-epoch loss history.

The hooks take the :class:`~cascade.training.trainer.Trainer` that calls them; the name
is only an annotation here (the trainer imports this module, not the other way round).
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


class HookBase:
    """Called by :class:`Trainer` at fixed points; override what you need.

    ``state_dict``/``load_state_dict`` carry whatever the hook needs to continue a
    resumed run exactly (the trainer saves them in its own state).
    """

    def before_train(self, trainer: "Trainer") -> None: ...

    def after_step(self, trainer: "Trainer", losses: dict[str, float]) -> None: ...

    def after_epoch(self, trainer: "Trainer") -> None: ...

    def after_train(self, trainer: "Trainer") -> None: ...

    def on_interrupt(self, trainer: "Trainer") -> None:
        """Ctrl-C (or SIGTERM, see :meth:`Trainer.train`) stopped training at a step
        boundary; ``KeyboardInterrupt`` follows."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ProgressHook(HookBase):
    """A tqdm progress bar over the steps, showing the running losses."""

    def __init__(self, desc: str, disable: bool = False):
        self.desc, self.disable = desc, disable
        self.bar = None

    def before_train(self, trainer: "Trainer") -> None:
        total = len(trainer.loader) * trainer.epochs
        self.bar = tqdm(total=total, initial=trainer.step, desc=self.desc, leave=False, disable=self.disable)

    def after_step(self, trainer: "Trainer", losses: dict[str, float]) -> None:
        self.bar.update(1)
        if trainer.step % 20 == 0:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)

    def after_train(self, trainer: "Trainer") -> None:
        self.bar.close()

    def on_interrupt(self, trainer: "Trainer") -> None:
        self.bar.close()


class HistoryHook(HookBase):
    """Keeps the mean of every logged loss per epoch (``history[epoch][name]``), and the
    loss of the phase's first step (``first_loss``: the network before any update)."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self.first_loss: float | None = None
        self._sums: dict[str, float] = {}
        self._n = 0

    def after_step(self, trainer: "Trainer", losses: dict[str, float]) -> None:
        if trainer.step == 1:
            self.first_loss = losses["loss"]
        for k, v in losses.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._n += 1

    def after_epoch(self, trainer: "Trainer") -> None:
        self.history.append({k: v / max(self._n, 1) for k, v in self._sums.items()})
        self._sums, self._n = {}, 0

    def state_dict(self) -> dict[str, Any]:
        # the running sums too: a checkpoint written mid-epoch (Ctrl-C) resumes the epoch's mean
        return {"history": self.history, "sums": dict(self._sums), "n": self._n, "first_loss": self.first_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.first_loss = state.get("first_loss")
        self._sums, self._n = dict(state.get("sums", {})), state.get("n", 0)
