"""The recommendation (cascade.evaluation.recommend): known answers on constructed runs,
the seed-stratified paired bootstrap, and a real run's metrics.json and table.md."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cascade.cli import main
from cascade.contracts.methods import MethodKind
from cascade.core.enums import Mode, ThresholdSource
from cascade.engine.experiment import Experiment
from cascade.evaluation.columns import Variant
from cascade.evaluation.points import operating_points
from cascade.evaluation.recommend import (
    bootstrap_weights,
    choose,
    pooled_means,
    ratio_interval,
    recommend,
)
from cascade.report.tables import recommendation_section, sig
from tests.conftest import REPO

N = 400  # inputs per split per seed
TARGETS = {Mode.WHITE_BOX.value: [0.0, 0.02]}


def _samples(scores: dict[str, callable], seeds=(0, 1)) -> pd.DataFrame:
    """Two splits per seed: the little network right on 90 % of inputs, the big one always;
    ``scores[name](rng, correct)`` gives method ``name``'s stop scores."""
    parts = []
    for seed in seeds:
        for split in ("cal", "test"):
            rng = np.random.default_rng(100 * seed + (split == "test"))
            correct = rng.random(N) < 0.9
            frame = pd.DataFrame({"seed": seed, "split": split, "stage0_correct": correct, "big_correct": True})
            for name, f in scores.items():
                frame[f"stage0_score_{name}"] = f(rng, correct)
            parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def _variant(name: str) -> Variant:
    return Variant(name, Mode.WHITE_BOX, "", (f"stage0_score_{name}",), ("stage0_correct", "big_correct"), (1.0, 10.0))


def _recommend(samples: pd.DataFrame, names: list[str], kinds: dict[str, MethodKind]) -> dict:
    variants = [_variant(n) for n in names]
    rows = operating_points(samples, variants, TARGETS, delta=0.1)
    return recommend(samples, variants, rows, kinds, None, {Mode.WHITE_BOX.value: 11.0})


def _choice(rec: dict, target: float, source: ThresholdSource) -> dict:
    return next(c for c in rec["choices"] if c["target_ad"] == target and c["threshold_source"] == source)


def informed(rng, correct):  # knows which inputs the little network gets right (wrong ones tie)
    return np.where(correct, 0.8 + 0.1 * rng.random(len(correct)), 0.2)


def blind(rng, correct):  # knows nothing
    return rng.random(len(correct))


def test_a_clearly_better_method_is_recommended_over_a_simpler_one():
    rec = _recommend(_samples({"msp": blind, "good": informed}), ["msp", "good"],
                     {"msp": MethodKind.POST_HOC, "good": MethodKind.TRAINED})
    for source in (ThresholdSource.GUARANTEED, ThresholdSource.VAL):
        c = _choice(rec, 0.02, source)
        assert c["method"] == "good" and c["best"] == "good" and c["tied"] == ["good"]
        vs = c["vs_msp"]
        assert vs["method"] == "msp" and vs["verdict"] == "ahead"
        assert vs["low"] <= vs["ratio"] <= vs["high"] < 1  # the interval excludes 1
        # the runner-up: the other method meeting the target (a blind val threshold may miss it)
        assert c["vs_runner_up"] == (None if "msp" in c["flagged"] else vs)
        assert c["target_met"] and c["times_cheaper"] == pytest.approx(11.0 / c["cost_mflops"])
    lines = recommendation_section({"recommendation": rec})
    assert lines[0] == "## Recommendation" and lines[2].startswith("| AD ≤ | thresholds | method |")
    # a row per target and source, guaranteed first: the method, then vs msp's ratio, ahead
    assert lines[4].startswith("| 0 % | guaranteed | ") and lines[5].startswith("|  | val | ")
    assert lines[6].startswith("| 2.00 % | guaranteed | **good** |") and lines[7].startswith("|  | val | good |")
    cells = [c.strip() for c in lines[6].strip("|").split("|")]
    vs = _choice(rec, 0.02, ThresholdSource.GUARANTEED)["vs_msp"]
    assert cells[7] == f"{sig(vs['ratio'])}x [{sig(vs['low'])}, {sig(vs['high'])}] ahead"


def test_two_identical_methods_are_tied_and_the_post_hoc_one_is_recommended():
    samples = _samples({"twin": informed})
    samples["stage0_score_msp"] = samples["stage0_score_twin"]
    # the trained twin comes first in the run's order: simplicity, not order, decides
    rec = _recommend(samples, ["twin", "msp"], {"twin": MethodKind.TRAINED, "msp": MethodKind.POST_HOC})
    for c in rec["choices"]:
        assert c["method"] == "msp" and sorted(c["tied"]) == ["msp", "twin"]
        assert c["vs_msp"] is None  # the chosen one is msp
        assert c["vs_runner_up"] == {"method": "twin", "ratio": 1.0, "low": 1.0, "high": 1.0, "verdict": "tied"}
    assert "| — (it is msp) | twin 1.00x [1.00, 1.00] tied | 2 of 2 |" in recommendation_section(
        {"recommendation": rec})[4]


