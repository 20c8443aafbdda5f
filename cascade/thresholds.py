"""Operating points from per-sample arrays: sort once, cumulative sums, no threshold loop.

A two-stage system keeps an input on the little network when its score is at or above
the threshold (``score >= t``) and appeals it otherwise. For an evaluation set of N
inputs, keeping the k highest-scoring inputs is a valid operating point only where the
k-th and (k+1)-th scores differ: a threshold never splits equal scores.

Accuracy degradation ``AD = Acc(big alone) - Acc(system)``; with a black-box oracle the
big side is always right (``big_correct`` all True) and this is ``1 - Acc(system)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: slack on "AD <= target", in units of one input, for float rounding of target * N
_COUNT_TOL = 1e-9


@dataclass(frozen=True)
class Sweep:
    """Every valid operating point of one score on one split, by number of inputs kept.

    Attributes:
        kept: ``[M]`` number of inputs kept on the little network, ascending from 0 to N.
        threshold: ``[M]`` the threshold that keeps exactly ``kept`` inputs.
        system_correct: ``[M]`` number of correct system answers at each point.
        n: N.
        big_correct: number of inputs the big side gets right.
    """

    kept: np.ndarray
    threshold: np.ndarray
    system_correct: np.ndarray
    n: int
    big_correct: int

    @property
    def skipping_rate(self) -> np.ndarray:
        return self.kept / self.n

    @property
    def system_accuracy(self) -> np.ndarray:
        return self.system_correct / self.n

    @property
    def ad(self) -> np.ndarray:
        return (self.big_correct - self.system_correct) / self.n


def sweep(score: np.ndarray, little_correct: np.ndarray, big_correct: np.ndarray) -> Sweep:
    """All operating points of ``score`` (higher = keep on little), ties respected.

    Args:
        score: ``[N]`` the predictor's score per input.
        little_correct: ``[N]`` bool, the little network's answer is right.
        big_correct: ``[N]`` bool, the big side's answer is right.
    """
    score = np.asarray(score, dtype=np.float64)
    n = len(score)
    if n == 0:
        raise ValueError("cannot sweep an empty split")
    order = np.argsort(-score, kind="stable")
    s = score[order]
    gain = little_correct[order].astype(np.int64) - big_correct[order].astype(np.int64)
    n_big = int(np.sum(big_correct))
    correct = np.concatenate([[n_big], n_big + np.cumsum(gain)])  # [N + 1], index = kept
    # k inputs kept is reachable iff k == 0, k == N, or s[k-1] > s[k].
    boundary = np.concatenate([[True], s[:-1] > s[1:], [True]])
    kept = np.flatnonzero(boundary)
    above_all = np.nextafter(s[0], np.inf)  # keeps nothing
    threshold = np.where(kept == 0, above_all, s[np.maximum(kept - 1, 0)])
    return Sweep(kept=kept, threshold=threshold, system_correct=correct[kept], n=n, big_correct=n_big)


def select_threshold(sw: Sweep, target_ad: float) -> float:
    """The threshold keeping the most inputs on the little network with ``AD <= target_ad``."""
    ok = (sw.big_correct - sw.system_correct) <= target_ad * sw.n + _COUNT_TOL
    # kept = 0 gives AD = 0, so a non-negative target always has a point
    best = np.flatnonzero(ok)[-1]
    return float(sw.threshold[best])


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold applied to one split."""

    threshold: float
    skipping_rate: float
    appeal_rate: float
    system_accuracy: float
    ad: float
    cost_mflops: float | None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def apply_threshold(
    threshold: float,
    score: np.ndarray,
    little_correct: np.ndarray,
    big_correct: np.ndarray,
    little_mflops: float,
    big_mflops: float | None,
) -> OperatingPoint:
    """Route with ``score >= threshold`` and measure the system (Eq. 15-17).

    Cost is ``c0 + AR * c1`` (``None`` when the big side's cost is unknown).
    """
    keep = np.asarray(score) >= threshold
    sr = float(keep.mean())
    acc = float(np.where(keep, little_correct, big_correct).mean())
    ar = 1.0 - sr
    cost = None if big_mflops is None else little_mflops + ar * big_mflops
    return OperatingPoint(
        threshold=float(threshold),
        skipping_rate=sr,
        appeal_rate=ar,
        system_accuracy=acc,
        ad=float(np.mean(big_correct)) - acc,
        cost_mflops=cost,
    )
