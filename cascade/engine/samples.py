"""The per-sample table, ``samples.csv``: every network run once over a split.

One row per seed, split and input; the columns are named by :mod:`cascade.runs.layout`
(``<network>_correct``, ``<network>_pred``, ``<network>_<error>``, ``<network>_score``
and ``<stage>_score_<scorer key>``). Every operating point is computed from this table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from cascade.core.enums import TaskKind
from cascade.engine.plan import Plan
from cascade.runs.layout import (
    BIG,
    column,
    scorer_column,
    stage_name,
    system_stage_name,
)
from cascade.training.data import make_loader


@torch.no_grad()
def network_columns(plan: Plan, prefix: str, module: nn.Module, dataset: Dataset, error_names: set[str],
                    scorers: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], Tensor]:
    """One network's per-sample columns on one split: prediction, correctness, the
    criterion's errors (their names added to ``error_names``), its own score ``q`` and
    each scorer's score; and the targets."""
    crit = plan.task.criterion
    module.eval()
    parts: dict[str, list[Tensor]] = {}
    targets = []
    for x, y in make_loader(dataset, plan.cfg.evaluation.batch_size, False, 0):
        x = x.to(plan.device)
        out = module(x)
        output = out.output.float().cpu()
        cols = {"correct": crit.correct(output, y)}
        if crit.kind == TaskKind.CLASSIFICATION:
            cols["pred"] = crit.prediction(output)
        errors = crit.errors(output, y)
        error_names.update(errors)
        cols.update(errors)
        # scores stay float64 (samples.csv round-trips them exactly): a float32 MSP of a
        # confident network saturates at 1.0 and ties inputs its logits still separate
        if out.q is not None:
            cols["score"] = out.q.double().cpu()
        for name, scorer in (scorers or {}).items():
            cols[f"score_{name}"] = scorer.score_batch(module, x, out).double().cpu()
        for key, value in cols.items():
            parts.setdefault(column(prefix, key), []).append(value)
        targets.append(y)
    return {k: torch.cat(v).numpy() for k, v in parts.items()}, torch.cat(targets)


def split_samples(plan: Plan, seed: int, split: str, dataset: Dataset, big, plain: list, scorers: dict,
                  systems: dict, error_names: set[str]) -> pd.DataFrame:
    """The rows of one seed's split: the big network (white-box), each plain stage with
    its post-hoc scores, and each trained system's stages."""
    cols: dict[str, np.ndarray] = {}
    targets = None
    if big is not None and plan.runs_big:
        c, targets = network_columns(plan, BIG, big, dataset, error_names)
        cols.update(c)
    for k, net in enumerate(plain):
        stage = stage_name(k)
        # a scorer fitted on the calibration split gives its out-of-sample scores of it instead
        fitted = {key: per_stage[k].cal_scores for key, per_stage in scorers.items()
                  if split == "cal" and per_stage[k].cal_scores is not None}
        c, targets = network_columns(plan, stage, net, dataset, error_names,
                                     {key: per_stage[k] for key, per_stage in scorers.items() if key not in fitted})
        c.update({scorer_column(stage, key): scores.double().numpy() for key, scores in fitted.items()})
        scored = [scorer_column(stage, key) for key in scorers]  # the columns in the scorers' order
        cols.update({name: c[name] for name in [n for n in c if n not in scored] + scored})
    for name, (_, _, system) in systems.items():
        for k, stage in enumerate(system.stages):
            cols.update(network_columns(plan, system_stage_name(name, k), stage, dataset, error_names)[0])
    n = len(targets)
    head = {"seed": np.full(n, seed), "split": np.full(n, split), "index": np.arange(n),
            "target": targets.numpy() if targets.dim() == 1 else np.full(n, np.nan)}
    return pd.DataFrame({**head, **cols})
