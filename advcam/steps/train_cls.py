"""Stage train_cls: train the CAM classifier on the train list; write the checkpoint and the curve CSV."""
from __future__ import annotations

import hashlib
from pathlib import Path

from advcam.config import Config
from advcam.data import load_info
from advcam.data.datasets import ClassificationDataset
from advcam.models.classifier import build_classifier, classifier_header
from advcam.train import loop
from advcam.train.classifier import train_classifier
from advcam.utils.checkpoint import save_checkpoint
from advcam.utils.device import resolve_device, seed_everything
from advcam.utils.progress import log


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()


def run(cfg: Config, data: Path, out: Path, curves: Path) -> None:
    info = load_info(data)
    ids = info.lists["train"]
    c = cfg.classifier
    momentum = c.momentum
    params = {**c.to_dict(), "seed": cfg.seed}
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = build_classifier(c.arch, info.num_classes, c.pretrained).to(device)
    dataset = ClassificationDataset(info, ids, c.crop_size, train=True, seed=cfg.seed)
    log.info("train-cls: %s, %d images of %s (list train), %d classes, %d epochs on %s",
             c.arch, len(ids), data, info.num_classes, c.epochs, device)
    resume = loop.resume_path_for(out)
    fingerprint = {"stage": "train_cls", "params": params, "classes": list(info.classes), "ids": ids_digest(ids)}
    train_classifier(model, dataset, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
                     weight_decay=c.weight_decay, momentum=momentum, seed=cfg.seed, workers=cfg.workers,
                     resume=resume, curves=curves, fingerprint=fingerprint)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    save_checkpoint(out, classifier_header(model, list(info.classes), params), model=state)
    loop.finish(resume)
    log.info("wrote %s", out)
