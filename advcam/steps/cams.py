"""Stage ``cams``: class maps for the infer list (``<out>/<id>.npz``) and the seed evaluation.

Resumable: stale temporary files are removed first, and an image whose CAM file is complete and matches
its image's size and classes is not recomputed (a truncated or corrupt file is). The folder records what made its
files (``.advcam-params.json``: the ``cam`` params, the classifier's content hash and the hash of the code that
computes the maps); when that changes, the old files of the list are removed and everything is recomputed, so a
resumed run never mixes the results of two settings. With ``ADVCAM_WORK_DIR`` set (the workflow's rules set it),
the CAM files are computed in a work folder keyed by that record and linked into the output folder, so that a
rerun of a killed job keeps them although Snakemake and DVC delete the output folder first
(:mod:`advcam.steps.shards`).

Seeds are the argmax over a constant background plane (each threshold of ``cam.thresholds``) and the
``high_res`` maps, compared with the ground-truth masks of the infer list (images without a mask are left out of
the score).

Scale-out (:mod:`advcam.steps.shards`): ``shard=(I, N)`` computes only shard ``I`` of ``N`` of the list into
``out`` (no scoring); ``gather=[folders]`` links the shards' files into ``out`` and scores the seeds over the
whole list, byte-identical to one unsharded run. On a node with several visible GPUs (``device`` cuda or
auto), the images are split across them, one process per GPU (``CUDA_VISIBLE_DEVICES`` selects them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from advcam import config
from advcam.attribution.advcam import prepare_model
from advcam.attribution.cam import compute_maps_images, is_valid_cam, load_cam, save_cam
from advcam.config import Config
from advcam.data import image_classes, image_size, load_info
from advcam.data.transforms import normalize
from advcam.metrics import best_index, finite_or_none, mean_iou, iou_from_confusion, per_class, seed_confusions
from advcam.models import load_classifier
from advcam.ops.fused import source_dir
from advcam.steps import shards as sharding
from advcam.steps.shards import FINGERPRINT, invalidate_if_changed
from advcam.utils.device import native_bf16, resolve_device
from advcam.utils.errors import AdvcamError
from advcam.utils.io import (check_free_space, clean_stale_temps, code_digest, files_digest, sole_writer, write_json,
                             write_text)
from advcam.utils.progress import log, note, progress


REFERENCE_RANGE = (0.15, 0.34)  # the papers report the best seed threshold within this range on VOC


def cams_code() -> str:
    """Hash of the code a CAM file depends on: attribution, models, the fused ops (and their C++/CUDA sources) and
    the image reading."""
    try:
        sources = [f for f in source_dir().iterdir() if f.is_file()]
    except AdvcamError:  # no C++ sources: the pure-PyTorch ops
        sources = []
    return code_digest("attribution", "models", "ops", "data", extra=sources)


def model_digest(path: Path) -> str:
    """Content hash of the classifier file: a classifier trained again to the same bytes keeps its CAM files."""
    if not Path(path).is_file():
        raise AdvcamError(f"file not found: {path}")
    return files_digest([path])


def record_for(cfg: Any, model_path: Path) -> dict:
    """What the CAM files depend on (``.advcam-params.json``): the map params, the classifier's bytes and the code
    that computes them. The image-level labels are checked per file (:func:`done`), so re-preparing the dataset
    keeps the files. Computed once per job (it hashes the classifier file and the code)."""
    maps_params = {k: v for k, v in config.active("cam", cfg.cam.to_dict()).items()
                   if k not in ("thresholds", "eval_threshold")}
    return {"cam": maps_params, "model": model_digest(model_path), "code": cams_code()}


def done(info: Any, folder: Path, image_id: str) -> bool:
    """``folder/<id>.npz`` is a complete CAM file of the image's size and classes."""
    return is_valid_cam(folder / f"{image_id}.npz", image_size(info, image_id), image_classes(info, image_id))


