"""The random walk of the ``refine`` stage (``refine.method: randomwalk``): its affinity network, trained or taken,
and the per-image walk; :mod:`advcam.steps.refine` runs them.

``design: irn`` trains IRN's class-boundary network (:mod:`advcam.refine.irn`) on the CRF labels and walks the
stride-4 CAMs over its path affinities (:mod:`advcam.refine.randomwalk`), as AdvCAM refines; ``design: affinitynet``
does the same with an embedding's affinities (:mod:`advcam.refine.affinity`) in place of the boundaries.
``design: psa`` takes PSA's or SEAM's trained AffinityNet, or trains it on CRF scores
(:mod:`advcam.refine.psa_labels`), and walks as PSA does (:mod:`advcam.refine.psa`). Designs irn and affinitynet take
a network trained elsewhere too (``refine.randomwalk.trained``: IRN's ``res50_irn.pth`` or an earlier run's
``.affinity.pt``, :mod:`advcam.refine.trained`). A network trained here is saved to ``<out>/.affinity.pt`` with its
fingerprint (resume file ``.affinity.pt.resume.pt`` while training, curve ``.affinity.csv``) and retrained only when
the fingerprint changes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, cast

import numpy as np
import torch
from torch import nn

from advcam.attribution.cam import load_cam
from advcam.data import image_size
from advcam.data.datasets import SegmentationDataset
from advcam.data.transforms import normalize
from advcam.refine import irn, psa, psa_labels
from advcam.refine import trained as taken
from advcam.refine.affinity import affinity_source, batch_loss, build_affinity_net, grid_loss, pairwise_affinity
from advcam.refine.randomwalk import walk_labels
from advcam.steps.shards import FINGERPRINT, invalidate_if_changed
from advcam.train import loop
from advcam.train.live import live_dir
from advcam.train.memo import weights_digest
from advcam.train.segmentation import pseudo_label_reader
from advcam.utils.checkpoint import load_checkpoint, save_checkpoint
from advcam.utils.device import resolve_device, seed_everything
from advcam.utils.errors import AdvcamError
from advcam.utils.io import check_free_space, clean_stale_temps, files_digest, ids_digest, save_npz
from advcam.utils.progress import log, progress

LabelFn = Callable[[np.ndarray, dict], np.ndarray]
WalkFn = Callable[[nn.Module, np.ndarray, dict], np.ndarray]
CRF_DIR = ".crf"  # the CRF labels the walk starts from (and designs irn, affinitynet train on), in the output folder
AFFINITY_FILE = ".affinity.pt"
AFFINITY_CURVE = ".affinity.csv"
AFFINITY_SCALES = (0.5, 1.5)  # random rescaling of the training images (IRN's train_irn: rescale=(0.5, 1.5))
TRAIN_KEYS = ("epochs", "batch_size", "crop_size", "lr", "weight_decay", "radius")
# design psa: the CRF scores its AffinityNet trains on, in the work folder (the output folder without one); not
# published into the output folder (DVC would cache them: about 40 GB for VOC's train_aug)
PSA_SCORES = ".psa_crf"
PSA_TRAIN_KEYS = ("la_alpha", "ha_alpha", "epochs", "batch_size", "crop_size", "lr", "weight_decay")


def affinity_fingerprint(cfg: Any, labels: Path, ids: list[str]) -> dict[str, Any]:
    """What the affinity network (design affinitynet) or the boundary network (irn) depends on: its training
    params, arch, seed and the CRF labels' bytes."""
    rw = cfg.refine.randomwalk
    digest = files_digest([labels / f"{i}.png" for i in ids], "fingerprint the CRF labels")
    arch, pretrained = affinity_source(cfg.classifier, rw)
    # affinitynet trains at radius; irn at train_radius (its radius is the walk's only)
    keys = TRAIN_KEYS if rw.design == "affinitynet" else tuple(k for k in TRAIN_KEYS if k != "radius") + (
        "train_radius",)
    return {"stage": "affinity" if rw.design == "affinitynet" else "boundary", "params": {k: rw[k] for k in keys},
            "arch": arch, "pretrained": pretrained, "seed": int(cfg.seed), "labels": digest}


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
    """``design: irn``: IRN's boundary network, ``affinitynet``: the affinity network, of ``out/.affinity.pt`` if it
    fits, else trained (resuming) on the CRF labels in ``labels``."""
    rw = cfg.refine.randomwalk
    arch, pretrained = affinity_source(cfg.classifier, rw)
    boundary = rw.design == "irn"
    build = irn.build_boundary_net if boundary else build_affinity_net
    loss, radius = (irn.batch_loss, int(rw.train_radius)) if boundary else (batch_loss, int(rw.radius))

    def train(resume: Path) -> nn.Module:
        model = build(arch, pretrained).to(device)
        dataset = SegmentationDataset(info, ids, pseudo_label_reader(info, labels), int(rw.crop_size), train=True,
                                      seed=int(cfg.seed), scale_range=AFFINITY_SCALES)
        # IRN's PolyOptimizer passes its weight decay as SGD's momentum: the effective momentum is the weight decay
        optimizer = loop.make_sgd(model.param_groups(), float(rw.lr), float(rw.weight_decay),
                                  float(rw.weight_decay), head_mult=1.0)
        log.info("refine: training the %s network (%s, %d images, %d epochs) on %s",
                 "boundary" if boundary else "affinity", arch, len(ids), int(rw.epochs), device)
        loop.fit(model, optimizer,
                 lambda e: loop.epoch_loader(dataset, int(rw.batch_size), int(cfg.seed), e, int(cfg.workers)),
                 lambda m, b: loss(m, b, radius), epochs=int(rw.epochs), base_lr=float(rw.lr),
                 resume=resume, curves=out / AFFINITY_CURVE, fingerprint=fingerprint,
                 desc="boundary" if boundary else "affinity")
        return model

    fingerprint = affinity_fingerprint(cfg, labels, ids)
    return cached_or_trained(out / AFFINITY_FILE, {"kind": fingerprint["stage"], "arch": arch,
                                                   "fingerprint": fingerprint},
                             lambda: build(arch), train, int(cfg.seed), device)


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


