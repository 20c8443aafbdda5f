"""The paper's CIFAR networks (Table 3), latency timing, `cascade networks` and the routed
speed-up benchmark."""

import itertools
import re
import time

import pytest
import torch
from torch import nn

from cascade import NETWORKS, FeatureNet
from cascade.cli import main
from cascade.nn.cost import measure_cost, measure_latency, median_time_ms

#: AppealNet's Table 3 (32x32 inputs, 10 classes): MFLOPs (millions of MACs) and millions
#: of parameters. ResNet-18 has no row there: its figures are the ones thop gives for the
#: usual CIFAR ResNet-18 (kuangliu/pytorch-cifar), counted the same way (0.56 G, 11.17 M).
TABLE3 = {
    "mobilenet_v2_cifar": (94.61, 2.30),
    "efficientnet_b0_cifar": (31.43, 3.60),
    "shufflenet_v2_cifar": (11.42, 0.35),
    "resnet101_cifar": (2520.29, 42.52),
    "resnet18_cifar": (556.65, 11.17),
}


def _batch_norm_elements(net: nn.Module, shape: tuple[int, ...]) -> int:
    """Output elements of every batch norm in one forward pass of one input."""
    count = [0]
    hooks = [m.register_forward_hook(lambda m, i, o: count.__setitem__(0, count[0] + o.numel()))
             for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        net.eval()(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return count[0]


@pytest.mark.parametrize("name", TABLE3)
def test_network_cost_matches_the_papers_table(name):
    mflops, params = TABLE3[name]
    net = NETWORKS.get(name)((3, 32, 32), 10)
    cost = measure_cost(net, (3, 32, 32))
    assert abs(cost.mflops / mflops - 1) < 0.05, f"{cost.mflops:.2f} MFLOPs vs the paper's {mflops}"
    assert abs(cost.params / 1e6 / params - 1) < 0.05, f"{cost.params / 1e6:.3f} M params vs the paper's {params}"
    # the table counts 2 per batch-norm output element too (thop): with them it is the paper's figure
    assert cost.mflops + 2 * _batch_norm_elements(net, (3, 32, 32)) / 1e6 == pytest.approx(mflops, rel=1e-3)


def test_shufflenet_is_torchvisions_with_a_cifar_stem():
    # torchvision's documented ShuffleNetV2 parameter counts (1000 classes), less the classifier's
    # difference: the CIFAR changes (stride, no max-pool) add or remove no parameter
    for width, imagenet_params, feature_dim in ((0.5, 1_366_792, 1024), (1.0, 2_278_604, 1024)):
        net = NETWORKS.get("shufflenet_v2_cifar")((3, 32, 32), 10, width_mult=width)
        assert sum(p.numel() for p in net.parameters()) == imagenet_params - (feature_dim + 1) * (1000 - 10)


@pytest.mark.parametrize("name", TABLE3)
def test_forward_on_a_batch_of_two(name):
    torch.manual_seed(0)
    net = NETWORKS.get(name)((3, 32, 32), 10).eval()
    assert isinstance(net, FeatureNet) and isinstance(net.head, nn.Linear)
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert out.output.shape == (2, 10) and out.features.shape == (2, net.feature_dim)
    assert torch.isfinite(out.output).all()


def test_other_inputs_and_options():
    # grey 64x64 images, 7 classes; a stride-2 stem makes them cost what 32x32 ones do at
    # stride 1 (the stem's 3x3 convolution outputs the same 32x32 map; one input channel)
    net = NETWORKS.get("shufflenet_v2_cifar")((1, 64, 64), 7, stem_stride=2, dropout=0.1)
    assert net(torch.randn(2, 1, 64, 64)).output.shape == (2, 7)
    assert isinstance(net.features[-1], nn.Dropout)
    stem = 2 * 24 * 9 * 32 * 32 / 1e6  # the stem's MACs from the two input channels it lacks
    small = measure_cost(NETWORKS.get("shufflenet_v2_cifar")((3, 32, 32), 7), (3, 32, 32)).mflops
    assert measure_cost(net, (1, 64, 64)).mflops == pytest.approx(small - stem, rel=1e-9)
    # ResNet width: every convolution but the stem's scales as width squared
    r16 = NETWORKS.get("resnet18_cifar")((3, 32, 32), 10, width=16)
    assert r16.feature_dim == 128
    assert measure_cost(r16, (3, 32, 32)).mflops == pytest.approx(555.42 / 16, rel=0.02)
    eff = NETWORKS.get("efficientnet_b0_cifar")((3, 32, 32), 10, width_mult=0.5, dropout=0.0)
    assert eff.feature_dim == 160 and not isinstance(eff.features[-1], nn.Dropout)
    assert NETWORKS.get("mobilenet_v2_cifar")((3, 32, 32), 10, width_mult=1.5).feature_dim == 1920


@pytest.mark.parametrize("name, kwargs, message", [
    ("shufflenet_v2_cifar", {"width_mult": 0.75}, "width_mult must be one of [0.5, 1.0, 1.5, 2.0]"),
    ("resnet18_cifar", {"stem_stride": 4}, "stem_stride must be 1 (CIFAR) or 2"),
    ("mobilenet_v2_cifar", {"dropout": 1.0}, "dropout must be in [0, 1)"),
])
def test_bad_options_say_why(name, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        NETWORKS.get(name)((3, 32, 32), 10, **kwargs)
    with pytest.raises(ValueError, match=r"takes images \(C, H, W\), got input_shape \(784,\)"):
        NETWORKS.get(name)((784,), 10)


# ============================================================================ latency


def test_median_time_is_the_median_of_the_timed_calls(monkeypatch):
    # a fake clock: the three timed calls take 1, 3 and 2 ms (the warm-up call is not timed)
    ticks = iter([0.0, 0.001, 0.010, 0.013, 0.020, 0.022])
    calls = []
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    assert median_time_ms(lambda: calls.append(1), "cpu", repeats=3, warmup=1) == pytest.approx(2.0)
    assert len(calls) == 4


def test_measure_latency_runs_in_eval_mode_and_restores_the_mode(monkeypatch):
    modes = []

    class Probe(nn.Linear):
        def forward(self, x):
            modes.append((self.training, torch.is_grad_enabled(), tuple(x.shape)))
            return super().forward(x)

    net = Probe(4, 2).train()
    # a fake clock: the two timed passes take 4 and 6 ms, so the median is 5 ms
    ticks = iter([0.0, 0.004, 0.010, 0.016])
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    assert measure_latency(net, (4,), batch=3, device="cpu", repeats=2, warmup=1) == pytest.approx(5.0)
    assert modes == [(False, False, (3, 4))] * 3 and net.training


@pytest.mark.parametrize("device, message", [
    ("banana", "device 'banana': not a device; use cpu, cuda or cuda:N"),
    ("meta", "device 'meta': latency is measured on cpu or cuda only"),
])
def test_bad_devices_say_why(device, message):
    from cascade import CascadeError

    with pytest.raises(CascadeError, match=message):
        measure_latency(nn.Linear(2, 2), (2,), device=device)


# ============================================================================ cascade networks


@pytest.fixture
def needs_option(monkeypatch):
    """A registered network that cannot be built without an option, for this test only."""
    def build_needs_option(input_shape, num_outputs, hidden):
        raise AssertionError("never built")

    monkeypatch.setitem(NETWORKS._entries, "needs_option", build_needs_option)


def test_cli_networks_prints_every_network_with_its_latency(capsys, needs_option):
    threads = torch.get_num_threads()
    # one thread: on a loaded machine two threads wait on each other at every layer
    assert main(["networks", "--input", "3,8,8", "--classes", "4", "--device", "cpu", "--batch", "2",
                 "--repeats", "2", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("input 3x8x8, 4 outputs; MFLOPs: millions of multiply-accumulates")
    assert lines[1].split() == ["network", "MFLOPs", "params", "ms/batch", "(cpu,", "batch", "2)"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == set(NETWORKS.names())
    cost = measure_cost(NETWORKS.get("shufflenet_v2_cifar")((3, 8, 8), 4), (3, 8, 8))
    mflops, params, unit, latency = rows["shufflenet_v2_cifar"]
    assert (mflops, params, unit) == (f"{cost.mflops:.3g}", f"{cost.params / 1e6:.3f}", "M")
    assert float(latency) > 0 and torch.get_num_threads() == threads  # the CLI's threads are put back
    assert " ".join(rows["needs_option"]).startswith("- cannot be built for input (3, 8, 8): TypeError: ")


@pytest.mark.parametrize("args, message", [
    (["--input", "3,x"], "error: --input '3,x': give one input's shape as integers separated by commas, e.g. 3,32,32"),
    (["--input", "3,0,32"], "error: input shape (3, 0, 32): every dimension must be a positive integer"),
    (["--classes", "0"], "error: outputs 0: must be at least 1"),
    (["--device", "cuda"], "error: device 'cuda': no CUDA device is available on this machine"),
    (["--device", "cpu", "--batch", "0"], "error: latency: batch 0; must be at least 1"),
])
def test_cli_networks_bad_arguments_one_line_exit_2(capsys, monkeypatch, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["networks", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == message and captured.out == ""


# ============================================================================ benchmark


def test_router_speedup_benchmark_runs_on_the_cpu(capsys):
    from benchmarks.router_speedup import main as bench

    bench(["--little", "mlp", "--big", "cnn", "--input", "1,8,8", "--batch", "40", "--rates", "0.05,0.2",
           "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "mlp -> cnn, batch 40 on cpu (median of 1): t_little " in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 0.")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (ar, path) for ar in ("0.05", "0.20") for path in ("router", "one-sync", "static")]
    # each row's figures from the printed times: speed-up = t_big / routed, ideal =
    # t_big / (t_little + AR t_big), their ratio. The times are printed to 2 decimals (±0.005 ms),
    # so each figure must lie between its values at the ends of those ranges (a t_little of
    # 0.03 ms is only known to ±17 %), give or take its own last printed digit
    t_little, t_big = (float(v) for v in re.search(r"t_little ([0-9.]+) ms, t_big ([0-9.]+) ms", out).groups())

    def between(value, f, *times):
        ends = [f(*(t + e for t, e in zip(times, signs))) for signs in itertools.product((-0.005, 0.005),
                                                                                       repeat=len(times))]
        assert min(ends) * 0.99 - 0.011 <= value <= max(ends) * 1.01 + 0.011, (value, min(ends), max(ends))

    for r in rows:
        ar, routed, speedup, ideal, ratio = (float(r[i].strip().rstrip("x")) for i in (0, 2, 3, 4, 5))
        between(speedup, lambda big, rt: big / rt, t_big, routed)
        between(ideal, lambda little, big: big / (little + ar * big), max(t_little, 0.005), t_big)
        assert ratio == pytest.approx(speedup / ideal, rel=0.1, abs=0.011)
