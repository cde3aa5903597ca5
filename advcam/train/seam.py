"""SEAM training (reference ``YudeWang/SEAM``, ``train_SEAM.py``): two branches, ER, ECR, PCM.

Per batch of crops ``x`` (size ``H x W``) with multi-hot labels ``y`` (foreground) and ``y' = [1, y]``:

- branch 1 runs on ``x``, branch 2 on ``x2 = resize(x, floor(s H) x floor(s W))`` (bilinear, corners
  aligned; ``s = seam.downscale``, 0.3). Each gives the raw CAM and the PCM output, both resized to its
  input size (bilinear, corners aligned);
- cls  = mean over the branches of the multilabel soft-margin loss of the GAP of the branch's CAM;
- rvmin = mean over the branches of the reference's ``adaptive_min_pooling_loss`` on the PCM output
  (mean of the ReLU of the lowest quarter of ``max_c`` over the image's classes);
- maps are min-max normalised per channel (:func:`max_norm`) and multiplied by the labels; branch 1's are
  then resized to branch 2's size;
- er  = mean |CAM_1 - CAM_2| over the foreground channels (:func:`er_loss`);
- ecr = sum over the two directions of the mean of the hardest ``seam.ecr_top_fraction`` (0.2) entries of
  ``|onehot(CAM_other) - PCM_own|`` over the background + foreground channels, CAM with background
  ``1 - max_c`` and foreground zeroed off the per-pixel maximum, no gradient through it (:func:`ecr_loss`);
- total = cls + rvmin + er_weight * er + ecr_weight * ecr (the reference: weights 1, rvmin inside its cls).

The optimiser is SEAM's own: SGD with the poly schedule and 10x lr on the new layers (classifier and PCM), with
``classifier.seam``'s ``lr`` (0.01), ``weight_decay`` (5e-4) and ``momentum`` (5e-4: the reference's
PolyOptimizer passes its weight decay in SGD's momentum slot, as IRN's does), and ``Dropout2d(dropout = 0.5)``
before the classifier in training. Epochs, batch and crop stay the ``classifier`` section's (the reference: 8
epochs, batch 8, crop 448). The augmentation is ``classifier.seam.augmentation`` (:func:`dataset_options`):
the reference's (long side 1.0-1.71x the crop, flip, colour jitter with hue) or the CAM classifier's.
Deviation: weight decay applies to every trained parameter (the reference: weights only).

Deviations: the classification logits are the GAP of the upsampled CAM as in the reference, while the
model's ``forward`` pools at feature resolution (the interface's logits); see :mod:`advcam.models.seam` for
the network's deviations.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, cast

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from advcam.data.datasets import augmentation_options
from advcam.models.seam import SEAMNet
from advcam.train import loop
from advcam.utils import param
from advcam.utils.errors import AdvcamError
from advcam.utils.progress import log

EPS = 1e-5
DEFAULTS: dict[str, Any] = {"downscale": 0.3, "ecr_top_fraction": 0.2, "er_weight": 1.0, "ecr_weight": 1.0,
                            "pcm": True, "lr": 0.01, "weight_decay": 5e-4, "momentum": 5e-4, "dropout": 0.5,
                            "augmentation": "reference"}
# train_SEAM.py: RandomResizeLong(448, 768) for crop 448, then ColorJitter(0.3, 0.3, 0.3, hue 0.1)
REFERENCE_RESIZE_LONG = (1.0, 768 / 448)
REFERENCE_JITTER = (0.3, 0.3, 0.3, 0.1)
LOSS_NAMES = ("cls", "rvmin", "er", "ecr", "total")


def seam_params(cfg_seam: Any) -> dict[str, Any]:
    """``classifier.seam`` (Config, dict or None) with defaults filled in."""
    return {k: param(cfg_seam, k, v) for k, v in DEFAULTS.items()}


def dataset_options(cfg_seam: Any, crop_size: int) -> dict[str, Any]:
    """``ClassificationDataset`` keywords of ``classifier.seam.augmentation``: ``reference`` is train_SEAM.py's
    (long side resized to 1.0-1.71x the crop, horizontal flip, colour jitter 0.3/0.3/0.3, hue 0.1); ``shared``
    is the CAM classifier's (IRN's 0.625-1.25x, flip, no jitter)."""
    low, high = REFERENCE_RESIZE_LONG
    return augmentation_options(str(seam_params(cfg_seam)["augmentation"]), "classifier.seam.augmentation",
                                {"resize_long": (round(low * crop_size), round(high * crop_size)),
                                 "color_jitter": REFERENCE_JITTER})


def max_norm(p: torch.Tensor) -> torch.Tensor:
    """Per-channel min-max normalisation of ``ReLU(p)`` (reference ``visualization.max_norm``), ``(B, K, h, w)``."""
    p = F.relu(p)
    flat = p.flatten(2)
    hi, lo = flat.amax(-1)[..., None, None], flat.amin(-1)[..., None, None]
    return F.relu(p - lo - EPS) / (hi - lo + EPS)


def max_onehot(x: torch.Tensor) -> torch.Tensor:
    """Zero every foreground entry (channels 1..) below its pixel's foreground maximum; background kept."""
    fg = x[:, 1:]
    top = fg.amax(1, keepdim=True)
    return torch.cat([x[:, :1], torch.where(fg != top, torch.zeros_like(fg), fg)], dim=1)


