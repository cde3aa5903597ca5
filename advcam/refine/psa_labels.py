"""Training data of PSA's AffinityNet (``refine.randomwalk.design: psa`` without a trained file).

As PSA's ``infer_cls.py`` (``--out_la_crf``, ``--out_ha_crf``) and its ``VOC12AffDataset``, which SEAM uses as they
are.

Scores (:func:`crf_scores`). Per image, two dense CRFs of the ``high_res`` maps with a background
``(1 - max CAM) ** alpha`` in front (PSA's ``_crf_with_alpha``; its ``crf_inference``: unary ``-log p``, Gaussian
sxy 3 compat 3, bilateral sxy 80 srgb 13 compat 10, 10 iterations, :data:`PSA_CRF`): a low alpha (``la_alpha``, 4:
a strong background, so what stays foreground is sure) and a high one (``ha_alpha``; PSA 32, SEAM 24: a weak
background, so what stays background is sure). The marginals are kept, float32, as PSA keeps them (``<id>.npz``:
``la``, ``ha``, each ``(1 + n, H, W)``, background first): its labels pool them.

Sample (:func:`sample_at`, :class:`AffinityDataset`): colour jitter of the image (torchvision's ColorJitter
0.3/0.3/0.3/0.1, before the crop); image and scores cropped together to S x S, placed in a zero container where
the image is smaller (PSA's ``RandomCrop``: :func:`advcam.data.transforms.crop_box`); a horizontal flip with
p 0.5; the image normalised (the container's zeros are black pixels); the scores average-pooled by 8. A cell's
label is ``la``'s argmax where that is foreground, 0 where ``ha``'s argmax is background, else 255, and 255 where
no score reaches 1e-5 (the container's padding). The pairs and the loss are :mod:`advcam.refine.affinity`'s (first
pixels in PSA's source region).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from advcam.data import DatasetInfo
from advcam.data import transforms as T
from advcam.data.datasets import AugmentedDataset
from advcam.refine.crf import CRFParams, crf_inference_softmax
from advcam.utils.errors import AdvcamError

IGNORE = 255
STRIDE = 8
PSA_CRF = CRFParams(iterations=10, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
                    bilateral_compat=10.0)


def crf_scores(image: np.ndarray, high_res: np.ndarray, alpha: float) -> np.ndarray:
    """PSA's ``_crf_with_alpha``: CRF marginals ``(1 + n, H, W)`` float32 of ``[(1 - max) ** alpha, high_res]``."""
    fg = np.asarray(high_res, dtype=np.float32)
    top = fg.max(0, keepdims=True) if len(fg) else np.zeros((1, *fg.shape[1:]), np.float32)
    return crf_inference_softmax(image, np.concatenate([(1 - top) ** float(alpha), fg]), PSA_CRF)


def pooled_label(la: np.ndarray, ha: np.ndarray) -> np.ndarray:
    """The cells' labels ``(h, w)`` uint8 from pooled scores ``(1 + n, h, w)`` (see the module doc)."""
    none = np.maximum(la.max(0), ha.max(0)) < 1e-5
    low, high = la.argmax(0), ha.argmax(0)
    label = low.astype(np.uint8)
    label[low == 0] = IGNORE
    label[high == 0] = 0
    label[none] = IGNORE
    return label


def sample_at(image: np.ndarray, la: np.ndarray, ha: np.ndarray, size: int,
              box: tuple[slice, slice, slice, slice], flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(normalised image ``(3, S, S)`` float32, label ``(S/8, S/8)`` uint8) of one training sample, for a crop
    ``box`` drawn by :func:`advcam.data.transforms.crop_box` (PSA's ``RandomCrop`` is IRN's ``random_crop``) and a
    flip (the image jittered already)."""
    h, w = image.shape[:2]
    if la.shape[1:] != (h, w) or ha.shape != la.shape:
        raise ValueError(f"sample_at: scores {la.shape} / {ha.shape} do not fit an image of {h}x{w}")
    stack = np.concatenate([image.astype(np.float32), la.transpose(1, 2, 0), ha.transpose(1, 2, 0)], -1)
    crop = T.crop_at([stack], [0.0], size, box)[0]
    if flip:
        crop = crop[:, ::-1]
    img = T.normalize_array(np.ascontiguousarray(crop[..., :3])).transpose(2, 0, 1)
    scores = torch.from_numpy(np.ascontiguousarray(crop[..., 3:].transpose(2, 0, 1)))
    pooled = F.avg_pool2d(scores, STRIDE, ceil_mode=True).numpy()
    return np.ascontiguousarray(img), pooled_label(*np.split(pooled, 2))


class AffinityDataset(AugmentedDataset):
    """Items ``{"image": (3, S, S) float32, "label": (S/8, S/8) int64 (255 = unsure), "id"}`` from the images and
    their score files ``scores/<id>.npz`` (:func:`crf_scores`), with PSA's augmentation (module doc)."""

    def __init__(self, info: DatasetInfo, ids: Sequence[str], scores: Path, crop_size: int, seed: int = 0):
        if crop_size % STRIDE:
            raise AdvcamError(f"refine.randomwalk.psa.crop_size: must be a multiple of {STRIDE}, got {crop_size}")
        super().__init__(info, ids, crop_size, True, seed)
        self.scores = Path(scores)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = self.info.read_image(image_id)
        with np.load(self.scores / f"{image_id}.npz") as z:
            la, ha = z["la"], z["ha"]
        rng = self.rng(index)
        image = T.color_jitter(image, rng)
        box = T.crop_box((image.shape[0], image.shape[1]), self.crop_size, rng)
        img, label = sample_at(image, la, ha, self.crop_size, box, bool(rng.random() < 0.5))
        return {"image": torch.from_numpy(img), "label": torch.from_numpy(label.astype(np.int64)), "id": image_id}


__all__ = ["PSA_CRF", "crf_scores", "pooled_label", "sample_at", "AffinityDataset"]
