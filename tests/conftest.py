"""Shared test settings: tiny configs that run the real code in seconds on a CPU."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
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


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Prepared TINY dataset with CAM files made from blurred ground-truth masks (no classifier needed): the random
    walk's tests."""
    from scipy.ndimage import gaussian_filter

    from advcam import config
    from advcam.attribution.cam import save_cam, strided_size
    from advcam.data import load_info
    from advcam.steps import prepare

    root = tmp_path_factory.mktemp("rw")
    prepare.run(config.load(None, TINY), root / "data")
    info = load_info(root / "data")
    for image_id in info.lists["infer"]:
        mask = info.read_mask(image_id)
        keys = np.array(sorted(info.labels[image_id]), np.int64)
        high = np.stack([gaussian_filter((mask == c + 1).astype(np.float32), 3) for c in keys]) if keys.size \
            else np.zeros((0, *mask.shape), np.float32)
        high = (high / (high.max(axis=(1, 2), keepdims=True) + 1e-5)).astype(np.float32)
        small = strided_size(mask.shape, 4)
        cam = torch.nn.functional.interpolate(torch.from_numpy(high)[None], size=small, mode="bilinear")[0].numpy()
        save_cam(root / "cams" / f"{image_id}.npz", {"keys": keys, "high_res": high, "cam": cam})
    return root, info


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
