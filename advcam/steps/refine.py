"""Stage ``refine``: pseudo labels (``<out>/<id>.png``, VOC palette, 255 = unsure) and their scores.

``refine.method``: ``crf`` writes the dense-CRF labels (:mod:`advcam.refine.crf`). ``randomwalk`` first writes
the CRF labels to ``<out>/.crf/``, then walks the CAMs over the affinities of a network that
:mod:`advcam.steps.refine_walk` trains, loads or takes: advcam's affinity network trained on the CRF labels and
IRN's walk (``refine.randomwalk.design: irn``), or PSA's AffinityNet and walk (``psa``).

Pseudo labels are made for the infer list and the seg list (``dataset.seg_list``, what the segmenter trains
on); the scores are of the infer list only, as the references score them on VOC train.

Resumable: stale temporary files are removed, and a pseudo label that opens and has its image's size is
kept (read back for the metrics) instead of recomputed, unless the ``refine`` params or the CAM folder's
record (``.advcam-params.json``) changed since (then the list's labels are recomputed). Scores:
``pseudo_miou`` and ``pseudo_iou_<class>`` leave 255 out (labelled pixels only); ``pseudo_labelled_fraction``
is the share of all pixels that got a label (0 or a class); ``pseudo_miou_unsure_as_background`` counts every
pixel, 255 as background (full coverage, comparable with the seeds' and the segmenter's scores). All describe
the final labels; ``pseudo_miou_crf``, ``pseudo_miou_unsure_as_background_crf`` and
``pseudo_labelled_fraction_crf`` describe the CRF labels (before the random walk; equal to the final ones for
``crf``).

With ``ADVCAM_WORK_DIR`` set (the workflow's rules set it), the labels, the affinity network and its resume file are
written to a work folder keyed by the record and linked into ``out`` at the end, so that a rerun of a killed job
keeps them although Snakemake and DVC delete ``out`` first (:mod:`advcam.steps.shards`).

Scale-out (:mod:`advcam.steps.shards`): the CRF labels, the costly CPU part, are what shards compute.
``shard=(I, N)`` writes the CRF labels of shard I of N to ``out`` and stops. ``gather=[folders]`` links the
shards' labels into ``out`` (``crf``) or ``out/.crf/`` (``randomwalk``) and then runs the rest once, over all
images: the scores, and for ``randomwalk`` the affinity training (once, on all CRF labels) and the walk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np

from advcam import config
from advcam.attribution.cam import load_cam
from advcam.data import image_size, load_info
from advcam.data.voc import palette, read_label
from advcam.metrics import confusion, finite_or_none, iou_from_confusion, mean_iou, per_class
from advcam.refine.crf import CRFParams, cam_to_label
from advcam.steps import refine_walk
from advcam.steps import shards as sharding
from advcam.steps.refine_walk import CRF_DIR, LabelFn
from advcam.steps.shards import FINGERPRINT, invalidate_if_changed
from advcam.utils.errors import AdvcamError
from advcam.utils.io import (check_free_space, clean_stale_temps, code_digest, read_json, save_png, sole_writer,
                             write_json)
from advcam.utils.progress import log, progress

RefineFn = Callable[[np.ndarray, dict, Any], np.ndarray]


def crf_method(image: np.ndarray, maps: dict, cfg_refine: Any) -> np.ndarray:
    """IRN/AdvCAM ``cam_to_ir_label``: two CRFs at the fg/bg thresholds."""
    return cam_to_label(image, maps["high_res"], maps["keys"], float(cfg_refine.fg_threshold),
                        float(cfg_refine.bg_threshold), CRFParams.from_config(cfg_refine.crf))


METHODS: dict[str, RefineFn] = {"crf": crf_method}
STAGED = ("randomwalk",)  # methods that need a trained model: handled by :func:`run` itself


def label_all(info: Any, ids: list[str], cams: Path, folder: Path, fn: LabelFn, desc: str,
              score: Collection[str] | None = None) -> dict[str, Any]:
    """Write ``folder/<id>.png`` = ``fn(image, maps)`` where missing (a valid file is kept) and score them.

    ``score``: the ids to score (default all; the stage scores the infer list only). Returns ``conf``
    (confusion matrix), ``labelled``, ``total`` (pixels of the scored images), ``scored`` (scored images with a
    mask) and ``computed`` (labels written now)."""
    score = set(ids) if score is None else set(score)
    pal = palette()
    k = info.num_classes + 1
    conf = np.zeros((k, k), np.int64)
    conf_full = np.zeros((k, k), np.int64)  # unsure pixels counted as background: full coverage, like the seeds
    labelled = total = scored = computed = 0
    todo = [i for i in ids if not (folder / f"{i}.png").is_file()]
    if todo:  # a PNG of uint8 labels is at most about H*W bytes
        check_free_space(folder, sum(h * w + 1024 for h, w in (image_size(info, i) for i in todo)),
                         f"refine: {len(todo)} pseudo labels")
    for image_id in progress(ids, desc=desc, unit="img"):
        image = info.read_image(image_id)
        size = image.shape[:2]
        path = folder / f"{image_id}.png"
        label = read_label(path, size)
        if label is None:
            maps = load_cam(cams / f"{image_id}.npz", size, info.num_classes)
            label = fn(image, maps)
            save_png(path, label, pal)
            computed += 1
        if image_id not in score:
            continue
        labelled += int((label != 255).sum())
        total += label.size
        if Path(info.mask_path(image_id)).is_file():
            mask = info.read_mask(image_id)
            conf += confusion(label, mask, k)
            conf_full += confusion(np.where(label == 255, 0, label), mask, k)
            scored += 1
    return {"conf": conf, "conf_full": conf_full, "labelled": labelled, "total": total, "scored": scored,
            "computed": computed}


def crf_labels(cfg: Any, info: Any, ids: list[str], cams: Path, folder: Path, record: dict,
               shards: Sequence[Path] = (), shared: bool = False,
               score: Collection[str] | None = None) -> dict[str, Any]:
    """The CRF labels of ``ids`` in ``folder`` (linked from ``shards`` when given, else computed where
    missing), scored as :func:`label_all` does. ``shared``: other jobs may write other ids into ``folder`` now
    (shards sharing a work folder), so only the temporaries of ``ids`` are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(folder, [f"{i}.png" for i in ids] if shared else None)
    invalidate_if_changed(folder, record, ids, ".png")
    if shards:
        n = sharding.gather([Path(f) for f in shards], ids, ".png", folder,
                            lambda p, i: read_label(p, image_size(info, i)) is not None, record, "refine")
        log.info("refine: gathered %d CRF labels from %d shard(s) into %s", n, len(shards), folder)
    return label_all(info, ids, cams, folder, lambda im, maps: METHODS["crf"](im, maps, cfg.refine),
                     "refine (crf labels)", score)


