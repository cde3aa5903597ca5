"""Stage ``refine``: pseudo labels (``<out>/<id>.png``, VOC palette, 255 = unsure) and their scores.

``refine.method``: ``crf`` writes the dense-CRF labels (:mod:`advcam.refine.crf`). ``randomwalk`` (IRN/AdvCAM)
first writes the CRF labels to ``<out>/.crf/``, trains an affinity network on them
(:mod:`advcam.refine.affinity`; checkpoint ``<out>/.affinity.pt``, resume file ``<out>/.affinity.pt.resume.pt``
while training, curve ``<out>/.affinity.csv``), then walks the stride-4 CAMs over its affinities
(:mod:`advcam.refine.randomwalk`). The affinity network uses ``classifier.arch`` (and ``classifier.pretrained``,
then frozen as IRN's backbone), or ``refine.randomwalk.arch`` / ``pretrained`` where set
(:func:`advcam.refine.affinity.affinity_source`); it is retrained only when its params, the seed or the CRF labels
change. With ``refine.randomwalk.design: psa`` the network is PSA's AffinityNet (:mod:`advcam.refine.psa`): taken
from ``refine.randomwalk.psa.trained``, or trained here on CRF scores written to ``.psa_crf/``
(:mod:`advcam.refine.psa_labels`), and the walk is PSA's.

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
from typing import Any, Callable, Collection, Sequence, cast

import numpy as np

import torch
from torch import nn

from advcam import config
from advcam.attribution.cam import load_cam
from advcam.data import image_size, load_info
from advcam.data.datasets import SegmentationDataset
from advcam.data.transforms import normalize
from advcam.steps import shards as sharding
from advcam.steps.shards import FINGERPRINT, invalidate_if_changed
from advcam.data.voc import palette, read_label
from advcam.metrics import confusion, finite_or_none, iou_from_confusion, mean_iou, per_class
from advcam.refine import psa, psa_labels
from advcam.refine.affinity import affinity_source, batch_loss, build_affinity_net, grid_loss, pairwise_affinity
from advcam.refine.crf import CRFParams, cam_to_label
from advcam.refine.randomwalk import walk_labels
from advcam.train import loop
from advcam.train.live import live_dir
from advcam.train.memo import weights_digest
from advcam.train.segmentation import pseudo_label_reader
from advcam.utils.checkpoint import load_checkpoint, save_checkpoint
from advcam.utils.device import resolve_device, seed_everything
from advcam.utils.errors import AdvcamError
from advcam.utils.io import (check_free_space, clean_stale_temps, code_digest, files_digest, ids_digest, read_json,
                             save_npz, save_png, sole_writer, write_json)
from advcam.utils.progress import log, progress

RefineFn = Callable[[np.ndarray, dict, Any], np.ndarray]
LabelFn = Callable[[np.ndarray, dict], np.ndarray]
CRF_DIR = ".crf"  # CRF labels of the randomwalk method, inside the output folder
AFFINITY_FILE = ".affinity.pt"
AFFINITY_CURVE = ".affinity.csv"
AFFINITY_SCALES = (0.5, 1.5)  # random rescaling of the training images (IRN's train_irn: rescale=(0.5, 1.5))
TRAIN_KEYS = ("epochs", "batch_size", "crop_size", "lr", "weight_decay", "radius")
# design psa: the CRF scores its AffinityNet trains on, in the work folder (the output folder without one); not
# published into the output folder (DVC would cache them: about 40 GB for VOC's train_aug)
PSA_SCORES = ".psa_crf"
PSA_TRAIN_KEYS = ("la_alpha", "ha_alpha", "epochs", "batch_size", "crop_size", "lr", "weight_decay")


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


def affinity_fingerprint(cfg: Any, labels: Path, ids: list[str]) -> dict[str, Any]:
    """What the affinity network depends on: its training params, arch, seed and the CRF labels' bytes."""
    rw = cfg.refine.randomwalk
    digest = files_digest([labels / f"{i}.png" for i in ids], "fingerprint the CRF labels")
    arch, pretrained = affinity_source(cfg.classifier, rw)
    return {"stage": "affinity", "params": {k: rw[k] for k in TRAIN_KEYS}, "arch": arch, "pretrained": pretrained,
            "seed": int(cfg.seed), "labels": digest}