def cam_devices(name: str) -> list[str]:
    """Devices to split the images across: every visible GPU for cuda (or auto with CUDA), else one."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(device)]


def compute_ids(cfg: Any, info: Any, ids: Sequence[str], model_path: Path, out: Path, device: str,
                desc: str = "") -> None:
    """Write ``out/<id>.npz`` for ``ids`` on one device (no checks of existing files).

    With AdvCAM and ``cam.advcam.batch_images`` > 1, up to that many consecutive images of one size climb
    together (the maps are those of one image at a time, up to float rounding)."""
    model: nn.Module = load_classifier(model_path, map_location=device, num_classes=info.num_classes,
                            classes=info.classes).to(device).eval()
    batch = 1
    if str(cfg.cam.method) == "advcam":
        model = prepare_model(model, cfg.cam)
        batch = int(cfg.cam.advcam.batch_images)
        if str(cfg.cam.advcam.precision) == "bf16" and native_bf16(torch.device(device)) is False:
            log.warning("cams: cam.advcam.precision bf16 on %s, which has no bf16 hardware (no AMX-BF16 or "
                        "AVX512-BF16): bf16 is emulated there and slower than fp32", device)
    groups: list[list[str]] = []
    group_size = None
    for image_id in ids:
        size = image_size(info, image_id) if batch > 1 else None
        if not groups or len(groups[-1]) == batch or size != group_size:
            groups.append([])
        groups[-1].append(image_id)
        group_size = size
    with progress(None, desc=f"cams ({cfg.cam.method}){desc}", total=len(ids), unit="img") as bar:
        # AdvCAM's scales take minutes each on a CPU at VOC's sizes: the bar names the scale being climbed
        on_scale = lambda s, k, n: note(bar, f"scale {s:g} ({k + 1}/{n})")  # noqa: E731
        for group in groups:
            _compute_group(model, cfg, info, group, model_path, out, on_scale)
            bar.set_postfix_str("", refresh=False)  # the next image's first scale names itself
            bar.update(len(group))  # counted once its files are written


def _compute_group(model: Any, cfg: Any, info: Any, group: list[str], model_path: Path, out: Path,
                   on_scale: Any = None) -> None:
    """The CAM files of ``group`` (images of one size), computed together."""
    images = [normalize(info.read_image(image_id)) for image_id in group]
    try:
        maps = compute_maps_images(model, images, [image_classes(info, i) for i in group], cfg.cam, on_scale)
    except AdvcamError as err:
        raise AdvcamError(f"image{'s' if len(group) > 1 else ''} {', '.join(group)}: {err}") from err
    for image_id, m in zip(group, maps):
        if not (np.isfinite(m["high_res"]).all() and np.isfinite(m["cam"]).all()):
            raise AdvcamError(f"image {image_id}: the classifier {model_path} produced non-finite class maps")
        save_cam(out / f"{image_id}.npz", m)


def _device_worker(rank: int, cfg_json: str, data: str, groups: list[list[str]], model_path: str, out: str,
                   devices: list[str], threads: int) -> None:
    """One process of :func:`compute_on_devices`: the ``rank``-th group of images on ``devices[rank]``."""
    if devices[rank].startswith("cuda"):
        torch.cuda.set_device(torch.device(devices[rank]))
    else:
        torch.set_num_threads(threads)  # as the parent: the same CPU kernels, the same bytes
    info = load_info(Path(data))
    compute_ids(Config(json.loads(cfg_json)), info, groups[rank], Path(model_path), Path(out), devices[rank],
                f" [{devices[rank]}]")


def compute_on_devices(cfg: Any, info: Any, ids: Sequence[str], model_path: Path, out: Path,
                       devices: Sequence[str]) -> None:
    """Split ``ids`` into ``len(devices)`` shards (:func:`advcam.steps.shards.split`), one process each."""
    groups = sharding.split(list(ids), len(devices))
    log.info("cams: %d images over %d devices (%s)", len(ids), len(devices), ", ".join(devices))
    try:
        torch.multiprocessing.spawn(_device_worker, nprocs=len(devices), join=True, args=(
            json.dumps(cfg.to_dict()), str(info.folder), groups, str(model_path), str(out), list(devices),
            torch.get_num_threads()))
    except torch.multiprocessing.ProcessRaisedException as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise AdvcamError(f"cams: a device process failed: {lines[-1] if lines else exc}") from None


def cam_nbytes(size: tuple[int, int], n: int) -> int:
    """Bytes of one CAM file: float32 ``high_res`` (n, H, W) + ``cam`` at stride 4, keys and .npz headers."""
    h, w = size
    return 4 * n * (h * w + ((h + 3) // 4) * ((w + 3) // 4)) + 8 * n + 1024


def compute_all(cfg: Any, info: Any, ids: list[str], model_path: Path, out: Path, record: dict,
                shared: bool = False) -> int:
    """Write ``out/<id>.npz`` for every id without a valid file; return how many were computed.

    ``shared``: other jobs may write other ids into ``out`` now (shards sharing a work folder), so only the
    temporaries of ``ids`` are removed."""
    out.mkdir(parents=True, exist_ok=True)
    removed = clean_stale_temps(out, [f"{i}.npz" for i in ids] if shared else None)
    if removed:
        log.info("cams: removed %d stale temporary file(s) in %s", removed, out)
    invalidate_if_changed(out, record, ids, ".npz", check=lambda: load_classifier(
        model_path, num_classes=info.num_classes, classes=info.classes))
    todo = [i for i in ids if not done(info, out, i)]
    log.info("cams: %d of %d images to compute (%d done already)", len(todo), len(ids), len(ids) - len(todo))
    if not todo:
        return 0
    check_free_space(out, sum(cam_nbytes(image_size(info, i), len(image_classes(info, i))) for i in todo),
                     f"cams: {len(todo)} CAM files")
    devices = cam_devices(cfg.device)
    if len(devices) > 1 and len(todo) > 1:
        compute_on_devices(cfg, info, todo, model_path, out, devices)
    else:
        compute_ids(cfg, info, todo, model_path, out, devices[0])
    return len(todo)


def compute(cfg: Any, info: Any, ids: list[str], model_path: Path, out: Path, record: dict) -> int:
    """:func:`compute_all` into ``out``; with ``ADVCAM_WORK_DIR`` set, into the work folder of ``record``
    (:mod:`advcam.steps.shards`), whose files are then linked into ``out``."""
    work = sharding.work_folder("cams", record)
    if work is None:
        return compute_all(cfg, info, ids, model_path, out, record)
    n = compute_all(cfg, info, ids, model_path, work, record, shared=True)
    sharding.publish(work, out, [f"{i}.npz" for i in ids] + [FINGERPRINT])
    return n


def gather_shards(info: Any, ids: list[str], out: Path, folders: Sequence[Path], record: dict) -> None:
    """Link the CAM files of the shard folders (``folders[k]`` = shard ``k+1`` of ``len(folders)``) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    invalidate_if_changed(out, record, ids, ".npz")
    n = sharding.gather([Path(f) for f in folders], ids, ".npz", out,
                        lambda p, i: done(info, p.parent, i), record, "cams")
    log.info("cams: gathered %d CAM files from %d shard(s) into %s", n, len(folders), out)