def test_without_msp_the_recommendation_says_so():
    rec = _recommend(_samples({"a": informed, "b": blind}), ["a", "b"],
                     {"a": MethodKind.POST_HOC, "b": MethodKind.POST_HOC})
    assert all(c["vs_msp"] == "msp is not in the run" for c in rec["choices"])


def test_a_method_missing_its_target_is_flagged_and_not_recommended():
    mean = np.array([1.0, 2.0])
    boot = np.tile(mean, (50, 1))
    c = choose(["cheap", "safe"], mean, boot, [False, True], {}, {})
    assert c["best"] == "safe" and c["tied"] == ["safe"] and c["vs_runner_up"] is None
    assert c["ratio_to_best"]["cheap"]["ratio"] == 0.5  # still shown


def test_fewer_parameters_break_a_tie_between_trained_methods():
    mean = np.array([1.0, 1.0])
    c = choose(["big", "small"], mean, np.tile(mean, (10, 1)), [True, True],
               {"big": MethodKind.TRAINED, "small": MethodKind.TRAINED}, {"big": 500, "small": 20})
    assert c["chosen"] == 1


def test_inputs_are_resampled_only_within_their_seed():
    weights = bootstrap_weights([3, 5], resamples=200, seed=0)
    assert [w.shape for w in weights] == [(200, 3), (200, 5)]
    assert (weights[0].sum(axis=1) == 3).all() and (weights[1].sum(axis=1) == 5).all()
    # method a: 1 on every input of seed 0, 3 on seed 1; method b: 2 everywhere. Resampled
    # within each seed, a's pooled mean is 2 in every draw; pooled across seeds it would vary.
    values = [np.array([[1.0, 2.0]] * 3), np.array([[3.0, 2.0]] * 5)]
    boot = pooled_means(values, weights)
    assert np.allclose(boot, 2.0)
    assert ratio_interval(np.array([2.0, 2.0]), boot, 0, 1) == {"ratio": 1.0, "low": 1.0, "high": 1.0}


def test_the_bootstrap_is_paired():
    # b = a + 1 on every input: paired, the ratio's spread is that of (m+1)/m, tight
    rng = np.random.default_rng(1)
    a = rng.random(200) * 10
    values = [np.stack([a, a + 1], axis=1)]
    boot = pooled_means(values, bootstrap_weights([200]))
    r = ratio_interval(values[0].mean(axis=0), boot, 0, 1)
    assert r["low"] <= r["ratio"] <= r["high"] and r["high"] - r["low"] < 0.05


def test_a_run_has_the_recommendation(quick_digits_run):
    m = json.loads((quick_digits_run / "metrics.json").read_text())
    rec = m["recommendation"]
    assert rec["resamples"] == 1000 and "stratified by seed" in rec["interval"]
    keys = {(c["mode"], c["target_ad"], c["threshold_source"]) for c in rec["choices"]}
    assert keys == {(p["mode"], p["target_ad"], s) for p in m["operating_points"] if p["target_ad"] is not None
                    for s in ("guaranteed", "val")}
    points = {(p["mode"], p["method"], p["threshold_source"], p["target_ad"]): p for p in m["operating_points"]
              if p["selection"] == "target_ad"}
    for c in rec["choices"]:
        p = points[c["mode"], c["method"], c["threshold_source"], c["target_ad"]]
        assert c["cost_mflops"] == pytest.approx(p["cost_mflops"]) and c["ad"] == pytest.approx(p["ad"])
        assert c["method"] in c["tied"] and c["method"] in m["methods"]
    md = (quick_digits_run / "table.md").read_text().splitlines()
    assert md[2] == "## Recommendation" and md[4] == "### White-box" and md[6].startswith("| AD ≤ | thresholds |")
    # one row per choice, in metrics.json's order
    rows = [line for line in md[:md.index("## Networks (test split)")] if line.startswith("| ")
            and not line.startswith("| AD ≤")]
    assert [r.split("|")[2].strip() for r in rows] == [c["threshold_source"] for c in rec["choices"]]


def test_cascade_run_prints_the_recommendation_last(quick_digits_run, tmp_path, monkeypatch, capsys):
    m = json.loads((quick_digits_run / "metrics.json").read_text())
    monkeypatch.setattr(Experiment, "run", lambda self, resume=False: m)  # the run itself: the fixture's
    assert main(["run", str(REPO / "configs" / "digits.yaml"), "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    section = recommendation_section(m)
    assert out[-len(section) + 1:] == section[:-1]  # the section closes the output
    assert out.count("## Recommendation") == 2  # also first in the table
