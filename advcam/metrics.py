"""Segmentation metrics: confusion matrix, IoU / mIoU, seeds from CAMs, flat metric dicts.

IoU follows the reference evaluation (IRN ``eval_cam.py`` on chainercv's confusion):
``IoU_k = TP / (GT_k + Pred_k - TP)``; a class absent from both ground truth and prediction has 0/0 = NaN
and is left out of the mean (``nanmean``). Ground-truth 255 is ignored; a prediction of 255 ("not
labelled", pseudo labels only) is left out as well, so pseudo-label IoU is measured on labelled pixels.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import numpy as np

IGNORE = 255


def confusion(pred: np.ndarray, gt: np.ndarray, num_classes_with_bg: int) -> np.ndarray:
    """``(K, K)`` int64 confusion, rows = ground truth, columns = prediction; 255 in either is skipped."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"confusion: prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    k = int(num_classes_with_bg)
    pred = pred.astype(np.int64, copy=False).ravel()
    gt = gt.astype(np.int64, copy=False).ravel()
    keep = (gt != IGNORE) & (pred != IGNORE)
    pred, gt = pred[keep], gt[keep]
    for name, arr in (("prediction", pred), ("ground truth", gt)):
        if arr.size and (arr.min() < 0 or arr.max() >= k):
            raise ValueError(f"confusion: {name} label {int(arr.max() if arr.max() >= k else arr.min())} "
                             f"outside 0..{k - 1} (and 255)")
    return np.bincount(gt * k + pred, minlength=k * k).reshape(k, k).astype(np.int64)


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU (float64, NaN where the class is in neither ground truth nor prediction)."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    denom = conf.sum(axis=1) + conf.sum(axis=0) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """``nanmean`` of :func:`iou_from_confusion`; NaN when no class occurs at all."""
    iou = iou_from_confusion(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan


def best_index(mious: Sequence[float]) -> int | None:
    """Index of the highest finite mIoU (the first of equals), None when none is finite: the best threshold of a
    sweep of seed thresholds."""
    values = np.asarray(mious, dtype=np.float64)
    return int(np.nanargmax(values)) if np.isfinite(values).any() else None


def pixel_accuracy(conf: np.ndarray) -> float:
    total = float(np.asarray(conf).sum())
    return float(np.trace(conf)) / total if total else math.nan


def seeds_from_cams(high_res: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """Seed label map ``(H, W)`` uint8: argmax over ``[threshold, maps]`` mapped to ``keys + 1`` (0 = bg).

    Equivalent to the reference's padding of a constant background plane and ``argmax`` (ties go to
    background, the first plane).
    """
    high_res = np.asarray(high_res)
    keys = np.asarray(keys, dtype=np.int64)
    if high_res.ndim != 3 or high_res.shape[0] != keys.shape[0]:
        raise ValueError(f"seeds_from_cams: high_res {high_res.shape} does not match keys {keys.shape}")
    if keys.size == 0:
        return np.zeros(high_res.shape[1:], np.uint8)
    best = high_res.max(axis=0)
    label = (keys + 1)[high_res.argmax(axis=0)].astype(np.uint8)
    return np.where(best > threshold, label, 0).astype(np.uint8)


def seed_confusions(high_res: np.ndarray, keys: np.ndarray, gt: np.ndarray, thresholds: Sequence[float],
                    num_classes_with_bg: int) -> np.ndarray:
    """``(T, K, K)`` confusions of the seeds at every threshold (argmax computed once)."""
    keys = np.asarray(keys, dtype=np.int64)
    k = int(num_classes_with_bg)
    if keys.size == 0:
        one = confusion(np.zeros(gt.shape, np.uint8), gt, k)
        return np.stack([one] * len(thresholds))
    best = high_res.max(axis=0)
    label = (keys + 1)[high_res.argmax(axis=0)]
    return np.stack([confusion(np.where(best > t, label, 0), gt, k) for t in thresholds])


def safe_name(name: str) -> str:
    """A class name usable in a flat metric key (letters, digits, underscores)."""
    return re.sub(r"[^0-9A-Za-z_]+", "_", str(name)).strip("_") or "class"


def finite_or_none(x: float) -> float | None:
    """JSON-safe number: NaN/inf become null (``dvc metrics`` and strict JSON readers cannot take NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


def per_class(prefix: str, iou: Iterable[float], class_names: Sequence[str]) -> dict[str, float | None]:
    """``{prefix_background: ..., prefix_<class>: ...}`` for background + the foreground classes."""
    names = ["background", *class_names]
    values = list(iou)
    if len(values) != len(names):
        raise ValueError(f"per_class: {len(values)} IoUs for {len(names)} classes")
    return {f"{prefix}_{safe_name(n)}": finite_or_none(v) for n, v in zip(names, values)}
