"""Training that went wrong without a NaN: checks run after each supervised phase.

A learning rate far too high can keep the loss finite (``big_train.lr: 1e6`` ends at a
loss of 9e12) and leave a network that answers at chance; the tables built on it would
look like results. After the phases that train a network on the task's own loss (the
big network, the pre-trained and the plain routed stages), :func:`degenerate_training`
stops the run, in one line naming the phase and its learning rate, when

- the phase's loss ends above its first epoch's (by more than :data:`LOSS_RISE_TOLERANCE`), or
- training left the network worse on the calibration split than a constant answer: a
  loss above both the best constant's (the class frequencies, or the mean target) and
  its own before training, and, for a classifier, an accuracy no better than always
  answering the most frequent class (within two standard errors). See
  :func:`constant_answer_problem`: a network still at its initialization, or one that
  improved without reaching the constant yet, is let through.

``checks.allow_degenerate: true`` turns the stop into a warning.

The routing methods' own objectives are not checked: their loss may rightly rise (the
AppealNet lambda controller raises its multiplier while training).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.utils.data import Dataset

from cascade.training.data import make_loader
from cascade.core.errors import TrainingError
from cascade.contracts.task import TaskLoss
from cascade.core.enums import TaskKind

log = logging.getLogger(__name__)

#: a phase's last-epoch mean loss may exceed its first's by this fraction (noise: a
#: fine-tuning phase starts near its floor, and its epoch means wobble)
LOSS_RISE_TOLERANCE = 0.1
#: a classifier within this many binomial standard errors of the majority class's accuracy
#: is no better than it (on 360 inputs at 10 classes: 0.103 + 0.032)
NOISE_STANDARD_ERRORS = 2.0
#: a network whose calibration loss exceeds a constant answer's, and its own before
#: training, by more than this fraction was made worse by training. The loss before
#: training is that of the phase's first training batch: for a classifier at its
#: initialization it is close to ln K whatever the batch, while a regression network's
#: depends on the batch's targets (on the quick keypoints configs, 200 faces, the
#: calibration loss after one epoch is within 1 % of the first batch's)
WORSE_TOLERANCE = {TaskKind.CLASSIFICATION: 0.02, TaskKind.REGRESSION: 1.0}


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
def constant_answer_problem(model: nn.Module, criterion: TaskLoss, data: Dataset, batch_size: int,
                            device: torch.device, start_loss: float | None = None) -> str | None:
    """What is wrong when training left ``model`` worse on ``data`` than a constant answer,
    else None (also for empty data).

    Worse means its mean loss is above, by more than :data:`WORSE_TOLERANCE` (2 %; for
    regression 100 %), both that of
    the best constant answer and ``start_loss`` (the phase's first step: the network
    before training), and, for a classifier, that its accuracy is also within
    :data:`NOISE_STANDARD_ERRORS` of always answering the most frequent class. The best
    constant answer is the split's class frequencies (under a log loss; its accuracy is
    the majority class's) or its mean target (regression, under a squared loss).

    So a network that training made worse than a constant (a diverged one: ``big_train.lr
    1e6`` ends at a loss of 9e12, ``pretrain.lr 1`` at 2.5 from 2.3, at 10 % accuracy) is
    refused, but not one that a few steps barely moved from its initialization (a smoke
    test's: at chance, with the constant's loss), nor one that improved on its start
    without reaching the constant yet (``configs/keypoints.yaml --quick``: 12.3 px RMSE
    after its one epoch, 5.0 px for the mean), nor a classifier whose loss beats the
    constant's (it learned something, though its argmax is still at chance). Accuracy and
    loss are the criterion's own (``correct``, ``per_sample``).
    """
    if len(data) == 0:
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
    classes = criterion.kind == TaskKind.CLASSIFICATION
    if classes:
        if target.dim() != 1 or target.is_floating_point():
            return None  # not class labels: no majority class to compare with
        frequencies = torch.bincount(target, minlength=output.shape[1]).float() / len(target)
        if float(frequencies.max()) >= 1.0:
            return None  # one class only: nothing to beat
        constant = frequencies.clamp_min(1e-12).log().expand_as(output)
        what = "answering the class frequencies"
    else:
        constant = torch.nan_to_num(target.float().nanmean(dim=0)).expand_as(output)  # missing targets: NaN
        what = "always answering the mean target"
    loss = float(criterion.per_sample(output, target).mean())
    baseline_loss = float(criterion.per_sample(constant, target).mean())
    reference = max(baseline_loss, start_loss if start_loss is not None and math.isfinite(start_loss) else 0.0)
    if loss <= reference * (1 + WORSE_TOLERANCE[TaskKind(criterion.kind)]):  # False for a NaN loss: worse
        return None
    start = f" and of the network before training ({start_loss:.3g})" if start_loss is not None else ""
    worse = f"its loss {loss:.3g} on the calibration split is above that of {what} ({baseline_loss:.3g}){start}"
    if not classes:
        return worse
    majority = torch.zeros_like(output)
    majority[:, int(frequencies.argmax())] = 1.0
    accuracy = float(criterion.correct(output, target).float().mean())
    baseline = float(criterion.correct(majority, target).float().mean())
    # a constant network's accuracy is the frequency of the class it answers: within a few
    # binomial standard errors of the majority's is no better
    margin = NOISE_STANDARD_ERRORS * math.sqrt(baseline * (1 - baseline) / len(target))
    if accuracy > baseline + margin:
        return None
    worse = worse.replace(" on the calibration split", "")
    return (f"accuracy {accuracy:.3f} on the calibration split is no better than always answering the majority "
            f"class ({baseline:.3f}, give or take {margin:.3f} on {len(target)} inputs), and {worse}")


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
