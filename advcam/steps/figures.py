"""Stage ``figures``: the report's tables and figures from a finished run (``snakemake --report``).

Reads what the pipeline wrote (``metrics/{seeds,pseudo,segmentation}.json``, ``plots/*.csv``, ``cams/``,
``pseudo/``, the two checkpoints) and writes into ``out/``:

* ``methods.html`` / ``methods.csv``: one row per run (this run, then every ``runs/<label>/`` folder holding a
  copy of another run's ``seeds.json``, ``pseudo.json``, ``segmentation.json`` and ``seeds_threshold.csv``):
  its methods (the classifier's with the file it was taken from, for ``classifier.trained``), seed mIoU (best
  threshold), pseudo-label mIoU and labelled fraction, final val mIoU, in percent.
* ``threshold.png``: seed mIoU against the background threshold, one curve per run.
* ``per_class_iou.png`` / ``per_class_iou.csv``: IoU per class of the seeds, the pseudo labels and the val
  predictions of this run.
* ``training.png``: loss and learning rate of every training run (classifier, affinity net, segmenter).
* ``gallery.png``: one row per image (the images of the evaluation gallery): image, ground truth, CAM, AdvCAM,
  pseudo label, prediction. The configured ``cam.method``'s maps come from ``cams/``; the other method's maps
  are computed here for the gallery images only, with the same classifier and ``cam`` params. After IRN's random
  walk (``refine.randomwalk.design: irn``) a ``boundary`` column, before the pseudo label, shows the class-boundary
  map its walk ran on (from ``pseudo/.affinity.pt``).

:func:`visualize` (``advcam visualize <id>``) draws the same row for one image.
"""
from __future__ import annotations

import csv
import html
import io
from pathlib import Path
from typing import Any, Mapping, cast

import torch

from advcam.attribution.cam import compute_maps, load_cam
from advcam import config
from advcam.config import Config
from advcam.data import image_classes, load_info
from advcam.data.transforms import normalize
from advcam.data.voc import palette, read_label
from advcam.plots import (cam_overlay, colorize, plot_curves, plot_gallery, plot_grouped_bars,
                          plot_training_curves)
from advcam.steps.evaluate import gallery_ids, predict
from advcam.refine import irn
from advcam.steps.refine_walk import AFFINITY_CURVE, AFFINITY_FILE
from advcam.utils.device import resolve_device
from advcam.utils.errors import AdvcamError
from advcam.utils.io import read_json, write_text
from advcam.utils.progress import log, progress

OUTPUTS = ("methods.html", "methods.csv", "threshold.png", "per_class_iou.png", "per_class_iou.csv",
           "training.png", "gallery.png")
GALLERY_COLUMNS = ("image", "ground truth", "CAM", "AdvCAM", "boundary", "pseudo label", "prediction")
METHOD_TITLES = {"cam": "CAM", "advcam": "AdvCAM"}
TABLE_COLUMNS = ("run", "classifier", "attribution", "refinement", "seed mIoU %", "best threshold",
                 "pseudo mIoU % (labelled px)", "labelled %", "pseudo mIoU % (unsure = bg)", "val mIoU %")
METRIC_FILES = ("seeds.json", "pseudo.json", "segmentation.json")


# ---- tables ------------------------------------------------------------------------------------------------
def read_metrics(folder: Path, required: bool = True) -> dict[str, Any]:
    """The three metric JSONs of a run merged into one flat dict (missing files: error, or skipped)."""
    merged: dict[str, Any] = {}
    for name in METRIC_FILES:
        path = Path(folder) / name
        if not path.is_file():
            if required:
                raise AdvcamError(f"figures: metrics file not found: {path} (run the pipeline first)")
            continue
        merged.update(read_json(path))
    return merged


def read_csv_columns(path: Path) -> dict[str, list[float]]:
    """A numeric CSV (header row) as ``{column: values}``; empty cells become NaN; a header alone gives empty
    columns (the curve of a classifier taken with ``classifier.trained``)."""
    try:
        reader = csv.DictReader(Path(path).read_text().splitlines())
        rows = list(reader)
    except OSError as exc:
        raise AdvcamError(f"figures: cannot read {path} ({exc})") from None
    cols: dict[str, list[float]] = {str(key): [] for key in reader.fieldnames or []}
    for r, row in enumerate(rows, start=2):
        for key, value in row.items():
            try:
                cols.setdefault(key, []).append(float(value) if value not in ("", None) else float("nan"))
            except ValueError:
                raise AdvcamError(f"figures: {path}, line {r}: column {key!r} is not a number: {value!r}") from None
    return cols


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * float(value):.1f}"


