"""advcam: weakly-supervised semantic segmentation from image-level labels.

Public entry points: :func:`load_classifier` (any trained classifier with ``features``, ``classifier``,
``cam`` and ``forward``) and :mod:`advcam.attribution`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on first use, not by ``import advcam``
    import torch
    from torch import nn

__version__ = "0.1.0"


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu",
                    num_classes: int | None = None) -> nn.Module:
    """Load a classifier checkpoint written by ``advcam train-cls`` as an ``nn.Module`` in eval mode.

    ``num_classes``, when given, must match the checkpoint (else an error naming the file)."""
    from advcam.models.classifier import load_classifier as _load

    return _load(path, map_location=map_location, num_classes=num_classes)


__all__ = ["load_classifier", "__version__"]
