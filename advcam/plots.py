"""Figures (matplotlib, Agg backend, written atomically): confusion matrix, gallery, threshold curve."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

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


def plot_threshold_curve(thresholds: Sequence[float], mious: Sequence[float], path: str | Path,
                         best: float | None = None) -> None:
    """Seed mIoU against the background threshold, the best threshold marked."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(thresholds, mious, marker="o", ms=3)
    if best is not None:
        ax.axvline(best, color="gray", ls="--", lw=1)
    ax.set_xlabel("background threshold")
    ax.set_ylabel("seed mIoU")
    ax.grid(alpha=0.3)
    _save(fig, path)
