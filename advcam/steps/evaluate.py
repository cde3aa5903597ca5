"""Stage ``evaluate``: the segmenter on the val list, a confusion matrix and a gallery.

Every val image is predicted at full resolution, single scale, averaging the softmax of the image and
of its horizontal flip. Metrics: ``val_miou`` (nanmean over background + C classes, as the reference),
``val_iou_<class>``, ``val_pixel_accuracy``, ``num_images`` and, for reference, the score of predicting
background everywhere (``val_miou_all_background``).

The gallery shows images of the *infer* list, the only list with CAMs and pseudo labels, so that one row
follows an image through every stage: image, ground truth, CAM (max over classes), pseudo label and the
segmenter's prediction. Missing pieces are drawn as "n/a"; when the infer list has fewer usable images
than ``evaluation.gallery_size``, val images fill the remaining rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from advcam.attribution.cam import load_cam
from advcam.data import load_info
from advcam.data.transforms import normalize
from advcam.data.voc import palette
from advcam.metrics import confusion, finite_or_none, iou_from_confusion, mean_iou, per_class, pixel_accuracy
from advcam.models import load_segmenter
from advcam.plots import cam_overlay, colorize, plot_confusion, plot_gallery
from advcam.steps.refine import read_label
from advcam.utils.device import resolve_device
from advcam.utils.errors import AdvcamError
from advcam.utils.io import write_json
from advcam.utils.progress import log, progress


def predict(model: torch.nn.Module, image: np.ndarray, device: torch.device, flip: bool = True) -> np.ndarray:
    """Label map ``(H, W)`` uint8: argmax of the (flip-averaged) softmax at the image's resolution."""
    x = normalize(image)[None].to(device)
    with torch.inference_mode():
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        logits = model(batch)
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        prob = logits.float().softmax(dim=1)
        prob = prob[0] + prob[1].flip(-1) if flip else prob[0]
    return prob.argmax(dim=0).to(torch.uint8).cpu().numpy()


def _gallery_ids(info: Any, cams: Path, pseudo: Path, n: int) -> list[str]:
    infer = [i for i in info.lists.get("infer", [])
             if (cams / f"{i}.npz").is_file() or (pseudo / f"{i}.png").is_file()]
    ids = infer[:n]
    if len(ids) < n:
        ids += [i for i in info.lists.get("val", []) if i not in ids][: n - len(ids)]
    return ids


def _gallery_row(info: Any, image_id: str, model: torch.nn.Module, device: torch.device, cams: Path,
                 pseudo: Path, pal: list[int]) -> dict:
    image = info.read_image(image_id)
    size = image.shape[:2]
    row: dict[str, Any] = {"id": image_id, "image": image, "prediction": colorize(predict(model, image, device), pal)}
    if Path(info.mask_path(image_id)).is_file():
        row["ground truth"] = colorize(info.read_mask(image_id), pal)
    if (cams / f"{image_id}.npz").is_file():
        row["CAM"] = cam_overlay(image, load_cam(cams / f"{image_id}.npz", size)["high_res"])
    label = read_label(pseudo / f"{image_id}.png", size)
    if label is not None:
        row["pseudo label"] = colorize(label, pal)
    return row


def run(cfg: Any, data: Path, model: Path, cams: Path, pseudo: Path, metrics: Path, plots: Path) -> None:
    """Score the segmenter on the val list; write the metrics JSON, confusion.png and gallery.png."""
    info = load_info(data)
    ids = list(info.lists.get("val", []))
    if not ids:
        raise AdvcamError(f"{data}: the val list is empty")
    k = info.num_classes + 1
    device = resolve_device(cfg.device)
    net = load_segmenter(model, map_location=device, num_classes=k).to(device).eval()
    conf = np.zeros((k, k), np.int64)
    conf_bg = np.zeros((k, k), np.int64)
    scored = 0
    for image_id in progress(ids, desc="evaluate", unit="img"):
        if not Path(info.mask_path(image_id)).is_file():
            raise AdvcamError(f"image {image_id}: val image has no ground-truth mask {info.mask_path(image_id)}")
        gt = info.read_mask(image_id)
        image = info.read_image(image_id)
        if image.shape[:2] != gt.shape:
            raise AdvcamError(f"image {image_id}: image {image.shape[:2]} and mask {gt.shape} differ in size")
        conf += confusion(predict(net, image, device), gt, k)
        conf_bg += confusion(np.zeros_like(gt), gt, k)
        scored += 1
    result: dict[str, Any] = {"num_images": scored, "val_miou": finite_or_none(mean_iou(conf)),
                              "val_pixel_accuracy": finite_or_none(pixel_accuracy(conf)),
                              "val_miou_all_background": finite_or_none(mean_iou(conf_bg))}
    result.update(per_class("val_iou", iou_from_confusion(conf), info.classes))
    write_json(metrics, result)
    plots = Path(plots)
    names = ["background", *info.classes]
    plot_confusion(conf, names, plots / "confusion.png",
                   title=f"val confusion (row-normalised), mIoU {100 * (result['val_miou'] or 0):.1f}")
    pal = palette()
    cams, pseudo = Path(cams), Path(pseudo)
    gallery = [_gallery_row(info, i, net, device, cams, pseudo, pal)
               for i in _gallery_ids(info, cams, pseudo, int(cfg.evaluation.gallery_size))]
    plot_gallery(gallery, plots / "gallery.png",
                 title="" if gallery else "evaluation.gallery_size is 0: no images shown")
    log.info("evaluate: val mIoU %.4f over %d images (all-background baseline %.4f)",
             result["val_miou"] or float("nan"), scored, result["val_miou_all_background"] or float("nan"))
