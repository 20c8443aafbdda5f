"""The violation simulation: how often chosen and guaranteed thresholds miss their AD
target on new data, over many random cal/test splits of each seed's rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cascade.core.enums import Mode, ThresholdSource
from cascade.evaluation.columns import Variant, by_method, sweep_costs, variant_arrays
from cascade.evaluation.guarantee import _certified_losses, degradation_scores
from cascade.evaluation.sweep import TOL, cumulative_costs, sorted_events, sweep_grid


class _Pool:
    """One variant's calibration and test rows of one seed pooled, evaluated on many random
    cal/test splits at once: the events are sorted once, each split is a mask over them.

    Its grid (every distinct event value) holds every split's calibration sweep points,
    and more: between two calibration events a split's calibration totals stand still.
    """

    def __init__(self, scores: np.ndarray, correct: np.ndarray, stage_mflops: Sequence[float]):
        scores = np.asarray(scores, dtype=np.float64)
        correct = np.asarray(correct, dtype=bool)
        cum = cumulative_costs(stage_mflops)
        self.rows, to, frm, value = sorted_events(scores)
        self.d_cost = cum[to] - cum[frm]
        self.keep, self.threshold = sweep_grid(value)  # [G]
        d_correct = correct[self.rows, to].astype(np.int32) - correct[self.rows, frm].astype(np.int32)
        # most events leave correctness alone: the running correct counts only need the others
        self.changes = np.flatnonzero(d_correct)
        self.d_correct = d_correct[self.changes]
        self.keep_changes = np.searchsorted(self.changes, self.keep, side="left")  # [G] changes before each point
        self.reached_changes = np.unique(self.keep_changes)  # the change counts a grid point can have
        self.all_correct = _padded(np.cumsum(self.d_correct))[self.keep_changes]  # [G] both parts together
        self.last = correct[:, -1]
        self.full_cost = float(cum[-1])
        s = degradation_scores(scores, correct)
        bad = np.flatnonzero(s > -np.inf)
        first = np.searchsorted(-self.threshold, -s[bad], side="left")  # first grid point where the loss is 1
        order = np.argsort(first, kind="stable")
        self.bad_rows = bad[order]
        # [G] how many of the sorted bad rows are losses at each grid point
        self.loss_upto = np.searchsorted(first[order], np.arange(len(self.keep)), side="right")

    def split(self, cal: np.ndarray) -> _Split:
        """This pool cut by ``cal [N, R]`` (True: calibration), one split per column."""
        return _Split(self, cal)


class _Split:
    """One pool under ``R`` cal/test splits: the calibration part's totals at any grid
    point of each split, from running sums over its calibration events only.

    ``[C, R]`` running sums cover the few events that change correctness (and the bad
    rows); the rest goes through ``flat``: the calibration events' positions ``r M + e``
    (split ``r``, event ``e``), sorted, so that "calibration events of split ``r`` before
    event ``e``" is one ``searchsorted``.
    """

    def __init__(self, pool: _Pool, cal: np.ndarray):
        self.pool = pool
        n_events, r = len(pool.rows), cal.shape[1]
        self.n_cal = int(cal[:, 0].sum())
        events = cal[pool.rows]  # [M, R]
        self.flat = np.flatnonzero(events.T)
        self.base = np.arange(r) * n_events  # [R] where each split's positions start
        self.first = np.searchsorted(self.flat, self.base)  # [R] each split's first calibration event in flat
        self.empty = np.searchsorted(self.flat, self.base + n_events) == self.first
        self.changes = _padded(np.cumsum(events[pool.changes] * pool.d_correct[:, None], axis=0, dtype=np.int32))
        self.losses = _padded(np.cumsum(cal[pool.bad_rows], axis=0, dtype=np.int32))  # [B + 1, R]
        self.last_cal = cal[pool.last].sum(axis=0)  # [R]
        self.last_test = pool.last.sum() - self.last_cal
        self.cols = np.arange(r)
        self._costs: np.ndarray | None = None

    def cal_correct(self, g: np.ndarray) -> np.ndarray:
        """``[R]`` the calibration part's correct answers at grid point ``g [R]``."""
        return self.last_cal + self.changes[self.pool.keep_changes[g], self.cols]

    def test_correct(self, g: np.ndarray) -> np.ndarray:
        return self.last_test + self.pool.all_correct[g] - self.changes[self.pool.keep_changes[g], self.cols]

    def cal_cost(self, g: np.ndarray) -> np.ndarray:
        """``[R]`` the calibration part's total cost at grid point ``g [R]``."""
        if self._costs is None:
            events = self.flat - np.repeat(self.base, np.diff(np.append(self.first, len(self.flat))))
            self._costs = np.concatenate([[0.0], np.cumsum(self.pool.d_cost[events])])
        end = np.searchsorted(self.flat, self.base + self.pool.keep[g])
        return self.n_cal * self.pool.full_cost + self._costs[end] - self._costs[self.first]

    def sweep_point(self, j: np.ndarray) -> np.ndarray:
        """``[R]`` the grid point that routes as the calibration sweep's point holding grid
        point ``j [R]``: that sweep's threshold is the lowest calibration event value
        reached, the grid point of the last calibration event up to ``j``; or, before any,
        just above every calibration score, the grid point just before its first event
        (test scores above that threshold stop there too); a part without events (every
        score ``-inf``) sweeps one point, threshold ``inf``: grid point 0."""
        keep = self.pool.keep
        last = np.searchsorted(self.flat, self.base + keep[j]) - 1  # the last calibration event before point j
        reached = last >= self.first
        event = self.flat[np.maximum(last, 0)] - self.base
        first_event = self.flat[np.minimum(self.first, len(self.flat) - 1)] - self.base
        before_any = np.where(self.empty, 0, np.searchsorted(keep, first_event + 1) - 1)
        return np.where(reached, np.searchsorted(keep, event + 1), before_any)

    def cheapest_within(self, target: float) -> np.ndarray:
        """``[R]`` what :func:`select_by_accuracy` picks on each calibration part for AD
        ``<= target``: the last grid point accurate enough (the cost falls at every
        calibration event), as the calibration sweep's point."""
        need = self.n_cal * (self.last_cal / self.n_cal - target) - TOL
        reached = self.pool.reached_changes  # [U]
        ok = self.last_cal + self.changes[reached] >= need  # [U, R]; U[0] = 0: all to the last stage, ok
        best = reached[len(reached) - 1 - np.argmax(ok[::-1], axis=0)]
        return self.sweep_point(np.searchsorted(self.pool.keep_changes, best, side="right") - 1)

    def certified(self, most_losses: int) -> np.ndarray:
        """``[R]`` what :func:`select_guaranteed` picks for one variant when a point is
        certified with at most ``most_losses`` losses: the last such (losses only grow
        along the grid), as the calibration sweep's point; 0 (above every score) if none."""
        bad_ok = (self.losses <= most_losses).sum(axis=0)  # [R] bad-row prefixes within the count
        count = np.searchsorted(self.pool.loss_upto, bad_ok - 1, side="right")  # grid points certified
        return np.where(count > 0, self.sweep_point(np.maximum(count - 1, 0)), 0)


