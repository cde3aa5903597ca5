"""Where the seeds land: seed mIoU and pixel accuracy on background, object bodies and object parts.

For a trained classifier and a prepared dataset, each variant (a list of param overrides, as ``--set`` takes
them) computes the CAM maps of the first N images of the infer list in memory, sweeps the background threshold
as ``advcam cams`` does, and at the best threshold reports the accuracy of the seeds on three kinds of pixel:
background, body and part. Body and part come from the embedded dataset's ``SegmentationPart/<id>.png``
(1 = body, 2 = part); on other datasets only the mIoU is reported. This is the diagnostic behind the README's
"what the numbers say": it shows whether a method grows the maps into the bodies (body accuracy up) or into
the clutter (background accuracy down).

    python benchmarks/seed_study.py --data data/synthetic --model models/classifier.pt --images 40 \\
        --variant cam=cam.method=cam --variant advcam=cam.method=advcam \\
        --variant 'lam0=cam.method=advcam;cam.advcam.lam=0' --set 'cam.scales=[1.0]'

``--set`` overrides apply to every variant, before the variant's own. ``--trace`` adds, per AdvCAM variant,
what one climb at scale 1 does on average: the class score and the other classes' scores at the first and
last step, how far the image moved, and how the max-normalised map grows in the class's part and body pixels
and in the background.

Writes ``benchmarks/results/seed_study/<date>.json`` (or ``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from advcam import config
from advcam.attribution.advcam import advcam_params, climb
from advcam.attribution.cam import compute_maps
from advcam.data import load_info
from advcam.data.transforms import normalize
from advcam.metrics import mean_iou, seed_confusions, seeds_from_cams
from advcam.models import load_classifier
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
          thresholds: Sequence[float]) -> dict[str, Any]:
    """Seed mIoU at the best threshold and the seeds' accuracy per region, for one attribution setting."""
    start = time.perf_counter()
    maps, confs = {}, None
    for image_id in progress(ids, desc=f"seeds ({cfg_cam.method})", unit="img"):
        m = compute_maps(model, normalize(info.read_image(image_id)), info.labels[image_id], cfg_cam)
        c = seed_confusions(m["high_res"], m["keys"], info.read_mask(image_id), thresholds, info.num_classes + 1)
        confs = c if confs is None else confs + c
        maps[image_id] = m
    seconds = time.perf_counter() - start
    mious = [mean_iou(c) for c in confs]
    best = int(np.nanargmax(np.asarray(mious, dtype=np.float64)))  # as advcam.steps.cams.evaluate_seeds
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


