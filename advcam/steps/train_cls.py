"""Stage train_cls: train the CAM classifier on the train list; write the checkpoint and the curve CSV.

With ``classifier.trained`` set, nothing is trained: the classifier in that file is checked against the dataset
and the params and written as the checkpoint (AdvCAM is post-hoc: it climbs on any trained classifier). The file
is a reference's trained network (IRN's or AdvCAM's ``res50_cam.pth``, PSA's ``resnet38_cls.pth``, SEAM's
``resnet38_SEAM.pth``: :mod:`advcam.models.trained`) or an advcam classifier checkpoint (of the configured method
and arch). The curve CSV is then empty.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from advcam import config
from advcam.config import Config
from advcam.data import image_classes, load_info
from advcam.data.datasets import ClassificationDataset
from advcam.models.classifier import builder_for, classifier_header
from advcam.models.trained import load_trained
from advcam.train import loop, memo
from advcam.train import eader as eader_training
from advcam.train import seam as seam_training
from advcam.utils.checkpoint import save_checkpoint
from advcam.utils.io import clean_stale_temps_for, code_digest, files_digest, ids_digest
from advcam.utils.device import resolve_device, seed_everything
from advcam.utils.progress import launch_rank, log


# Training method -> "module:function" with the signature of :func:`advcam.train.classifier.train_cam`.
TRAINERS: dict[str, str] = {
    "cam": "advcam.train.classifier:train_cam",
    "seam": "advcam.train.seam:train_seam",
    "eader": "advcam.train.eader:train_eader",
}


def trainer_for(method: str) -> Callable[..., list[list[float]]]:
    module, name = TRAINERS[method].split(":")
    return getattr(importlib.import_module(module), name)


def import_trained(cfg: Config, info: Any, out: Path, curves: Path) -> None:
    """``classifier.trained``: write the classifier of that file (a reference's trained network or an advcam
    checkpoint) as ``out``, after checking it against the dataset's classes and the classifier params."""
    c = cfg.classifier
    path = Path(str(c.trained)).expanduser()
    model, source = load_trained(path, info.num_classes, list(info.classes), c.method, c.arch)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # the header names the file, not the training params (unused here): the same file gives the same bytes
    save_checkpoint(out, classifier_header(model, list(info.classes), {"trained": str(path), "format": source}),
                    model=state)
    loop.write_curves(curves, [])
    log.info("train-cls: took the trained %s classifier of %s (%s format); nothing trained; wrote %s",
             model.arch, path, source, out)


def run(cfg: Config, data: Path, out: Path, curves: Path) -> None:
    info = load_info(data)
    info.check_lists(cfg.dataset, "train-cls")
    if cfg.classifier.get("trained"):
        import_trained(cfg, info, out, curves)
        return
    ids = info.lists["train"]
    c = cfg.classifier
    params = {**config.active("classifier", c.to_dict()), "seed": cfg.seed}
    resume = loop.resume_path_for(out)
    if clean_stale_temps_for([out, resume]):
        log.info("train-cls: removed the temporary files of a killed run next to %s", out)
    fingerprint = {"stage": "train_cls", "params": params, "classes": list(info.classes), "ids": ids_digest(ids),
                   "labels": ids_digest(f"{i} {image_classes(info, i)}" for i in ids),
                   "images": files_digest([info.image_path(i) for i in ids], "train-cls: fingerprint the images"),
                   "pretrained": memo.weights_digest(c.pretrained), "code": code_digest("train", "models", "data")}
    if memo.recall(out, curves, fingerprint, "train-cls"):
        return
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = builder_for(c.method)(c.arch, info.num_classes, c.pretrained).to(device)
    options = (seam_training.dataset_options(c.seam, c.crop_size) if c.method == "seam" else
               eader_training.dataset_options(c, c.crop_size) if c.method == "eader" else {})
    dataset = ClassificationDataset(info, ids, c.crop_size, train=True, seed=cfg.seed, **options)
    log.info("train-cls: %s (%s), %d images of %s (list train), %d classes, %d epochs on %s",
             c.method, c.arch, len(ids), data, info.num_classes, c.epochs, device)
    rows = trainer_for(c.method)(model, dataset, cfg=c, seed=cfg.seed, workers=cfg.workers, resume=resume,
                                 curves=curves, fingerprint=fingerprint)
    if launch_rank() != 0:  # under torchrun every process holds the same weights; one writes them
        return
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    save_checkpoint(out, classifier_header(model, list(info.classes), params), model=state)
    loop.finish(resume)
    memo.remember(out, rows, fingerprint)
    log.info("wrote %s", out)