def _padded(running: np.ndarray) -> np.ndarray:
    """Running totals (along the first axis) with the total before any event, 0, in front."""
    return np.concatenate([np.zeros((1, *running.shape[1:]), dtype=running.dtype), running])


def _resplit_ads(pools: Sequence[_Pool], cal: np.ndarray, targets: Sequence[float],
                 delta: float) -> dict[tuple[ThresholdSource, float], tuple[np.ndarray, np.ndarray]]:
    """The AD reached by the ``val`` and ``guaranteed`` choices of one method (its
    variants' pools), one cal/test split per column of ``cal [N, R]``.

    Exactly what :func:`select_by_accuracy` and :func:`select_guaranteed` pick on each
    calibration part (when every stage costs more than nothing, so that the cost falls at
    every calibration event), applied to its test part and to the whole pool.

    Returns:
        ``(source, target) -> (AD on the test part [R], AD on the pool [R])``.
    """
    n_cal, n = int(cal[:, 0].sum()), cal.shape[0]
    splits = [p.split(cal) for p in pools]
    out = {}
    for t in targets:
        most = _certified_losses(n_cal, t, delta / len(pools))
        for source in (ThresholdSource.VAL, ThresholdSource.GUARANTEED):
            best = None  # per split: (cost, -correct) on the calibration part, correct on the test part
            for s in splits:
                g = s.cheapest_within(t) if source == ThresholdSource.VAL else s.certified(most)
                mine = (s.cal_cost(g) if len(splits) > 1 else 0.0, -s.cal_correct(g), s.test_correct(g))
                if best is None:
                    best = mine
                    continue
                better = (mine[0] < best[0]) | ((mine[0] == best[0]) & (mine[1] < best[1]))  # ties: the first variant
                best = tuple(np.where(better, a, b) for a, b in zip(mine, best))
            degraded_test = splits[0].last_test - best[2]
            degraded_cal = splits[0].last_cal + best[1]
            out[(source, t)] = (degraded_test / (n - n_cal), (degraded_test + degraded_cal) / n)
    return out