def cached_or_trained(path: Path, header: dict[str, Any], empty: Callable[[], nn.Module],
                      train: Callable[[Path], nn.Module], seed: int, device: torch.device) -> nn.Module:
    """The network of the checkpoint ``path`` if its header's ``kind`` and ``fingerprint`` are ``header``'s (built by
    ``empty()``), else ``train(resume_file)`` after seeding (it builds, trains and returns the network), saved to
    ``path`` with ``header``."""
    kind, fingerprint = header["kind"], header["fingerprint"]
    if path.is_file():
        try:
            header, state = load_checkpoint(path)
        except AdvcamError as exc:
            log.warning("refine: ignoring %s (%s)", path, exc)
            header, state = {}, {}
        if header.get("kind") == kind and header.get("fingerprint") == fingerprint:
            model = empty()
            model.load_state_dict(state["model"])
            log.info("refine: affinity network from %s", path)
            return model.to(device).eval()
        log.info("refine: %s was trained with other params or labels; retraining", path)
    seed_everything(seed)
    resume = loop.resume_path_for(path)
    model = train(resume)
    save_checkpoint(path, header, model={k: v.cpu() for k, v in model.state_dict().items()})
    loop.finish(resume)
    return model.eval()


def affinity_model(cfg: Any, info: Any, ids: list[str], labels: Path, out: Path, device: torch.device) -> nn.Module:
    """``design: irn``: the affinity network of ``out/.affinity.pt`` if it fits, else trained (resuming) on
    ``labels``."""
    rw = cfg.refine.randomwalk
    arch, pretrained = affinity_source(cfg.classifier, rw)

    def train(resume: Path) -> nn.Module:
        model = build_affinity_net(arch, pretrained).to(device)
        dataset = SegmentationDataset(info, ids, pseudo_label_reader(info, labels), int(rw.crop_size), train=True,
                                      seed=int(cfg.seed), scale_range=AFFINITY_SCALES)
        # IRN's PolyOptimizer passes its weight decay as SGD's momentum: the effective momentum is the weight decay
        optimizer = loop.make_sgd(model.param_groups(), float(rw.lr), float(rw.weight_decay),
                                  float(rw.weight_decay), head_mult=1.0)
        log.info("refine: training the affinity network (%s, %d images, %d epochs) on %s", arch, len(ids),
                 int(rw.epochs), device)
        loop.fit(model, optimizer,
                 lambda e: loop.epoch_loader(dataset, int(rw.batch_size), int(cfg.seed), e, int(cfg.workers)),
                 lambda m, b: batch_loss(m, b, int(rw.radius)), epochs=int(rw.epochs), base_lr=float(rw.lr),
                 resume=resume, curves=out / AFFINITY_CURVE, fingerprint=fingerprint, desc="affinity")
        return model

    fingerprint = affinity_fingerprint(cfg, labels, ids)
    return cached_or_trained(out / AFFINITY_FILE, {"kind": "affinity", "arch": arch, "fingerprint": fingerprint},
                             lambda: build_affinity_net(arch), train, int(cfg.seed), device)


