"""Pseudo labels from CAMs with a dense CRF (IRN/AdvCAM ``cam_to_ir_label``).

Two CRF runs on the ``high_res`` maps: one with a constant background plane at ``fg_threshold`` (0.35;
what beats it is confident foreground) and one at ``bg_threshold`` (0.15; what stays below it is confident
background). Each run takes the plane-padded argmax as hard labels, turns them into unaries with
confidence ``gt_prob`` and runs mean-field inference with a Gaussian and a bilateral (colour) kernel.
The label is the foreground of the first run; where the first run says background, the pixel is
background if the second run agrees and 255 ("not sure") otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

IGNORE = 255


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF parameters; defaults are IRN/AdvCAM's ``crf_inference_label``."""

    iterations: int = 10
    gt_prob: float = 0.7
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0

    @classmethod
    def from_config(cls, cfg_crf: Any) -> "CRFParams":
        """Build from ``cfg.refine.crf`` (missing keys keep the defaults)."""
        names = cls.__dataclass_fields__
        return cls(**{k: type(getattr(cls, k))(cfg_crf[k]) for k in names if k in cfg_crf})


def crf_inference_label(image: np.ndarray, labels: np.ndarray, n_labels: int, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refine a hard label map ``(H, W)`` with values in ``0..n_labels-1`` on a uint8 RGB ``image``."""
    h, w = labels.shape
    if image.shape[:2] != (h, w) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"crf_inference_label: image {image.shape} does not match labels {labels.shape}")
    if n_labels < 2:
        return np.zeros((h, w), np.int64)
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=params.gt_prob, zero_unsure=False))
    d.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    rgb = np.array(image, dtype=np.uint8, order="C", copy=True)  # pydensecrf needs a writable buffer
    d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=rgb,
                           compat=params.bilateral_compat)
    q = np.asarray(d.inference(params.iterations))
    return q.reshape(n_labels, h, w).argmax(axis=0)


def crf_inference_softmax(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Mean-field marginals ``(n, H, W)`` float32 of the scores ``probs`` (``(n, H, W)``, taken as probabilities:
    unary ``-log(max(p, 1e-5))``, pydensecrf's ``unary_from_softmax``) on a uint8 RGB ``image`` (PSA's
    ``crf_inference``); ``params.gt_prob`` is unused."""
    n, h, w = probs.shape
    if image.shape != (h, w, 3):
        raise ValueError(f"crf_inference_softmax: image {image.shape} does not match scores {probs.shape}")
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.asarray(probs, dtype=np.float32))))
    d.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    rgb = np.array(image, dtype=np.uint8, order="C", copy=True)
    d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=rgb,
                           compat=params.bilateral_compat)
    return np.asarray(d.inference(params.iterations), dtype=np.float32).reshape(n, h, w)


def _crf_with_background(image: np.ndarray, high_res: np.ndarray, keys: np.ndarray, bg: float,
                         params: CRFParams) -> np.ndarray:
    """CRF labels (in the 0..C space: 0 = bg, keys+1) with a constant background plane ``bg``."""
    padded = np.concatenate([np.full((1, *high_res.shape[1:]), bg, high_res.dtype), high_res])
    pred = crf_inference_label(image, padded.argmax(axis=0), padded.shape[0], params)
    return np.concatenate([[0], keys + 1])[pred]


def cam_to_label(image: np.ndarray, high_res: np.ndarray, keys: np.ndarray, fg_threshold: float = 0.35,
                 bg_threshold: float = 0.15, params: CRFParams = CRFParams()) -> np.ndarray:
    """Pseudo label ``(H, W)`` uint8: ``keys + 1`` confident foreground, 0 confident background, 255 unsure."""
    keys = np.asarray(keys, dtype=np.int64)
    high_res = np.asarray(high_res, dtype=np.float32)
    if high_res.ndim != 3 or high_res.shape[0] != keys.shape[0]:
        raise ValueError(f"cam_to_label: high_res {high_res.shape} does not match keys {keys.shape}")
    if image.shape[:2] != high_res.shape[1:]:
        raise ValueError(f"cam_to_label: image {image.shape[:2]} and CAM {high_res.shape[1:]} differ in size")
    if keys.size == 0:
        return np.zeros(high_res.shape[1:], np.uint8)
    fg_conf = _crf_with_background(image, high_res, keys, fg_threshold, params)
    bg_conf = _crf_with_background(image, high_res, keys, bg_threshold, params)
    out = fg_conf.copy()
    out[fg_conf == 0] = IGNORE
    out[(fg_conf == 0) & (bg_conf == 0)] = 0
    return out.astype(np.uint8)
