"""Where the seeds land: seed mIoU and pixel accuracy on background, object bodies and object parts.

For a trained classifier and a prepared dataset, each variant (a list of param overrides, as ``--set`` takes
them) computes the CAM maps of the first N images of the infer list in memory, sweeps the background threshold
as ``advcam cams`` does, and at the best threshold reports the accuracy of the seeds on three kinds of pixel:
background, body and part. Body and part come from the embedded dataset's ``SegmentationPart/<id>.png``
(1 = body, 2 = part); on other datasets only the mIoU is reported. This is the diagnostic behind docs/results.md's
"what the numbers say": it shows whether a method grows the maps into the bodies (body accuracy up) or into
the clutter (background accuracy down).

    python benchmarks/seed_study.py --data data/synthetic --model models/classifier.pt --images 40 \\
        --variant cam=cam.method=cam --variant advcam=cam.method=advcam \\
        --variant 'lam0=cam.method=advcam;cam.advcam.lam=0' --set 'cam.scales=[1.0]'

``--set`` overrides apply to every variant, before the variant's own. ``--compare`` adds how each variant's
maps agree with the first variant's (Pearson correlation of the ``high_res`` maps), the check behind the speed
options (AdvCAM's default ``precision: fp32`` is true float32 on CUDA; ``--strict-fp32`` does the same for
plain-CAM variants)::

    python benchmarks/seed_study.py --data data/synthetic --model models/classifier.pt --images 120 --compare \
        --device cuda --variant fp32=cam.method=advcam \
        --variant 'bf16=cam.method=advcam;cam.advcam.precision=bf16'

``--scales`` adds, per variant, the seeds of each scale's map alone and of two merges of the same maps: the
reference's sum, and the sum of maps each divided by its own maximum first; with each scale's mean map maximum
(how much the scale weighs in the sum).

``--trace`` adds, per AdvCAM variant,
what one climb at scale 1 does on average: the class score and the other classes' scores at the first and
last step, how far the image moved, and how the max-normalised map grows in the class's part and body pixels
and in the background.

Writes ``benchmarks/results/seed_study/<date>.json`` (or ``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from advcam import config
from advcam.attribution.advcam import advcam_maps, prepare_model
from advcam.attribution.cam import (METHODS, combine_resized, compute_maps, model_stride, resolve_normalise,
                                   resolve_resize)
from advcam.data import load_info
from advcam.data.transforms import normalize
from advcam.metrics import best_index, mean_iou, seed_confusions, seeds_from_cams
from advcam.models import load_classifier
from advcam.utils.device import device_name
from advcam.utils.progress import progress

RESULTS = Path(__file__).resolve().parent / "results" / "seed_study"
REGIONS = ("background", "body", "part")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name=key=value;key=value`` -> (name, ["key=value", ...])."""
    name, sep, rest = text.partition("=")
    if not sep or not name or "=" not in rest:
        raise SystemExit(f"--variant {text!r}: expected NAME=key=value[;key=value...]")
    return name, [item for item in rest.split(";") if item]


def region_masks(root: Path, image_id: str, gt: np.ndarray) -> dict[str, np.ndarray] | None:
    """Background / body / part pixel masks from ``SegmentationPart`` (None when the dataset has none)."""
    path = root / "SegmentationPart" / f"{image_id}.png"
    if not path.is_file():
        return None
    parts = np.array(Image.open(path))
    return {"background": (parts == 0) & (gt == 0), "body": parts == 1, "part": parts == 2}