def psa_scores(cfg: Any, info: Any, ids: list[str], cams: Path, folder: Path, record: dict) -> None:
    """``design: psa`` without a trained file: the CRF scores ``folder/<id>.npz`` (``la``, ``ha``) that PSA's
    AffinityNet trains on (:func:`advcam.refine.psa_labels.crf_scores`), where missing or stale."""
    p = cfg.refine.randomwalk.psa
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(folder)
    invalidate_if_changed(folder, record, ids, ".npz")
    todo = [i for i in ids if not (folder / f"{i}.npz").is_file()]
    if todo:  # two (1 + n, H, W) float32 arrays an image
        check_free_space(folder, sum(8 * (1 + len(info.labels[i])) * h * w + 4096
                                     for i, (h, w) in ((i, image_size(info, i)) for i in todo)),
                         f"refine: {len(todo)} CRF score files")
    for image_id in progress(todo, desc="refine (psa crf scores)", unit="img"):
        image = info.read_image(image_id)
        maps = load_cam(cams / f"{image_id}.npz", image.shape[:2], info.num_classes)
        save_npz(folder / f"{image_id}.npz", la=psa_labels.crf_scores(image, maps["high_res"], float(p.la_alpha)),
                 ha=psa_labels.crf_scores(image, maps["high_res"], float(p.ha_alpha)))


def psa_affinity_model(cfg: Any, info: Any, ids: list[str], scores: Path, scores_record: dict, out: Path,
                       device: torch.device) -> nn.Module:
    """``design: psa`` without a trained file: PSA's AffinityNet of ``out/.affinity.pt`` if it fits, else trained
    (resuming) on the CRF scores in ``scores`` (made from ``scores_record``), as PSA's ``train_aff.py``."""
    rw = cfg.refine.randomwalk
    p, radius = rw.psa, int(rw.radius)
    pretrained = psa.pretrained_source(cfg.classifier, rw)

    def train(resume: Path) -> nn.Module:
        model = psa.build_psa_affinity(pretrained).to(device)
        dataset = psa_labels.AffinityDataset(info, ids, scores, int(p.crop_size), int(cfg.seed))
        # PSA's PolyOptimizer passes its weight decay as SGD's momentum too; the heads learn at 10x
        optimizer = loop.make_sgd(model.param_groups(), float(p.lr), float(p.weight_decay), float(p.weight_decay),
                                  head_mult=10.0)
        log.info("refine: training PSA's AffinityNet (%d images, %d epochs) on %s", len(ids), int(p.epochs), device)
        loop.fit(model, optimizer,
                 lambda e: loop.epoch_loader(dataset, int(p.batch_size), int(cfg.seed), e, int(cfg.workers)),
                 lambda m, b: grid_loss(m(b["image"].to(device)), b["label"].to(device), radius),
                 epochs=int(p.epochs), base_lr=float(p.lr), resume=resume, curves=out / AFFINITY_CURVE,
                 fingerprint=fingerprint, desc="affinity (psa)")
        return model

    fingerprint = {"stage": "affinity-psa", "params": {k: p[k] for k in PSA_TRAIN_KEYS}, "radius": radius,
                   "pretrained": weights_digest(pretrained), "seed": int(cfg.seed), "scores": scores_record,
                   "ids": ids_digest(ids)}
    return cached_or_trained(out / AFFINITY_FILE, {"kind": "affinity-psa", "arch": "resnet38",
                                                   "fingerprint": fingerprint},
                             psa.PSAAffinityNet, train, int(cfg.seed), device)


def walker(model_fn: Callable[[], nn.Module], walk: Callable[[nn.Module, np.ndarray, dict], np.ndarray]) -> LabelFn:
    """``fn(image, maps)`` = ``walk(model, image, maps)``, the random-walk label of one image (the affinity network
    is made on first use)."""
    cache: list[nn.Module] = []

    def fn(image: np.ndarray, maps: dict) -> np.ndarray:
        if not cache:
            cache.append(model_fn())
        with torch.inference_mode():
            return walk(cache[0], image, maps)
    return fn


def irn_walk(cfg_rw: Any, device: torch.device) -> Callable[[nn.Module, np.ndarray, dict], np.ndarray]:
    """``design: irn``: the stride-4 CAMs walked over the affinities of advcam's affinity network."""
    radius = int(cfg_rw.radius)

    def walk(model: nn.Module, image: np.ndarray, maps: dict) -> np.ndarray:
        emb = model(normalize(image)[None].to(device))
        cam = torch.from_numpy(maps["cam"]).to(device)
        if cam.shape[0] and tuple(emb.shape[-2:]) != tuple(cam.shape[-2:]):
            raise AdvcamError(f"affinity grid {tuple(emb.shape[-2:])} differs from the CAM grid "
                              f"{tuple(cam.shape[-2:])}")
        return walk_labels(cam, maps["keys"], pairwise_affinity(emb, radius)[0], image.shape[:2],
                           radius=radius, beta=float(cfg_rw.beta), exp_times=int(cfg_rw.exp_times),
                           cam_power=float(cfg_rw.cam_power), bg_threshold=float(cfg_rw.bg_threshold))
    return walk


