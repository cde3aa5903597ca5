"""Stage ``evaluate``: the segmenter on the val list, a confusion matrix and a gallery.

Every val image is predicted at full resolution, as DeepLab-v2's multi-scale inference: the logits at
``evaluation.scales`` (and their horizontal flips when ``evaluation.flip``) are resized to the image and
fused by their pixel-wise max; the prediction is the argmax. With ``evaluation.crf.enabled`` the softmax of
the fused logits is also refined by a dense CRF (deeplab-pytorch's post-processing: unary -log p, Gaussian
sxy 1 / weight 3, bilateral sxy 67 / srgb 3 / weight 4, 10 iterations) and scored separately.

Metrics: ``val_miou`` (nanmean over background + C classes, as the reference), ``val_iou_<class>``,
``val_pixel_accuracy``, the same with CRF post-processing (``val_miou_crf``, ``val_iou_crf_<class>``,
``val_pixel_accuracy_crf``), ``num_images`` and, for reference, the score of predicting background
everywhere (``val_miou_all_background``).

The gallery shows images of the *infer* list, the only list with CAMs and pseudo labels, so that one row
follows an image through every stage: image, ground truth, CAM (max over classes), pseudo label and the
segmenter's prediction. Missing pieces are drawn as "n/a"; when the infer list has fewer usable images
than ``evaluation.gallery_size``, val images fill the remaining rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
from pydensecrf.utils import unary_from_softmax

from advcam.attribution.cam import load_cam
from advcam.data import load_info
from advcam.data.transforms import normalize
from advcam.data.voc import palette, read_label
from advcam.metrics import confusion, finite_or_none, iou_from_confusion, mean_iou, per_class, pixel_accuracy
from advcam.models import load_segmenter
from advcam.models.deeplab import multiscale_logits
from advcam.plots import GALLERY_COLUMNS, cam_overlay, colorize, plot_confusion, plot_gallery
from advcam.refine.crf import CRFParams
from advcam.utils.device import resolve_device
from advcam.utils.errors import AdvcamError
from advcam.utils.io import write_json
from advcam.utils.progress import log, progress


CRF_COLUMN = "prediction + CRF"
# deeplab-pytorch's CRF post-processing (configs/voc12.yaml); gt_prob is not used with soft unaries.
DEEPLAB_CRF = CRFParams(iterations=10, gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0,
                        bilateral_srgb=3.0, bilateral_compat=4.0)


def predict_probabilities(model: torch.nn.Module, image: np.ndarray, device: torch.device,
                          scales: tuple[float, ...] = (1.0,), flip: bool = False) -> np.ndarray:
    """Softmax ``(K, H, W)`` float32 of the multi-scale (+ flip) max-fused logits at the image's resolution."""
    logits = multiscale_logits(model, normalize(image).to(device), scales, flip)
    return logits.softmax(dim=0).cpu().numpy().astype(np.float32, copy=False)


def predict(model: torch.nn.Module, image: np.ndarray, device: torch.device, scales: tuple[float, ...] = (1.0,),
            flip: bool = False) -> np.ndarray:
    """Label map ``(H, W)`` uint8: argmax of the fused logits (see :func:`predict_probabilities`)."""
    return predict_probabilities(model, image, device, scales, flip).argmax(axis=0).astype(np.uint8)


def crf_postprocess(image: np.ndarray, prob: np.ndarray, params: CRFParams = DEEPLAB_CRF) -> np.ndarray:
    """Dense-CRF refinement of class probabilities ``(K, H, W)`` on the uint8 RGB ``image``: label map uint8."""
    k, h, w = prob.shape
    if image.shape != (h, w, 3):
        raise ValueError(f"crf_postprocess: image {image.shape} does not match probabilities {prob.shape}")
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob.astype(np.float32))))
    d.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    rgb = np.array(image, dtype=np.uint8, order="C", copy=True)  # pydensecrf needs a writable C buffer
    d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=rgb,
                           compat=params.bilateral_compat)
    q = np.asarray(d.inference(params.iterations)).reshape(k, h, w)
    return q.argmax(axis=0).astype(np.uint8)


def inference_params(cfg_eval: Any) -> tuple[tuple[float, ...], bool, CRFParams | None]:
    """(scales, flip, CRF params or None) from ``cfg.evaluation``; missing keys take the defaults."""
    scales = tuple(float(v) for v in cfg_eval.get("scales", (1.0, 0.75, 0.5)))
    crf_cfg = cfg_eval.get("crf", {}) or {}
    crf = CRFParams.from_config({**DEEPLAB_CRF.__dict__, **dict(crf_cfg)}) if crf_cfg.get("enabled", True) else None
    return scales, bool(cfg_eval.get("flip", False)), crf


def gallery_ids(info: Any, cams: Path, pseudo: Path, n: int) -> list[str]:
    infer = [i for i in info.lists.get("infer", [])
             if (cams / f"{i}.npz").is_file() or (pseudo / f"{i}.png").is_file()]
    ids = infer[:n]
    if len(ids) < n:
        ids += [i for i in info.lists.get("val", []) if i not in ids][: n - len(ids)]
    return ids


