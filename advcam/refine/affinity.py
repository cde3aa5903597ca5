"""Inter-pixel affinities learned from confident CRF labels (AffinityNet / IRN), at stride 4.

Labels. A CRF pseudo label (0 = background, 1..C, 255 = unsure) is reduced to the stride-4 grid (nearest,
the pixel ``4i + 2`` as IRN's ``pil_rescale(label, 0.25, 0)``). Every pixel is paired with its neighbours at
the offsets of :func:`offsets` (IRN's search directions: one half-plane of the disc ``dy^2 + dx^2 < r^2``,
so each unordered pair appears once). As in IRN (``PathIndex``) and AffinityNet (``ExtractAffinityLabelInRadius``),
only the pixels of ``label[:-(r-1), (r-1):-(r-1)]`` are the first pixel of a training pair, so every pair lies
inside the grid. A pair of two labelled pixels is *positive* when both labels agree (background-positive when both
are 0, foreground-positive otherwise) and *negative* when they differ; a pair touching an unsure (255) or padded
pixel is ignored (:func:`affinity_labels`).

Network. :class:`AffinityNet` = a ResNet from :mod:`advcam.models.resnet` whose four stages each feed a
1x1 conv + GroupNorm + ReLU; the four maps are resized to the layer-1 (stride-4) grid, concatenated and
projected by a 1x1 conv to an embedding ``f``. The affinity of pixels i, j is ``exp(-mean_c |f_i - f_j|)``
(AffinityNet), in (0, 1]. With ImageNet weights (``pretrained``) the backbone is frozen, as IRN freezes its
backbone; from scratch (``resnet_small`` on the embedded dataset) everything trains.

Loss (AffinityNet / IRN): ``bg_pos / 4 + fg_pos / 4 + neg / 2``, each term the mean over its pairs of
``-log(a)`` (positives) or ``-log(1 - a)`` (negatives), with IRN's 1e-5 guards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from advcam.models import resnet
from advcam.models.classifier import freeze_batchnorm_stats
from advcam.utils.errors import AdvcamError

IGNORE = 255
AFFINITY_ARCHS = ("resnet50", "resnet_small")
EMBED_DIM = 64


def offsets(radius: int) -> list[tuple[int, int]]:
    """IRN's search directions for ``radius``: ``(0, 1..r-1)`` then ``dy = 1..r-1`` with ``dy^2+dx^2 < r^2``."""
    if radius < 1:
        raise ValueError(f"offsets: radius must be >= 1, got {radius}")
    out = [(0, dx) for dx in range(1, radius)]
    out += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dx * dx + dy * dy < radius ** 2]
    return out


