"""A recommendation: which method to deploy, per mode and target AD, and how sure we are.

For each mode and target AD, and for each deployable threshold source (``guaranteed``,
then ``val`` beside it), every method's point is read off ``points.csv``: per seed, the
variant and threshold chosen on the calibration split. Holding those thresholds fixed,
each test input's value is recomputed from ``samples.csv`` (its cost in MFLOPs
white-box, whether it appeals black-box: :func:`~cascade.evaluation.summaries.value_field`).

Uncertainty is a **paired bootstrap over the test inputs, stratified by seed, seeds
pooled**: each resample draws every seed's test inputs with replacement *within that
seed* (:func:`bootstrap_weights`; :func:`bootstrap_means` draws the same counts a chunk
of resamples at a time, so memory stays bounded), every method is measured on the same
draw (paired), and a method's value is the mean over seeds of its per-seed means (as ``metrics.json``'s
operating points). A ratio ``a / b`` gets the 2.5 and 97.5 percentiles of the
resampled ratios (``RESAMPLES`` draws, generator seed ``BOOTSTRAP_SEED``: reproducible).
The thresholds are not re-chosen on each draw: the interval is the test split's
sampling error at the deployed thresholds, not the calibration split's. The draws are
made once per run (:class:`Deployable`, every deployable point a column) and shared with
each point's own interval (:mod:`cascade.evaluation.intervals`).

The rule (:func:`choose`): the *best* is the cheapest method whose point met its target
on test (mean AD over seeds; if none did, the cheapest of all, flagged). A method is
*tied* with the best when the interval of its ratio to the best contains 1. Among the
tied, the simplest is recommended: post-hoc before trained
(:class:`~cascade.contracts.methods.MethodKind`), then fewer parameters (the routing
heads' where known; unknown counts as more), then the run's method order. The chosen
method is then compared with plain MSP (``msp``, when in the run) and with the runner-up
(the cheapest other method meeting the target): ``ratio = chosen / other`` (< 1: the
chosen one is cheaper), ``ahead`` when the interval lies under 1, ``behind`` over 1,
else ``tied``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cascade.contracts.methods import MethodKind
from cascade.core.enums import Mode, Selection, ThresholdSource
from cascade.evaluation.columns import Variant, sweep_costs, variant_arrays
from cascade.evaluation.points import ORACLE
from cascade.evaluation.summaries import value_field
from cascade.evaluation.sweep import TOL, cumulative_costs, exit_stages

#: the threshold sources recommended from, the deployable-with-a-guarantee one first
SOURCES = (ThresholdSource.GUARANTEED, ThresholdSource.VAL)
#: the bootstrap's resamples, its generator's seed and the interval's coverage
RESAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
#: the most bootstrap counts held at once (float64: 32 MB), whatever the test split's size
CHUNK_CELLS = 2 ** 22
#: the baseline every recommendation is compared with
MSP = "msp"
RULE = ("best = cheapest method meeting the target on test; tied = its ratio to the best has a 95 % interval "
        "containing 1; recommended = the simplest tied method: post-hoc before trained, then fewer routing-head "
        "parameters, then the run's order")
INTERVAL = ("paired bootstrap over the test inputs, stratified by seed (inputs resampled within each seed), "
            "seeds pooled (mean of per-seed means); thresholds fixed at their calibration choice")


def _generators(count: int, seed: int) -> list[np.random.Generator]:
    """One generator per seed of the run, spawned from ``seed``: a seed's draws depend on
    neither the other seeds nor how the resamples are chunked."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(count)]