def _gallery_row(info: Any, image_id: str, model: torch.nn.Module, device: torch.device, cams: Path,
                 pseudo: Path, pal: list[int], inference: tuple, cam_title: str = "CAM") -> dict:
    scales, flip, crf = inference
    image = info.read_image(image_id)
    size = image.shape[:2]
    prob = predict_probabilities(model, image, device, scales, flip)
    row: dict[str, Any] = {"id": image_id, "image": image, "prediction": colorize(prob.argmax(axis=0), pal)}
    if crf is not None:
        row[CRF_COLUMN] = colorize(crf_postprocess(image, prob, crf), pal)
    if Path(info.mask_path(image_id)).is_file():
        row["ground truth"] = colorize(info.read_mask(image_id), pal)
    if (cams / f"{image_id}.npz").is_file():
        row[cam_title] = cam_overlay(image, load_cam(cams / f"{image_id}.npz", size)["high_res"])
    label = read_label(pseudo / f"{image_id}.png", size)
    if label is not None:
        row["pseudo label"] = colorize(label, pal)
    return row


def run(cfg: Any, data: Path, model: Path, cams: Path, pseudo: Path, metrics: Path, plots: Path) -> None:
    """Score the segmenter on the val list; write the metrics JSON, confusion.png and gallery.png."""
    info = load_info(data)
    info.check_lists(cfg.dataset, "evaluate")
    ids = list(info.lists.get("val", []))
    if not ids:
        raise AdvcamError(f"{data}: the val list is empty")
    k = info.num_classes + 1
    device = resolve_device(cfg.device)
    net = load_segmenter(model, map_location=device, num_classes=k).to(device).eval()
    inference = inference_params(cfg.evaluation)
    scales, flip, crf = inference
    log.info("evaluate: scales %s%s, max-fused%s", list(scales), " + flips" if flip else "",
             "; also with CRF post-processing" if crf is not None else "")
    conf = np.zeros((k, k), np.int64)
    conf_crf = np.zeros((k, k), np.int64)
    conf_bg = np.zeros((k, k), np.int64)
    scored = 0
    for image_id in progress(ids, desc="evaluate", unit="img"):
        if not Path(info.mask_path(image_id)).is_file():
            raise AdvcamError(f"image {image_id}: val image has no ground-truth mask {info.mask_path(image_id)}")
        gt = info.read_mask(image_id)
        image = info.read_image(image_id)
        if image.shape[:2] != gt.shape:
            raise AdvcamError(f"image {image_id}: image {image.shape[:2]} and mask {gt.shape} differ in size")
        prob = predict_probabilities(net, image, device, scales, flip)
        conf += confusion(prob.argmax(axis=0).astype(np.uint8), gt, k)
        if crf is not None:
            conf_crf += confusion(crf_postprocess(image, prob, crf), gt, k)
        conf_bg += confusion(np.zeros_like(gt), gt, k)
        scored += 1
    result: dict[str, Any] = {"num_images": scored, "val_miou": finite_or_none(mean_iou(conf)),
                              "val_pixel_accuracy": finite_or_none(pixel_accuracy(conf)),
                              "val_miou_all_background": finite_or_none(mean_iou(conf_bg))}
    result.update(per_class("val_iou", iou_from_confusion(conf), info.classes))
    if crf is not None:
        result["val_miou_crf"] = finite_or_none(mean_iou(conf_crf))
        result["val_pixel_accuracy_crf"] = finite_or_none(pixel_accuracy(conf_crf))
        result.update(per_class("val_iou_crf", iou_from_confusion(conf_crf), info.classes))
    write_json(metrics, result)
    plots = Path(plots)
    names = ["background", *info.classes]
    plot_confusion(conf, names, plots / "confusion.png",
                   title=f"val confusion (row-normalised), mIoU {100 * (result['val_miou'] or 0):.1f}")
    pal = palette()
    cams, pseudo = Path(cams), Path(pseudo)
    cam_title = "AdvCAM" if str(cfg.cam.method) == "advcam" else "CAM"  # the maps in cams/ are the method's
    gallery = [_gallery_row(info, i, net, device, cams, pseudo, pal, inference, cam_title)
               for i in gallery_ids(info, cams, pseudo, int(cfg.evaluation.gallery_size))]
    columns = tuple(cam_title if c == "CAM" else c for c in GALLERY_COLUMNS)
    columns = (*columns, CRF_COLUMN) if crf is not None else columns
    plot_gallery(gallery, plots / "gallery.png", columns=columns,
                 title="infer-list images (the segmenter trains on their pseudo labels)" if gallery
                 else "evaluation.gallery_size is 0: no images shown")
    log.info("evaluate: val mIoU %.4f%s over %d images (all-background baseline %.4f)",
             result["val_miou"] or float("nan"),
             f", with CRF {result['val_miou_crf'] or float('nan'):.4f}" if crf is not None else "", scored,
             result["val_miou_all_background"] or float("nan"))
