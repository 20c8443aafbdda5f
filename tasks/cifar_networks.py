"""The AppealNet paper's CIFAR-10 networks (32x32 inputs, 10 classes; its Table 3),
built from torchvision's blocks and registered for the ``little:`` / ``big:`` keys.

The paper does not say which variants it used; its Table 3 figures are those of the
CIFAR variants of kuangliu/pytorch-cifar counted by ``thop`` (to 0.03 %, see below), so
these are those networks: the ImageNet architectures with a stride-1 3x3 stem instead of
the stride-2 stem (and max-pool), so that a 32x32 image is not shrunk to 8x8 before the
first stage. What else each one changes is in its builder's docstring.

Cost. Table 3 counts what ``thop`` counts: the multiply-accumulates of convolutions and
linear layers, plus 2 per batch-norm output element. :func:`cascade.nn.cost.measure_cost`
counts the first part only (batch norm folds into the preceding convolution at
deployment), so its figures sit 0.4-4.5 % under the table's (MFLOPs = millions of MACs):

===================== ============== ============== =========== ==========
network                MFLOPs here    Table 3         params      Table 3
===================== ============== ============== =========== ==========
mobilenet_v2_cifar      91.15          94.61           2.297 M     2.30 M
efficientnet_b0_cifar   30.33          31.43           3.599 M     3.60 M
shufflenet_v2_cifar     10.90          11.42           0.352 M     0.35 M
resnet101_cifar       2509.98        2520.29          42.513 M    42.52 M
resnet18_cifar         555.42         (none)          11.174 M     (none)
===================== ============== ============== =========== ==========

Adding 2 per batch-norm output element to the figures here gives Table 3's to 0.1 %
(``tests/test_cifar_networks.py`` checks both).

Every builder takes ``input_shape`` ``(C, H, W)`` (any channel count and size: the
features end in global average pooling) and ``num_outputs``, and returns a :class:`cascade.FeatureNet` whose features are the pooled
last feature map ``[B, F]`` (then the optional dropout) and whose head is
``Linear(F, num_outputs)``. ``stem_stride=2`` halves the resolution at the stem (e.g.
64x64 inputs at about the cost of 32x32 ones). torchvision is imported when a network is
built, not when the registry is read.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cascade import NETWORKS, FeatureNet

#: MobileNetV2 stages (expansion t, channels c, blocks n, first stride s): torchvision's
#: ImageNet table with the second stage's stride 2 -> 1, as in the paper's network
_MOBILENET_V2_CIFAR = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                       [6, 320, 1, 1]]

#: EfficientNet-B0 stages (expansion, kernel, stride, in, out, blocks): the ImageNet table
_EFFICIENTNET_B0 = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                    (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]

#: ShuffleNetV2 channels per width (stem, three stages, last 1x1 convolution), torchvision's
_SHUFFLENET_V2_CHANNELS = {0.5: [24, 48, 96, 192, 1024], 1.0: [24, 116, 232, 464, 1024],
                           1.5: [24, 176, 352, 704, 1024], 2.0: [24, 244, 488, 976, 2048]}


def _image_channels(name: str, input_shape: Sequence[int], stem_stride: int) -> int:
    """The channel count of ``(C, H, W)`` inputs.

    Raises:
        ValueError: not an image shape, or a stem stride other than 1 or 2.
    """
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"{name} takes images (C, H, W), got input_shape {tuple(input_shape)}")
    if stem_stride not in (1, 2):
        raise ValueError(f"{name}: stem_stride must be 1 (CIFAR) or 2, got {stem_stride}")
    return int(input_shape[0])


def _stem_conv(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    """The 3x3 stem convolution, initialized as torchvision initializes its convolutions."""
    conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _feature_net(body: nn.Module, feature_dim: int, num_outputs: int, dropout: float) -> FeatureNet:
    """``body`` ([B, F, h, w]) pooled to ``[B, F]``, then dropout; a linear head."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    features = nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if dropout > 0:
        features.append(nn.Dropout(dropout))
    return FeatureNet(features, nn.Linear(feature_dim, num_outputs), feature_dim)


# -- MobileNetV2 ----------------------------------------------------------------------