def table_row(label: str, methods: Mapping[str, str], m: Mapping[str, Any]) -> list[str]:
    """One row of the method table (percent with one decimal; empty where a stage has no number)."""
    thr = m.get("seed_best_threshold")
    return [label, methods.get("classifier", ""), methods.get("cam", ""), methods.get("refine", ""),
            _pct(m.get("seed_miou")), "" if thr is None else f"{float(thr):g}", _pct(m.get("pseudo_miou")),
            _pct(m.get("pseudo_labelled_fraction")), _pct(m.get("pseudo_miou_unsure_as_background")),
            _pct(m.get("val_miou"))]


def table_html(rows: list[list[str]], caption: str) -> str:
    """A small standalone HTML page with the table (the report shows it in a frame)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>\n" for row in rows)
    style = ("body{font-family:sans-serif;font-size:14px}table{border-collapse:collapse}"
             "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
             "td:nth-child(-n+4){text-align:left}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>methods</title><style>{style}</style>"
            f"</head><body><table><caption>{html.escape(caption)}</caption><tr>{head}</tr>\n{body}</table>"
            "</body></html>\n")


def table_csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    writer.writerows(rows)
    return buf.getvalue()


def run_methods(folder: Path) -> dict[str, str]:
    """The classifier, attribution and refinement methods of a ``runs/<label>/`` folder, from the copy of its
    ``params.yaml`` (empty when there is none; a file that does not validate is named in a warning)."""
    path = Path(folder) / "params.yaml"
    if not path.is_file():
        return {}
    try:
        other = config.load(path)
    except (AdvcamError, OSError) as exc:
        log.warning("figures: ignoring %s (%s)", path, exc)
        return {}
    return methods_of(other)


def methods_of(cfg: Any) -> dict[str, str]:
    """The classifier (with the file it was taken from, for ``classifier.trained``), attribution and refinement
    (with the random walk's design, and PSA's AffinityNet file) methods of a run's params."""
    classifier = str(cfg.classifier.method)
    if cfg.classifier.get("trained"):
        classifier += f" (taken: {Path(str(cfg.classifier.trained)).name})"
    refine, walk = str(cfg.refine.method), cfg.refine.randomwalk
    if refine == "randomwalk" and walk.design == "psa":
        refine += f" (psa, taken: {Path(str(walk.psa.trained)).name})" if walk.psa.trained else " (psa)"
    elif refine == "randomwalk":
        refine += f" ({walk.design})"
    return {"classifier": classifier, "cam": str(cfg.cam.method), "refine": refine}


def other_runs(runs: Path) -> dict[str, Path]:
    """``runs/<label>/`` folders that hold at least one metrics JSON, sorted by label."""
    runs = Path(runs)
    if not runs.is_dir():
        return {}
    return {p.name: p for p in sorted(runs.iterdir())
            if p.is_dir() and any((p / f).is_file() for f in METRIC_FILES)}


def per_class_groups(classes: list[str], m: Mapping[str, Any]) -> dict[str, list[float | None]]:
    """IoU per class (background first) of seeds, pseudo labels and val predictions, from the flat metrics."""
    from advcam.metrics import safe_name

    names = ["background", *classes]
    groups = {}
    for label, prefix in (("seeds", "seed_iou"), ("pseudo labels", "pseudo_iou"), ("val prediction", "val_iou")):
        values = [m.get(f"{prefix}_{safe_name(n)}") for n in names]
        if any(v is not None for v in values):
            groups[label] = values
    return groups


