"""Shared test settings: tiny configs that run the real code in seconds on a CPU."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Keep the suite quiet and single-threaded per process (CI has 2 cores).
os.environ.setdefault("ADVCAM_PROGRESS", "0")
torch.set_num_threads(1)

# Overrides that turn the default params into a run of a few seconds per stage.
TINY = [
    "device=cpu",
    "synthetic.image_size=32",
    "synthetic.num_train_aug=24",
    "synthetic.num_train=10",
    "synthetic.num_val=6",
    "synthetic.num_classes=3",
    "classifier.epochs=1",
    "classifier.batch_size=8",
    "classifier.crop_size=32",
    "cam.scales=[1.0, 0.5]",
    "segmentation.epochs=1",
    "segmentation.batch_size=8",
    "segmentation.crop_size=32",
    "evaluation.gallery_size=2",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture
def tiny_cfg():
    from advcam import config

    return config.load(None, TINY)
