"""IRN's class-boundary map and its path affinities (Ahn, Cho, Kwak, CVPR 2019), the refinement AdvCAM reports.

Network. :class:`BoundaryNet` is the class-boundary branch of IRN's ``net/resnet50_irn.py``: the stem and the four
stages of a ResNet each feed a 1x1 conv (32 channels, no bias) + GroupNorm(4, 32), the three deeper ones upsampled
(bilinear) to the stem's stride-4 grid, then a ReLU; the five maps are cropped to the grid, concatenated (160
channels) and a 1x1 conv with bias gives one boundary logit per stride-4 pixel. On IRN's ResNet-50 (strides 2, 2, 2,
1) the upsampling factors are 2, 4 and 4, as IRN's. With ImageNet weights the backbone is frozen (IRN detaches its
features and keeps its BatchNorm statistics); from scratch (``resnet_small`` on the embedded dataset, where no
ImageNet weights exist) everything trains. IRN's displacement branch serves instance segmentation only: its
layers and loss share nothing trainable with the boundary branch, so it is left out.

Path affinities (IRN's ``PathIndex`` and ``edge_to_affinity``). For each offset ``d`` of
:func:`advcam.refine.affinity.offsets` the path is the grid points of the box spanned by ``0`` and ``d`` whose
distance to the line through them is below 1; the affinity of ``p`` and ``p + d`` is ``1 - max`` of the boundary
map over ``p + path``. A path point outside the grid counts as boundary 1 (IRN pads the map with 1), so such pairs
get affinity 0.

Training (IRN's ``train_irn.py``): the boundary probabilities' path affinities of pairs within radius 10 (IRN's
``PathIndex(radius=10)``) against the stride-4 CRF labels, with the pair labels and the loss of
:mod:`advcam.refine.affinity` (IRN's ``(bg / 2 + fg / 2 + neg) / 2``). Inference (IRN's ``EdgeDisplacement``): the
image and its flip padded to the training crop, and the boundary is ``sigmoid`` of the mean of their logits (the
flip's flipped back).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from advcam.models import resnet
from advcam.refine.affinity import (BackboneNet, affinity_backbone, affinity_labels, affinity_loss, check_grid,
                                    downsample_label, offsets, shifted, stage_channels)

HEAD_WIDTH = 32  # IRN's fc_edge1..5 outputs


def path(dy: int, dx: int) -> list[tuple[int, int]]:
    """IRN's path from ``(0, 0)`` to ``(dy, dx)``: the box's grid points nearer than 1 to the line, far end first."""
    length_sq = dy * dy + dx * dx
    points = [(y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
              if (dy * x - dx * y) ** 2 / length_sq < 1]
    return sorted(points, key=lambda p: -abs(p[0]) - abs(p[1]))


def path_affinity(edge: torch.Tensor, radius: int) -> torch.Tensor:
    """``1 - max`` of the boundary map over each pair's path: ``(B, h, w)`` -> ``(B, K, h, w)``, K =
    ``len(offsets(radius))``; entry ``[b, k, y, x]`` is the pair (``(y, x)``, ``(y, x) + offsets(radius)[k]``)."""
    maps = []
    for dy, dx in offsets(radius):
        along = torch.stack([shifted(edge, py, px, 1.0) for py, px in path(dy, dx)])
        maps.append(1 - along.amax(0))
    return torch.stack(maps, 1)


def _head(cin: int, factor: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, HEAD_WIDTH, 1, bias=False), nn.GroupNorm(4, HEAD_WIDTH)]
    if factor > 1:
        layers.append(nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


class BoundaryNet(BackboneNet):
    """ResNet stem + stages -> IRN's class-boundary logits ``(B, 1, ceil(H/4), ceil(W/4))``."""

    def __init__(self, backbone: resnet.ResNet, strides: Sequence[int], arch: str, frozen: bool) -> None:
        super().__init__(backbone, arch, frozen)
        s = list(strides)
        factors = [1, 1, s[1], s[1] * s[2], s[1] * s[2] * s[3]]  # each stage's stride over the stem's
        widths = [backbone.conv1.out_channels] + [stage_channels(m) for m in self.stages()]
        self.heads = nn.ModuleList(_head(c, f) for c, f in zip(widths, factors))
        self.edge = nn.Conv2d(HEAD_WIDTH * len(widths), 1, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        h, w = feats[0].shape[-2:]
        return self.edge(torch.cat([head(f)[..., :h, :w] for head, f in zip(self.heads, feats)], 1))


def build_boundary_net(arch: str, pretrained: str | Path | None = None) -> BoundaryNet:
    """IRN's boundary network on ``arch``; ``pretrained`` (a local torchvision weight file) freezes the backbone."""
    backbone, strides = affinity_backbone(arch, pretrained)
    return BoundaryNet(backbone, strides, arch, frozen=bool(pretrained))


def boundary(model: BoundaryNet, image: torch.Tensor, canvas: int = 0) -> torch.Tensor:
    """The boundary map ``(ceil(H/4), ceil(W/4))`` of a normalised image ``(3, H, W)``: IRN's ``EdgeDisplacement``.

    The image and its flip are padded with zeros at the bottom and right to ``canvas`` x ``canvas`` (IRN: its
    training crop, 512; a side already longer is left as it is, where IRN's padding would cut the image), the
    logits are cropped to the image's stride-4 grid, and the boundary is ``sigmoid`` of the mean of the image's
    logits and its flip's, flipped back."""
    h, w = image.shape[-2:]
    pair = torch.stack([image, image.flip(-1)])
    pair = F.pad(pair, (0, max(0, canvas - w), 0, max(0, canvas - h)))
    logits = model(pair)[:, 0, : (h + 3) // 4, : (w + 3) // 4]
    return torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)


def grid_loss(logits: torch.Tensor, label: torch.Tensor, radius: int) -> torch.Tensor:
    """IRN's affinity loss of boundary logits ``(B, 1, h, w)`` against stride-4 labels ``(B, h, w)``."""
    check_grid(logits, label)
    loss, _ = affinity_loss(path_affinity(torch.sigmoid(logits[:, 0]), radius), *affinity_labels(label, radius))
    return loss


def batch_loss(model: nn.Module, batch: Mapping[str, Any], radius: int) -> torch.Tensor:
    """Loss of one ``{"image", "mask"}`` batch (full-resolution CRF labels, 255 = unsure; the stride-4 grid)."""
    device = next(model.parameters()).device
    return grid_loss(model(batch["image"].to(device)), downsample_label(batch["mask"].to(device)), radius)


__all__ = ["path", "path_affinity", "BoundaryNet", "build_boundary_net", "boundary", "grid_loss", "batch_loss"]