def run(cfg: Any, data: Path, cams: Path, out: Path, metrics: Path, shard: tuple[int, int] | None = None,
        gather: Sequence[Path] = ()) -> None:
    """Write a pseudo label for every image of the infer and seg lists (resuming), then score the infer list's
    against their masks.

    ``shard=(I, N)``: only the CRF labels of shard I of N, into ``out`` (no metrics). ``gather``: the CRF
    labels come from these shard folders (shard k = the k-th folder) instead of being computed here."""
    method = str(cfg.refine.method)
    if method not in METHODS and method not in STAGED:
        known = sorted({*METHODS, *STAGED})
        raise AdvcamError(f"refine.method: unknown method {method!r} (known: {', '.join(known)})")
    info = load_info(data)
    info.check_lists(cfg.dataset, "refine")
    ids = sharding.map_ids("refine", info, data, shard, gather)
    scored = set(info.lists["infer"])
    cams, out = Path(cams), Path(out)
    with sole_writer(out, "refine"):  # a second run into this folder would clean this one's temporaries
        if clean_stale_temps(out):
            log.info("refine: removed stale temporary files in %s", out)
        cams_record = read_json(cams / FINGERPRINT) if (cams / FINGERPRINT).is_file() else None
        crf_keys = {k: v for k, v in cfg.refine.to_dict().items() if k in ("fg_threshold", "bg_threshold", "crf")}
        code = code_digest("refine", "data")  # the labels' code (the CAMs' is in their record)
        crf_record = {"refine": crf_keys, "cams": cams_record, "code": code}
        if shard is not None:
            part = sharding.shard_items(ids, *shard)
            log.info("refine: shard %d/%d: CRF labels of %d of %d images", shard[0], shard[1], len(part), len(ids))
            work = sharding.work_folder("refine-crf", crf_record)
            crf_labels(cfg, info, part, cams, work or out, crf_record, shared=work is not None)
            if work is not None:
                sharding.publish(work, out, [f"{i}.png" for i in part] + [FINGERPRINT])
            return
        record: dict[str, Any] = {"refine": config.active("refine", cfg.refine.to_dict()), "cams": cams_record,
                                  "code": code}
        if method in STAGED:
            record["affinity"] = refine_walk.affinity_record(cfg)
        # per-image work of this job (the labels unless gathered, the affinity training and the walk) goes to the work
        # folder when there is one (ADVCAM_WORK_DIR), and is linked into out at the end
        work = sharding.work_folder("refine", record) if method in STAGED or not gather else None
        dest = work or out
        invalidate_if_changed(dest, record, ids, ".png")
        gathered = 0
        if method == "crf":
            if gather:  # the shards' CRF labels are the final labels; the out record stays the full one
                gathered = sharding.gather([Path(f) for f in gather], ids, ".png", dest,
                                           lambda p, i: read_label(p, image_size(info, i)) is not None, crf_record,
                                           "refine")
            final = crf = label_all(info, ids, cams, dest, lambda im, maps: METHODS[method](im, maps, cfg.refine),
                                    f"refine ({method})", scored)
        else:
            ready = refine_walk.walker_for(cfg, info, ids, cams, dest, cams_record, code)  # a taken file read now
            crf = crf_labels(cfg, info, ids, cams, dest / CRF_DIR, crf_record, gather, score=scored)
            fn = ready(any(not (dest / f"{i}.png").is_file() for i in ids))
            final = label_all(info, ids, cams, dest, fn, "refine (random walk)", scored)
        if work is not None:
            names = [f"{i}.png" for i in ids]
            if method in STAGED:
                names += refine_walk.published(work, ids)
            sharding.publish(work, out, names + [FINGERPRINT])
        computed = final["computed"]
        kept = max(0, len(ids) - computed - gathered)
        parts = [f"{computed} computed"]
        if gathered:
            parts.append(f"{gathered} gathered from {len(gather or [])} shard(s)")
        if kept:
            parts.append(f"{kept} kept from an earlier run")
        log.info("refine: %d pseudo labels: %s", len(ids), ", ".join(parts))
        result = scores(final, "pseudo", info.classes)
        before = scores(crf, "pseudo", info.classes)
        result.update(pseudo_miou_crf=before["pseudo_miou"],
                      pseudo_miou_unsure_as_background_crf=before["pseudo_miou_unsure_as_background"],
                      pseudo_labelled_fraction_crf=before["pseudo_labelled_fraction"])
        if final["scored"]:
            if method != "crf":
                log.info("refine: CRF labels mIoU %.4f (%.1f%% labelled)", before["pseudo_miou"] or float("nan"),
                         100 * before["pseudo_labelled_fraction"])
            log.info("refine: pseudo-label mIoU %.4f on labelled pixels (%.1f%% labelled)",
                     result["pseudo_miou"] or float("nan"), 100 * result["pseudo_labelled_fraction"])
        write_json(metrics, {"num_images": len(scored), **result})
        sharding.discard_work("refine", keep=record)  # every output written: other params' work folders go
        sharding.discard_work("refine-crf", keep=crf_record)


def scores(s: dict[str, Any], prefix: str, classes: Sequence[str]) -> dict[str, Any]:
    """Flat metrics of :func:`label_all`'s counts: ``<prefix>_miou``, ``_labelled_fraction``, ``_iou_<class>``."""
    out: dict[str, Any] = {"num_images_scored": s["scored"],
                           f"{prefix}_labelled_fraction": s["labelled"] / s["total"] if s["total"] else None,
                           f"{prefix}_miou": finite_or_none(mean_iou(s["conf"])) if s["scored"] else None,
                           f"{prefix}_miou_unsure_as_background":
                               finite_or_none(mean_iou(s["conf_full"])) if s["scored"] else None}
    if s["scored"]:
        out.update(per_class(f"{prefix}_iou", iou_from_confusion(s["conf"]), classes))
    return out
