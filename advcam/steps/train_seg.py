"""Stage train_seg: train the segmenter on the seg list's pseudo labels; write the checkpoint and curves.

The seg list is ``dataset.seg_list`` (null: the infer list); the references train on train_aug.

Semi-supervised mode: the images chosen by ``segmentation.gt_ids`` / ``segmentation.gt_fraction`` train on
their ground-truth masks instead of their pseudo labels (their pseudo labels are not needed).
"""
from __future__ import annotations

from pathlib import Path

from advcam.config import Config
from advcam.data import load_info
from advcam.data.datasets import SegmentationDataset
from advcam.models.deeplab import build_segmenter, segmenter_header
from advcam.train import loop, memo
from advcam.train.segmentation import (check_gt_masks, check_pseudo_labels, class_weights, select_gt_ids,
                                       train_segmenter, training_label_reader)
from advcam.utils.checkpoint import save_checkpoint
from advcam.utils.device import resolve_device, seed_everything
from advcam.utils.errors import AdvcamError
from advcam.utils.io import clean_stale_temps_for, code_digest, files_digest, ids_digest
from advcam.utils.progress import launch_rank, log


def pseudo_digest(pseudo: Path, ids: list[str]) -> str:
    """Content hash of the pseudo labels of ``ids``."""
    return files_digest([pseudo / f"{image_id}.png" for image_id in ids], "fingerprint the pseudo labels")


def _scale_range(s: Config) -> tuple[float, float]:
    low, high = (float(v) for v in s.get("scale_range", (0.5, 1.5)))
    if not 0 < low <= high:
        raise AdvcamError(f"segmentation.scale_range must be [low, high] with 0 < low <= high, got {[low, high]}")
    return low, high


def run(cfg: Config, data: Path, pseudo: Path, out: Path, curves: Path) -> None:
    info = load_info(data)
    info.check_lists(cfg.dataset, "train-seg")
    ids = info.lists["seg"]
    source = (info.meta.get("lists") or {}).get("seg") or "seg"
    s = cfg.segmentation
    gt_ids = select_gt_ids(ids, s.get("gt_ids", []), float(s.get("gt_fraction", 0.0)), cfg.seed, source,
                           lambda i: Path(info.mask_path(i)).is_file())
    gt_set = set(gt_ids)
    pseudo_ids = [i for i in ids if i not in gt_set]
    check_gt_masks(info, gt_ids)
    check_pseudo_labels(info, pseudo_ids, pseudo)
    scale_range = _scale_range(s)
    params = {**s.to_dict(), "seed": cfg.seed}
    resume = loop.resume_path_for(out)
    if clean_stale_temps_for([out, resume]):
        log.info("train-seg: removed the temporary files of a killed run next to %s", out)
    fingerprint = {"stage": "train_seg", "params": params, "classes": list(info.classes), "ids": ids_digest(ids),
                   "images": files_digest([info.image_path(i) for i in ids], "train-seg: fingerprint the images"),
                   "pseudo": pseudo_digest(pseudo, pseudo_ids),
                   "gt_ids": ids_digest(gt_ids), "gt": files_digest([Path(info.mask_path(i)) for i in gt_ids]),
                   "pretrained": memo.weights_digest(s.pretrained), "code": code_digest("train", "models", "data")}
    if memo.recall(out, curves, fingerprint, "train-seg"):
        return
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = build_segmenter(s.arch, info.num_classes + 1, s.pretrained).to(device)
    label_fn = training_label_reader(info, pseudo, gt_ids)
    weight = class_weights(label_fn, ids, info.num_classes + 1) if s.get("balanced_ce", False) else None
    if weight is not None:
        log.info("train-seg: balanced cross-entropy, class weights %s",
                 ", ".join(f"{n} {w:.3g}" for n, w in zip(["background", *info.classes], weight)))
    dataset = SegmentationDataset(info, ids, label_fn, s.crop_size, train=True, seed=cfg.seed,
                                  scale_range=scale_range, scale_choices=[float(c) for c in s.scale_choices],
                                  pad=str(s.crop_pad))
    log.info("train-seg: %s, %d images of %s (list %s): %d with pseudo labels from %s, %d with ground truth; "
             "%d epochs on %s", s.arch, len(ids), data, source, len(pseudo_ids), pseudo, len(gt_ids), s.epochs,
             device)
    rows = train_segmenter(model, dataset, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
                           weight_decay=s.weight_decay, momentum=s.momentum, seed=cfg.seed, workers=cfg.workers,
                           resume=resume, curves=curves, fingerprint=fingerprint, class_weight=weight,
                           train_scales=[float(v) for v in s.train_scales], lr_update_every=int(s.lr_update_every),
                           loss_at=str(s.loss_at))
    if launch_rank() != 0:  # under torchrun every process holds the same weights; one writes them
        return
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    header = segmenter_header(model, list(info.classes), params)
    header["num_gt_images"] = len(gt_ids)
    save_checkpoint(out, header, model=state)
    loop.finish(resume)
    memo.remember(out, rows, fingerprint)
    log.info("wrote %s", out)
