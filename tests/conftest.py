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


# The longest test files first. `make test` gives each CPU a worker and each worker whole files (--dist loadfile), in
# the order collected (--no-loadscope-reorder; xdist's default order, most tests first, put test_workflow.py, the
# longest, last): a long file started last keeps one worker busy while the other has nothing left. Started first,
# the short files fill in around them. (Summed durations on a 2-core Intel machine, 2026-12-03: workflow 95 s,
# faults 78 s, slurm 59 s (mostly waiting for the SLURM status checks), shards 50 s, ddp 33 s, report 29 s,
# resnet38 23 s (a 420 MB network); the other 25 files 90 s together. The suite took 3 min 56 s in this order and 4 min 25 s in xdist's.)
SLOW_FIRST = ("test_workflow.py", "test_faults.py", "test_slurm.py", "test_shards.py", "test_ddp.py",
              "test_report.py", "test_resnet38.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: n for n, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: each file keeps its order