def trace(model: torch.nn.Module, info: Any, ids: Sequence[str], cfg_cam: Any) -> dict[str, Any]:
    """What one climb at scale 1 does, averaged over the (image, class) pairs of ``ids``.

    ``score`` / ``others``: y_c and the other classes' summed y (average-pooled ReLU maps, summed over the
    flips) at the first and the last step; ``l1``: the masked L1 term at the last step; ``dx``: mean and max
    |x_last - x_0| (normalised units); ``relative_map``: per region (the class's part and body pixels, and the
    background), the mean of the max-normalised map A(x_t) at the first and last step and of the accumulated
    map (what AdvCAM returns). Needs ``SegmentationPart`` for the regions (else they are NaN)."""
    p = advcam_params(cfg_cam.advcam)
    sums: dict[str, list[float]] = {}

    def add(key: str, *values: float) -> None:
        row = sums.setdefault(key, [0.0] * (len(values) + 1))
        for k, v in enumerate(values):
            if np.isfinite(v):
                row[k] += v
        row[-1] += 1

    for image_id in progress(ids, desc="trace (advcam, scale 1)", unit="img"):
        classes = info.labels[image_id]
        if not classes:
            continue
        steps: list[dict[str, torch.Tensor]] = []
        acc = climb(model, normalize(info.read_image(image_id)), classes, steps=int(p["steps"]), xi=float(p["xi"]),
                    lam=float(p["lam"]), tau=float(p["tau"]), flip=bool(cfg_cam.flip),
                    sign_steps=bool(p["sign_steps"]), cumulative_mask=bool(p["cumulative_mask"]),
                    suppress_image_classes_only=bool(p["suppress_image_classes_only"]),
                    callback=lambda t, state: steps.append(state))
        first, last = steps[0], steps[-1]
        gt = info.read_mask(image_id)
        parts_path = Path(info.root) / "SegmentationPart" / f"{image_id}.png"
        parts = np.array(Image.open(parts_path)) if parts_path.is_file() else None
        dx = (last["x"] - first["x"]).abs().flatten(1).view(len(classes), -1)
        for k, c in enumerate(classes):
            add("score", float(first["score"][k]), float(last["score"][k]))
            add("others", float(first["others"][k]), float(last["others"][k]))
            add("l1", float(last["l1"][k]))
            add("dx", float(dx[k].mean()), float(dx[k].max()))
            if parts is None:
                continue
            maps = [first["map"][k], last["map"][k], acc[k]]
            up = [torch.nn.functional.interpolate(m[None, None], size=gt.shape, mode="bilinear",
                                                  align_corners=False)[0, 0].numpy() for m in maps]
            up = [m / m.max() if m.max() > 0 else m for m in up]
            obj = gt == c + 1
            for region, sel in (("part", obj & (parts == 2)), ("body", obj & (parts == 1)),
                                ("background", gt == 0)):
                if sel.any():
                    add(f"relative_map.{region}", *(float(m[sel].mean()) for m in up))
    out: dict[str, Any] = {"pairs": int(sums.get("score", [0, 0, 0])[-1])}
    for key, row in sums.items():
        means = [v / row[-1] for v in row[:-1]] if row[-1] else []
        head, _, region = key.partition(".")
        if region:
            out.setdefault(head, {})[region] = dict(zip(("first", "last", "accumulated"), means))
        elif key == "dx":
            out[key] = dict(zip(("mean", "max"), means))
        else:
            out[key] = dict(zip(("first", "last"), means)) if len(means) == 2 else means[0]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="prepared dataset folder (advcam prepare --out)")
    ap.add_argument("--model", required=True, help="classifier checkpoint (advcam train-cls --out)")
    ap.add_argument("--params", default="params.yaml", help="params file the variants start from")
    ap.add_argument("--images", type=int, default=40, help="first N images of the infer list")
    ap.add_argument("--variant", action="append", default=[], help="NAME=key=value[;key=value...] (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="key=value for every variant (repeatable)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--trace", action="store_true",
                    help="also trace one climb at scale 1 per advcam variant (score, others, |dx|, map per region)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/seed_study/<date>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variant] or [("cam", ["cam.method=cam"]),
                                                             ("advcam", ["cam.method=advcam"])]
    info = load_info(args.data)
    model = load_classifier(args.model, classes=list(info.classes)).eval()
    ids = info.lists["infer"][: args.images]
    rows = []
    for name, overrides in variants:
        cfg = config.load(args.params if Path(args.params).is_file() else None, [*args.set, *overrides])
        result = study(model, info, ids, cfg.cam, [float(t) for t in cfg.cam.thresholds])
        rows.append({"variant": name, "overrides": overrides, **result})
        acc = result["accuracy"]
        print(f"{name:20s} seed mIoU {100 * result['seed_miou']:5.1f} @ {result['best_threshold']:.2f} | accuracy "
              + " ".join(f"{r} {'-' if acc[r] is None else f'{acc[r]:.2f}'}" for r in REGIONS)
              + f" | {result['seconds_per_image']:.2f} s/img", flush=True)
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
    out.write_text(json.dumps({"date": today, "device": platform.processor() or platform.machine(),
                               "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "data": str(args.data), "model": str(args.model), "images": len(ids),
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
