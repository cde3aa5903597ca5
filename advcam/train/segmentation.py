"""Segmentation training on pseudo labels: pixel cross-entropy (255 ignored), SGD, poly LR, head at 10x lr.

Pseudo labels are index PNGs ``<pseudo>/<id>.png`` (0 = background, 1..C, 255 = not confident), the same
size as their image. :func:`check_pseudo_labels` checks every one up front (existence and size, from the
headers) so a bad folder fails before training starts; :func:`pseudo_label_reader` checks the values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from advcam.data import DatasetInfo
from advcam.models.deeplab import DeepLab
from advcam.train import loop
from advcam.utils.errors import AdvcamError

IGNORE = 255


def _size(path: Path, what: str) -> tuple[int, int]:
    """(W, H) from the file header."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError) as exc:
        raise AdvcamError(f"{path}: cannot read {what} ({exc})") from None


def check_pseudo_labels(info: DatasetInfo, ids: Sequence[str], pseudo: Path) -> None:
    """Every id has ``<pseudo>/<id>.png`` of its image's size; AdvcamError naming the first offenders."""
    missing = [i for i in ids if not (pseudo / f"{i}.png").is_file()]
    if missing:
        raise AdvcamError(f"{pseudo}: no pseudo label for {len(missing)} of {len(ids)} images "
                          f"(e.g. {missing[0]}.png); run `advcam refine` first")
    for image_id in ids:
        path = pseudo / f"{image_id}.png"
        got, want = _size(path, "pseudo label"), _size(info.image_path(image_id), "image")
        if got != want:
            raise AdvcamError(f"{path}: pseudo label is {got[0]}x{got[1]} but image {image_id} is "
                              f"{want[0]}x{want[1]} (W x H)")


def pseudo_label_reader(info: DatasetInfo, pseudo: Path) -> Callable[[str], np.ndarray]:
    """``label_fn(id) -> uint8 (H, W)`` reading ``<pseudo>/<id>.png`` and checking size and values."""
    num_classes = info.num_classes

    def read(image_id: str) -> np.ndarray:
        path = pseudo / f"{image_id}.png"
        if not path.is_file():
            raise AdvcamError(f"{path}: pseudo label not found for image {image_id}")
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise AdvcamError(f"{path}: pseudo label must be an index PNG (mode P or L), got mode {im.mode}")
            label = np.array(im, dtype=np.uint8)
        want = _size(info.image_path(image_id), "image")
        if (label.shape[1], label.shape[0]) != want:
            raise AdvcamError(f"{path}: pseudo label is {label.shape[1]}x{label.shape[0]} but image {image_id} "
                              f"is {want[0]}x{want[1]} (W x H)")
        bad = np.setdiff1d(np.unique(label), np.r_[np.arange(num_classes + 1), IGNORE])
        if bad.size:
            raise AdvcamError(f"{path}: pseudo label values {bad.tolist()[:5]} outside 0..{num_classes} and 255")
        return label

    return read


def segmentation_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels (0 when a batch has none)."""
    device = next(model.parameters()).device
    logits = model(batch["image"].to(device))
    mask = batch["mask"].to(device).long()
    total = F.cross_entropy(logits, mask, ignore_index=IGNORE, reduction="sum")
    return total / (mask != IGNORE).sum().clamp(min=1)


def train_segmenter(model: DeepLab, dataset: Dataset, *, epochs: int, batch_size: int, lr: float,
                    weight_decay: float, momentum: float, seed: int, workers: int, resume: Path, curves: Path,
                    fingerprint: Mapping[str, Any]) -> list[list[float]]:
    """Train ``model`` in place (backbone at ``lr``, ASPP head at 10x ``lr``); return the curve rows."""
    optimizer = loop.make_sgd(model.param_groups(), lr, weight_decay, momentum)
    return loop.fit(model, optimizer, lambda e: loop.epoch_loader(dataset, batch_size, seed, e, workers),
                    segmentation_loss, epochs=epochs, base_lr=lr, resume=resume, curves=curves,
                    fingerprint=fingerprint, desc="train-seg")