def walker(model_fn: Callable[[], nn.Module], walk: WalkFn) -> LabelFn:
    """``fn(image, maps)`` = ``walk(model, image, maps)``, the random-walk label of one image (the affinity network
    is made on first use)."""
    cache: list[nn.Module] = []

    def fn(image: np.ndarray, maps: dict) -> np.ndarray:
        if not cache:
            cache.append(model_fn())
        with torch.inference_mode():
            return walk(cache[0], image, maps)
    return fn


def irn_walk(cfg_rw: Any, device: torch.device) -> WalkFn:
    """``design: irn``: the stride-4 CAMs, damped by ``1 - boundary``, walked over the boundary map's path affinities
    (IRN); ``affinitynet``: walked over the affinities of the embedding."""
    radius, boundary = int(cfg_rw.radius), cfg_rw.design == "irn"

    def walk(model: nn.Module, image: np.ndarray, maps: dict) -> np.ndarray:
        x = normalize(image).to(device)
        edge = irn.boundary(cast(irn.BoundaryNet, model), x, int(cfg_rw.crop_size)) if boundary else None
        out = edge if edge is not None else model(x[None])[0]
        cam = torch.from_numpy(maps["cam"]).to(device)
        if cam.shape[0] and tuple(out.shape[-2:]) != tuple(cam.shape[-2:]):
            raise AdvcamError(f"affinity grid {tuple(out.shape[-2:])} differs from the CAM grid "
                              f"{tuple(cam.shape[-2:])}")
        aff = irn.path_affinity(out[None], radius)[0] if edge is not None else pairwise_affinity(out[None], radius)[0]
        return walk_labels(cam, maps["keys"], aff, image.shape[:2], radius=radius, beta=float(cfg_rw.beta),
                           exp_times=int(cfg_rw.exp_times), cam_power=float(cfg_rw.cam_power),
                           bg_threshold=float(cfg_rw.bg_threshold), boundary=edge)
    return walk