def _draw(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """``[resamples, n]`` multinomial counts summing to ``n``: how often each input is drawn."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def bootstrap_weights(sizes: Sequence[int], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> list[np.ndarray]:
    """Per seed, ``[resamples, n_s]``: how often each of its test inputs is drawn in each
    resample (multinomial counts summing to ``n_s``): inputs are resampled within their seed.
    Dense (``resamples x n_s`` floats per seed); :func:`bootstrap_means` draws the same
    counts in chunks."""
    return [_draw(g, n, resamples) for g, n in zip(_generators(len(sizes), seed), sizes)]


def pooled_means(values: Sequence[np.ndarray], weights: Sequence[np.ndarray]) -> np.ndarray:
    """``[resamples, M]`` the mean over seeds of each method's per-seed resampled mean.

    Args:
        values: per seed, ``[n_s, M]`` each test input's value under each method.
        weights: per seed, ``[resamples, n_s]`` (:func:`bootstrap_weights`).
    """
    return sum(w @ x / x.shape[0] for x, w in zip(values, weights)) / len(values)


def bootstrap_means(values: Sequence[np.ndarray], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                    cells: int = CHUNK_CELLS) -> np.ndarray:
    """:func:`pooled_means` of :func:`bootstrap_weights` (the same draws), with at most
    ``cells`` counts held at once: the resamples are drawn a chunk at a time, seed by seed,
    so memory stays bounded whatever the test split's size."""
    gens = _generators(len(values), seed)
    step = max(1, cells // max(x.shape[0] for x in values))
    out = np.zeros((resamples, values[0].shape[1]))
    for start in range(0, resamples, step):
        k = min(step, resamples - start)
        for g, x in zip(gens, values):
            out[start:start + k] += _draw(g, x.shape[0], k) @ x / x.shape[0]
    return out / len(values)


def percentile_interval(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``draws`` by rank (no
    interpolation: a draw may be inf): of 1000 draws, the 26th and the 975th smallest."""
    r = np.sort(draws)
    lo, hi = r[[round((len(r) - 1) * (1 - level) / 2), round((len(r) - 1) * (1 + level) / 2)]]
    return float(lo), float(hi)


def ratio_interval(mean: np.ndarray, boot: np.ndarray, i: int, j: int, level: float = LEVEL) -> dict[str, float]:
    """Method ``i``'s value over method ``j``'s: the ratio of the means and its percentile interval."""
    def ratio(a, b):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.where(a > 0, np.inf, 1.0))

    lo, hi = percentile_interval(ratio(boot[:, i], boot[:, j]), level)
    return {"ratio": float(ratio(mean[i], mean[j])), "low": lo, "high": hi}


def verdict(r: Mapping[str, float]) -> str:
    """``ahead`` (interval under 1), ``behind`` (over 1) or ``tied``."""
    return "ahead" if r["high"] < 1 - TOL else "behind" if r["low"] > 1 + TOL else "tied"


def simplicity(method: str, kinds: Mapping[str, Any], params: Mapping[str, int | None], order: int) -> tuple:
    """Sort key of the tie-break: post-hoc first, then fewer parameters (unknown last), then order."""
    p = params.get(method)
    return (kinds.get(method) != MethodKind.POST_HOC, p is None, p or 0, order)


def choose(methods: Sequence[str], mean: np.ndarray, boot: np.ndarray, met: Sequence[bool],
           kinds: Mapping[str, Any], params: Mapping[str, int | None]) -> dict[str, Any]:
    """The best, the tied, the recommended method and its comparisons (module docstring).

    Args:
        methods: ``[M]`` the methods, in the run's order.
        mean: ``[M]`` their pooled values; boot: ``[resamples, M]`` resampled.
        met: ``[M]`` whether each point met its target on test.
    """
    pool = [i for i in range(len(methods)) if met[i]] or list(range(len(methods)))
    best = min(pool, key=lambda i: (mean[i], i))
    vs_best = {i: ratio_interval(mean, boot, i, best) for i in range(len(methods))}
    tied = [i for i in pool if vs_best[i]["low"] <= 1 + TOL and vs_best[i]["high"] >= 1 - TOL]
    chosen = min(tied, key=lambda i: simplicity(methods[i], kinds, params, i))
    others = [i for i in pool if i != chosen]
    runner = min(others, key=lambda i: (mean[i], i)) if others else None
    out: dict[str, Any] = {"best": methods[best], "tied": [methods[i] for i in tied], "chosen": chosen,
                           "ratio_to_best": {m: vs_best[i] for i, m in enumerate(methods)}}
    out["vs_runner_up"] = None if runner is None else _versus(mean, boot, chosen, runner, methods)
    if MSP not in methods:
        out["vs_msp"] = "msp is not in the run"
    else:
        m = methods.index(MSP)
        out["vs_msp"] = None if m == chosen else _versus(mean, boot, chosen, m, methods)
    return out


def _versus(mean: np.ndarray, boot: np.ndarray, i: int, j: int, methods: Sequence[str]) -> dict[str, Any]:
    r = ratio_interval(mean, boot, i, j)
    return {"method": methods[j], **r, "verdict": verdict(r)}


class Deployable:
    """Every deployable target-AD point's per-input test values at its fixed thresholds,
    and their seed-stratified bootstrap, drawn once for the recommendation and the
    intervals (:mod:`cascade.evaluation.intervals`).

    Attributes:
        keys: ``[(mode, target, source)]``: modes in the run's order, then targets
            ascending, guaranteed before val.
        columns: ``[(mode, target, source, method)]``: one per point, grouped by key.
        groups: ``column -> its per-seed point rows`` (``points.csv``).
        mean: ``[C]`` each column's pooled value (mean over seeds of the per-seed means:
            the point's cost or appeal rate); boot: ``[resamples, C]`` resampled.
    """

    def __init__(self, samples: pd.DataFrame, variants: Sequence[Variant], rows: Sequence[Mapping[str, Any]],
                 resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED):
        tests = _Tests(samples)
        self.seed = seed
        index = _point_rows(rows)
        lookup = {(v.mode, v.method, v.variant): v for v in variants}
        keys = list(dict.fromkeys((k[1], k[4], k[3]) for k in index))  # (mode, target, source)
        modes = list(dict.fromkeys(k[0] for k in keys))
        self.keys = sorted(keys, key=lambda k: (modes.index(k[0]), k[1], SOURCES.index(k[2])))
        self.columns = [(mode, target, source, m) for mode, target, source in self.keys
                        for m in dict.fromkeys(k[2] for k in index if (k[1], k[4], k[3]) == (mode, target, source))]
        self.groups = {c: [index[s, c[0], c[3], c[2], c[1]] for s in tests.seeds] for c in self.columns}
        per_seed = [np.stack([tests.values(lookup[c[0], c[3], g[i]["variant"]], s, g[i]["threshold"])
                              for c, g in self.groups.items()], axis=1) if self.columns else np.zeros((0, 0))
                    for i, s in enumerate(tests.seeds)]
        self.mean = np.mean([x.mean(axis=0) for x in per_seed], axis=0) if self.columns else np.zeros(0)
        self.boot = bootstrap_means(per_seed, resamples, seed) if self.columns else np.zeros((resamples, 0))

    def of(self, key: tuple) -> list[int]:
        """The columns of one ``(mode, target, source)``, in the run's method order."""
        return [i for i, c in enumerate(self.columns) if c[:3] == key]


class _Tests:
    """Each seed's test rows and, cached, each variant's scores and correctness there."""

    def __init__(self, samples: pd.DataFrame):
        test = samples[samples["split"] == "test"]
        self.frames = {int(s): f for s, f in test.groupby("seed", sort=True)}
        self.seeds = list(self.frames)
        self._arrays: dict[tuple[int, Variant], tuple[np.ndarray, np.ndarray]] = {}

    def values(self, v: Variant, seed: int, threshold: float) -> np.ndarray:
        """``[n_s]`` each test input's value at ``threshold``: cost (white-box) or appeal (black-box)."""
        if (seed, v) not in self._arrays:
            self._arrays[seed, v] = variant_arrays(self.frames[seed], v)
        scores, correct = self._arrays[seed, v]
        tau = exit_stages(scores, threshold)
        if v.mode == Mode.WHITE_BOX:
            return cumulative_costs(sweep_costs(v))[tau]
        return (tau == correct.shape[1] - 1).astype(np.float64)


def _point_rows(rows: Sequence[Mapping[str, Any]]) -> dict[tuple, Mapping[str, Any]]:
    """``(seed, mode, method, source, target) -> point`` of the deployable target-AD points."""
    return {(int(r["seed"]), r["mode"], r["method"], r["threshold_source"], r["target_ad"]): r for r in rows
            if r["selection"] == Selection.TARGET_AD and r["threshold_source"] in SOURCES and r["method"] != ORACLE}


def _summary(group: Sequence[Mapping[str, Any]], target: float, last: float | None) -> dict[str, Any]:
    """The seed-mean figures of one method's point (the table's), and whether it met the target."""
    def mean(k):
        vals = [g[k] for g in group if g[k] is not None]
        return float(np.mean(vals)) if vals else None

    cost = mean("cost_mflops")
    ad = mean("ad")
    return {"threshold": mean("threshold"), "thresholds": [float(g["threshold"]) for g in group],
            "variants": [g["variant"] for g in group], "cost_mflops": cost,
            "times_cheaper": last / cost if cost and last else None, "ad": ad, "target_met": ad <= target + TOL,
            "skipping_rate": mean("skipping_rate"), "appeal_rate": mean("appeal_rate")}


def recommend(samples: pd.DataFrame, variants: Sequence[Variant], rows: Sequence[Mapping[str, Any]],
              kinds: Mapping[str, Any], params: Mapping[tuple[str, str], int | None] | None = None,
              last_mflops: Mapping[str, float | None] | None = None,
              deployable: Deployable | None = None) -> dict[str, Any]:
    """``metrics.json``'s ``recommendation``: per mode, target and source (guaranteed, val)
    the recommended method, its point and its comparisons (module docstring).

    Args:
        samples: the per-sample table.
        variants: every routed system (a point's ``variant`` names which of a method's).
        rows: the per-seed operating points (``points.csv``).
        kinds: ``method -> MethodKind``.
        params: ``(mode, method) -> its routing heads' parameters``, where known.
        last_mflops: ``mode -> the last stage's cost`` (for "times cheaper"), where known.
        deployable: the points' values and bootstrap when already drawn (else drawn here).
    """
    d = deployable if deployable is not None else Deployable(samples, variants, rows)
    choices = []
    for mode, target, source in d.keys:
        cols = d.of((mode, target, source))
        methods = [d.columns[i][3] for i in cols]
        summaries = {m: _summary(d.groups[d.columns[i]], target, (last_mflops or {}).get(mode))
                     for m, i in zip(methods, cols)}
        mine = {m: p for (md, m), p in (params or {}).items() if md == mode}
        c = choose(methods, d.mean[cols], d.boot[:, cols], [summaries[m]["target_met"] for m in methods],
                   kinds, mine)
        chosen = methods[c.pop("chosen")]
        choices.append({"mode": mode, "target_ad": target, "threshold_source": source,
                        "field": value_field(mode), "method": chosen, "kind": kinds.get(chosen),
                        **summaries[chosen], **c,
                        "flagged": [m for m in methods if not summaries[m]["target_met"]]})
    return {"interval": INTERVAL, "rule": RULE, "resamples": RESAMPLES, "bootstrap_seed": BOOTSTRAP_SEED,
            "level": LEVEL, "choices": choices}