def _resplit_masks(rng: np.random.Generator, n: int, n_cal: int, resplits: int) -> np.ndarray:
    """``[n, resplits]`` bool: each column marks ``n_cal`` random rows as calibration."""
    ranks = rng.permuted(np.broadcast_to(np.arange(n), (resplits, n)), axis=1)
    return np.ascontiguousarray((ranks < n_cal).T)


def threshold_violations(samples: pd.DataFrame, variants: Sequence[Variant], targets: dict[str, list[float]],
                         delta: float, resplits: int = 200, seed: int = 0) -> list[dict]:
    """How often ``val`` and ``guaranteed`` thresholds miss their AD target on new data.

    Per run seed, that seed's calibration and test rows are pooled and split again at
    random ``resplits`` times into a calibration and a test part of the original sizes
    (every method sees the same splits). On each, the thresholds are chosen on the
    calibration part (:func:`select_by_accuracy` for ``val``, :func:`select_guaranteed`
    for ``guaranteed``, the best of a method's variants as in :func:`operating_points`)
    and the AD they reach is measured on the test part and on the whole pool. A violation
    is an AD over the target (beyond float slack).

    Two rates, because the guarantee and a test set answer different questions:

    - ``violation_rate``, on the test part: what a user sees on one held-out set. It
      carries the test part's own sampling noise, and in this finite world the test part
      is the pool minus the calibration part, so a calibration part that looks good
      leaves a test part that looks correspondingly bad. A threshold whose risk sits
      just under the target misses here about half the time, so this rate may exceed
      ``delta`` for guaranteed thresholds too, though far less than for ``val``.
    - ``pool_violation_rate``, on the pool: the pool is this world's population (the
      calibration part is drawn from it), so its AD is the *risk* the guarantee is about,
      ``P(risk > target) <= delta`` (up to drawing without replacement, which
      concentrates the loss count: the binomial tail then errs on the safe side).

    Args:
        samples: the per-sample table.
        variants: every routed system (as for :func:`operating_points`).
        targets: ``mode -> AD targets``.
        delta: the guaranteed thresholds' allowed probability of missing.
        resplits: random splits per run seed.
        seed: seeds the splits (with each run seed).

    Returns:
        One dict per (mode, method, target, source ``val`` | ``guaranteed``):
        ``violation_rate`` and ``pool_violation_rate`` (means over run seeds of the
        fraction of splits over the target; ``violation_rate_std`` across run seeds when
        several), ``mean_ad`` (test-part AD averaged over splits and seeds), ``delta``,
        ``resplits``, ``seeds``.

    Raises:
        ValueError: ``resplits < 1``, or a seed without both splits.
    """
    if resplits < 1:
        raise ValueError(f"resplits must be at least 1, got {resplits}")
    per_seed: dict[tuple[Mode, str, float, ThresholdSource], list[tuple[float, float, float]]] = {}
    seeds = sorted(samples["seed"].unique())
    for run_seed in seeds:
        frame = samples[samples["seed"] == run_seed]
        parts = {name: part for name, part in frame.groupby("split")}
        if set(parts) != {"cal", "test"}:
            raise ValueError(f"seed {run_seed}: needs a cal and a test split, has {sorted(parts)}")
        pooled = pd.concat([parts["cal"], parts["test"]], ignore_index=True)
        cal = _resplit_masks(np.random.default_rng([seed, int(run_seed)]), len(pooled), len(parts["cal"]), resplits)
        chunk = int(np.clip(4_000_000 // len(pooled), 1, 256))  # splits evaluated together: bounds [events, R] arrays
        for (mode, method), vs in by_method(variants).items():
            pools = [_Pool(*variant_arrays(pooled, v), sweep_costs(v)) for v in vs]
            ads = [_resplit_ads(pools, cal[:, i:i + chunk], targets[mode], delta) for i in range(0, resplits, chunk)]
            for source, t in ads[0]:
                test_ad, pool_ad = (np.concatenate([a[(source, t)][k] for a in ads]) for k in (0, 1))
                per_seed.setdefault((mode, method, t, source), []).append(
                    (float(np.mean(test_ad > t + TOL)), float(np.mean(pool_ad > t + TOL)), float(test_ad.mean())))
    out = []
    for (mode, method, t, source), values in per_seed.items():
        rates, pool_rates, ads = zip(*values)
        row = {"mode": mode, "method": method, "target_ad": t, "threshold_source": source, "delta": delta,
               "resplits": resplits, "seeds": len(seeds), "violation_rate": float(np.mean(rates)),
               "pool_violation_rate": float(np.mean(pool_rates)), "mean_ad": float(np.mean(ads))}
        if len(rates) > 1:
            row["violation_rate_std"] = float(np.std(rates, ddof=1))
        out.append(row)
    return out