def psa_walk(cfg_rw: Any, device: torch.device) -> Callable[[nn.Module, np.ndarray, dict], np.ndarray]:
    """``design: psa``: the ``high_res`` maps walked at stride 8 over PSA's AffinityNet (:mod:`advcam.refine.psa`)."""
    p = cfg_rw["psa"]

    def walk(model: nn.Module, image: np.ndarray, maps: dict) -> np.ndarray:
        aff, radius = psa.affinities(cast(psa.PSAAffinityNet, model), normalize(image).to(device), int(cfg_rw.radius))
        return psa.walk_labels(torch.from_numpy(maps["high_res"]), maps["keys"], aff, radius,
                               alpha=float(p["alpha"]), beta=float(p["beta"]), logt=int(p["logt"]))
    return walk


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
        rw = cfg.refine.randomwalk
        design, taken_file = str(rw.design), rw.psa.trained if rw.design == "psa" else None
        if method in STAGED and taken_file:  # the file's bytes: a new file at the same path reruns the walk
            record["affinity"] = {"trained": weights_digest(str(taken_file))}
        elif method in STAGED and design == "psa":
            record["affinity"] = {"pretrained": weights_digest(psa.pretrained_source(cfg.classifier, rw)),
                                  "seed": cfg.seed}
        elif method in STAGED:
            record["affinity"] = {"arch": cfg.classifier.arch, "pretrained": cfg.classifier.pretrained,
                                  "seed": cfg.seed}
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
            labels = dest / CRF_DIR
            device = resolve_device(cfg.device)
            make: Callable[[], nn.Module] = lambda: affinity_model(cfg, info, ids, labels, dest, device)  # noqa: E731
            walk = irn_walk(rw, device)
            if taken_file:  # read (and checked) before the CRF labels' hours
                taken = psa.load_trained(rw).to(device)
                make, walk = (lambda: taken), psa_walk(rw, device)
            elif design == "psa":  # the scores' record: what they are computed from (hashing 40 GB is no use)
                scores_record = {"psa": {k: rw.psa[k] for k in ("la_alpha", "ha_alpha")}, "cams": cams_record,
                                 "code": code}
                make = lambda: psa_affinity_model(cfg, info, ids, dest / PSA_SCORES, scores_record, dest,  # noqa: E731
                                                  device)
                walk = psa_walk(rw, device)
            crf = crf_labels(cfg, info, ids, cams, labels, crf_record, gather, score=scored)
            if design == "psa" and not taken_file and any(not (dest / f"{i}.png").is_file() for i in ids):
                psa_scores(cfg, info, ids, cams, dest / PSA_SCORES, scores_record)
            if any(not (dest / f"{i}.png").is_file() for i in ids):  # train (or load) it before the labels' bar
                trained = make()
                make = lambda: trained  # noqa: E731
            fn = walker(make, walk)
            final = label_all(info, ids, cams, dest, fn, "refine (random walk)", scored)
        if work is not None:
            names = [f"{i}.png" for i in ids]
            if method in STAGED:
                names += [f"{CRF_DIR}/{i}.png" for i in ids] + [f"{CRF_DIR}/{FINGERPRINT}"]
                names += [n for n in (AFFINITY_FILE, AFFINITY_CURVE) if (work / n).is_file()]
                live = live_dir(work / AFFINITY_CURVE)  # the curve's dvclive mirror, when dvclive is installed
                if live.is_dir():
                    names += sorted(str(f.relative_to(work)) for f in live.rglob("*") if f.is_file())
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