# ---- gallery -------------------------------------------------------------------------------------------------
def image_row(info: Any, image_id: str, *, cams: Path | None, pseudo: Path | None, cam_method: str,
              classifier: torch.nn.Module | None = None, cfg_cam: Any = None,
              segmenter: torch.nn.Module | None = None, device: torch.device | None = None,
              cfg_eval: Any = None, boundary_net: irn.BoundaryNet | None = None,
              boundary_canvas: int = 0) -> dict[str, Any]:
    """Gallery row of one image: every column of :data:`GALLERY_COLUMNS` that can be drawn (others: None).

    The ``cam_method`` column comes from ``cams/<id>.npz``; with a ``classifier``, the other attribution method
    is computed for this image with ``cfg_cam`` (and the method column too, when the file is missing). With a
    ``boundary_net``, its boundary map of the image (IRN's, on a ``boundary_canvas`` square: the walk's training
    crop; upsampled from stride 4) over the image.
    """
    if not Path(info.image_path(image_id)).is_file():
        raise AdvcamError(f"image {image_id}: not found ({info.image_path(image_id)})")
    image = info.read_image(image_id)
    size = image.shape[:2]
    pal = palette()
    row: dict[str, Any] = {"id": image_id, "image": image}
    if Path(info.mask_path(image_id)).is_file():
        row["ground truth"] = colorize(info.read_mask(image_id), pal)
    if cams is not None and (Path(cams) / f"{image_id}.npz").is_file():
        row[METHOD_TITLES.get(cam_method, "CAM")] = cam_overlay(image, load_cam(Path(cams) / f"{image_id}.npz",
                                                                                size)["high_res"])
    if classifier is not None:
        for method, title in METHOD_TITLES.items():
            if title not in row:
                cfg = Config({**cfg_cam.to_dict(), "method": method})
                maps = compute_maps(classifier, normalize(image), image_classes(info, image_id), cfg)
                row[title] = cam_overlay(image, maps["high_res"])
    if boundary_net is not None:
        with torch.inference_mode():
            edge = irn.boundary(boundary_net, normalize(image).to(device or torch.device("cpu")), boundary_canvas)
        up = torch.nn.functional.interpolate(edge[None, None], scale_factor=4, mode="bilinear", align_corners=False)
        row["boundary"] = cam_overlay(image, up[0, :, :size[0], :size[1]].cpu().numpy())
    label = read_label(Path(pseudo) / f"{image_id}.png", size) if pseudo is not None else None
    if label is not None:
        row["pseudo label"] = colorize(label, pal)
    if segmenter is not None:
        # as evaluate scores it: evaluation.scales, max-fused, + flip if evaluation.flip (CRF not applied)
        scales = tuple(float(v) for v in (cfg_eval or {}).get("scales", (1.0,)))
        flip = bool((cfg_eval or {}).get("flip", False))
        row["prediction"] = colorize(predict(segmenter, image, device or torch.device("cpu"), scales, flip), pal)
    return row


def boundary_net_of(pseudo: Path | None, device: torch.device, cfg_refine: Any = None) -> irn.BoundaryNet | None:
    """IRN's boundary network that made the pseudo labels of ``pseudo``: with ``cfg_refine`` (the refine params) of
    design irn's random walk, its taken ``refine.randomwalk.trained``; else ``pseudo``'s ``.affinity.pt``; None
    without one."""
    from advcam.refine import trained as taken
    from advcam.utils.checkpoint import load_checkpoint

    rw = cfg_refine.randomwalk if cfg_refine is not None and cfg_refine.method == "randomwalk" else None
    if pseudo is not None and rw is not None and rw.design == "irn" and taken.trained_file(rw):
        return cast(irn.BoundaryNet, taken.load_trained(rw).to(device))
    path = Path(pseudo) / AFFINITY_FILE if pseudo is not None else None
    if path is None or not path.is_file():
        return None
    header, state = load_checkpoint(path)
    if header.get("kind") != "boundary":
        return None
    net = irn.build_boundary_net(str(header["arch"]))
    net.load_state_dict(state["model"])
    return net.to(device).eval()


def _load_models(cfg: Any, info: Any, classifier: Path | None, segmenter: Path | None
                 ) -> tuple[torch.device, Any, Any]:
    from advcam.models import load_classifier, load_segmenter

    device = resolve_device(cfg.device)
    cls = seg = None
    if classifier is not None and Path(classifier).is_file():
        cls = load_classifier(classifier, map_location=device, num_classes=info.num_classes).to(device).eval()
    if segmenter is not None and Path(segmenter).is_file():
        seg = load_segmenter(segmenter, map_location=device, num_classes=info.num_classes + 1).to(device).eval()
    return device, cls, seg