def psa_walk(cfg_rw: Any, device: torch.device) -> WalkFn:
    """``design: psa``: the ``high_res`` maps walked at stride 8 over PSA's AffinityNet (:mod:`advcam.refine.psa`)."""
    p = cfg_rw["psa"]

    def walk(model: nn.Module, image: np.ndarray, maps: dict) -> np.ndarray:
        aff, radius = psa.affinities(cast(psa.PSAAffinityNet, model), normalize(image).to(device), int(cfg_rw.radius))
        return psa.walk_labels(torch.from_numpy(maps["high_res"]), maps["keys"], aff, radius,
                               alpha=float(p["alpha"]), beta=float(p["beta"]), logt=int(p["logt"]))
    return walk


def affinity_record(cfg: Any) -> dict[str, Any]:
    """What the walk's labels depend on beyond the refine params and the CAMs: the taken network file's bytes
    (a new file at the same path reruns the walk), or what the trained network starts from and its seed."""
    rw = cfg.refine.randomwalk
    if rw.design == "psa" and psa.trained_file(rw):
        return {"trained": weights_digest(psa.trained_file(rw))}
    if rw.design != "psa" and taken.trained_file(rw):
        return {"trained": weights_digest(taken.trained_file(rw))}
    if rw.design == "psa":
        return {"pretrained": weights_digest(psa.pretrained_source(cfg.classifier, rw)), "seed": cfg.seed}
    return {"arch": cfg.classifier.arch, "pretrained": cfg.classifier.pretrained, "seed": cfg.seed}


def walker_for(cfg: Any, info: Any, ids: list[str], cams: Path, out: Path, cams_record: Any,
               code: str) -> Callable[[bool], LabelFn]:
    """``ready(pending)``: the per-image label function of the configured design; with labels ``pending`` the network
    is made first (loaded, or trained on ``out``'s CRF labels or scores, before the labels' bar), else on first use.
    A taken network file is read and checked here, before the CRF labels' hours."""
    rw = cfg.refine.randomwalk
    device = resolve_device(cfg.device)
    make: Callable[[], nn.Module]
    if rw.design == "psa" and psa.trained_file(rw):
        psa_net = psa.load_trained(rw).to(device)
        make, walk = (lambda: psa_net), psa_walk(rw, device)
    elif taken.trained_file(rw):
        walk_net = taken.load_trained(rw).to(device)
        make, walk = (lambda: walk_net), irn_walk(rw, device)
    elif rw.design == "psa":  # the scores' record: what they are computed from (hashing 40 GB is no use)
        scores_record = {"psa": {k: rw.psa[k] for k in ("la_alpha", "ha_alpha")}, "cams": cams_record, "code": code}

        def make() -> nn.Module:
            psa_scores(cfg, info, ids, cams, out / PSA_SCORES, scores_record)
            return psa_affinity_model(cfg, info, ids, out / PSA_SCORES, scores_record, out, device)
        walk = psa_walk(rw, device)
    else:
        make, walk = (lambda: affinity_model(cfg, info, ids, out / CRF_DIR, out, device)), irn_walk(rw, device)

    def ready(pending: bool) -> LabelFn:
        if not pending:
            return walker(make, walk)
        model = make()
        return walker(lambda: model, walk)
    return ready


def published(work: Path, ids: list[str]) -> list[str]:
    """The random walk's files in the work folder that go into the output folder besides the labels: the CRF labels,
    the affinity network and its curve (with its dvclive mirror); not design psa's CRF scores."""
    names = [f"{CRF_DIR}/{i}.png" for i in ids] + [f"{CRF_DIR}/{FINGERPRINT}"]
    names += [n for n in (AFFINITY_FILE, AFFINITY_CURVE) if (work / n).is_file()]
    live = live_dir(work / AFFINITY_CURVE)  # the curve's dvclive mirror, when dvclive is installed
    if live.is_dir():
        names += sorted(str(f.relative_to(work)) for f in live.rglob("*") if f.is_file())
    return names
