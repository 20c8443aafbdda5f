"""What makes a learned appeal decision win: AppealNet's variants against the strongest baselines.

    python benchmarks/ablation.py configs/mnist.yaml [--settings base,holdout] [--variants a,b]
        [--seeds 0,1,2] [--quick] [--out runs/ablation]

One run per *setting* (what every method's networks get: the data the fine-tuning and the
heads see, or the task's own perturbations), each with every AppealNet *variant* listed as
its own method (``label: an_<variant>``) beside every baseline, so all of them share one
big network, one pre-trained little network and one plain fine-tuned little network (the
baselines' and the frozen variants'). The variants change one thing at a time:

- the training target: the paper's loss, the 0-1 error (appeal when the little is wrong
  and the big right), a binary classifier of "keeping is safe", a regression on the loss
  difference;
- what the head reads: the paper's features, sorted probabilities, or features with
  sorted log-probabilities and logit statistics;
- joint fine-tuning of the little network (the q-weighted loss, or the plain loss) vs the
  little network frozen.

The table gives, per setting, mode and variant, the best baseline's cost (white-box) or
appeal rate (black-box) over the variant's at each AD target with thresholds chosen on
the calibration split (> 1: AppealNet is cheaper), and the share of the gap to the oracle
router it closes; ``--sources test`` adds the test-tuned figures, for the paper.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascade.config import load_config
from cascade.core.errors import CascadeError
from cascade.evaluation import comparisons
from cascade.engine.experiment import Experiment

#: the baselines every setting runs: the paper's, and what a user would try before training anything
BASELINES = ["msp", "msp_ts", "doctor", "energy", "gap", "entropy", "deferral_head"]

PAPER_HEAD = {"inputs": ["features"], "hidden": [], "detach": False}
PROBS_HEAD = {"inputs": ["sorted_probs", "confidence"], "hidden": [16], "detach": True}
RICH_HEAD = {"inputs": ["features", "sorted_log_probs", "logit_stats"], "hidden": [32], "detach": True,
             "normalize": True}

#: AppealNet's options per variant (label ``an_<name>``)
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {"predictor": PAPER_HEAD, "predictor_target": "loss", "approximator_loss": "weighted"},
    "probs_loss": {"predictor": PROBS_HEAD, "predictor_target": "loss"},
    "probs_error": {"predictor": PROBS_HEAD, "predictor_target": "error"},
    "probs_loss_full": {"predictor": PROBS_HEAD, "predictor_target": "loss", "approximator_loss": "full"},
    "rich_loss": {"predictor": RICH_HEAD, "predictor_target": "loss"},
    "rich_error": {"predictor": RICH_HEAD, "predictor_target": "error"},
    "rich_safe": {"predictor": RICH_HEAD, "predictor_target": "safe"},
    "rich_safe_frozen": {"predictor": RICH_HEAD, "predictor_target": "safe", "freeze_stage": True},
    "rich_loss_gap": {"predictor": RICH_HEAD, "predictor_target": "loss_gap"},
    "probs_safe": {"predictor": PROBS_HEAD, "predictor_target": "safe"},
}

#: config overrides per setting; every method's networks get the same
SETTINGS: dict[str, list[str]] = {
    "base": [],
    # the little network pre-trains on 70 % of the training split, then every method (and the
    # plain little the baselines score) fine-tunes on the held-out 30 %, where the little's
    # errors are not memorized
    "holdout": ["finetune_data=holdout"],
    # where learned deferral should win (cascade.nn.perturb): 20 % of the training labels flipped;
    # a big network that saw only 10 % of classes 5-9; the test split corrupted by Gaussian noise
    "noise": ["perturb.label_noise=0.2"],
    "specialist": ["perturb.big_classes=[0, 1, 2, 3, 4]", "perturb.big_other_fraction=0.1"],
    "shift": ["perturb.shift.corruption=gaussian_noise", "perturb.shift.severity=3"],
}


def methods_for(variants: list[str]) -> list[dict[str, Any]]:
    """The ``methods:`` list of one ablation run: each variant, labelled, then the baselines."""
    return [{"name": "appealnet", "label": f"an_{v}", **VARIANTS[v]} for v in variants] + \
        [{"name": b} for b in BASELINES]


def summarize(metrics: dict, sources: tuple[str, ...] = ("val",)) -> list[dict]:
    """One row per (mode, threshold source, trained method): best baseline / method at each
    AD target, their mean and minimum, and the gap closed to the oracle router.

    A ratio is ``best post-hoc value / the method's value`` (:func:`cascade.evaluation.comparisons`):
    > 1 means the method is cheaper than every post-hoc method at that target. The mean and
    minimum leave out targets where the best baseline's value is 0 (its ratio is 0).
    """
    kinds = metrics["methods"]
    trained = [m for m, v in kinds.items() if v["kind"] == "trained"]
    post_hoc = [m for m, v in kinds.items() if v["kind"] == "post_hoc"]
    rows = comparisons(metrics["operating_points"], trained, post_hoc)
    out = []
    for mode in metrics["modes"]:
        for source in sources:
            for method in trained:
                mine = sorted((r for r in rows if (r["mode"], r["threshold_source"], r["method"]) == (mode, source, method)),
                              key=lambda r: r["target_ad"])
                # a ratio of 0: the best baseline's value is 0 there (every input kept) and the
                # method's is not; it is shown in its cell but left out of the mean and minimum
                ratios = [r["ratio"] for r in mine if r["ratio"]]
                gaps = [r["gap_closed"] for r in mine if r.get("gap_closed") is not None]
                if not ratios:
                    continue
                out.append({"mode": mode, "source": source, "method": method,
                            "ratios": {f"{r['target_ad']:g}": r["ratio"] for r in mine},
                            "best_baselines": {f"{r['target_ad']:g}": r["best_post_hoc"] for r in mine},
                            "mean_ratio": float(np.mean(ratios)), "min_ratio": float(np.min(ratios)),
                            "mean_gap_closed": float(np.mean(gaps)) if gaps else None})
    return out


def markdown(rows: list[dict]) -> str:
    """The ablation table: a row per (setting, mode, source, method), a column per target."""
    targets = sorted({t for r in rows for t in r["ratios"]}, key=float)
    lines = ["| setting | mode | thresholds | method | " + " | ".join(f"AD {float(t) * 100:g} %" for t in targets)
             + " | mean | min | gap closed |", "|---|---|---|---|" + "---:|" * (len(targets) + 3)]
    for r in rows:
        cells = [f"{r['ratios'][t]:.2f}x" if r["ratios"].get(t) is not None else "" for t in targets]
        gap = "" if r["mean_gap_closed"] is None else f"{r['mean_gap_closed'] * 100:.0f} %"
        lines.append(f"| {r['setting']} | {r['mode']} | {r['source']} | {r['method']} | " + " | ".join(cells)
                     + f" | {r['mean_ratio']:.2f}x | {r['min_ratio']:.2f}x | {gap} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--settings", default="base", help="comma-separated subset of: " + ", ".join(SETTINGS))
    ap.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS) + " (default: all)")
    ap.add_argument("--sources", default="val", help="threshold sources to tabulate (val, test, guaranteed)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every run")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/ablation")
    args = ap.parse_args(argv)
    settings = args.settings.split(",")
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    for given, known, what in ((settings, SETTINGS, "setting"), (variants, VARIANTS, "variant")):
        unknown = [n for n in given if n not in known]
        if unknown:
            print(f"error: unknown {what}(s) {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
            return 2
    methods = json.dumps(methods_for(variants))
    rows: list[dict] = []
    cache: dict[str, dict] = {}  # the big network's weights, trained once for every setting
    out_root = Path(args.out)
    try:
        for setting in settings:
            cfg = load_config(args.config, [f"methods={methods}", *SETTINGS[setting], *args.overrides],
                              quick=args.quick)
            if cfg.threads is not None:  # as `cascade run` does
                torch.set_num_threads(cfg.threads)
            out = out_root / f"{cfg.name or Path(args.config).stem}_{setting}"
            t0 = time.perf_counter()
            metrics = Experiment(cfg, out, quiet=True, source=args.config, cache=cache).run()
            for r in summarize(metrics, tuple(args.sources.split(","))):
                rows.append({"setting": setting, **r})
            print(f"{setting}: {time.perf_counter() - t0:.0f} s, {out}", file=sys.stderr, flush=True)
    except CascadeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "ablation.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (out_root / "ablation.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
