"""DeepLab-v2-style segmentation network: dilated ResNet backbone (output stride 8) + ASPP head.

The ASPP head is DeepLab-v2's: parallel 3x3 convolutions with different dilation rates, each mapping the
backbone features straight to the C+1 class scores, summed (no BN, no 1x1 branch, no image pooling: those are
DeepLab-v3). Weights N(0, 0.01), biases 0, as in DeepLab-v2. ``forward`` upsamples the logits bilinearly to the
input size.

- ``deeplab_resnet50`` / ``deeplab_resnet101``: ResNet-50/101, strides (2, 2, 1, 1), dilations (1, 1, 2, 4)
  -> output stride 8, ASPP rates (6, 12, 18, 24), BatchNorm frozen completely (statistics and affine
  parameters; DeepLab-v2 trains with frozen BN). Loads torchvision ImageNet weights for the backbone.
  ResNet-101 is the reference DeepLab-v2 backbone (the AdvCAM authors retrain it from ImageNet weights).
- ``deeplab_small``: the small ResNet (trainable BN, from scratch), output stride 8 (96 px -> 12x12), ASPP rates
  (2, 4, 6, 8): the reference rates scaled to the much smaller feature maps (a 321 px VOC crop gives 41x41
  maps at output stride 8; rate 24 there is about 0.6 of the map side, rate 8 here about 0.7 of 12).

Inference (:func:`multiscale_logits`) follows DeepLab-v2's MSC: the image is run at each scale (and, if
asked, flipped), every logit map is resized bilinearly to the image size, and the maps are fused by their
pixel-wise maximum (deeplab-pytorch: scales 1.0, 0.75, 0.5, no flip).

The ResNet-50/101 backbones dilate every block of layer3 / layer4 by 2 / 4, as deeplab-pytorch's ``_ResBlock``
(before 2026-12-01 their first blocks kept torchvision's convention, the previous dilation 1 / 2);
``deeplab_small`` is advcam's CPU network and keeps torchvision's convention (:func:`resnet.resnet_small`).

Deviations from deeplab-pytorch: the multi-scale max is
taken after resizing every scale to the image size (deeplab-pytorch: at the 1.0 scale's logit size, then one
resize); each scale's input size is ``round(H * s)`` and the resize goes by that size (deeplab-pytorch: a
``scale_factor`` resize, ``floor(H * s)`` with the factor's coordinates, which is not flip-equivariant where
``H * s`` is not whole); the backbone is torchvision's ResNet (stride on the 3x3 convolution) with ImageNet
weights, not the authors' Caffe-converted one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from advcam.models import resnet
from advcam.models.classifier import freeze_batchnorm_stats, load_model_checkpoint
from advcam.utils.errors import AdvcamError

SEGMENTER_ARCHS = ("deeplab_resnet50", "deeplab_resnet101", "deeplab_small")


class ASPP(nn.Module):
    """Sum of parallel dilated 3x3 convolutions, features -> class scores (DeepLab-v2)."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int]) -> None:
        super().__init__()
        convs = [nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates]
        for conv in convs:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        self.branches = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(dim=0)


class DeepLab(nn.Module):
    """``forward(x)`` -> (B, num_classes, H, W) logits at the input size (num_classes includes background)."""

    def __init__(self, backbone: resnet.ResNet, num_classes: int, rates: Sequence[int], arch: str,
                 frozen_bn: bool) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.frozen_bn = frozen_bn
        self.backbone = backbone
        self.aspp = ASPP(backbone.out_channels, num_classes, rates)
        if frozen_bn:
            for m in backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.requires_grad_(False)
            freeze_batchnorm_stats(self)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head's logits at the backbone's resolution (stride 8): what deeplab-pytorch's model returns."""
        return self.aspp(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.logits(x), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def train(self, mode: bool = True) -> "DeepLab":
        super().train(mode)
        if self.frozen_bn:
            freeze_batchnorm_stats(self)
        return self

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, head parameters): the head gets 10x the lr."""
        return ([p for p in self.backbone.parameters() if p.requires_grad], list(self.aspp.parameters()))

    def deeplab_param_groups(self) -> tuple[list[nn.Parameter], list[torch.Tensor], list[torch.Tensor]]:
        """DeepLab-v2's three groups: (backbone, ASPP weights, ASPP biases) at 1x, 10x and 20x the lr."""
        head = [cast(nn.Conv2d, b) for b in self.aspp.branches]
        return ([p for p in self.backbone.parameters() if p.requires_grad], [c.weight for c in head],
                [c.bias for c in head if c.bias is not None])