# ---- stage -----------------------------------------------------------------------------------------------------
def run(cfg: Any, data: Path, classifier: Path, segmenter: Path, cams: Path, pseudo: Path, metrics_dir: Path,
        plots: Path, runs: Path, out: Path) -> None:
    """Write every file of :data:`OUTPUTS` into ``out``."""
    info = load_info(data)
    out, plots, pseudo = Path(out), Path(plots), Path(pseudo)
    here = methods_of(cfg)
    this = read_metrics(metrics_dir)
    label = "+".join(here.values())
    rows = [table_row(f"{label} (this run)", here, this)]
    curves = {label: read_csv_columns(plots / "seeds_threshold.csv")}
    best: dict[str, float] = {}
    if this.get("seed_best_threshold") is not None:
        best[label] = float(this["seed_best_threshold"])
    for name, folder in other_runs(runs).items():
        m = read_metrics(folder, required=False)
        rows.append(table_row(name, run_methods(folder), m))
        if (folder / "seeds_threshold.csv").is_file():
            curves[name] = read_csv_columns(folder / "seeds_threshold.csv")
            if m.get("seed_best_threshold") is not None:
                best[name] = float(m["seed_best_threshold"])
    caption = f"{info.kind} dataset {cfg.dataset.name}: mIoU in percent (seeds and pseudo labels: infer list, " \
              f"val: val list)"
    write_text(out / "methods.html", table_html(rows, caption))
    write_text(out / "methods.csv", table_csv(rows))
    plot_curves({k: (c.get("threshold", []), c.get("miou", [])) for k, c in curves.items()}, out / "threshold.png",
                xlabel="background threshold", ylabel="seed mIoU", title="seed mIoU vs threshold", best=best)
    groups = per_class_groups(list(info.classes), this)
    names = ["background", *info.classes]
    plot_grouped_bars(names, groups, out / "per_class_iou.png", ylabel="IoU", title="IoU per class")
    write_text(out / "per_class_iou.csv", "class," + ",".join(groups) + "\n" + "".join(
        f"{n}," + ",".join("" if g[i] is None else f"{g[i]:.6f}" for g in groups.values()) + "\n"
        for i, n in enumerate(names)))
    training = {}
    for title, path in (("classifier", plots / "train_cls.csv"), ("affinity net", pseudo / AFFINITY_CURVE),
                        ("segmenter", plots / "train_seg.csv")):
        if path.is_file():
            training[title] = read_csv_columns(path)
    plot_training_curves(training, out / "training.png")
    device, cls, seg = _load_models(cfg, info, classifier, segmenter)
    ids = gallery_ids(info, Path(cams), pseudo, int(cfg.evaluation.gallery_size))
    edges = boundary_net_of(pseudo, device, cfg.refine) if cfg.refine.method == "randomwalk" else None
    gallery = [image_row(info, i, cams=Path(cams), pseudo=pseudo, cam_method=str(cfg.cam.method), classifier=cls,
                         cfg_cam=cfg.cam, segmenter=seg, device=device, cfg_eval=cfg.evaluation, boundary_net=edges,
                         boundary_canvas=int(cfg.refine.randomwalk.crop_size))
               for i in progress(ids, desc="figures (gallery)", unit="img")]
    columns = [c for c in GALLERY_COLUMNS if c != "boundary" or edges is not None]
    plot_gallery(gallery, out / "gallery.png", columns=columns,
                 title="" if gallery else "evaluation.gallery_size is 0: no images shown")
    log.info("figures: wrote %s", ", ".join(str(out / f) for f in OUTPUTS))


def visualize(cfg: Any, data: Path, image_id: str, out: Path, cams: Path | None = None, pseudo: Path | None = None,
              classifier: Path | None = None, segmenter: Path | None = None) -> list[str]:
    """One image as a row of panels (what exists of :data:`GALLERY_COLUMNS`); return the columns drawn.

    Missing inputs are left out; with ``classifier`` both CAM and AdvCAM are drawn (computed if needed).
    """
    info = load_info(data)
    info.require_listed([image_id], "visualize")
    device, cls, seg = _load_models(cfg, info, classifier, segmenter)
    row = image_row(info, image_id, cams=cams, pseudo=pseudo, cam_method=str(cfg.cam.method), classifier=cls,
                    cfg_cam=cfg.cam, segmenter=seg, device=device, cfg_eval=cfg.evaluation,
                    boundary_net=boundary_net_of(pseudo, device, cfg.refine),
                    boundary_canvas=int(cfg.refine.randomwalk.crop_size))
    columns = [c for c in GALLERY_COLUMNS if row.get(c) is not None]
    plot_gallery([row], out, columns=columns)
    log.info("wrote %s (%s)", out, ", ".join(columns))
    return columns