def study(model: torch.nn.Module, info: Any, ids: Sequence[str], cfg_cam: Any,
          thresholds: Sequence[float], maps: dict[str, dict] | None = None) -> dict[str, Any]:
    """Seed mIoU at the best threshold and the seeds' accuracy per region, for one attribution setting.

    ``maps``, when given, receives each image's CAM maps (``compute_maps``' dict), for comparisons."""
    start = time.perf_counter()
    maps, confs = ({} if maps is None else maps), None
    if cfg_cam.method == "advcam":
        model = prepare_model(model, cfg_cam)  # the speed options that change the model, as `advcam cams` does
    for image_id in progress(ids, desc=f"seeds ({cfg_cam.method})", unit="img"):
        m = compute_maps(model, normalize(info.read_image(image_id)), info.labels[image_id], cfg_cam)
        c = seed_confusions(m["high_res"], m["keys"], info.read_mask(image_id), thresholds, info.num_classes + 1)
        confs = c if confs is None else confs + c
        maps[image_id] = m
    seconds = time.perf_counter() - start
    if confs is None:
        raise SystemExit("seed_study: no images to score")
    mious, best = best_threshold(confs)
    hits = {r: [0, 0] for r in REGIONS}
    for image_id, m in maps.items():
        gt = info.read_mask(image_id)
        regions = region_masks(Path(info.root), image_id, gt)
        if regions is None:
            continue
        seeds = seeds_from_cams(m["high_res"], m["keys"], thresholds[best])
        for r, sel in regions.items():
            hits[r][0] += int((seeds[sel] == gt[sel]).sum())
            hits[r][1] += int(sel.sum())
    return {"seed_miou": mious[best], "best_threshold": thresholds[best],
            "accuracy": {r: (h / n if n else None) for r, (h, n) in hits.items()},
            "seconds_per_image": seconds / max(len(ids), 1)}


def best_threshold(confs: Any) -> tuple[list[float], int]:
    """The seed mIoU per threshold and the index of the best (as ``advcam.steps.cams.evaluate_seeds``)."""
    mious = [mean_iou(c) for c in confs]
    best = best_index(mious)
    if best is None:
        raise SystemExit("seed_study: no threshold gives a finite seed mIoU (no class occurs in the scored images)")
    return mious, best


def scale_study(model: torch.nn.Module, info: Any, ids: Sequence[str], cfg_cam: Any,
                thresholds: Sequence[float]) -> dict[str, Any]:
    """Seed mIoU (best threshold) of each scale of ``cfg_cam.scales`` alone and of two merges of the same
    per-scale maps: ``sum`` (the reference's, :func:`combine_scales`) and ``sum_max_normalised`` (each scale's map
    divided by its own maximum before the sum); ``mean_max``: each scale's map maximum, averaged over the
    (image, class) pairs."""
    scales = [float(s) for s in cfg_cam.scales]
    if cfg_cam.method == "advcam":
        model = prepare_model(model, cfg_cam)
    resize, normalise = resolve_resize(cfg_cam, model), resolve_normalise(cfg_cam, model)
    device = next(model.parameters()).device
    every = list(range(len(scales)))
    merges = {**{f"scale {s:g}": [k] for k, s in enumerate(scales)}, "sum": every, "sum_max_normalised": every}
    confs: dict[str, Any] = {}
    peaks: list[list[float]] = []
    for image_id in progress(ids, desc=f"scales ({cfg_cam.method})", unit="img"):
        keys = sorted(info.labels[image_id])
        if not keys:
            continue
        image = normalize(info.read_image(image_id)).to(device)
        maps = [m.detach().float().cpu() for m in METHODS[cfg_cam.method](model, image, keys, cfg_cam)]
        peaks.extend(np.stack([m.amax((1, 2)).numpy() for m in maps], 1).tolist())
        gt = info.read_mask(image_id)
        for name, chosen in merges.items():
            use = [maps[k] / (maps[k].amax((1, 2), keepdim=True) + 1e-5) if name == "sum_max_normalised"
                   else maps[k] for k in chosen]
            _, high = combine_resized(use, tuple(gt.shape), [scales[k] for k in chosen], resize, model_stride(model),
                                      normalise)
            c = seed_confusions(high.numpy(), np.asarray(keys), gt, thresholds, info.num_classes + 1)
            confs[name] = c if name not in confs else confs[name] + c
    if not confs:
        raise SystemExit("seed_study: no images to score")
    out: dict[str, Any] = {}
    for name, c in confs.items():
        mious, best = best_threshold(c)
        out[name] = {"seed_miou": mious[best], "best_threshold": thresholds[best]}
    out["mean_max"] = dict(zip((f"{s:g}" for s in scales), np.mean(peaks, axis=0).tolist()))
    return out


