"""Stage ``refine``: pseudo labels (``<out>/<id>.png``, VOC palette, 255 = unsure) and their scores.

Resumable: stale temporary files are removed, and a pseudo label that opens and has its image's size is
kept (read back for the metrics) instead of recomputed, unless the ``refine`` params or the CAM folder's
record (``.advcam-params.json``) changed since (then the list's labels are recomputed). Scores count labelled pixels only:
``pseudo_miou`` and ``pseudo_iou_<class>`` leave 255 out; ``pseudo_labelled_fraction`` is the share of
all pixels that got a label (0 or a class).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from advcam.attribution.cam import load_cam
from advcam.data import load_info
from advcam.steps.cams import FINGERPRINT, invalidate_if_changed
from advcam.data.voc import palette
from advcam.metrics import confusion, finite_or_none, iou_from_confusion, mean_iou, per_class
from advcam.refine.crf import CRFParams, cam_to_label
from advcam.utils.errors import AdvcamError
from advcam.utils.io import clean_stale_temps, read_json, save_png, write_json
from advcam.utils.progress import log, progress

RefineFn = Callable[[np.ndarray, dict, Any], np.ndarray]


def crf_method(image: np.ndarray, maps: dict, cfg_refine: Any) -> np.ndarray:
    """IRN/AdvCAM ``cam_to_ir_label``: two CRFs at the fg/bg thresholds."""
    return cam_to_label(image, maps["high_res"], maps["keys"], float(cfg_refine.fg_threshold),
                        float(cfg_refine.bg_threshold), CRFParams.from_config(cfg_refine.crf))


METHODS: dict[str, RefineFn] = {"crf": crf_method}


def read_label(path: Path, size: tuple[int, int]) -> np.ndarray | None:
    """A finished pseudo label as uint8 ``(H, W)``, or None when it is missing, unreadable or mis-sized."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L") or (im.size[1], im.size[0]) != tuple(size):
                return None
            return np.array(im, dtype=np.uint8)
    except (OSError, ValueError):
        return None


def run(cfg: Any, data: Path, cams: Path, out: Path, metrics: Path) -> None:
    """Write a pseudo label for every infer image (resuming), then score them against the masks."""
    method = str(cfg.refine.method)
    if method not in METHODS:
        raise AdvcamError(f"refine.method: unknown method {method!r} (known: {', '.join(sorted(METHODS))})")
    info = load_info(data)
    ids = list(info.lists.get("infer", []))
    if not ids:
        raise AdvcamError(f"{data}: the infer list is empty")
    cams, out = Path(cams), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if clean_stale_temps(out):
        log.info("refine: removed stale temporary files in %s", out)
    cams_record = read_json(cams / FINGERPRINT) if (cams / FINGERPRINT).is_file() else None
    invalidate_if_changed(out, {"refine": cfg.refine.to_dict(), "cams": cams_record}, ids, ".png")
    pal = palette()
    k = info.num_classes + 1
    conf = np.zeros((k, k), np.int64)
    labelled = total = scored = computed = 0
    for image_id in progress(ids, desc=f"refine ({method})", unit="img"):
        image = info.read_image(image_id)
        size = image.shape[:2]
        path = out / f"{image_id}.png"
        label = read_label(path, size)
        if label is None:
            maps = load_cam(cams / f"{image_id}.npz", size, info.num_classes)
            label = METHODS[method](image, maps, cfg.refine)
            save_png(path, label, pal)
            computed += 1
        labelled += int((label != 255).sum())
        total += label.size
        if Path(info.mask_path(image_id)).is_file():
            conf += confusion(label, info.read_mask(image_id), k)
            scored += 1
    log.info("refine: %d pseudo labels computed, %d kept from an earlier run", computed, len(ids) - computed)
    result: dict[str, Any] = {"num_images": len(ids), "num_images_scored": scored,
                              "pseudo_labelled_fraction": labelled / total if total else None,
                              "pseudo_miou": finite_or_none(mean_iou(conf)) if scored else None}
    if scored:
        result.update(per_class("pseudo_iou", iou_from_confusion(conf), info.classes))
        log.info("refine: pseudo-label mIoU %.4f on labelled pixels (%.1f%% labelled)",
                 result["pseudo_miou"] or float("nan"), 100 * result["pseudo_labelled_fraction"])
    write_json(metrics, result)
