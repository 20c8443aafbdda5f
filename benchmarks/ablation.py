"""Ablation of AppealNet's predictor: what the head sees, its depth, which data trains it,
the objective's form and the lambda budget, against the best confidence baseline.

    python benchmarks/ablation.py configs/digits.yaml [--variants a,b] [--out runs/ablation]

Each variant is a list of ``--set`` overrides on the config (AppealNet must be the
config's first method, ``methods.0``); every variant is a full run (all the config's
seeds), and the runs share one cache of trained weights, so the big network and the
pre-trained little one are trained once for all variants that do not change them. The
table gives, per mode and threshold source, the mean over the AD targets of ``best
baseline / AppealNet`` (cost in white-box, appeal rate in black-box): > 1 means AppealNet
is cheaper than the best of the post-hoc methods (MSP, Gap and Entropy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cascade.config import load_config
from cascade.errors import CascadeError
from cascade.evaluation import comparisons
from cascade.pipeline import Experiment

#: the config key of AppealNet's options: the config's first method
APPEALNET = "methods.0"

PAPER = [f"{APPEALNET}.predictor.inputs=[features]", f"{APPEALNET}.predictor.hidden=[]",
         f"{APPEALNET}.predictor.detach=false"]
PROBS = [f"{APPEALNET}.predictor.inputs=[sorted_probs, confidence]", f"{APPEALNET}.predictor.hidden=[16]",
         f"{APPEALNET}.predictor.detach=true"]
ALL_IN = [f"{APPEALNET}.predictor.inputs=[features, sorted_probs, confidence]", f"{APPEALNET}.predictor.hidden=[16]",
          f"{APPEALNET}.predictor.detach=true"]
HOLDOUT = ["finetune_data=holdout"]  # every method's fine-tuning (and the plain little's) on held-out data
ERROR = [f"{APPEALNET}.predictor_target=error"]
FULL = [f"{APPEALNET}.approximator_loss=full"]

LOGITS = [f"{APPEALNET}.predictor.inputs=[sorted_probs, confidence, logit_stats]", f"{APPEALNET}.predictor.hidden=[16]",
          f"{APPEALNET}.predictor.detach=true", f"{APPEALNET}.predictor.normalize=true"]
NORM = [f"{APPEALNET}.predictor.normalize=true", f"{APPEALNET}.predictor.lr_scale=10"]
LONG = ["finetune.epochs=12"]  # every method's fine-tuning, and the plain little's: a fair comparison

VARIANTS: dict[str, list[str]] = {
    "paper_literal": PAPER,
    "paper_holdout": PAPER + HOLDOUT,
    "probs_mlp": PROBS,
    "probs_mlp_holdout": PROBS + HOLDOUT,
    "probs_mlp_error": PROBS + ERROR,
    "probs_mlp_full": PROBS + FULL,
    "all_inputs": ALL_IN,
    "all_inputs_holdout": ALL_IN + HOLDOUT,
    "all_inputs_holdout_error": ALL_IN + HOLDOUT + ERROR,
    "all_inputs_holdout_full": ALL_IN + HOLDOUT + FULL,
    "all_inputs_norm": ALL_IN + NORM,
    "all_inputs_norm_holdout": ALL_IN + NORM + HOLDOUT,
    "all_inputs_norm_holdout_error": ALL_IN + NORM + HOLDOUT + ERROR,
    "probs_mlp_norm_holdout": PROBS + NORM + HOLDOUT,
    "paper_norm": PAPER + NORM,
    "logits": LOGITS,
    "logits_holdout": LOGITS + HOLDOUT,
    "logits_error": LOGITS + ERROR,
    "logits_lr10": LOGITS + [f"{APPEALNET}.predictor.lr_scale=10"],
    "logits_full": LOGITS + FULL,
    "probs_mlp_long": PROBS + LONG,
    "probs_mlp_full_long": PROBS + FULL + LONG,
    "logits_features": LOGITS[1:] + [f"{APPEALNET}.predictor.inputs=[features, sorted_probs, confidence, logit_stats]"],
    "probs_mlp_budget_0.2": PROBS + [f"{APPEALNET}.lambda.budget=0.2"],
    "probs_mlp_budget_1.0": PROBS + [f"{APPEALNET}.lambda.budget=1.0"],
}


def summarize(metrics: dict, method: str = "appealnet") -> dict[str, float]:
    """Mean over the AD targets of best-post-hoc / ``method``, per ``mode/source``.

    The ratios are :func:`cascade.evaluation.comparisons` of the run's target-AD points:
    cost in white-box, appeal rate in black-box; a target where the method's value is 0
    counts 1 when the best post-hoc method's is 0 too, and is left out otherwise.
    """
    post_hoc = [m for m, v in metrics["methods"].items() if v["kind"] == "post_hoc"]
    rows = comparisons(metrics["operating_points"], [method], post_hoc)
    out = {}
    for mode in metrics["modes"]:
        for source in ("test", "val"):
            ratios = [r["ratio"] for r in rows if r["mode"] == mode and r["threshold_source"] == source
                      and r["ratio"] is not None]
            if ratios:
                out[f"{mode}/{source}"] = float(np.mean(ratios))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every variant")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/ablation")
    args = ap.parse_args(argv)
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    rows: list[dict] = []
    cache: dict[str, dict] = {}  # trained weights shared by the runs: the big and pre-trained little, once
    try:
        base = load_config(args.config, args.overrides, quick=args.quick)
        if not base.methods or base.methods[0].name != "appealnet":
            raise CascadeError(f"{args.config}: the ablation varies {APPEALNET} (AppealNet's options); list "
                               "appealnet first under methods:")
        if base.threads is not None:  # as `cascade run` does
            torch.set_num_threads(base.threads)
        for name in names:
            cfg = load_config(args.config, args.overrides + VARIANTS[name], quick=args.quick)
            out = Path(args.out) / f"{cfg.name or Path(args.config).stem}_{name}"
            t0 = time.perf_counter()
            metrics = Experiment(cfg, out, quiet=True, source=args.config, cache=cache).run()
            row = {"variant": name, **summarize(metrics),
                   **{f"appealnet_{mode}_acc": metrics["accuracy"][f"appealnet_{mode}_stage0"]
                      for mode in metrics["modes"]},
                   "little_acc": metrics["accuracy"]["stage0"], "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
    except CascadeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cols = [c for c in rows[0] if c != "variant"]
    print("\n| variant | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(f"{r.get(c, float('nan')):.3f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
