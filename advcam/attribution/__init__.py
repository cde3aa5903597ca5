"""advcam.attribution: class maps from a trained classifier.

:mod:`advcam.attribution.cam` holds plain CAM, the scale combination and the CAM file; methods register in
``cam.METHODS``. ``climb`` (AdvCAM, :mod:`advcam.attribution.advcam`) is imported on first use.
"""
from __future__ import annotations

from typing import Any

from advcam.attribution.cam import METHODS, cam_at_scale, combine_scales, compute_maps, load_cam, save_cam

__all__ = ["METHODS", "cam_at_scale", "climb", "combine_scales", "compute_maps", "load_cam", "save_cam"]


def __getattr__(name: str) -> Any:
    if name == "climb":
        from advcam.attribution.advcam import climb

        return climb
    raise AttributeError(f"module 'advcam.attribution' has no attribute {name!r}")
