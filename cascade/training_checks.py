"""Training that went wrong without a NaN: checks run after each supervised phase.

A learning rate far too high can keep the loss finite (``big_train.lr: 1e6`` ends at a
loss of 9e12) and leave a network that answers at chance; the tables built on it would
look like results. After the phases that train a network on the task's own loss (the
big network, the pre-trained and the plain routed stages), :func:`degenerate_training`
stops the run, in one line naming the phase and its learning rate, when

- the phase's loss ends above its first epoch's (by more than :data:`LOSS_RISE_TOLERANCE`), or
- (classification) the network is no more accurate on the calibration split than
  always answering that split's most frequent class (within two standard errors).

``checks.allow_degenerate: true`` turns the stop into a warning.

Regression has no second check: the analogue, "no better than predicting the mean
target", refuses working short runs (``configs/keypoints.yaml --quick``: 12.3 px RMSE
after its one epoch, against 5.0 px for the mean), since a network starts far from the
mean and gets there only after some epochs. The loss check and the NaN check
(:class:`~cascade.trainer.Trainer`) cover a diverging regression phase.

The routing methods' own objectives are not checked: their loss may rightly rise (the
AppealNet lambda controller raises its multiplier while training).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.utils.data import Dataset

from cascade.building import make_loader
from cascade.errors import TrainingError
from cascade.roles import TaskKind, TaskLoss

log = logging.getLogger("cascade")

#: a phase's last-epoch mean loss may exceed its first's by this fraction (noise: a
#: fine-tuning phase starts near its floor, and its epoch means wobble)
LOSS_RISE_TOLERANCE = 0.1
#: a classifier within this many binomial standard errors of the majority class's accuracy
#: is no better than it (on 360 inputs at 10 classes: 0.103 + 0.032)
NOISE_STANDARD_ERRORS = 2.0


def loss_rise_problem(history: list[dict[str, float]]) -> str | None:
    """``"loss rose from X to Y"`` when the last epoch's mean loss ends above the first's
    (beyond :data:`LOSS_RISE_TOLERANCE`), else None (also for fewer than two epochs)."""
    if len(history) < 2:
        return None
    first, last = history[0]["loss"], history[-1]["loss"]
    if last > first * (1 + LOSS_RISE_TOLERANCE):
        return f"loss rose from {first:.4g} (epoch 1) to {last:.4g} (epoch {len(history)})"
    return None


@torch.no_grad()
def majority_class_problem(model: nn.Module, criterion: TaskLoss, data: Dataset, batch_size: int,
                           device: torch.device) -> str | None:
    """``"accuracy A on the calibration split is no better than ..."`` when the classifier
    ``model`` is at most as accurate on ``data`` as always answering its most frequent
    class, else None (also for regression, see the module docstring, and empty data).

    Correctness is the criterion's own (``correct(output, target)``), for the network and
    for the constant answer (a one-hot output of that class) alike.
    """
    if criterion.kind != TaskKind.CLASSIFICATION or len(data) == 0:
        return None
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    try:
        for x, y in make_loader(data, batch_size, False, 0):
            outputs.append(model(x.to(device)).output.float().cpu())
            targets.append(y)
    finally:
        model.train(was_training)
    output, target = torch.cat(outputs), torch.cat(targets)
    if target.dim() != 1 or target.is_floating_point():
        return None  # not class labels: no majority class to compare with
    majority = int(torch.bincount(target).argmax())
    constant = torch.zeros_like(output)
    constant[:, majority] = 1.0
    accuracy = float(criterion.correct(output, target).float().mean())
    baseline = float(criterion.correct(constant, target).float().mean())
    if baseline >= 1.0:
        return None  # one class only: nothing to beat
    # "no better": within NOISE_STANDARD_ERRORS binomial standard errors of the constant's
    # accuracy (a constant network's accuracy is the frequency of the class it answers)
    margin = NOISE_STANDARD_ERRORS * math.sqrt(baseline * (1 - baseline) / len(target))
    if accuracy <= baseline + margin:
        return (f"accuracy {accuracy:.3f} on the calibration split is no better than always answering the majority "
                f"class ({baseline:.3f}, give or take {margin:.3f} on {len(target)} inputs)")
    return None


def degenerate_training(phase: str, key: str, lr: float, problems: list[str | None], allow: bool) -> None:
    """Stop the run (or, with ``allow``, warn) on the first of ``problems`` found.

    Args:
        phase: the phase's name (``seed 0 big``).
        key: its config block (``big_train``), named with its learning rate.
        lr: the phase's learning rate.
        problems: what the checks above returned.
        allow: ``checks.allow_degenerate``.

    Raises:
        TrainingError: a problem, and not ``allow``.
    """
    found = [p for p in problems if p]
    if not found:
        return
    where = f"{phase} ({key}, lr {lr:g})"
    if allow:
        log.warning("%s: %s (kept: checks.allow_degenerate is true)", where, found[0])
        return
    raise TrainingError(f"{where}: {found[0]}; lower {key}.lr or train longer, or set checks.allow_degenerate: true "
                        "to keep such a network")
