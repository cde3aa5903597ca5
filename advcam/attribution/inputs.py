"""What :func:`advcam.attribution.advcam.climb` checks of its inputs before it climbs: the image, the model's
interface, the class ids, and the scalars against the params schema's ranges (library callers bypass the
schema that validates ``params.yaml``)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from advcam import config
from advcam.utils.errors import AdvcamError


def check_image_and_classes(model: nn.Module, image: torch.Tensor, classes: Sequence[int]) -> list[int]:
    """A normalised float (3, H, W) image without NaN, a model with ``cam(x)`` and ``classifier.weight``, and class
    ids within the classifier's; returns the ids as ints."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise AdvcamError(f"AdvCAM: expected a normalised (3, H, W) image tensor, got {shape}")
    if not image.is_floating_point():
        raise AdvcamError(f"AdvCAM: image must be a float tensor (normalised), got {image.dtype}")
    if not bool(torch.isfinite(image).all()):
        raise AdvcamError("AdvCAM: the image holds NaN or infinite values")
    weight = getattr(getattr(model, "classifier", None), "weight", None)
    if weight is None or not hasattr(model, "cam"):
        raise AdvcamError("AdvCAM: the model needs cam(x) and a bias-free 1x1 classifier (classifier.weight)")
    num = weight.shape[0]
    out = [int(c) for c in classes]
    bad = [c for c in out if not 0 <= c < num]
    if bad:
        raise AdvcamError(f"AdvCAM: class ids {bad} outside 0..{num - 1}")
    return out


def check_scalars(**values: Any) -> None:
    """The schema's ranges of ``cam.advcam.<name>`` (steps, xi, lam, tau), for callers of the library."""
    for name, value in values.items():
        sch = config.schema_property(f"cam.advcam.{name}")
        whole = sch["type"] == "integer"
        strict = "exclusiveMinimum" in sch
        low, high = sch.get("exclusiveMinimum", sch.get("minimum")), sch.get("maximum")
        ok = (not isinstance(value, bool) and isinstance(value, (int, np.integer) if whole else (int, float, np.number))
              and math.isfinite(value) and (low is None or (value > low if strict else value >= low))
              and (high is None or value <= high))
        if not ok:
            bounds = " and ".join(b for b in (f"{'>' if strict else '>='} {low:g}" if low is not None else "",
                                               f"<= {high:g}" if high is not None else "") if b)
            raise AdvcamError(f"cam.advcam.{name}: must be a {'whole' if whole else 'finite'} number {bounds}, "
                              f"got {value!r}")