def shifted(x: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """``x[..., y + dy, x + dx]`` at every ``(y, x)`` of the last two dims; ``fill`` outside the grid."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    ys, yd = slice(0, max(h - dy, 0)), slice(dy, h)
    xs, xd = (slice(0, max(w - dx, 0)), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, max(w + dx, 0)))
    out[..., ys, xs] = x[..., yd, xd]
    return out


def downsample_label(label: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` labels -> ``(B, ceil(H/4), ceil(W/4))``, nearest (pixel ``4i + 2``; 255 past the edge)."""
    h, w = label.shape[-2:]
    padded = F.pad(label, (0, (-w) % 4 + 4, 0, (-h) % 4 + 4), value=IGNORE)
    return padded[..., 2::4, 2::4][..., : (h + 3) // 4, : (w + 3) // 4]


def affinity_labels(label: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bg_pos, fg_pos, neg) bool masks ``(B, K, h, w)`` for a stride-4 label map ``(B, h, w)``.

    Entry ``[b, k, y, x]`` is the pair (``(y, x)``, ``(y, x) + offsets(radius)[k]``); only pixels with
    ``y < h - (r - 1)`` and ``r - 1 <= x < w - (r - 1)`` start pairs (IRN / AffinityNet: ``label[:-rf, rf:-rf]``)."""
    full = label.long()
    h, w = full.shape[-2:]
    rf = radius - 1
    src = torch.full_like(full, IGNORE)
    src[..., : max(h - rf, 0), rf: max(w - rf, rf)] = full[..., : max(h - rf, 0), rf: max(w - rf, rf)]
    bg, fg, neg = [], [], []
    for dy, dx in offsets(radius):
        dst = shifted(full, dy, dx, IGNORE)
        valid = (src != IGNORE) & (dst != IGNORE)
        same = (src == dst) & valid
        bg.append(same & (src == 0))
        fg.append(same & (src != 0))
        neg.append(valid & (src != dst))
    return torch.stack(bg, 1), torch.stack(fg, 1), torch.stack(neg, 1)


def pairwise_affinity(emb: torch.Tensor, radius: int) -> torch.Tensor:
    """``exp(-mean_c |f_i - f_j|)`` for every pair of :func:`offsets`: ``(B, E, h, w)`` -> ``(B, K, h, w)``.

    Pairs leaving the grid get 0 (the walk never uses them)."""
    maps = []
    for dy, dx in offsets(radius):
        other = shifted(emb, dy, dx, 0.0)
        aff = torch.exp(-(emb - other).abs().mean(1))
        maps.append(shifted(torch.ones_like(aff), dy, dx, 0.0) * aff)
    return torch.stack(maps, 1)


def affinity_loss(aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """AffinityNet/IRN loss ``bg/4 + fg/4 + neg/2`` and its three terms (for logging)."""
    def term(mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        m = mask.float()
        return (m * value).sum() / (m.sum() + 1e-5)

    bg = term(bg_pos, -torch.log(aff + 1e-5))
    fg = term(fg_pos, -torch.log(aff + 1e-5))
    ng = term(neg, -torch.log(1.0 + 1e-5 - aff))
    return bg / 4 + fg / 4 + ng / 2, {"bg_pos": bg.item(), "fg_pos": fg.item(), "neg": ng.item()}


def _head(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(min(4, cout), cout), nn.ReLU(inplace=True))


class BackboneNet(nn.Module):
    """A ResNet backbone that heads read: frozen (parameters and BatchNorm statistics) when it carries ImageNet weights,
    as IRN freezes its backbone. The affinity and the boundary networks put their heads on it."""

    def __init__(self, backbone: resnet.ResNet, arch: str, frozen: bool) -> None:
        super().__init__()
        self.arch, self.frozen = arch, frozen
        self.backbone = backbone
        if frozen:
            backbone.requires_grad_(False)
            freeze_batchnorm_stats(backbone)

    def stages(self) -> list[nn.Module]:
        b = self.backbone
        return [b.layer1, b.layer2, b.layer3, b.layer4]

    def train(self, mode: bool = True) -> "BackboneNet":
        super().train(mode)
        if self.frozen:
            freeze_batchnorm_stats(self.backbone)
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem's output (stride 4) and the four stages'."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = [self.backbone.stem(x)]
            for stage in self.stages():
                feats.append(stage(feats[-1]))
        return feats

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, head parameters)."""
        heads = [p for name, p in self.named_parameters() if not name.startswith("backbone.")]
        return [p for p in self.backbone.parameters() if p.requires_grad], heads


class AffinityNet(BackboneNet):
    """ResNet stages -> per-stage 1x1 heads at stride 4 -> embedding ``(B, EMBED_DIM, ceil(H/4), ceil(W/4))``."""

    def __init__(self, backbone: resnet.ResNet, arch: str, frozen: bool) -> None:
        super().__init__(backbone, arch, frozen)
        widths = [stage_channels(m) for m in self.stages()]
        heads = [min(256, max(32, c // 2)) for c in widths]
        self.heads = nn.ModuleList(_head(c, d) for c, d in zip(widths, heads))
        self.embed = nn.Conv2d(sum(heads), EMBED_DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)[1:]
        size = feats[0].shape[-2:]
        maps = [h(f) for h, f in zip(self.heads, feats)]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]
        return self.embed(torch.cat(maps, 1))


def stage_channels(stage: nn.Module) -> int:
    """The output channels of a ResNet stage."""
    last = list(stage.children())[-1]
    name = "conv3" if hasattr(last, "conv3") else "conv2"  # Bottleneck or BasicBlock
    return int(cast(nn.Conv2d, last.get_submodule(name)).out_channels)


def affinity_source(classifier: Mapping[str, Any], randomwalk: Mapping[str, Any]) -> tuple[str, str | None]:
    """(arch, pretrained weight file) of the affinity network, from the params sections (Config or dict):
    ``refine.randomwalk.arch`` (null: the classifier's) and ``refine.randomwalk.pretrained`` (null:
    ``classifier.pretrained`` while the arch is the classifier's). Refuses an arch the affinity network has no
    variant for (a ResNet-38 classifier's, left to null)."""
    arch = str(randomwalk.get("arch") or classifier["arch"])
    if arch not in AFFINITY_ARCHS:
        raise AdvcamError(f"refine.method randomwalk: the affinity network has no {arch} variant (it has "
                          f"{', '.join(AFFINITY_ARCHS)}, IRN's design): set refine.randomwalk.arch=resnet50 (and "
                          "refine.randomwalk.pretrained), or take a trained one (refine.randomwalk.trained: IRN's "
                          "res50_irn.pth), or refine.randomwalk.design=psa (PSA's AffinityNet on "
                          "ResNet-38, taken or trained), or use refine.method crf")
    pretrained = randomwalk.get("pretrained") or (classifier.get("pretrained") if arch == classifier["arch"] else None)
    return arch, (str(pretrained) if pretrained else None)


def build_affinity_net(arch: str, pretrained: str | Path | None = None) -> AffinityNet:
    """An affinity network on ``arch`` (the classifier's arch; strides give a stride-4 layer1).

    ``pretrained``: a local torchvision weight file; the backbone is then frozen (IRN)."""
    backbone, _ = affinity_backbone(arch, pretrained)
    return AffinityNet(backbone, arch, frozen=bool(pretrained))


def affinity_backbone(arch: str, pretrained: str | Path | None = None) -> tuple[resnet.ResNet, tuple[int, ...]]:
    """(backbone, its strides) of the affinity networks on ``arch``: IRN's ResNet-50 with strides (2, 2, 2, 1), or
    the small ResNet at output stride 8; ``pretrained``: a local torchvision weight file, loaded."""
    if arch not in AFFINITY_ARCHS:
        raise AdvcamError(f"affinity network: arch {arch!r} unknown (choose from {', '.join(AFFINITY_ARCHS)})")
    strides = (2, 2, 2, 1) if arch == "resnet50" else (2, 2, 1, 1)
    backbone = resnet.resnet50(strides=strides) if arch == "resnet50" else resnet.resnet_small(strides, (1, 1, 2, 4))
    if pretrained:
        resnet.load_torchvision_weights(backbone, pretrained)
    return backbone, strides


def check_grid(out: torch.Tensor, label: torch.Tensor) -> None:
    """Refuse a network output whose grid is not the label grid of the crop."""
    if label.shape[-2:] != out.shape[-2:]:
        raise AdvcamError(f"affinity network: output grid {tuple(out.shape[-2:])} is not the label grid "
                          f"{tuple(label.shape[-2:])} of the crop")


def grid_loss(emb: torch.Tensor, label: torch.Tensor, radius: int) -> torch.Tensor:
    """The affinity loss of embeddings ``(B, E, h, w)`` against labels ``(B, h, w)`` on the same grid."""
    check_grid(emb, label)
    loss, _ = affinity_loss(pairwise_affinity(emb, radius), *affinity_labels(label, radius))
    return loss


def batch_loss(model: nn.Module, batch: Mapping[str, Any], radius: int) -> torch.Tensor:
    """Loss of one ``{"image", "mask"}`` batch (full-resolution CRF labels, 255 = unsure; the stride-4 grid)."""
    device = next(model.parameters()).device
    return grid_loss(model(batch["image"].to(device)), downsample_label(batch["mask"].to(device)), radius)


__all__: Sequence[str] = ["offsets", "shifted", "downsample_label", "affinity_labels", "pairwise_affinity",
                          "affinity_loss", "BackboneNet", "AffinityNet", "build_affinity_net", "affinity_backbone",
                          "stage_channels", "check_grid", "affinity_source", "grid_loss", "batch_loss"]
