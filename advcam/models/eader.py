"""EADER (Stammes et al., 2021, "Find it if you can"): a localiser and an adversary, trained end to end.

The localiser is a plain :class:`~advcam.models.classifier.CAMNet`. Its attention map of a positive class
drives a soft mask that erases the class from the image; the adversary, a second CAM network with its own
weights, tries to recognise the image's classes on the erased images, and the localiser learns to make its
maps cover enough of the object that the adversary fails (training: :mod:`advcam.train.eader`).

Attention map. The reference uses Grad-CAM on the last stage, ReLU'd, bilinearly upsampled to the image and
min-max normalised. With GAP + a 1x1 classifier, the Grad-CAM channel weights (the spatial mean of
d logit_c / d features) are ``W_c / (h w)``, a positive multiple of the classifier row, and a hook-captured
gradient carries no graph; min-max normalisation removes the positive scale. So Grad-CAM here is *exactly*
``minmax(upsample(ReLU(conv2d(features, W_c.detach()))))``, computed by :func:`attention_maps` without the
extra backward (the classifier weight is detached as in the reference: the attention terms train the
features only).

:class:`EADERNet` keeps the CAMNet interface (``features``, ``classifier``, ``cam``, ``forward``,
``num_classes``, ``arch``), all delegated to the localiser, so CAM/AdvCAM inference runs on it unchanged.
The adversary is a submodule: its weights are part of the state dict and therefore of the checkpoint
(about twice the size of a CAM checkpoint; inference ignores them, continued training and inspection
need them). With ``share_weights`` (the reference's ``--share_weights``) there is no separate adversary:
the localiser itself plays the adversary, and :meth:`EADERNet.load_state_dict` accepts a state dict without
``adversary.*`` keys by dropping the adversary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from advcam.models.classifier import CAMNet, build_classifier

ADVERSARY_PREFIX = "adversary."


class EADERNet(nn.Module):
    """Localiser (a CAMNet, used for inference) + adversary (a CAMNet with its own weights, or None)."""

    method = "eader"

    def __init__(self, localiser: CAMNet, adversary: CAMNet | None) -> None:
        super().__init__()
        self.localiser = localiser
        self.adversary = adversary
        self.arch = localiser.arch
        self.num_classes = localiser.num_classes

    # -- the CAMNet interface, delegated to the localiser -------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.localiser.backbone

    @property
    def classifier(self) -> nn.Conv2d:
        return self.localiser.classifier

    @property
    def output_stride(self) -> int:
        return int(getattr(self.localiser.backbone, "output_stride", 16))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.localiser.features(x)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        return self.localiser.cam(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.localiser(x)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The localiser's (backbone, classifier) groups (the adversary has its own optimiser)."""
        return self.localiser.param_groups()

    # -- EADER --------------------------------------------------------------------------------------------
    @property
    def shares_weights(self) -> bool:
        """True when the localiser plays its own adversary (no separate adversary weights)."""
        return self.adversary is None

    def adversary_net(self) -> CAMNet:
        """The network that classifies erased images: the adversary, or the localiser when weights are shared."""
        return self.localiser if self.adversary is None else self.adversary

    def drop_adversary(self) -> None:
        """Remove the separate adversary (weight sharing: the localiser plays the adversary)."""
        self.adversary = None

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As :meth:`nn.Module.load_state_dict`; a state dict without ``adversary.*`` keys (trained with
        ``share_weights``) drops this model's adversary instead of failing."""
        if self.adversary is not None and not any(k.startswith(ADVERSARY_PREFIX) for k in state_dict):
            self.drop_adversary()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build_eader(arch: str, num_classes: int, pretrained: str | Path | None = None,
                share_weights: bool = False) -> EADERNet:
    """A fresh EADER model: localiser and (unless ``share_weights``) adversary, both ``arch`` CAM networks
    (``pretrained`` backbone weights for both, as the reference starts both from ImageNet)."""
    localiser = build_classifier(arch, num_classes, pretrained)
    adversary = None if share_weights else build_classifier(arch, num_classes, pretrained)
    return EADERNet(localiser, adversary)


def attention_maps(features: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, classes: torch.Tensor,
                   size: tuple[int, int]) -> torch.Tensor:
    """The reference's Grad-CAM of each (image, class) pair, min-max normalised to [0, 1] at ``size``.

    ``features`` (B, K, h, w) with graph; ``weight`` the (C, K, 1, 1) classifier weight (detached here);
    ``rows``/``classes`` (P,) the pairs. Returns (P, H, W). A constant map (max = min) stays 0, as in the
    reference (division by 1 instead of 0).
    """
    if rows.numel() == 0:
        return features.new_zeros((0, int(size[0]), int(size[1])))
    w = weight.detach().flatten(1)[classes]  # (P, K)
    # index_select: its backward adds the gradients of repeated rows in order (the backward of features[rows]
    # adds them with parallel atomics on CPU, so results varied in the last bits from run to run under load)
    raw = torch.einsum("pkhw,pk->phw", features.index_select(0, rows), w)
    up = F.interpolate(F.relu(raw)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    flat = up.flatten(1)
    flat = flat - flat.amin(1, keepdim=True)
    top = flat.amax(1, keepdim=True)
    flat = flat / torch.where(top > 0, top, torch.ones_like(top))
    return flat.view_as(up)


def soft_mask(attention: torch.Tensor, omega: float = 100.0, sigma: float = 0.5) -> torch.Tensor:
    """``T(A) = sigmoid(omega (A - sigma))``: about 1 where the attention exceeds ``sigma``, 0 elsewhere."""
    return torch.sigmoid(omega * (attention - sigma))


def erase(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x (1 - mask)``: ``images`` (P, 3, H, W) normalised, ``mask`` (P, H, W) in [0, 1]."""
    return images * (1.0 - mask[:, None])


__all__ = ["EADERNet", "build_eader", "attention_maps", "soft_mask", "erase"]
