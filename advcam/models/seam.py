"""SEAM (Wang et al., CVPR 2020): a CAM network with a pixel correlation module (PCM).

The network is :class:`~advcam.models.classifier.CAMNet` (same backbones, same frozen stages and BatchNorm
handling, bias-free 1x1 ``classifier``) plus the PCM of the reference (``YudeWang/SEAM``,
``network/resnet38_SEAM.py``):

1. the raw CAM is turned into the PCM input (:func:`pcm_input`): ReLU, each map divided by its maximum
   (+1e-5), a background map ``1 - max_c`` prepended, and every foreground map zeroed where it is not the
   per-pixel maximum over the foreground classes;
2. the PCM features are the image resized to the CAM resolution and two backbone stages (``layer2`` and
   ``layer3``: 512 and 1024 channels on ResNet-50, as the reference's conv4/conv5 of ResNet-38), each
   projected by a bias-free 1x1 conv (to 64 and 128 channels) and a ReLU, concatenated with the image and
   embedded by another 1x1 conv (195 -> 192 channels);
3. :func:`pixel_affinity`: cosine similarity of the L2-normalised embeddings, negatives clipped to zero,
   each row divided by its sum (+1e-5);
4. :func:`pcm_refine`: every output pixel is the affinity-weighted average of the PCM input.

``cam(x)`` returns the PCM-refined foreground maps when ``use_pcm`` is on (the reference infers through the
PCM), else the raw CAM. ``use_pcm`` is saved in the state dict (as extra state), so it survives
``load_classifier``. ``forward(x)`` returns the GAP logits as ``CAMNet`` does.

On ``resnet38`` (the reference's backbone) the PCM stages are the reference's: the pre-activations of ``b5`` and
``b6`` (``conv4``, ``conv5``; :meth:`advcam.models.resnet38.ResNet38.forward_stages`), all at stride 8, and SEAM's
trained ``resnet38_SEAM.pth`` loads (:mod:`advcam.models.trained`).

Deviations from the reference, by design:

- on IRN's ResNet-50 (or the small CPU ResNet) the PCM stages are ``layer2``/``layer3``; on ResNet-50 ``layer2``
  is at stride 8 and is resized (bilinear) to the stride-16 CAM grid before the projection;
- no background channel in the classifier: the reference's ``fc8`` has 21 outputs but its background map
  is always replaced by ``1 - max`` (foreground) and never receives a gradient;
- ``Dropout2d`` before the classifier in training is ``dropout`` (0.5, the reference's ``dropout7``; set by
  the trainer from ``classifier.seam.dropout``; never active in eval mode, so inference and climbing are
  unaffected);
- ``cam(x)`` keeps the autograd graph through the PCM input and the features (the reference computes the
  PCM input under ``no_grad`` and detaches the stage features, which only matters in training:
  :meth:`SEAMNet.seam_forward` with ``detach=True`` does that), so adversarial climbing gets input gradients.
"""
from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from advcam.models.classifier import Backbone, CAMNet, build_classifier

EPS = 1e-5
PROJ_CHANNELS = (64, 128)  # reference f8_3 (conv4 -> 64), f8_4 (conv5 -> 128)
EMBED_CHANNELS = 192  # reference f9: (3 + 64 + 128) -> 192


def pcm_input(cam: torch.Tensor) -> torch.Tensor:
    """The PCM input ``(B, 1 + C, h, w)`` from raw class maps ``(B, C, h, w)`` (reference ``cam_d_norm``).

    Maps are ReLU'd and divided by their maximum + 1e-5; channel 0 is the background ``1 - max_c``; a
    foreground map is zeroed where it is below the per-pixel maximum of the foreground maps.
    """
    cam = F.relu(cam)
    peak = cam.flatten(2).amax(-1)[..., None, None] + EPS
    norm = F.relu(cam - EPS) / peak
    top = norm.amax(1, keepdim=True)
    fg = torch.where(norm < top, torch.zeros_like(norm), norm)
    return torch.cat([1.0 - top, fg], dim=1)


def pixel_affinity(f: torch.Tensor) -> torch.Tensor:
    """Row-normalised affinities ``(B, hw, hw)`` of embeddings ``(B, D, h, w)``.

    ``A[j, i] = relu(cos(f_j, f_i)) / (sum_i relu(cos(f_j, f_i)) + 1e-5)``; the cosine is symmetric, so this
    equals the reference's column normalisation of ``relu(f^T f)``.
    """
    f = f.flatten(2)
    f = f / (f.norm(dim=1, keepdim=True) + EPS)
    aff = F.relu(torch.bmm(f.transpose(1, 2), f))
    return aff / (aff.sum(-1, keepdim=True) + EPS)


