"""Data-parallel training: `torchrun` with 2 CPU processes (gloo) follows one process's loss curve."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from advcam.train import loop
from advcam.train.distributed import GlobalBatchSlices
from advcam.utils.checkpoint import load_checkpoint
from advcam.utils.errors import AdvcamError
from conftest import TINY

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "ADVCAM_PROGRESS": "0",
       "OMP_NUM_THREADS": "1"}
# 24 training images, global batch 8 (4 per process), 2 epochs = 6 steps; resnet_small's BatchNorm trains,
# so this also checks the global-batch BatchNorm. lr 0.01: at 0.1 a randomly initialised net amplifies the
# float noise of the reordered sums to ~1e-4 within 6 steps; at 0.01 the runs agree to ~1e-6.
PARAMS = [*TINY, "classifier.epochs=2", "classifier.lr=0.01"]


class Items(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"i": torch.tensor(i)}


@pytest.mark.parametrize("n,batch", [(24, 8), (5, 8), (31, 5)])
def test_data_order_depends_on_seed_and_epoch_only(n, batch):
    """The batches of an epoch are the same with DataLoader workers, iterated again, or under a progress bar,
    and they are the order of advcam's earlier releases (a shuffled loader opened twice), so numbers measured
    with those reproduce; another epoch or seed gives another order."""
    from torch.utils.data import DataLoader

    from advcam.utils.progress import progress

    def batches(loader) -> list[list[int]]:
        return [b["i"].tolist() for b in loader]

    ref = batches(loop.epoch_loader(Items(n), batch, seed=3, epoch=2))
    seen = sum(ref, [])
    assert len(set(seen)) == len(seen) == (n if n < batch else n // batch * batch)
    assert all(len(b) == min(batch, n) for b in ref)
    with_workers = loop.epoch_loader(Items(n), batch, seed=3, epoch=2, workers=2)
    assert batches(with_workers) == ref and batches(with_workers) == ref
    assert batches(progress(loop.epoch_loader(Items(n), batch, seed=3, epoch=2, workers=1), "x")) == ref
    earlier = DataLoader(Items(n), batch_size=batch, shuffle=True, drop_last=n >= batch,
                         generator=torch.Generator().manual_seed(3 * 100_003 + 2))
    iter(earlier)  # the iterator that tqdm.auto opened when the bar was made
    assert batches(earlier) == ref
    assert batches(loop.epoch_loader(Items(n), batch, seed=3, epoch=3)) != ref
    assert batches(loop.epoch_loader(Items(n), batch, seed=4, epoch=2)) != ref


@pytest.mark.parametrize("n,batch,size", [(24, 8, 2), (10, 8, 3), (5, 8, 2)])
def test_process_slices_make_up_the_single_process_batches(n, batch, size):
    """Rank slices, concatenated, are exactly the batches one process draws (same seed and epoch)."""
    single = [b["i"].tolist() for b in loop.epoch_loader(Items(n), batch, seed=3, epoch=1)]
    drop_last = n >= batch
    slices = []
    for rank in range(size):
        slices.append(list(GlobalBatchSlices(loop.epoch_order(n, 3, 1), batch, drop_last, rank, size)))
    assert [sum((s[b] for s in slices), []) for b in range(len(single))] == single
    assert all(len(s) == len(single) for s in slices)
    assert max(len(s[0]) for s in slices) - min(len(s[0]) for s in slices) <= 1


def test_too_many_processes_for_the_batch_is_an_error():
    with pytest.raises(AdvcamError, match="smaller than the 4 training processes"):
        GlobalBatchSlices(list(range(10)), 3, True, 0, 4)


def run(*cmd: str, cwd: Path) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)  # a hang fails, not stalls
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


def curve(path: Path) -> np.ndarray:
    with open(path) as f:
        return np.array([[float(r["step"]), float(r["loss"]), float(r["lr"])] for r in csv.DictReader(f)])


@pytest.mark.skipif(shutil.which("torchrun", path=ENV["PATH"]) is None, reason="torchrun not found")
def test_two_gloo_processes_follow_the_single_process_curve(tmp_path):
    args = ["--params-json", json.dumps({})] + [a for p in PARAMS for a in ("--set", p)]
    run("advcam", "prepare", *args, "--out", "data", cwd=tmp_path)
    one_and_two_processes_agree(["train-cls", *args, "--data", "data"], tmp_path / "one", tmp_path / "two", "c",
                                tmp_path)


def one_and_two_processes_agree(command: list[str], one_dir: Path, two_dir: Path, name: str, cwd: Path) -> None:
    """Run ``advcam <command>`` in one process and under torchrun with two (writing ``<dir>/<name>.pt`` and
    ``.csv``); both follow the same loss curve and end with the same weights, and nothing temporary is left."""
    run("advcam", *command, "--out", f"{one_dir}/{name}.pt", "--curves", f"{one_dir}/{name}.csv", cwd=cwd)
    log = run("torchrun", "--standalone", "--nproc-per-node", "2", "-m", "advcam.cli", *command, "--out",
              f"{two_dir}/{name}.pt", "--curves", f"{two_dir}/{name}.csv", cwd=cwd)
    # rank 0 alone writes the checkpoint and logs; the other process logs only warnings, and nothing is deprecated
    assert log.count(f"wrote {two_dir}/{name}.pt\n") == 1 and log.count("process 1 of 2") == 1, log[-3000:]
    assert "process 2 of 2" not in log and "FutureWarning" not in log, log[-3000:]
    one, two = curve(one_dir / f"{name}.csv"), curve(two_dir / f"{name}.csv")
    assert one.shape == two.shape == (6, 3)
    np.testing.assert_array_equal(one[:, [0, 2]], two[:, [0, 2]])  # the same steps and learning rates
    # the all-reduces sum the two halves' float32 gradients and BatchNorm moments in another order than one process's
    # batch, and training carries the difference on: on a 2-core AMD EPYC (2026-12-02) the 6th loss differs by 2e-5
    # (it passed 1e-5 on the Intel machine of the earlier runs); a missing all-reduce or BatchNorm sync differs by
    # whole percents
    np.testing.assert_allclose(two[:, 1], one[:, 1], rtol=1e-4, atol=2e-6)
    assert not np.allclose(one[1:, 1], one[1, 1]), "the loss moves: the check is not vacuous"
    (_, a), (_, b) = load_checkpoint(one_dir / f"{name}.pt"), load_checkpoint(two_dir / f"{name}.pt")
    # weights and BatchNorm statistics: relative 1e-3, with a float32 floor (1e-5 per element) for tensors that barely
    # left a zero init. On the AMD EPYC conv1's weights differ by 1.4e-4 and bn1's running mean by 4.4e-4 relative,
    # and bn1.bias (norm 3.0e-4) by 9.1e-6, 3 % of its norm (the Intel machine passed 1e-4 without a floor)
    for key, value in a["model"].items():
        if value.is_floating_point() and value.norm() > 0:
            diff, norm = float((b["model"][key] - value).norm()), float(value.norm())
            assert diff <= 1e-3 * norm + 1e-5 * value.numel() ** 0.5, \
                f"{key}: weights differ by {diff:.2e} (norm {norm:.2e}, {diff / norm:.2e} relative)"
    assert not list(two_dir.glob(".tmp-*")) and not (two_dir / f"{name}.pt.resume.pt").exists()


def write_pseudo_labels(data: Path, out: Path) -> None:
    """Pseudo labels = the ground truth with a random share (0-90 %) of each image set to 255 (not confident),
    so the processes' slices hold very different numbers of labelled pixels."""
    from PIL import Image

    from advcam.data import load_info

    info = load_info(data)
    rng = np.random.default_rng(0)
    out.mkdir()
    for image_id in info.lists["infer"]:
        mask = info.read_mask(image_id).copy()
        mask[rng.random(mask.shape) < rng.uniform(0.0, 0.9)] = 255
        Image.fromarray(mask.astype(np.uint8)).save(out / f"{image_id}.png")


