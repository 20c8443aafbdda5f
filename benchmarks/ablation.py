"""Ablation of AppealNet's predictor: what the head sees, its depth, which data trains it,
the objective's form and the lambda budget, against the best confidence baseline.

    python benchmarks/ablation.py configs/digits.yaml [--variants a,b] [--out runs/ablation]

Each variant is a list of ``--set`` overrides on the config; every variant is a full run
(all the config's seeds). The table gives, per mode and threshold source, the mean over
the AD targets of ``best baseline / AppealNet`` (cost in white-box, appeal rate in
black-box): > 1 means AppealNet is cheaper than the best of MSP, Gap and Entropy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cascade.config import load_config
from cascade.experiment import Experiment

PAPER = ["appealnet.predictor.inputs=[features]", "appealnet.predictor.hidden=[]", "appealnet.predictor.detach=false"]
PROBS = ["appealnet.predictor.inputs=[sorted_probs, confidence]", "appealnet.predictor.hidden=[16]",
         "appealnet.predictor.detach=true"]
ALL_IN = ["appealnet.predictor.inputs=[features, sorted_probs, confidence]", "appealnet.predictor.hidden=[16]",
          "appealnet.predictor.detach=true"]
HOLDOUT = ["appealnet.finetune_data=holdout"]
ERROR = ["appealnet.predictor_target=error"]
FULL = ["appealnet.approximator_loss=full"]

LOGITS = ["appealnet.predictor.inputs=[sorted_probs, confidence, logit_stats]", "appealnet.predictor.hidden=[16]",
          "appealnet.predictor.detach=true", "appealnet.predictor.normalize=true"]
NORM = ["appealnet.predictor.normalize=true", "appealnet.predictor.lr_scale=10"]

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
    "logits_lr10": LOGITS + ["appealnet.predictor.lr_scale=10"],
    "logits_full": LOGITS + FULL,
    "probs_mlp_long": PROBS + ["appealnet.finetune.epochs=12"],
    "probs_mlp_full_long": PROBS + FULL + ["appealnet.finetune.epochs=12"],
    "logits_features": LOGITS[1:] + ["appealnet.predictor.inputs=[features, sorted_probs, confidence, logit_stats]"],
    "probs_mlp_budget_0.2": PROBS + ["appealnet.lambda.budget=0.2"],
    "probs_mlp_budget_1.0": PROBS + ["appealnet.lambda.budget=1.0"],
}


def summarize(metrics: dict) -> dict[str, float]:
    """Mean over targets of best-baseline / AppealNet, per (mode, source)."""
    pts = metrics["operating_points"]
    out = {}
    for mode in metrics["modes"]:
        field = "cost_mflops" if mode == "white_box" else "appeal_rate"
        for source in ("test", "val"):
            ratios = []
            for t in sorted({p["target_ad"] for p in pts if p["mode"] == mode}):
                here = [p for p in pts if p["mode"] == mode and p["threshold_source"] == source and p["target_ad"] == t]
                if not here:
                    continue
                app = next(p[field] for p in here if p["method"] == "appealnet")
                best = min(p[field] for p in here if p["method"] != "appealnet")
                if app > 0:
                    ratios.append(best / app)
                elif best == 0:
                    ratios.append(1.0)
            if ratios:
                out[f"{mode}/{source}"] = float(np.mean(ratios))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every variant")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/ablation")
    args = ap.parse_args()
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    rows, cache = [], {}
    for name in names:
        cfg = load_config(args.config, args.overrides + VARIANTS[name], quick=args.quick)
        out = Path(args.out) / f"{cfg.name or Path(args.config).stem}_{name}"
        t0 = time.perf_counter()
        metrics = Experiment(cfg, out, quiet=True, source=args.config, cache=cache).run()
        row = {"variant": name, **summarize(metrics), "appealnet_acc": metrics["accuracy"]["appealnet"],
               "little_acc": metrics["accuracy"]["little"], "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = [c for c in rows[0] if c != "variant"]
    print("\n| variant | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
