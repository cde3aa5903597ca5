"""Figures (matplotlib, Agg backend, written atomically): confusion matrix, gallery, threshold curve."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from advcam.utils.io import atomic_path  # noqa: E402

GALLERY_COLUMNS = ("image", "ground truth", "CAM", "pseudo label", "prediction")


def _save(fig: "plt.Figure", path: str | Path, dpi: int = 100) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def colorize(label: np.ndarray, palette: Sequence[int]) -> np.ndarray:
    """Index map ``(H, W)`` -> RGB uint8 with a 768-int palette (255 gets the palette's 255 colour)."""
    pal = np.zeros((256, 3), np.uint8)
    flat = np.asarray(palette, dtype=np.uint8)[:768]
    pal[: len(flat) // 3] = flat.reshape(-1, 3)
    return pal[np.asarray(label, dtype=np.uint8)]


def cam_overlay(image: np.ndarray, high_res: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The maximum over classes of ``high_res`` as a jet colour map blended over the RGB image."""
    heat = high_res.max(axis=0) if high_res.shape[0] else np.zeros(image.shape[:2], np.float32)
    rgb = plt.get_cmap("jet")(np.clip(heat, 0, 1))[..., :3]
    return np.clip((1 - alpha) * image / 255.0 + alpha * rgb, 0, 1)


def plot_confusion(conf: np.ndarray, names: Sequence[str], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction) with class names."""
    conf = np.asarray(conf, dtype=np.float64)
    rows = conf.sum(axis=1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    k = len(names)
    side = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=90)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if norm[i, j] >= 0.01:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title or "confusion (row-normalised)")
    _save(fig, path)


def plot_gallery(rows: Sequence[dict], path: str | Path, title: str = "",
                 columns: Sequence[str] = GALLERY_COLUMNS) -> None:
    """One row per image; ``rows[i]`` maps a column name to an RGB image or None (shown as "n/a"), plus an
    optional ``"id"`` for the row label."""
    n = max(1, len(rows))
    ncol = len(columns)
    fig, axes = plt.subplots(n, ncol, figsize=(2.2 * ncol, 2.2 * n), squeeze=False)
    for r in range(n):
        row = rows[r] if rows else {}
        for c, name in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            img = row.get(name)
            if img is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, color="gray")
            else:
                ax.imshow(img, interpolation="nearest")
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0 and row.get("id"):
                ax.set_ylabel(str(row["id"]), fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)


# ---- report figures (fixed pixel size: figsize x dpi, no tight bounding box) ---------------------------------
REPORT_DPI = 100


def _save_fixed(fig: "plt.Figure", path: str | Path) -> None:
    """Save at exactly ``figsize * REPORT_DPI`` pixels (the layout engine keeps labels inside)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=REPORT_DPI)
    plt.close(fig)


def plot_curves(series: dict[str, tuple[Sequence[float], Sequence[float | None]]], path: str | Path, *,
                xlabel: str, ylabel: str, title: str = "", best: dict[str, float] | None = None) -> None:
    """Several named curves on one axis (missing y values skipped); ``best`` marks an x per curve.

    600 x 400 px. Used for the seed mIoU-vs-threshold curves of one or several runs.
    """
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for i, (name, (xs, ys)) in enumerate(series.items()):
        pts = [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None and np.isfinite(y)]
        if not pts:
            continue
        line, = ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        if best and best.get(name) is not None:
            ax.axvline(best[name], color=line.get_color(), ls="--", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    ax.set_title(title or ylabel)
    _save_fixed(fig, path)


def plot_grouped_bars(names: Sequence[str], groups: Mapping[str, Sequence[float | None]], path: str | Path, *,
                      ylabel: str, title: str = "") -> None:
    """One group of bars per name (e.g. per class), one bar per series (e.g. seeds / pseudo / val); None = no bar.

    Width ``max(6, 0.6 * len(names) + 2)`` inches, height 4 inches.
    """
    k, n = len(names), max(1, len(groups))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * k + 2), 4), layout="constrained")
    width = 0.8 / n
    for j, (label, values) in enumerate(groups.items()):
        xs = [i + (j - (n - 1) / 2) * width for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width=width, label=label)
    ax.set_xticks(range(k), names, rotation=45 if k > 8 else 0, ha="right" if k > 8 else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if groups:
        ax.legend(fontsize=8, ncols=min(n, 4))
    ax.set_title(title)
    _save_fixed(fig, path)


def plot_training_curves(curves: dict[str, dict[str, list[float]]], path: str | Path) -> None:
    """One panel per training run: loss against step (left axis) and the learning rate (right axis, dashed).

    ``curves[name]`` holds the columns ``step``, ``loss``, ``lr`` of a curves CSV (empty for a classifier taken with
    ``classifier.trained``: the panel says so). 450 px wide per panel, 350 px high.
    """
    n = max(1, len(curves))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.5), squeeze=False, layout="constrained")
    for ax, (name, cols) in zip(axes[0], curves.items()):
        ax.set_title(name)
        if not cols.get("step"):  # a classifier taken with classifier.trained: nothing trained here
            ax.text(0.5, 0.5, "no training steps\n(taken trained)", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        marker = "o" if len(cols["step"]) <= 30 else None  # a short run still shows its points
        ax.plot(cols["step"], cols["loss"], lw=1, color="tab:blue", marker=marker, ms=3)
        ax.set_xlabel("step (batches)")
        ax.set_ylabel("loss", color="tab:blue")
        ax.grid(alpha=0.3)
        if cols.get("lr"):
            twin = ax.twinx()
            twin.plot(cols["step"], cols["lr"], lw=1, ls="--", color="tab:orange", marker=marker, ms=3)
            twin.set_ylabel("learning rate", color="tab:orange")
    if not curves:
        axes[0, 0].text(0.5, 0.5, "no training curves", ha="center", va="center", transform=axes[0, 0].transAxes)
    _save_fixed(fig, path)