def pcm_refine(cam: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Refine maps ``(B, K, h, w)`` with the affinities of embeddings ``(B, D, h, w)``: ``out_j = sum_i A[j, i] cam_i``."""
    b, k, h, w = cam.shape
    if tuple(f.shape[-2:]) != (h, w):
        cam = F.interpolate(cam, size=f.shape[-2:], mode="bilinear", align_corners=True)
        h, w = f.shape[-2:]
    out = torch.bmm(cam.flatten(2), pixel_affinity(f).transpose(1, 2))
    return out.view(b, k, h, w)


class SEAMNet(CAMNet):
    """CAMNet + pixel correlation module; ``cam(x)`` is PCM-refined when ``use_pcm``."""

    method = "seam"

    def __init__(self, backbone: Backbone, num_classes: int, arch: str, frozen_bn: bool,
                 use_pcm: bool = True) -> None:
        super().__init__(backbone, num_classes, arch, frozen_bn)
        self.use_pcm = bool(use_pcm)
        self.dropout = 0.0  # training-only Dropout2d before the classifier (set by advcam.train.seam)
        widths = backbone.mid_channels  # the two stages the PCM reads
        self.pcm_proj2 = nn.Conv2d(widths[0], PROJ_CHANNELS[0], 1, bias=False)
        self.pcm_proj3 = nn.Conv2d(widths[1], PROJ_CHANNELS[1], 1, bias=False)
        self.pcm_embed = nn.Conv2d(3 + sum(PROJ_CHANNELS), EMBED_CHANNELS, 1, bias=False)
        # the reference's initialisation of fc8, f8_3, f8_4, f9
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.kaiming_normal_(self.pcm_proj2.weight)
        nn.init.kaiming_normal_(self.pcm_proj3.weight)
        nn.init.xavier_uniform_(self.pcm_embed.weight, gain=4)

    # -- the PCM flag travels in the state dict (a tensor, so weights_only loading accepts it)
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.use_pcm)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.use_pcm = bool(state)

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the two PCM stages, the last stage): (layer2, layer3, layer4) outputs; ResNet-38's (conv4, conv5, conv6)."""
        return cast(Backbone, self.backbone).forward_stages(x)

    def pcm_features(self, x: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, 192, h, w)`` of the image and two stages at the CAM resolution ``x3.shape[-2:]``."""
        size = x3.shape[-2:]
        if x2.shape[-2:] != size:
            x2 = F.interpolate(x2, size=size, mode="bilinear", align_corners=True)
        small = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        f = torch.cat([small, F.relu(self.pcm_proj2(x2)), F.relu(self.pcm_proj3(x3))], dim=1)
        return self.pcm_embed(f)

    def seam_forward(self, x: torch.Tensor, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw CAM ``(B, C, h, w)``, PCM output ``(B, 1 + C, h, w)`` with background first).

        ``detach=True`` is the reference's training path: no gradient from the PCM into the CAM or the backbone
        (only the projections and the embedding learn from the PCM output).
        """
        x2, x3, x4 = self.stages(x)
        if self.dropout > 0:
            x4 = F.dropout2d(x4, self.dropout, training=self.training)
        cam = F.conv2d(x4, self.classifier.weight)
        src = cam.detach() if detach else cam
        if detach:
            x2, x3 = x2.detach(), x3.detach()
        refined = pcm_refine(pcm_input(src), self.pcm_features(x, x2, x3))
        return cam, refined

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """Foreground maps ``(B, C, h, w)``: PCM-refined when ``use_pcm`` (non-negative), else the raw CAM."""
        if not self.use_pcm:
            return super().cam(x)
        return self.seam_forward(x)[1][:, 1:]

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, new layers): the classifier and the PCM layers get 10x the lr."""
        head = [*self.classifier.parameters(), *self.pcm_proj2.parameters(), *self.pcm_proj3.parameters(),
                *self.pcm_embed.parameters()]
        return [p for p in self.backbone.parameters() if p.requires_grad], head


def build_seam(arch: str, num_classes: int, pretrained: str | Path | None = None) -> SEAMNet:
    """A fresh SEAM network on the backbone ``build_classifier`` makes for ``arch`` (same frozen stages)."""
    base = build_classifier(arch, num_classes, pretrained)
    return SEAMNet(base.backbone, num_classes, arch, frozen_bn=base.frozen_bn)


__all__ = ["SEAMNet", "build_seam", "pcm_input", "pixel_affinity", "pcm_refine"]
