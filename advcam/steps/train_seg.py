"""Stage train_seg: train the segmenter on the infer list's pseudo labels; write the checkpoint and curves."""
from __future__ import annotations

import hashlib
from pathlib import Path

from advcam.config import Config
from advcam.data import load_info
from advcam.data.datasets import SegmentationDataset
from advcam.models.deeplab import build_segmenter, segmenter_header
from advcam.steps.train_cls import ids_digest, images_digest
from advcam.train import loop
from advcam.train.segmentation import check_pseudo_labels, pseudo_label_reader, train_segmenter
from advcam.utils.checkpoint import save_checkpoint
from advcam.utils.io import clean_stale_temps_for
from advcam.utils.device import resolve_device, seed_everything
from advcam.utils.progress import log



def pseudo_digest(pseudo: Path, ids: list[str]) -> str:
    """Content hash of the pseudo labels, so a resume file never continues on other labels."""
    h = hashlib.sha1()
    for image_id in ids:
        h.update((pseudo / f"{image_id}.png").read_bytes())
    return h.hexdigest()


def run(cfg: Config, data: Path, pseudo: Path, out: Path, curves: Path) -> None:
    info = load_info(data)
    ids = info.lists["infer"]
    s = cfg.segmentation
    check_pseudo_labels(info, ids, pseudo)
    momentum = s.momentum
    params = {**s.to_dict(), "seed": cfg.seed}
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = build_segmenter(s.arch, info.num_classes + 1, s.pretrained).to(device)
    dataset = SegmentationDataset(info, ids, pseudo_label_reader(info, pseudo), s.crop_size, train=True,
                                  seed=cfg.seed)
    log.info("train-seg: %s, %d images of %s (list infer) with pseudo labels from %s, %d epochs on %s",
             s.arch, len(ids), data, pseudo, s.epochs, device)
    resume = loop.resume_path_for(out)
    if clean_stale_temps_for([out, resume]):
        log.info("train-seg: removed the temporary files of a killed run next to %s", out)
    fingerprint = {"stage": "train_seg", "params": params, "classes": list(info.classes), "ids": ids_digest(ids),
                   "images": images_digest(info, ids), "pseudo": pseudo_digest(pseudo, ids)}
    train_segmenter(model, dataset, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
                    weight_decay=s.weight_decay, momentum=momentum, seed=cfg.seed, workers=cfg.workers,
                    resume=resume, curves=curves, fingerprint=fingerprint)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    save_checkpoint(out, segmenter_header(model, list(info.classes), params), model=state)
    loop.finish(resume)
    log.info("wrote %s", out)