def with_background(cam: torch.Tensor) -> torch.Tensor:
    """Prepend the background map ``1 - max_c`` to normalised foreground maps ``(B, C, h, w)``."""
    return torch.cat([1.0 - cam.amax(1, keepdim=True), cam], dim=1)


def er_loss(cam_full: torch.Tensor, cam_small: torch.Tensor) -> torch.Tensor:
    """Equivariant regularisation: mean |resize(cam_full) - cam_small|, maps already normalised."""
    if cam_full.shape[-2:] != cam_small.shape[-2:]:
        cam_full = F.interpolate(cam_full, size=cam_small.shape[-2:], mode="bilinear", align_corners=True)
    return (cam_full - cam_small).abs().mean()


def top_fraction_mean(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the largest ``int(n * fraction)`` (at least one) entries of each sample, averaged over samples."""
    flat = values.flatten(1)
    k = max(1, int(flat.shape[1] * float(fraction)))
    return flat.topk(k, dim=1).values.mean()


def ecr_loss(target: torch.Tensor, refined: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """Equivariant cross regularisation, one direction: hardest-``fraction`` L1 between the one-hot of the other
    branch's CAM ``target`` (background first, no gradient) and this branch's PCM output ``refined``."""
    return top_fraction_mean((max_onehot(target.detach()) - refined).abs(), fraction)


def adaptive_min_pooling_loss(x: torch.Tensor) -> torch.Tensor:
    """Reference ``adaptive_min_pooling_loss``: mean ReLU of the lowest quarter of ``max_c x`` per image."""
    n, _, h, w = x.shape
    k = max(1, h * w // 4)
    low = x.amax(1).flatten(1).topk(k, dim=1, largest=False).values
    return F.relu(low).sum() / (k * n)


def _branch(model: SEAMNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cam, refined = model.seam_forward(x, detach=True)
    size = x.shape[-2:]
    up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=True)  # noqa: E731
    return up(cam), up(refined)


def seam_losses(model: SEAMNet, images: torch.Tensor, labels: torch.Tensor,
                params: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The SEAM losses of one batch: ``cls``, ``rvmin``, ``er``, ``ecr`` and ``total`` (see the module doc).

    ``model`` needs ``seam_forward(x, detach)`` (:class:`advcam.models.seam.SEAMNet`); ``images`` (B, 3, H, W)
    normalised; ``labels`` (B, C) multi-hot foreground labels; ``params`` as :func:`seam_params`.
    """
    p = seam_params(params)
    h, w = images.shape[-2:]
    s = float(p["downscale"])
    size2 = (max(1, int(h * s)), max(1, int(w * s)))
    small = F.interpolate(images, size=size2, mode="bilinear", align_corners=True)
    fg = labels[..., None, None].to(images.dtype)
    full = torch.cat([torch.ones_like(fg[:, :1]), fg], dim=1)

    cam1, rv1 = _branch(model, images)
    cam2, rv2 = _branch(model, small)
    cls = (F.multilabel_soft_margin_loss(cam1.mean((2, 3)), labels)
           + F.multilabel_soft_margin_loss(cam2.mean((2, 3)), labels)) / 2
    rvmin = (adaptive_min_pooling_loss((rv1 * full)[:, 1:]) + adaptive_min_pooling_loss((rv2 * full)[:, 1:])) / 2
    down = lambda t: F.interpolate(t, size=size2, mode="bilinear", align_corners=True)  # noqa: E731
    c1, r1 = down(max_norm(cam1)) * fg, down(max_norm(rv1)) * full
    c2, r2 = max_norm(cam2) * fg, max_norm(rv2) * full
    er = er_loss(c1, c2)
    frac = float(p["ecr_top_fraction"])
    ecr = ecr_loss(with_background(c2), r1, frac) + ecr_loss(with_background(c1), r2, frac)
    total = cls + rvmin + float(p["er_weight"]) * er + float(p["ecr_weight"]) * ecr
    return {"cls": cls, "rvmin": rvmin, "er": er, "ecr": ecr, "total": total}


class _SeamLoss:
    """``loss_fn(model, batch)`` for :func:`advcam.train.loop.fit`; logs the component means once per epoch."""

    def __init__(self, params: Mapping[str, Any], steps_per_epoch: int) -> None:
        self.params, self.steps = dict(params), max(1, steps_per_epoch)
        self.sums = dict.fromkeys(LOSS_NAMES, 0.0)
        self.count = 0

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        device = next(model.parameters()).device
        losses = seam_losses(cast(SEAMNet, model), batch["image"].to(device), batch["label"].to(device), self.params)
        for k in LOSS_NAMES:
            self.sums[k] += float(losses[k].detach())
        self.count += 1
        if self.count == self.steps:
            log.info("train-cls seam: mean losses %s",
                     ", ".join(f"{k} {v / self.count:.4f}" for k, v in self.sums.items()))
            self.sums, self.count = dict.fromkeys(LOSS_NAMES, 0.0), 0
        return losses["total"]


def train_seam(model: torch.nn.Module, dataset: Dataset, *, cfg: Any, seed: int, workers: int, resume: Path,
               curves: Path, fingerprint: Mapping[str, Any]) -> list[list[float]]:
    """Train a SEAM network in place with the ``classifier`` params section ``cfg`` (``cfg.seam`` for SEAM's own
    params); same signature as :func:`advcam.train.classifier.train_cam`. Returns the curve rows."""
    if not hasattr(model, "seam_forward"):
        raise AdvcamError(f"classifier.method seam: the model ({type(model).__name__}) has no PCM; "
                          f"build it with advcam.models.seam.build_seam")
    params = seam_params(getattr(cfg, "seam", None))
    model.use_pcm = bool(params["pcm"])  # type: ignore[assignment]
    model.dropout = float(params["dropout"])  # type: ignore[assignment]
    lr = float(params["lr"])
    optimizer = loop.make_sgd(model.param_groups(), lr, float(params["weight_decay"]),  # type: ignore[operator]
                              float(params["momentum"]))
    loader = lambda e: loop.epoch_loader(dataset, cfg.batch_size, seed, e, workers)  # noqa: E731
    loss_fn = _SeamLoss(params, len(loader(0)))
    return loop.fit(model, optimizer, loader, loss_fn, epochs=cfg.epochs, base_lr=lr, resume=resume,
                    curves=curves, fingerprint=fingerprint, desc="train-cls seam")


__all__ = ["dataset_options", "train_seam", "seam_losses", "seam_params", "max_norm", "max_onehot", "with_background", "er_loss",
           "ecr_loss", "top_fraction_mean", "adaptive_min_pooling_loss"]