def evaluate_seeds(cfg: Any, info: Any, ids: list[str], cams: Path) -> tuple[dict, list[tuple[float, float]]]:
    """Seed metrics (flat dict) and the (threshold, mIoU) curve over ``cfg.cam.thresholds``.

    ``seed_miou`` is the best over all swept thresholds; ``seed_miou_reference_range`` the best over those in
    the references' range 0.15..0.34 (DESIGN.md; present when the sweep has thresholds there)."""
    thresholds = [float(t) for t in cfg.cam.thresholds]
    fixed = float(cfg.cam.eval_threshold)
    sweep = thresholds + ([fixed] if fixed not in thresholds else [])
    k = info.num_classes + 1
    conf = np.zeros((len(sweep), k, k), np.int64)
    evaluated, n_maps = 0, 0
    empty: list[tuple[str, str]] = []  # (image, class) whose map is zero everywhere
    for image_id in progress(ids, desc="seeds", unit="img"):
        if not Path(info.mask_path(image_id)).is_file():
            continue
        gt = info.read_mask(image_id)
        maps = load_cam(cams / f"{image_id}.npz", gt.shape, info.num_classes)
        conf += seed_confusions(maps["high_res"], maps["keys"], gt, sweep, k)
        evaluated += 1
        n_maps += len(maps["keys"])
        empty += [(image_id, info.classes[int(c)]) for c, m in zip(maps["keys"], maps["high_res"])
                  if not (m > 0).any()]
    if evaluated < len(ids):
        log.warning("cams: %d of %d infer images have no ground-truth mask; seeds scored on %d",
                    len(ids) - evaluated, len(ids), evaluated)
    if empty:
        log.warning("cams: %d of %d class maps of the scored images are zero everywhere (e.g. image %s, class "
                    "%r): the classifier gives these labelled classes no positive evidence, so their seeds are "
                    "all background. A classifier that has not learned them gives this (see its loss in "
                    "plots/train_cls.csv, and classifier.pretrained)", len(empty), n_maps, *empty[0])
    mious = [mean_iou(c) for c in conf]
    curve = [(t, mious[i]) for i, t in enumerate(thresholds)]
    metrics: dict[str, Any] = {"num_images": len(ids), "num_images_scored": evaluated}
    best = best_index(mious[:len(thresholds)])
    if best is not None:
        metrics.update(seed_miou=finite_or_none(mious[best]), seed_best_threshold=thresholds[best],
                       seed_miou_fixed=finite_or_none(mious[sweep.index(fixed)]))
        ref = [i for i, t in enumerate(thresholds) if REFERENCE_RANGE[0] <= t <= REFERENCE_RANGE[1]
               and np.isfinite(mious[i])]
        if ref:  # the papers' protocol: best threshold within 0.15..0.34 (comparable with their numbers)
            ref_best = max(ref, key=lambda i: mious[i])
            metrics.update(seed_miou_reference_range=finite_or_none(mious[ref_best]),
                           seed_best_threshold_reference_range=thresholds[ref_best])
        metrics.update(per_class("seed_iou", iou_from_confusion(conf[best]), info.classes))
    else:
        metrics.update(seed_miou=None, seed_best_threshold=None, seed_miou_fixed=None)
    return metrics, curve


