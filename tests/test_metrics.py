"""Confusion matrix, IoU / mIoU (reference semantics) and seeds, on hand-computed examples."""
from __future__ import annotations

import math

import numpy as np
import pytest

from advcam.metrics import (best_index, confusion, finite_or_none, iou_from_confusion, mean_iou, per_class, pixel_accuracy,
                            seed_confusions, seeds_from_cams)


def test_confusion_counts_and_ignores_255():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 0]])
    conf = confusion(pred, gt, 3)
    assert conf.dtype == np.int64
    assert conf.tolist() == [[1, 1, 0],   # gt 0: one right, one called 1
                             [0, 2, 0],   # gt 1: both right
                             [0, 1, 0]]   # gt 2: called 1; the 255 pixel is not counted
    # a prediction of 255 (unsure pseudo label) is left out as well
    pred255 = np.array([[0, 255, 1], [1, 255, 0]])
    assert confusion(pred255, gt, 3).sum() == 3


def test_iou_hand_computed_and_absent_classes():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 0]])
    iou = iou_from_confusion(confusion(pred, gt, 4))
    # class 0: TP 1, GT 2, P 1 -> 1/2; class 1: TP 2, GT 2, P 4 -> 2/4; class 2: 0/1; class 3 absent -> NaN
    assert iou[:3] == pytest.approx([0.5, 0.5, 0.0])
    assert math.isnan(iou[3])
    assert mean_iou(confusion(pred, gt, 4)) == pytest.approx(1 / 3)  # NaN excluded (nanmean)
    assert pixel_accuracy(confusion(pred, gt, 4)) == pytest.approx(3 / 5)


def test_class_only_predicted_counts_as_zero():
    gt = np.zeros((2, 2), np.uint8)
    pred = np.array([[0, 0], [0, 2]])
    iou = iou_from_confusion(confusion(pred, gt, 3))
    assert iou[0] == pytest.approx(0.75) and iou[2] == 0.0 and math.isnan(iou[1])


def test_confusion_rejects_out_of_range_and_shape():
    with pytest.raises(ValueError, match="outside"):
        confusion(np.array([3]), np.array([0]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion(np.zeros((2, 2)), np.zeros((2, 3)), 3)


def test_empty_confusion_mean_is_nan_and_json_safe():
    assert math.isnan(mean_iou(np.zeros((3, 3), np.int64)))
    assert finite_or_none(float("nan")) is None and finite_or_none(0.5) == 0.5


def test_seeds_at_threshold():
    high = np.array([[[0.9, 0.3, 0.1]], [[0.2, 0.6, 0.25]]], np.float32)  # (2, 1, 3)
    keys = np.array([4, 1])
    assert seeds_from_cams(high, keys, 0.25).tolist() == [[5, 2, 0]]
    assert seeds_from_cams(high, keys, 0.5).tolist() == [[5, 2, 0]]
    assert seeds_from_cams(high, keys, 0.7).tolist() == [[5, 0, 0]]
    assert seeds_from_cams(high, keys, 0.9).tolist() == [[0, 0, 0]]  # tie goes to background, as argmax
    empty = seeds_from_cams(np.zeros((0, 2, 3), np.float32), np.zeros(0, np.int64), 0.2)
    assert empty.shape == (2, 3) and not empty.any()


def test_seed_confusions_match_per_threshold():
    rng = np.random.default_rng(0)
    high = rng.random((2, 6, 7)).astype(np.float32)
    keys = np.array([0, 2])
    gt = rng.integers(0, 4, (6, 7))
    gt[0, 0] = 255
    high[:, :2] = 0  # no map at all: background at every threshold, 0 included (the reference's argmax)
    high[:, 3, 3] = [0.5, 0.25]  # a best map value equal to a threshold: not above it
    thresholds = [0.0, 0.1, 0.5, 0.6]
    confs = seed_confusions(high, keys, gt, thresholds, 4)
    assert (seeds_from_cams(high, keys, 0.0)[:2] == 0).all() and seeds_from_cams(high, keys, 0.5)[3, 3] == 0
    for t, c in zip(thresholds, confs):
        np.testing.assert_array_equal(c, confusion(seeds_from_cams(high, keys, t), gt, 4))


def test_per_class_keys():
    out = per_class("val_iou", [0.5, float("nan")], ["potted plant"])
    assert out == {"val_iou_background": 0.5, "val_iou_potted_plant": None}


def test_best_index_skips_nan_and_takes_the_first_of_equals():
    assert best_index([0.2, float("nan"), 0.5, 0.5, 0.1]) == 2
    assert best_index([float("nan"), 0.3]) == 1
    assert best_index([float("nan"), float("nan")]) is None and best_index([]) is None
