"""The same checks over every registered network and method (timm-style contract tests)."""

import pytest
import torch

from cascade import METHODS, NETWORKS, TASKS, PredictorHead, StageOutput, TwoHeadNetwork
from cascade.registry import Registry
from cascade import CascadeError

NETWORK_SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "keypoint_cnn": (1, 96, 96)}


@pytest.mark.parametrize("name", NETWORKS.names())
def test_network_contract(name):
    shape = NETWORK_SHAPES.get(name)
    if shape is None:
        pytest.skip(f"no input shape declared for network {name!r}")
    torch.manual_seed(0)
    net = NETWORKS.get(name)(shape, 10)
    out = net(torch.randn(4, *shape))
    assert out.output.shape == (4, 10) and out.features.shape == (4, net.feature_dim)
    assert torch.isfinite(out.output).all()
    out.output.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("inputs", [["features"], ["sorted_probs", "confidence"], ["features", "sorted_probs", "confidence"]])
@pytest.mark.parametrize("detach", [False, True])
def test_two_head_gradients(inputs, detach):
    torch.manual_seed(0)
    base = NETWORKS.get("mlp")((1, 8, 8), 10, hidden=[16])
    net = TwoHeadNetwork(base, PredictorHead(16, 10, inputs, hidden=[8], detach=detach))
    out = net(torch.randn(5, 1, 8, 8))
    assert out.q.shape == (5,) and ((out.q > 0) & (out.q < 1)).all()
    (out.output.sum() + out.q.sum()).backward()
    assert all(p.grad is not None for p in net.parameters())
    # the predictor's gradient reaches the shared features only when not detached
    net.zero_grad()
    net(torch.randn(5, 1, 8, 8)).q.sum().backward()
    trunk = net.base.features[1][0].weight.grad
    assert (trunk is None or trunk.abs().sum() == 0) == detach


@pytest.mark.parametrize("name", [n for n in METHODS.names() if n in ("msp", "gap", "entropy")])
def test_confidence_method_contract(name):
    torch.manual_seed(0)
    scores = METHODS.get(name)().score(StageOutput(output=torch.randn(7, 10) * 3))
    assert scores.shape == (7,) and ((scores >= 0) & (scores <= 1)).all()


def test_registry_rejects_duplicates_and_lists_known_names():
    reg = Registry("thing")
    reg.register("a")(object)
    with pytest.raises(ValueError):
        reg.register("a")(object)
    with pytest.raises(CascadeError, match="known: a"):
        reg.get("b")


def test_dotted_path_reaches_a_class():
    assert TASKS.get("tasks.digits.DigitsTask").__name__ == "DigitsTask"


def test_digits_splits_are_stratified_and_fixed_by_seed():
    task = TASKS.get("digits")()
    a, b = task.build_splits(0), task.build_splits(0)
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    n = len(a.train) + len(a.cal) + len(a.test)
    assert n == 1797 and abs(len(a.test) - 0.3 * n) < 2
    # every class in every split
    for split in (a.train, a.cal, a.test):
        assert len(torch.unique(split.tensors[1])) == 10


def test_config_head_inputs_match_the_network_code():
    from typing import get_args

    from cascade.config import HeadInput
    from cascade.networks import HEAD_INPUTS

    assert set(get_args(HeadInput)) == set(HEAD_INPUTS)
