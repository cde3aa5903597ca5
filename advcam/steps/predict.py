"""Stage ``predict``: the segmenter's masks for a list of images that need no ground truth, such as VOC2012's
``test`` list for the evaluation server.

``predict.list`` names the list (``<dataset root>/ImageSets/Segmentation/<name>.txt``, one id per line or the
DeepLab two-column form, as the other lists); its images are read from the prepared dataset's root, with its
image suffix. Every image is predicted as ``evaluate`` scores the val images: the logits at
``evaluation.scales`` (and flips with ``evaluation.flip``) max-fused at full resolution, then, when
``evaluation.crf.enabled``, the same dense-CRF post-processing (what ``val_miou_crf`` scores; deeplab-pytorch
post-processes its test predictions so too). Output: ``<out>/<id>.png``, an index PNG with VOC's palette
(0 = background, 1..C), the format of ``SegmentationClass`` and of the evaluation server's
``results/VOC2012/Segmentation/comp6_test_cls/``.

Resumable: each mask is written atomically, and one that opens with its image's size is kept, unless the
segmenter, the inference params or the code changed since it was written (``.advcam-params.json``): then every
mask of the list is computed again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from advcam.data import load_info, voc
from advcam.models import load_segmenter
from advcam.steps.evaluate import crf_postprocess, inference_params, predict_probabilities
from advcam.steps.shards import invalidate_if_changed
from advcam.utils.device import resolve_device
from advcam.utils.errors import AdvcamError
from advcam.utils.io import clean_stale_temps, code_digest, files_digest, save_png, sole_writer
from advcam.utils.progress import log, progress

MAX_REPORTED = 5


def list_name(cfg: Any) -> str:
    """``predict.list``; AdvcamError when it is not set."""
    name = (cfg.get("predict") or {}).get("list")
    if not name:
        raise AdvcamError("predict.list is not set: name the list of images to predict, e.g. --set predict.list=test "
                          "for <dataset root>/ImageSets/Segmentation/test.txt")
    return str(name)


def run(cfg: Any, data: Path, model: Path, out: Path) -> None:
    """Write ``out/<id>.png`` for every image of ``predict.list`` (resuming)."""
    info = load_info(data)
    name = list_name(cfg)
    ids = voc.read_list(info.root, name)
    missing = [str(info.image_path(i)) for i in ids if not info.image_path(i).is_file()]
    if missing:
        more = f" (and {len(missing) - MAX_REPORTED} more)" if len(missing) > MAX_REPORTED else ""
        raise AdvcamError(f"{len(missing)} image(s) of {voc.list_path(info.root, name)} not found: "
                          + ", ".join(missing[:MAX_REPORTED]) + more)
    device = resolve_device(cfg.device)
    net = load_segmenter(model, map_location=device, num_classes=info.num_classes + 1).to(device).eval()
    scales, flip, crf = inference_params(cfg.evaluation)
    record = {"segmenter": files_digest([model]), "scales": list(scales), "flip": flip,
              "crf": None if crf is None else dict(crf.__dict__), "code": code_digest("steps", "models", "data")}
    log.info("predict: %d images of list %s, scales %s%s%s", len(ids), name, list(scales),
             " + flips" if flip else "", ", CRF post-processing" if crf is not None else "")
    out = Path(out)
    pal = voc.palette()
    written = 0
    with sole_writer(out, "predict"):
        clean_stale_temps(out)
        invalidate_if_changed(out, record, ids, ".png")
        for image_id in progress(ids, desc=f"predict ({name})", unit="img"):
            image = info.read_image(image_id)
            path = out / f"{image_id}.png"
            if voc.read_label(path, image.shape[:2]) is not None:
                continue
            prob = predict_probabilities(net, image, device, scales, flip)
            mask = crf_postprocess(image, prob, crf) if crf is not None else prob.argmax(axis=0).astype(np.uint8)
            save_png(path, mask, pal)
            written += 1
    log.info("predict: wrote %d masks to %s (%d kept from an earlier run)", written, out, len(ids) - written)
