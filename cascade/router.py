"""Deployment: route each input through the little network and appeal only the hard ones.

The little network runs on the whole batch; the big one runs only on the appealed rows,
so the wall-clock speed-up approaches ``t_big / (t_little + AR * t_big)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from cascade.checkpoint import load_checkpoint
from cascade.errors import CascadeError
from cascade.roles import Predictor, StageOutput


@dataclass
class RoutedOutput:
    """Outputs ``[B, ...]`` of the system, and ``kept`` ``[B]``: True where the little answered."""

    output: Tensor
    kept: Tensor

    @property
    def appeal_rate(self) -> float:
        return 1.0 - self.kept.float().mean().item()


class Router(nn.Module):
    """A trained little network, its predictor and threshold, and the big side.

    Args:
        little: the little network (a ``TwoHeadNetwork`` for AppealNet).
        predictor: scores the little network's output (``AppealNetScore``, ``MaxSoftmaxScore``...).
        threshold: keep on the little network where ``score >= threshold``.
        big: the big network; None for a black-box oracle, whose answers the caller
            fetches for the rows where ``kept`` is False.
    """

    def __init__(self, little: nn.Module, predictor: Predictor, threshold: float, big: nn.Module | None = None):
        super().__init__()
        self.little, self.big = little.eval(), None if big is None else big.eval()
        self.predictor, self.threshold = predictor, threshold

    @torch.no_grad()
    def forward(self, x: Tensor) -> RoutedOutput:
        out = self.little(x)
        out = out if isinstance(out, StageOutput) else StageOutput(output=out)
        kept = self.predictor.score(out) >= self.threshold  # [B]
        output = out.output.clone()
        if self.big is not None and not bool(kept.all()):
            appealed = (~kept).nonzero(as_tuple=True)[0]
            big_out = self.big(x[appealed])
            output[appealed] = (big_out.output if isinstance(big_out, StageOutput) else big_out).to(output.dtype)
        return RoutedOutput(output=output, kept=kept)

    @classmethod
    def from_run(
        cls, run_dir: str | Path, *, mode: str = "white_box", target_ad: float = 0.005,
        threshold_source: str = "val", seed: int | None = None,
    ) -> "Router":
        """The AppealNet router of a finished run, at one of its operating points.

        The threshold is that seed's, chosen on the calibration split by default (the
        deployable choice); the weights come from ``checkpoints/`` with ``weights_only=True``.

        Raises:
            CascadeError: missing files, or no such operating point in ``metrics.json``.
        """
        from cascade.config import validate
        from cascade.evaluator import operating_points
        from cascade.experiment import build_network, build_task, Experiment
        from cascade.networks import AppealNetScore, PredictorHead, TwoHeadNetwork

        run = Path(run_dir)
        for name in ("config.yaml", "metrics.json", "samples.csv"):
            if not (run / name).is_file():
                raise CascadeError(f"{run / name}: not found; is {run} the output folder of `cascade run`?")
        cfg = validate(yaml.safe_load((run / "config.yaml").read_text()), str(run / "config.yaml"))
        metrics = json.loads((run / "metrics.json").read_text())
        seed = metrics["seeds"][0] if seed is None else seed
        if mode not in metrics["modes"]:
            raise CascadeError(f"{run / 'metrics.json'}: mode {mode!r} not in this run ({metrics['modes']})")
        import pandas as pd

        exp = Experiment(cfg, run, quiet=True)
        key = exp.appealnet_keys[mode]
        samples = pd.read_csv(run / "samples.csv")
        routes = exp.routes(metrics["networks"])
        points = operating_points(samples[samples["seed"] == seed], {(mode, "appealnet"): routes[(mode, "appealnet")]},
                                  {mode: [target_ad]})
        row = points[points["threshold_source"] == threshold_source]
        if row.empty:
            raise CascadeError(f"{run}: no {threshold_source} operating point at AD {target_ad} for {mode}")
        task = build_task(cfg)
        pc = cfg.appealnet.predictor
        base = build_network(exp.little_spec, task)
        little = TwoHeadNetwork(base, PredictorHead(base.feature_dim, task.num_outputs, pc.inputs, pc.hidden, pc.detach,
                                                    task.criterion.kind == "classification", pc.normalize))
        little.load_state_dict(load_checkpoint(run / "checkpoints" / f"seed{seed}_{key}.pt"))
        big = None
        if mode == "white_box":
            big = build_network(exp.big_spec, task)
            big.load_state_dict(load_checkpoint(run / "checkpoints" / f"seed{seed}_big.pt"))
        return cls(little, AppealNetScore(), float(row["threshold"].iloc[0]), big)

