"""Random walk of the stride-4 CAMs over learned affinities (IRN ``propagate_to_edge`` / AdvCAM).

The grid is the CAM file's ``cam`` grid, ``ceil(H/4) x ceil(W/4)`` (N nodes). The affinity matrix is
sparse: each node is linked to itself (affinity 1, as IRN) and to its neighbours within ``radius``
(:func:`advcam.refine.affinity.offsets`, both directions), so it has at most ``N * (2K + 1)`` entries
(K = 34 offsets at radius 5; about 0.8 M entries for a 500x375 image, where a dense matrix would hold
N^2 = 138 M). Entries are raised to ``beta`` and each row divided by its sum: ``P = D^-1 A^beta``, whose rows
sum to 1. As ``A`` is symmetric, ``P x`` is IRN's ``x @ (A D^-1)`` (IRN normalises columns and multiplies
from the right). The walk applies ``P`` ``2^exp_times`` times by iterated sparse products (repeated squaring
would fill the matrix in); memory stays at the sparse matrix plus two ``(N, n)`` maps.

Labels (AdvCAM ``make_sem_seg_labels``): the walk runs on ``cam ** cam_power``; the walked maps are
upsampled by 4 (bilinear), cropped to the image, divided by their global maximum, a background plane
``bg_threshold`` is put in front, and the argmax is mapped to ``0, keys + 1``. Every pixel gets a label.

The affinities are IRN's path affinities of its class-boundary map (:mod:`advcam.refine.irn`), with IRN's damping of
the maps by ``1 - boundary`` before the walk, or AffinityNet's (:mod:`advcam.refine.affinity`), without damping.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from advcam.refine.affinity import offsets


def neighbour_pairs(h: int, w: int, radius: int, device: torch.device | str = "cpu", cropped: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src, dst, k) flat node indices of every in-grid pair of an ``h x w`` grid, and its offset index.

    ``cropped``: only the pairs whose first pixel lies in ``[:-(r-1), (r-1):-(r-1)]`` (PSA's and SEAM's
    ``get_indices_of_pairs`` at inference; IRN pads the grid instead, so that every in-grid pair is there)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    rf = radius - 1
    inside = (ys < h - rf) & (xs >= rf) & (xs < w - rf) if cropped else torch.ones_like(ys, dtype=torch.bool)
    src_all, dst_all, k_all = [], [], []
    for k, (dy, dx) in enumerate(offsets(radius)):
        ok = inside & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        y, x = ys[ok], xs[ok]
        src_all.append(y * w + x)
        dst_all.append((y + dy) * w + x + dx)
        k_all.append(torch.full_like(y, k))
    return torch.cat(src_all), torch.cat(dst_all), torch.cat(k_all)


def transition_matrix(aff: torch.Tensor, radius: int, beta: float, cropped: bool = False) -> torch.Tensor:
    """Row-stochastic sparse CSR ``(N, N)`` from pairwise affinities ``(K, h, w)`` (see the module doc).

    ``aff[k, y, x]`` is the affinity of ``(y, x)`` and ``(y, x) + offsets(radius)[k]`` (as
    :func:`advcam.refine.affinity.pairwise_affinity` gives it); values are clamped to [0, 1]. ``cropped``: the
    pairs of :func:`neighbour_pairs` with ``cropped`` (PSA's walk). ``radius`` 0: no pairs (the identity)."""
    k_total, h, w = aff.shape
    if k_total != (len(offsets(radius)) if radius >= 1 else 0):
        raise ValueError(f"transition_matrix: {k_total} affinity maps do not fit radius {radius}")
    n = h * w
    if radius >= 1:
        src, dst, k = neighbour_pairs(h, w, radius, aff.device, cropped)
    else:
        src = dst = k = torch.zeros(0, dtype=torch.int64, device=aff.device)
    values = aff.float().clamp(0, 1).reshape(k_total, n)[k, src] ** float(beta)
    diag = torch.arange(n, device=aff.device)
    rows = torch.cat([src, dst, diag])
    cols = torch.cat([dst, src, diag])
    vals = torch.cat([values, values, torch.ones(n, device=aff.device)])
    row_sum = torch.zeros(n, device=aff.device).index_add_(0, rows, vals)
    vals = vals / row_sum[rows]
    order = torch.argsort(rows * n + cols)
    rows, cols, vals = rows[order], cols[order], vals[order]
    crow = torch.zeros(n + 1, dtype=torch.int64, device=aff.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    with warnings.catch_warnings():  # "CSR support is in beta": the operations used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, vals, size=(n, n), check_invariants=False)


def random_walk(maps: torch.Tensor, trans: torch.Tensor, steps: int) -> torch.Tensor:
    """Apply ``trans`` ``steps`` times to each map of ``(n, h, w)`` (``x <- P x``); same shape back."""
    n, h, w = maps.shape
    x = maps.reshape(n, h * w).t().contiguous().float()
    for _ in range(int(steps)):
        x = torch.sparse.mm(trans, x)
    return x.t().reshape(n, h, w)


def walk_labels(cam: torch.Tensor, keys: Sequence[int], aff: torch.Tensor, size: tuple[int, int], *,
                radius: int = 5, beta: float = 10.0, exp_times: int = 8, cam_power: float = 1.5,
                bg_threshold: float = 0.25, boundary: torch.Tensor | None = None) -> np.ndarray:
    """Pseudo label ``(H, W)`` uint8 (0 = bg, ``keys + 1``) from stride-4 CAMs ``(n, h, w)`` and affinities.

    ``size`` = the image's ``(H, W)``; ``(h, w)`` must be ``ceil(H/4), ceil(W/4)``. ``boundary``: IRN's class-boundary
    map ``(h, w)``; the maps are multiplied by ``1 - boundary`` before the walk (IRN's ``propagate_to_edge``)."""
    height, width = int(size[0]), int(size[1])
    key_arr = np.asarray(keys, dtype=np.int64)
    if cam.shape[0] == 0:
        return np.zeros((height, width), np.uint8)
    h, w = cam.shape[-2:]
    if (h, w) != ((height + 3) // 4, (width + 3) // 4) or tuple(aff.shape[-2:]) != (h, w):
        raise ValueError(f"walk_labels: cam {tuple(cam.shape)} / affinities {tuple(aff.shape)} do not fit "
                         f"an image of {height}x{width}")
    trans = transition_matrix(aff, radius, beta)
    start = cam.float().clamp(min=0) ** float(cam_power)
    if boundary is not None:
        start = start * (1 - boundary.float())
    walked = random_walk(start, trans, 2 ** int(exp_times))
    up = F.interpolate(walked[None], size=(4 * h, 4 * w), mode="bilinear", align_corners=False)[0, :, :height, :width]
    top = up.max()
    if top > 0:
        up = up / top
    scores = torch.cat([torch.full_like(up[:1], float(bg_threshold)), up])
    lookup = np.concatenate([[0], key_arr + 1]).astype(np.uint8)
    return lookup[scores.argmax(0).cpu().numpy()]


__all__ = ["neighbour_pairs", "transition_matrix", "random_walk", "walk_labels"]