# 16 infer images, global batch 8 (4 per process), 3 epochs = 6 steps; deeplab_small's BatchNorm trains. Before
# the fix of the per-pixel normalisation (each process dividing by its own pixel count) the curves differed by up
# to 9 % (at lr 0.01); now by ~1e-7. lr 0.001: the loss first falls (at 0.01 the noisy labels make it climb).
# lr 1e-4: at 1e-3 the loss at the logits' size (the default loss_at: labels) makes this 6-step curve jump
# (0.79 -> 1.29), which amplifies float rounding past the tolerance (2.5e-5 at step 5, both runs correct); at 1e-4
# it descends smoothly and one and two processes agree to 1e-6.
SEG_PARAMS = [*TINY, "synthetic.num_train=16", "segmentation.epochs=3", "segmentation.lr=0.0001"]


def set_args(params: list[str]) -> list[str]:
    return ["--params-json", json.dumps({})] + [a for p in params for a in ("--set", p)]


@pytest.fixture(scope="module")
def seg_work(tmp_path_factory) -> Path:
    """A prepared dataset (`data/`) and its pseudo labels (`pseudo/`)."""
    work = tmp_path_factory.mktemp("seg")
    run("advcam", "prepare", *set_args(SEG_PARAMS), "--out", "data", cwd=work)
    write_pseudo_labels(work / "data", work / "pseudo")
    return work


@pytest.mark.skipif(shutil.which("torchrun", path=ENV["PATH"]) is None, reason="torchrun not found")
@pytest.mark.parametrize("balanced", [False, True], ids=["mean", "balanced"])
def test_segmentation_two_gloo_processes_follow_the_single_process_curve(seg_work, balanced):
    """The segmenter's loss is a mean over labelled pixels (class-weighted with balanced_ce): under DDP the
    processes' pixel sums are divided by the count over all processes, so 2 processes give 1 process's curve."""
    args = set_args([*SEG_PARAMS, f"segmentation.balanced_ce={str(balanced).lower()}"])
    common = ["train-seg", *args, "--data", "data", "--pseudo", "pseudo"]
    one_and_two_processes_agree(common, seg_work / f"one-{balanced}", seg_work / f"two-{balanced}", "s", seg_work)


def test_stages_that_are_not_data_parallel_refuse_torchrun(monkeypatch, capsys):
    """Under torchrun every process would run cams (or EADER's trainer) whole and write the same files, removing
    each other's temporaries: refused with one line; the data-parallel trainings pass."""
    from advcam import cli
    from advcam.train.distributed import refuse_torchrun

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["cams", "--set", "cam.method=cam"]) == 2
    assert "advcam cams: error: advcam cams runs as one process, but WORLD_SIZE is 2" in capsys.readouterr().err
    with pytest.raises(AdvcamError, match="EADER's trainer"):
        refuse_torchrun("train-cls", "eader")
    refuse_torchrun("train-cls", "cam")
    refuse_torchrun("train-cls", "seam")
    refuse_torchrun("train-seg", "eader")  # the segmenter does not depend on the classifier's method
    monkeypatch.setenv("WORLD_SIZE", "1")
    refuse_torchrun("cams")
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert cli.main(["cams", "--set", "cam.method=cam"]) == 2
    assert "WORLD_SIZE is 'two': expected a whole number" in capsys.readouterr().err