def build_segmenter(arch: str, num_classes_with_bg: int, pretrained: str | Path | None = None) -> DeepLab:
    """A fresh segmenter; ``pretrained`` = a local torchvision-format weight file for the backbone."""
    if arch == "deeplab_resnet50":
        backbone = resnet.resnet50(strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4), dilate_first_block=True)
        rates, frozen = (6, 12, 18, 24), True
    elif arch == "deeplab_resnet101":
        backbone = resnet.ResNet(resnet.Bottleneck, (3, 4, 23, 3), strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4),
                                 dilate_first_block=True)
        rates, frozen = (6, 12, 18, 24), True
    elif arch == "deeplab_small":
        backbone, rates, frozen = resnet.resnet_small(strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4)), (2, 4, 6, 8), False
    else:
        raise AdvcamError(f"segmenter arch {arch!r} unknown (choose from {', '.join(SEGMENTER_ARCHS)})")
    if pretrained:
        resnet.load_torchvision_weights(backbone, pretrained)
    return DeepLab(backbone, num_classes_with_bg, rates, arch, frozen_bn=frozen)


def load_segmenter(path: str | Path, map_location: str | torch.device = "cpu",
                   num_classes: int | None = None) -> DeepLab:
    """Load a segmenter written by ``advcam train-seg``, in eval mode. ``num_classes`` includes background."""
    model, header = load_model_checkpoint(path, "segmenter", build_segmenter, num_classes, map_location)
    model.header = header  # type: ignore[assignment]
    model.classes = list(header.get("classes") or [])  # type: ignore[assignment]
    return model  # type: ignore[return-value]


def segmenter_header(model: DeepLab, classes: list[str], params: dict) -> dict:
    """The JSON header of a segmenter checkpoint (``classes`` = foreground names; num_classes = C + 1)."""
    return {"kind": "segmenter", "arch": model.arch, "method": "deeplab", "classes": list(classes),
            "num_classes": model.num_classes, "params": dict(params)}


def multiscale_logits(model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,),
                      flip: bool = False) -> torch.Tensor:
    """Fused logits ``(K, H, W)`` of a normalised ``(3, H, W)`` image: pixel-wise max over the scales (and
    flips) of the logits, each resized bilinearly to ``(H, W)`` (DeepLab-v2 MSC). No gradients are kept.

    With ``scales=(1.0,)`` and ``flip=False`` this is ``model(image[None])[0]``. With ``flip=True`` the
    result is flip-equivariant: the logits of the flipped image are the flipped logits.
    """
    if not scales:
        raise ValueError("multiscale_logits: no scales given")
    size = image.shape[-2:]
    x = image[None]
    fused: torch.Tensor | None = None
    with torch.inference_mode():
        for scale in scales:
            xs = x if scale == 1.0 else F.interpolate(
                x, size=(max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), mode="bilinear",
                align_corners=False)
            out = model(torch.cat([xs, xs.flip(-1)]) if flip else xs).float()
            if out.shape[-2:] != size:
                out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
            out = torch.maximum(out[0], out[1].flip(-1)) if flip else out[0]
            fused = out if fused is None else torch.maximum(fused, out)
    assert fused is not None
    return fused
