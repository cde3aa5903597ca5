"""ResNet-38 ("wider or deeper", Wu et al. 2016): the backbone of PSA and SEAM, with their parameter names.

The network reads as PSA's / SEAM's ``network/resnet38d.py`` so that their weight files load as they are:
the ImageNet weights converted from MXNet, PSA's ``resnet38_cls.pth`` and SEAM's ``resnet38_SEAM.pth``. It is
a pre-activation ResNet: every block starts with BatchNorm + ReLU of its input, and the last block's output goes
through ``bn7`` + ReLU.

==========  ==================================  =======  ========  ===========
stage       blocks                               width    stride    dilation
==========  ==================================  =======  ========  ===========
conv1a      3x3 conv                             64       1         1
b2          3 x ``PreActBlock``                  128      2         1
b3          3 x ``PreActBlock``                  256      4         1
b4          6 x ``PreActBlock``                  512      8         1
b5          3 x ``PreActBlock`` (mid 512)        1024     8         2 (the first block's first conv: 1)
b6          ``PreActBottleneck``, dropout 0.3    2048     8         4
b7          ``PreActBottleneck``, dropout 0.5    4096     8         4
bn7         BatchNorm + ReLU                     4096
==========  ==================================  =======  ========  ===========

Output stride 8, 4096 output channels. :meth:`ResNet38.forward_stages` also returns the pre-activations of
``b5`` and ``b6`` (the reference's ``conv4``, 512 channels, and ``conv5``, 1024 channels): SEAM's pixel correlation
module reads them.

The weights in the references are used with every BatchNorm frozen (statistics and affine parameters) and
``conv1a``, ``b2``, ``b2_1``, ``b2_2`` frozen (``not_training``); :func:`freeze_reference_layers` does that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# PSA's and SEAM's ``not_training`` layers (plus every BatchNorm, which they freeze as well)
FROZEN_MODULES = ("conv1a", "b2", "b2_1", "b2_2")
# keys of the reference's weight files that are not the backbone's: the ImageNet head, the CAM classifier, the PCM,
# the AffinityNet's heads
HEAD_PREFIXES = ("fc.", "linear1000", "fc8.", "f8_3.", "f8_4.", "f8_5.", "f9.")


def _bn_relu(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    return F.relu(bn(x))


class PreActBlock(nn.Module):
    """BN-ReLU, 3x3 conv (strided, ``first_dilation``), BN-ReLU, 3x3 conv (``dilation``), plus the shortcut.

    The shortcut is the input itself when the shape is kept, else a strided 1x1 conv of the pre-activation
    (``conv_branch1``)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 first_dilation: int | None = None, dilation: int = 1) -> None:
        super().__init__()
        first = dilation if first_dilation is None else first_dilation
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first, dilation=first,
                                       bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the block's pre-activation BN-ReLU(x))."""
        pre = _bn_relu(self.bn_branch2a, x)
        shortcut = x if self.same_shape else self.conv_branch1(pre)
        out = self.conv_branch2b1(_bn_relu(self.bn_branch2b1, self.conv_branch2a(pre)))
        return shortcut + out, pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_preact(x)[0]


class PreActBottleneck(nn.Module):
    """BN-ReLU, 1x1 conv to out/4, BN-ReLU, dropout, 3x3 conv to out/2 (``dilation``), BN-ReLU, dropout, 1x1 conv
    to out, plus a 1x1 conv shortcut of the pre-activation (always present, as in the reference)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the block's pre-activation BN-ReLU(x))."""
        pre = _bn_relu(self.bn_branch2a, x)
        out = self.dropout_2b1(_bn_relu(self.bn_branch2b1, self.conv_branch2a(pre)))
        out = self.dropout_2b2(_bn_relu(self.bn_branch2b2, self.conv_branch2b1(out)))
        return self.conv_branch1(pre) + self.conv_branch2b2(out), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_preact(x)[0]


class ResNet38(nn.Module):
    """ResNet-38 with PSA's / SEAM's names; ``forward`` returns ReLU(bn7(b7(...))), ``(B, 4096, H/8, W/8)``."""

    out_channels = 4096
    output_stride = 8
    mid_channels = (512, 1024)  # the pre-activations of b5 and b6 (the reference's conv4, conv5)
    ignored_weight_prefixes = HEAD_PREFIXES

    def __init__(self) -> None:
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = PreActBlock(64, 128, 128, stride=2)
        self.b2_1 = PreActBlock(128, 128, 128)
        self.b2_2 = PreActBlock(128, 128, 128)
        self.b3 = PreActBlock(128, 256, 256, stride=2)
        self.b3_1 = PreActBlock(256, 256, 256)
        self.b3_2 = PreActBlock(256, 256, 256)
        self.b4 = PreActBlock(256, 512, 512, stride=2)
        self.b4_1 = PreActBlock(512, 512, 512)
        self.b4_2 = PreActBlock(512, 512, 512)
        self.b4_3 = PreActBlock(512, 512, 512)
        self.b4_4 = PreActBlock(512, 512, 512)
        self.b4_5 = PreActBlock(512, 512, 512)
        self.b5 = PreActBlock(512, 512, 1024, first_dilation=1, dilation=2)
        self.b5_1 = PreActBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = PreActBlock(1024, 512, 1024, dilation=2)
        self.b6 = PreActBottleneck(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = PreActBottleneck(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(``conv4``: b5's pre-activation, ``conv5``: b6's pre-activation, the output), all at stride 8."""
        x = self.conv1a(x)
        for name in ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"):
            x = getattr(self, name)(x)
        x, conv4 = self.b5.forward_preact(x)
        x = self.b5_2(self.b5_1(x))
        x, conv5 = self.b6.forward_preact(x)
        return conv4, conv5, _bn_relu(self.bn7, self.b7(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[2]


def freeze_reference_layers(backbone: ResNet38) -> None:
    """Freeze what PSA and SEAM never train: ``conv1a``, ``b2``, ``b2_1``, ``b2_2`` and the affine parameters of
    every BatchNorm (their statistics are frozen by the owning network's ``frozen_bn``)."""
    for name in FROZEN_MODULES:
        getattr(backbone, name).requires_grad_(False)
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(False)


def resnet38() -> ResNet38:
    """ResNet-38 with PyTorch's default initialisation (the references always start from ImageNet weights)."""
    return ResNet38()


__all__ = ["ResNet38", "PreActBlock", "PreActBottleneck", "resnet38", "freeze_reference_layers", "FROZEN_MODULES",
           "HEAD_PREFIXES"]
