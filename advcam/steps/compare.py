"""``advcam compare``: a gallery of several CAM folders side by side (e.g. CAM vs AdvCAM on the same images)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from advcam.attribution.cam import load_cam
from advcam.data import load_info
from advcam.data.voc import palette
from advcam.plots import cam_overlay, colorize, plot_gallery
from advcam.utils.errors import AdvcamError

log = logging.getLogger("advcam")


def run(cfg: Any, data: Path, cams: Sequence[Path], labels: Sequence[str], out: Path, n: int = 6,
        ids: Sequence[str] = ()) -> None:
    """Rows: images present in every CAM folder (or ``ids``); columns: image, ground truth, one map per folder."""
    if len(labels) != len(cams):
        raise AdvcamError(f"compare: {len(cams)} CAM folders but {len(labels)} labels")
    if n < 1 and not ids:
        raise AdvcamError(f"compare: -n must be at least 1, got {n}")
    info = load_info(data)
    for folder in cams:
        if not Path(folder).is_dir():
            raise AdvcamError(f"compare: CAM folder not found: {folder}")
    info.require_listed(ids, "compare")
    chosen = list(ids) or [i for i in info.lists["infer"]
                           if all((Path(f) / f"{i}.npz").is_file() for f in cams)][:n]
    if not chosen:
        raise AdvcamError(f"compare: no image of the infer list has a CAM file in every folder of {list(map(str, cams))}")
    pal = palette()
    rows = []
    for image_id in chosen:
        image = info.read_image(image_id)
        row: dict[str, Any] = {"id": image_id, "image": image}
        if Path(info.mask_path(image_id)).is_file():
            row["ground truth"] = colorize(info.read_mask(image_id), pal)
        for folder, label in zip(cams, labels):
            row[label] = cam_overlay(image, load_cam(Path(folder) / f"{image_id}.npz", image.shape[:2])["high_res"])
        rows.append(row)
    plot_gallery(rows, out, columns=["image", "ground truth", *labels])
    log.info("wrote %s (%d images x %d methods)", out, len(rows), len(cams))