def trace(model: torch.nn.Module, info: Any, ids: Sequence[str], cfg_cam: Any) -> dict[str, Any]:
    """What one climb at scale 1 does, averaged over the (image, class) pairs of ``ids``.

    ``score`` / ``others``: y_c and the other classes' summed y (average-pooled ReLU maps, summed over the
    flips) at the first and the last step; ``l1``: the masked L1 term at the last step; ``dx``: mean and max
    |x_last - x_0| (normalised units); ``relative_map``: per region (the class's part and body pixels, and the
    background), the mean of the max-normalised map A(x_t) at the first and last step and of the accumulated
    map (what AdvCAM returns); present where the dataset has ``SegmentationPart`` masks."""
    cfg_one = {"scales": [1.0], "flip": cfg_cam.flip, "advcam": cfg_cam.advcam}
    rows: dict[str, list[tuple[float, ...]]] = {k: [] for k in ("score", "others", "l1", "dx", *REGIONS)}
    device = next(model.parameters()).device  # advcam_maps climbs the image where it is (compute_maps moves it)
    for image_id in progress(ids, desc="trace (advcam, scale 1)", unit="img"):
        classes = info.labels[image_id]
        if not classes:
            continue
        steps: list[dict[str, torch.Tensor]] = []
        (acc,) = advcam_maps(model, normalize(info.read_image(image_id)).to(device), classes, cfg_one,
                             callback=lambda t, state: steps.append(state))
        first, last = steps[0], steps[-1]
        gt = info.read_mask(image_id)
        regions = region_masks(Path(info.root), image_id, gt)
        dx = (last["x"] - first["x"]).abs().reshape(len(classes), -1)
        for k, c in enumerate(classes):
            rows["score"].append((float(first["score"][k]), float(last["score"][k])))
            rows["others"].append((float(first["others"][k]), float(last["others"][k])))
            rows["l1"].append((float(last["l1"][k]),))
            rows["dx"].append((float(dx[k].mean()), float(dx[k].max())))
            if regions is None:
                continue
            up = [F.interpolate(m[None, None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
                  for m in (first["map"][k], last["map"][k], acc[k])]
            up = [m / m.max() if m.max() > 0 else m for m in up]
            obj = gt == c + 1
            for region, sel in regions.items():
                sel = sel if region == "background" else sel & obj
                if sel.any():
                    rows[region].append(tuple(float(m[sel].mean()) for m in up))

    def mean(key: str, names: Sequence[str]) -> dict[str, float]:
        return dict(zip(names, np.mean(rows[key], axis=0).tolist())) if rows[key] else {}

    return {"pairs": len(rows["score"]), "score": mean("score", ("first", "last")),
            "others": mean("others", ("first", "last")), "l1": mean("l1", ("last",)).get("last"),
            "dx": mean("dx", ("mean", "max")),
            "relative_map": {r: mean(r, ("first", "last", "accumulated")) for r in REGIONS if rows[r]}}


def map_agreement(ref: dict[str, dict], other: dict[str, dict]) -> dict[str, float | None]:
    """Pearson correlation of the ``high_res`` maps of two variants: over all pixels of all images (pooled),
    and the lowest per image; plus the largest absolute difference (the maps are max-normalised)."""
    a = [ref[i]["high_res"].ravel().astype(np.float64) for i in ref if ref[i]["high_res"].size]
    b = [other[i]["high_res"].ravel().astype(np.float64) for i in ref if ref[i]["high_res"].size]
    per_image = [float(np.corrcoef(x, y)[0, 1]) for x, y in zip(a, b) if x.std() > 0 and y.std() > 0]
    pooled = float(np.corrcoef(np.concatenate(a), np.concatenate(b))[0, 1])
    return {"pooled": pooled, "min_image": min(per_image) if per_image else None,
            "max_abs_diff": max(float(np.abs(x - y).max()) for x, y in zip(a, b))}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="prepared dataset folder (advcam prepare --out)")
    ap.add_argument("--model", required=True, help="classifier checkpoint (advcam train-cls --out)")
    ap.add_argument("--params", default="params.yaml", help="params file the variants start from")
    ap.add_argument("--images", type=int, default=40, help="first N images of the infer list")
    ap.add_argument("--variant", action="append", default=[], help="NAME=key=value[;key=value...] (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="key=value for every variant (repeatable)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="torch device for the classifier (cpu, cuda)")
    ap.add_argument("--strict-fp32", action="store_true",
                    help="CUDA: turn TF32 off globally (for plain-CAM variants; AdvCAM's cam.advcam.precision "
                         "already sets it for the climb)")
    ap.add_argument("--compare", action="store_true",
                    help="also report how each variant's maps agree with the first variant's (correlation)")
    ap.add_argument("--scales", action="store_true",
                    help="also report the seeds of each scale alone and of two merges (sum, max-normalised sum)")
    ap.add_argument("--trace", action="store_true",
                    help="also trace one climb at scale 1 per advcam variant (score, others, |dx|, map per region)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/seed_study/<date>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variant] or [("cam", ["cam.method=cam"]),
                                                             ("advcam", ["cam.method=advcam"])]
    device = torch.device(args.device)
    if args.strict_fp32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    info = load_info(args.data)
    model = load_classifier(args.model, classes=list(info.classes)).eval().to(device)
    ids = info.lists["infer"][: args.images]
    rows: list[dict[str, Any]] = []
    first: dict[str, dict] = {}
    for name, overrides in variants:
        cfg = config.load(args.params if Path(args.params).is_file() else None, [*args.set, *overrides])
        maps: dict[str, dict] = {}
        result = study(model, info, ids, cfg.cam, [float(t) for t in cfg.cam.thresholds], maps)
        rows.append({"variant": name, "overrides": overrides, **result})
        if args.compare and not first:
            first = maps
        elif args.compare:
            rows[-1]["maps_vs_first"] = map_agreement(first, maps)
        acc = result["accuracy"]
        agree = rows[-1].get("maps_vs_first")
        print(f"{name:20s} seed mIoU {100 * result['seed_miou']:5.2f} @ {result['best_threshold']:.2f} | accuracy "
              + " ".join(f"{r} {'-' if acc[r] is None else f'{acc[r]:.2f}'}" for r in REGIONS)
              + f" | {result['seconds_per_image']:.3f} s/img"
              + (f" | maps vs {variants[0][0]}: r {agree['pooled']:.5f} (min image {agree['min_image']:.5f})"
                 if agree else ""), flush=True)
        if args.scales:
            sc = rows[-1]["scales"] = scale_study(model, info, ids, cfg.cam, [float(t) for t in cfg.cam.thresholds])
            print(f"{'':20s} " + " | ".join(f"{k} {100 * v['seed_miou']:.2f} @ {v['best_threshold']:.2f}"
                                            for k, v in sc.items() if k != "mean_max")
                  + " | mean max " + " ".join(f"{k}: {v:.1f}" for k, v in sc["mean_max"].items()), flush=True)
        if args.trace and cfg.cam.method == "advcam":
            tr = rows[-1]["trace"] = trace(model, info, ids, cfg.cam)
            rel = tr.get("relative_map", {})
            print(f"{'':20s} climb: score {tr['score']['first']:.2f} -> {tr['score']['last']:.2f}, others "
                  f"{tr['others']['first']:.2f} -> {tr['others']['last']:.2f}, mean |dx| {tr['dx']['mean']:.3f} | "
                  "relative map first/last/accumulated "
                  + " ".join(f"{r} {v['first']:.2f}/{v['last']:.2f}/{v['accumulated']:.2f}" for r, v in rel.items()),
                  flush=True)
    today = dt.date.today().isoformat()
    out = Path(args.out) if args.out else RESULTS / f"{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": today, "device": device_name(device), "strict_fp32": args.strict_fp32,
                               "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "data": str(args.data), "model": str(args.model), "images": len(ids),
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