def run(cfg: Any, data: Path, model: Path, out: Path, metrics: Path, curve: Path,
        shard: tuple[int, int] | None = None, gather: Sequence[Path] = ()) -> None:
    """Compute (or resume) the CAM files of the infer and seg lists, then score the seeds (infer list).

    ``shard=(I, N)``: compute only shard I of N into ``out`` and stop (no metrics). ``gather``: take the CAM
    files from these shard folders (shard k = the k-th folder) instead of computing them, then score."""
    info = load_info(data)
    info.check_lists(cfg.dataset, "cams")
    ids = sharding.map_ids("cams", info, data, shard, gather)
    record = record_for(cfg, Path(model))
    with sole_writer(out, "cams"):  # a second run into this folder would clean this one's temporaries
        if shard is not None:
            part = sharding.shard_items(ids, *shard)
            log.info("cams: shard %d/%d: %d of %d images", shard[0], shard[1], len(part), len(ids))
            compute(cfg, info, part, Path(model), Path(out), record)
            return
        if gather:
            gather_shards(info, ids, Path(out), gather, record)
        else:
            compute(cfg, info, ids, Path(model), Path(out), record)
        result, points = evaluate_seeds(cfg, info, list(info.lists["infer"]), Path(out))
        write_json(metrics, result)
        write_text(curve, "threshold,miou\n" + "".join(
            f"{t:g},{'' if not np.isfinite(m) else f'{m:.6f}'}\n" for t, m in points))
        sharding.discard_work("cams", keep=record)  # every output written: other params' work folders go
        if result.get("seed_miou") is not None:
            log.info("cams: seed mIoU %.4f at threshold %g (%.4f at %g)", result["seed_miou"],
                     result["seed_best_threshold"], result["seed_miou_fixed"], cfg.cam.eval_threshold)
            if "seed_miou_reference_range" in result:
                log.info("cams: seed mIoU %.4f at threshold %g, the best within the papers' range %g..%g",
                         result["seed_miou_reference_range"], result["seed_best_threshold_reference_range"],
                         *REFERENCE_RANGE)