class _CifarInvertedResidual(nn.Module):
    """MobileNetV2's inverted residual block as the paper's network has it: torchvision's
    layers (1x1 expansion, 3x3 depthwise, linear 1x1 projection), plus two differences
    that make up Table 3's 2.30 M parameters: the expansion runs also at expansion 1, and a
    stride-1 block that changes the width adds a 1x1 projection shortcut (torchvision's
    has no shortcut there). Without them: 2.24 M parameters and 88.0 MFLOPs, 7 % under
    the table."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, norm_layer=nn.BatchNorm2d):
        from torchvision.ops.misc import Conv2dNormActivation

        super().__init__()
        hidden = round(inp * expand_ratio)
        self.conv = nn.Sequential(
            Conv2dNormActivation(inp, hidden, kernel_size=1, norm_layer=norm_layer, activation_layer=nn.ReLU6),
            Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden, norm_layer=norm_layer,
                                 activation_layer=nn.ReLU6),
            nn.Conv2d(hidden, oup, 1, bias=False),
            norm_layer(oup),
        )
        if stride != 1:
            self.shortcut = None
        elif inp == oup:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(inp, oup, 1, bias=False), norm_layer(oup))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return out if self.shortcut is None else out + self.shortcut(x)


@NETWORKS.register("mobilenet_v2_cifar")
def build_mobilenet_v2_cifar(
    input_shape: tuple[int, ...], num_outputs: int, width_mult: float = 1.0, dropout: float = 0.0,
    stem_stride: int = 1,
) -> FeatureNet:
    """MobileNetV2 for 32x32 inputs (the paper's little network; Table 3: 94.61 MFLOPs,
    2.30 M parameters).

    torchvision's ``MobileNetV2`` (its stage table, width rounding, 1x1 convolution to
    1280 channels and initialization) with a stride-1 stem, the second stage at stride 1
    instead of 2 (the feature maps go 32 -> 16 -> 8 -> 4; total stride 8, not 32) and the
    paper's block (:class:`_CifarInvertedResidual`). 91.2 MFLOPs, 2.297 M parameters.

    Args:
        input_shape: ``(C, H, W)``.
        num_outputs: classes.
        width_mult: scales every layer's channels (rounded to multiples of 8); the last
            1x1 convolution keeps 1280 channels below 1.
        dropout: before the head (torchvision uses 0.2; the paper's network none).
        stem_stride: 1 for 32x32 inputs; 2 for inputs twice that size.

    Returns:
        A FeatureNet with ``feature_dim`` 1280 (times ``width_mult`` above 1).

    Raises:
        ValueError: a shape that is not ``(C, H, W)``, a bad stride or dropout.
    """
    from torchvision.models import MobileNetV2

    in_channels = _image_channels("mobilenet_v2_cifar", input_shape, stem_stride)
    net = MobileNetV2(num_classes=num_outputs, width_mult=width_mult, inverted_residual_setting=_MOBILENET_V2_CIFAR,
                      block=_CifarInvertedResidual)
    stem = net.features[0][0]
    net.features[0][0] = _stem_conv(in_channels, stem.out_channels, stem_stride)
    return _feature_net(net.features, net.last_channel, num_outputs, dropout)


# -- EfficientNet-B0 ------------------------------------------------------------------


@NETWORKS.register("efficientnet_b0_cifar")
def build_efficientnet_b0_cifar(
    input_shape: tuple[int, ...], num_outputs: int, width_mult: float = 1.0, depth_mult: float = 1.0,
    dropout: float = 0.2, stochastic_depth: float = 0.2, stem_stride: int = 1,
) -> FeatureNet:
    """EfficientNet-B0 for 32x32 inputs (Table 3: 31.43 MFLOPs, 3.60 M parameters).

    torchvision's ``EfficientNet`` (MBConv blocks with squeeze-excitation and SiLU,
    stochastic depth, B0's stage table and strides) with a stride-1 stem, so the stages
    see 32 -> 16 -> 8 -> 4 -> 2 (total stride 16: the cost of B0 at 112x112 on ImageNet),
    and without the final 1x1 convolution to 1280 channels: the paper's network pools
    the last stage's 320 channels straight into its classifier. With that convolution it
    would have 4.02 M parameters, 12 % over Table 3. 30.3 MFLOPs, 3.599 M parameters.

    Args:
        input_shape: ``(C, H, W)``.
        num_outputs: classes.
        width_mult: scales the channels (EfficientNet's rounding to multiples of 8).
        depth_mult: scales the blocks per stage (rounded up).
        dropout: before the head (0.2, as B0 and the paper's network).
        stochastic_depth: the last block's probability of being skipped in training,
            rising linearly from 0 at the first (0.2, as B0).
        stem_stride: 1 for 32x32 inputs; 2 for inputs twice that size.

    Returns:
        A FeatureNet with ``feature_dim`` 320 (times ``width_mult``, rounded).

    Raises:
        ValueError: a shape that is not ``(C, H, W)``, a bad stride or dropout.
    """
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    in_channels = _image_channels("efficientnet_b0_cifar", input_shape, stem_stride)
    if not 0.0 <= stochastic_depth < 1.0:
        raise ValueError(f"stochastic_depth must be in [0, 1), got {stochastic_depth}")
    setting = [MBConvConfig(*row, width_mult=width_mult, depth_mult=depth_mult) for row in _EFFICIENTNET_B0]
    net = EfficientNet(setting, dropout, stochastic_depth_prob=stochastic_depth, num_classes=num_outputs)
    body = net.features[:-1]  # the stem and the seven stages; not the 1x1 convolution to 1280 channels
    stem = body[0][0]
    body[0][0] = _stem_conv(in_channels, stem.out_channels, stem_stride)
    return _feature_net(body, setting[-1].out_channels, num_outputs, dropout)


# -- ShuffleNetV2 ---------------------------------------------------------------------


@NETWORKS.register("shufflenet_v2_cifar")
def build_shufflenet_v2_cifar(
    input_shape: tuple[int, ...], num_outputs: int, width_mult: float = 0.5, dropout: float = 0.0,
    stem_stride: int = 1,
) -> FeatureNet:
    """ShuffleNetV2 0.5x for 32x32 inputs (Table 3: 11.42 MFLOPs, 0.35 M parameters).

    torchvision's ``ShuffleNetV2`` (its blocks, stage repeats 4/8/4 and channels) with a
    stride-1 stem and no max-pool, so the three stages see 16 -> 8 -> 4 (total stride 8,
    not 32). Width 0.5x is the one with Table 3's 0.35 M parameters (1.0x has 1.27 M).
    10.9 MFLOPs, 0.352 M parameters.

    Args:
        input_shape: ``(C, H, W)``.
        num_outputs: classes.
        width_mult: 0.5, 1.0, 1.5 or 2.0 (torchvision's widths).
        dropout: before the head (the paper's network has none).
        stem_stride: 1 for 32x32 inputs; 2 for inputs twice that size.

    Returns:
        A FeatureNet with ``feature_dim`` 1024 (2048 at width 2.0).

    Raises:
        ValueError: another width, a shape that is not ``(C, H, W)``, a bad stride or
            dropout.
    """
    from torchvision.models import ShuffleNetV2

    in_channels = _image_channels("shufflenet_v2_cifar", input_shape, stem_stride)
    channels = _SHUFFLENET_V2_CHANNELS.get(float(width_mult))
    if channels is None:
        raise ValueError(f"shufflenet_v2_cifar: width_mult must be one of {sorted(_SHUFFLENET_V2_CHANNELS)}, "
                         f"got {width_mult}")
    net = ShuffleNetV2([4, 8, 4], channels, num_classes=num_outputs)
    net.conv1[0] = _stem_conv(in_channels, channels[0], stem_stride)
    body = nn.Sequential(net.conv1, net.stage2, net.stage3, net.stage4, net.conv5)  # no max-pool
    return _feature_net(body, channels[-1], num_outputs, dropout)


# -- ResNet ---------------------------------------------------------------------------


def _resnet_cifar(
    name: str, input_shape: tuple[int, ...], num_outputs: int, bottleneck: bool, blocks: Sequence[int],
    width: int, dropout: float, stem_stride: int, zero_init_residual: bool,
) -> FeatureNet:
    """A ResNet of torchvision's ``BasicBlock`` / ``Bottleneck`` (stride on the 3x3
    convolution, "v1.5") with a 3x3 stride-1 stem and no max-pool: four stages of
    ``width`` x 1, 2, 4, 8 channels (times 4 for bottlenecks) at strides 1, 2, 2, 2."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

    in_channels = _image_channels(name, input_shape, stem_stride)
    if width < 1:
        raise ValueError(f"{name}: width must be at least 1, got {width}")
    # ``planes`` is what ``width`` scales; the blocks' own ``base_width`` (a Wide-ResNet
    # knob that BasicBlock refuses) stays at its default
    block = Bottleneck if bottleneck else BasicBlock
    layers: list[nn.Module] = [_stem_conv(in_channels, width, stem_stride), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    inplanes = width
    for i, n in enumerate(blocks):
        planes, stride = width * 2**i, (1 if i == 0 else 2)
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        stage = [block(inplanes, planes, stride, downsample)]
        inplanes = planes * block.expansion
        stage += [block(inplanes, planes) for _ in range(n - 1)]
        layers.append(nn.Sequential(*stage))
    body = nn.Sequential(*layers)
    for m in body.modules():  # torchvision's ResNet initialization
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif zero_init_residual and isinstance(m, (BasicBlock, Bottleneck)):
            nn.init.zeros_(m.bn3.weight if isinstance(m, Bottleneck) else m.bn2.weight)
    return _feature_net(body, inplanes, num_outputs, dropout)


@NETWORKS.register("resnet18_cifar")
def build_resnet18_cifar(
    input_shape: tuple[int, ...], num_outputs: int, width: int = 64, dropout: float = 0.0, stem_stride: int = 1,
    zero_init_residual: bool = False,
) -> FeatureNet:
    """ResNet-18 for 32x32 inputs (not in Table 3; the usual CIFAR ResNet-18): basic
    blocks 2/2/2/2, a 3x3 stride-1 stem and no max-pool (feature maps 32 -> 16 -> 8 -> 4).
    555.4 MFLOPs, 11.17 M parameters.

    Args:
        input_shape: ``(C, H, W)``.
        num_outputs: classes.
        width: the first stage's channels (64); the stages have 1, 2, 4, 8 times it, so
            cost scales as its square (``width=16``: 35 MFLOPs, 0.70 M parameters).
        dropout: before the head.
        stem_stride: 1 for 32x32 inputs; 2 for inputs twice that size.
        zero_init_residual: start each block's last batch norm at zero, so every block
            starts as the identity (torchvision's option; helps large-batch training).

    Returns:
        A FeatureNet with ``feature_dim`` ``8 * width``.

    Raises:
        ValueError: a shape that is not ``(C, H, W)``, a bad width, stride or dropout.
    """
    return _resnet_cifar("resnet18_cifar", input_shape, num_outputs, False, (2, 2, 2, 2), width, dropout,
                         stem_stride, zero_init_residual)


@NETWORKS.register("resnet101_cifar")
def build_resnet101_cifar(
    input_shape: tuple[int, ...], num_outputs: int, width: int = 64, dropout: float = 0.0, stem_stride: int = 1,
    zero_init_residual: bool = False,
) -> FeatureNet:
    """ResNet-101 for 32x32 inputs (the paper's big network; Table 3: 2520.29 MFLOPs,
    42.52 M parameters): bottleneck blocks 3/4/23/3, a 3x3 stride-1 stem and no max-pool
    (feature maps 32 -> 16 -> 8 -> 4). 2510.0 MFLOPs, 42.51 M parameters.

    Args:
        input_shape: ``(C, H, W)``.
        num_outputs: classes.
        width: the first stage's bottleneck channels (64); the stages have 1, 2, 4, 8
            times it, and 4 times that at their outputs.
        dropout: before the head.
        stem_stride: 1 for 32x32 inputs; 2 for inputs twice that size.
        zero_init_residual: start each block's last batch norm at zero (torchvision's
            option).

    Returns:
        A FeatureNet with ``feature_dim`` ``32 * width``.

    Raises:
        ValueError: a shape that is not ``(C, H, W)``, a bad width, stride or dropout.
    """
    return _resnet_cifar("resnet101_cifar", input_shape, num_outputs, True, (3, 4, 23, 3), width, dropout,
                         stem_stride, zero_init_residual)
