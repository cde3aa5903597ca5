"""AdvCAM cost model: wall time of VOC train_aug (10,582 images) on N GPUs, from measured per-image times.

Reads ``benchmarks/results/*.json`` (written by ``advcam_speed.py``). For each result file and variant
(``reference``, ``ours-extension``, ``ours-fallback``), the time per image of VOC is

    t = s_per_class x classes_per_image (VOC: 1.55) x (VOC pixels / measured pixels, when --scale-pixels)

since climbing runs once per ground-truth class and a network's cost is about linear in the input pixels.
With ``workflow.shards = N`` (one GPU per shard, see docs/cluster.md), shard ``I`` holds every N-th image,
so the slowest shard has ``ceil(images / N)`` images and

    wall(N) = startup + ceil(images / N) x t          GPU-hours(N) = N x wall(N)

``startup`` (default 60 s) covers a job's start, the classifier load and the gather. Nothing else is modelled:
queueing on a cluster, I/O contention and GPU clock differences are not. A measurement on another
backbone than the paper's ResNet-50 (``resnet_small`` on CPU) or another image size only shows the method;
its absolute times are not VOC's.

    python benchmarks/cost_model.py                       # every results/*.json, GPUs 1 2 4 8 16
    python benchmarks/cost_model.py --gpus 1 4 8 --md benchmarks/results/cost_model.md
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
VOC_IMAGES = 10_582          # SBD train_aug
VOC_CLASSES_PER_IMAGE = 1.55  # ground-truth classes per VOC image (the climbing runs once per class)
VOC_HW = (375, 500)          # the typical VOC image (most are 500 x 375 or 375 x 500)
REFERENCE_AUTHOR = (14.0, 4)  # the AdvCAM author's figure: about 14 h on 4 GPUs for train_aug
VARIANTS = ("ours-extension", "ours-fallback", "ours-tf32-fast", "ours-fast", "reference")


def per_image_seconds(result: dict[str, Any], variant: str, classes_per_image: float,
                      scale_pixels: bool) -> float | None:
    """Seconds per VOC image of ``variant`` in one ``advcam_speed.py`` result (None when not measured)."""
    row = result.get("results", {}).get(variant)
    if not row:
        return None
    if "s_per_class" in row:
        t = float(row["s_per_class"]) * classes_per_image
    elif "s_per_image" in row:
        t = float(row["s_per_image"]) / float(result.get("classes_per_image", 1.5)) * classes_per_image
    else:
        return None
    if scale_pixels and result.get("size_hw"):
        h, w = result["size_hw"]
        t *= (VOC_HW[0] * VOC_HW[1]) / float(h * w)
    return t


def wall_seconds(t_image: float, gpus: int, images: int = VOC_IMAGES, startup: float = 60.0) -> float:
    """Wall time with ``gpus`` shards: the slowest shard's images plus the fixed startup."""
    return startup + math.ceil(images / gpus) * t_image


def fmt_hours(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.0f} min"


def table(rows: list[tuple[str, float]], gpus: Sequence[int], images: int, startup: float) -> list[str]:
    """Markdown rows: one per (label, seconds per image), one column per GPU count."""
    head = "| measured on, variant | s / image | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in gpus) + " |"
    lines = [head, "|" + "---|" * (len(gpus) + 2)]
    for label, t in rows:
        cells = [fmt_hours(wall_seconds(t, n, images, startup)) for n in gpus]
        lines.append(f"| {label} | {t:.2f} | " + " | ".join(cells) + " |")
    hours, n_ref = REFERENCE_AUTHOR
    t_ref = hours * 3600 * n_ref / VOC_IMAGES
    cells = [fmt_hours(t_ref * math.ceil(images / n)) for n in gpus]
    lines.append(f"| AdvCAM author (14 h on 4 GPUs) | {t_ref:.1f} | " + " | ".join(cells) + " |")
    return lines


def load_results(paths: Sequence[Path]) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in paths:
        for f in sorted(path.glob("*.json")) if path.is_dir() else [path]:
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                print(f"cost_model: skipping {f} ({exc})", file=sys.stderr)
                continue
            if isinstance(data, dict) and "results" in data:
                found.append((f, data))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", type=Path, default=[RESULTS], help="result files or folders")
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--images", type=int, default=VOC_IMAGES)
    ap.add_argument("--classes-per-image", type=float, default=VOC_CLASSES_PER_IMAGE)
    ap.add_argument("--startup", type=float, default=60.0, help="seconds per shard job besides the images")
    ap.add_argument("--no-scale-pixels", dest="scale_pixels", action="store_false",
                    help="use the measured time per image as it is (no scaling to VOC's 500 x 375)")
    ap.add_argument("--md", type=Path, default=None, help="also write the Markdown snippet here")
    args = ap.parse_args(argv)
    if any(n < 1 for n in args.gpus):
        ap.error("--gpus: counts must be >= 1")
    if args.images < 1:
        ap.error(f"--images: must be >= 1, got {args.images}")
    if not (math.isfinite(args.classes_per_image) and args.classes_per_image > 0):
        ap.error(f"--classes-per-image: must be a finite number > 0, got {args.classes_per_image}")
    if not (math.isfinite(args.startup) and args.startup >= 0):
        ap.error(f"--startup: must be a finite number >= 0, got {args.startup}")

    rows: list[tuple[str, float]] = []
    notes = []
    for path, result in load_results(args.results):
        where = f"{path.stem}, {result.get('model', '?')}"
        found = [(variant, per_image_seconds(result, variant, args.classes_per_image, args.scale_pixels))
                 for variant in VARIANTS]
        timed = [(variant, t) for variant, t in found if t is not None]
        if not timed:  # e.g. a run of the fused op alone
            continue
        rows += [(f"{where}, {variant}", t) for variant, t in timed]
        size = "x".join(str(v) for v in result.get("size_hw", [])[::-1]) or "?"
        notes.append(f"`{path.name}`: {result.get('model', '?')} at {size}, {result.get('steps', '?')} steps, "
                     f"{result.get('threads', '?')} thread(s), torch {result.get('torch', '?')}")
        if not str(result.get("device", "")).startswith("cuda"):
            notes.append(f"  ({path.name} was measured on a CPU: its columns are N such CPU workers, not GPUs)")
        if result.get("model") != "resnet50":
            notes.append(f"  (not the paper's ResNet-50: {path.name} shows the method, not VOC's absolute time)")
    if not rows:
        print("cost_model: no measured per-image times found in " + ", ".join(map(str, args.results)),
              file=sys.stderr)
        return 2
    scaled = " scaled to 500 x 375 pixels," if args.scale_pixels else ""
    lines = [f"Estimated AdvCAM wall time for VOC train_aug ({args.images:,} images, "
             f"{args.classes_per_image} classes per image) with `workflow.shards` = number of GPUs: measured "
             f"time per class{scaled} x classes per image x ceil(images / GPUs) + {args.startup:.0f} s per job "
             f"(`benchmarks/cost_model.py`).", "", *table(rows, args.gpus, args.images, args.startup), "",
             *[f"- {n}" if not n.startswith("  ") else f"  {n.strip()}" for n in notes]]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
