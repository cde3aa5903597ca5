"""Training: poly LR, param groups, the shared loop (loss goes down, kill + resume == straight run), and the
train_cls / train_seg stages on a tiny prepared synthetic dataset."""
from __future__ import annotations

import csv
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from advcam.models import build_classifier
from advcam.train import loop
from advcam.train.classifier import classification_loss
from advcam.utils.errors import AdvcamError


class ToyShapes(Dataset):
    """Stand-in dataset: class k = a bright square in quadrant k; random flip from the global torch RNG
    (so resuming must restore RNG states to reproduce it)."""

    def __init__(self, n: int = 32, size: int = 32, num_classes: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(n):
            label = (torch.rand(num_classes, generator=g) < 0.5).float()
            label[i % num_classes] = 1.0
            img = 0.1 * torch.randn(3, size, size, generator=g)
            for k in torch.nonzero(label).flatten().tolist():
                y, x = (k // 2) * size // 2, (k % 2) * size // 2
                img[k % 3, y + 4:y + 12, x + 4:x + 12] += 2.0
            self.items.append((img, label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        img, label = self.items[i]
        if torch.rand(()) < 0.5:
            img = img + 0.01 * torch.randn_like(img)
        return {"image": img, "label": label, "id": str(i)}


def _train(tmp: Path, epochs: int, fingerprint: dict | None = None, crash_at_epoch: int | None = None,
           lr: float = 0.05):
    torch.manual_seed(0)
    model = build_classifier("resnet_small", 3)
    data = ToyShapes()
    optimizer = loop.make_sgd(model.param_groups(), lr, 1e-4, 0.9)

    def loss_fn(m, batch):
        if crash_at_epoch is not None and loader_epoch[0] == crash_at_epoch:
            raise KeyboardInterrupt
        return classification_loss(m, batch)

    loader_epoch = [0]

    def loader(e):
        loader_epoch[0] = e
        return loop.epoch_loader(data, 8, seed=3, epoch=e)

    rows = loop.fit(model, optimizer, loader, loss_fn, epochs=epochs, base_lr=lr, resume=tmp / "m.pt.resume.pt",
                    curves=tmp / "curves.csv", fingerprint=fingerprint or {"p": 1}, desc="test")
    return model, rows


def test_progress_opens_its_iterable_once():
    from advcam.utils.progress import progress

    class Counted:
        opened = 0

        def __iter__(self):
            Counted.opened += 1
            return iter(range(3))

        def __len__(self) -> int:
            return 3

    assert list(progress(Counted(), "x")) == [0, 1, 2] and Counted.opened == 1


def test_bars_into_a_log_file_refresh_seldom(tmp_path, capsys, monkeypatch):
    """Into a file (Snakemake's logs, a SLURM job's output) a training bar refreshes every 10 s: it used to be
    redrawn at every batch (set_postfix forced a refresh), hundreds of lines per log."""
    monkeypatch.setenv("ADVCAM_PROGRESS", "1")
    torch.manual_seed(0)
    model = build_classifier("resnet_small", 3)
    data = ToyShapes(n=64, size=16)
    optimizer = loop.make_sgd(model.param_groups(), 0.05, 1e-4, 0.9)
    capsys.readouterr()
    loop.fit(model, optimizer, lambda e: loop.epoch_loader(data, 2, seed=0, epoch=e), classification_loss,
             epochs=1, base_lr=0.05, resume=tmp_path / "m.resume.pt", curves=tmp_path / "c.csv",
             fingerprint={"p": 1}, desc="bars")
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    draws = err.count("\r") + err.count("\n")
    assert "bars epoch 1/1" in err and draws < 10, (draws, err[-500:])  # 32 batches


def test_poly_lr_and_param_groups():
    assert loop.poly_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert loop.poly_lr(0.1, 50, 100) == pytest.approx(0.1 * 0.5 ** 0.9)
    assert loop.poly_lr(0.1, 100, 100) == 0.0
    model = build_classifier("resnet_small", 3)
    opt = loop.make_sgd(model.param_groups(), 0.1, 1e-4, 0.9)
    assert loop.set_poly_lr(opt, 0.1, 10, 20) == pytest.approx(0.1 * 0.5 ** 0.9)
    assert opt.param_groups[1]["lr"] == pytest.approx(10 * opt.param_groups[0]["lr"])
    assert opt.param_groups[1]["params"] == [model.classifier.weight]
    assert opt.param_groups[0]["weight_decay"] == 1e-4 and opt.param_groups[0]["momentum"] == 0.9


def test_epoch_loader_selects_the_epochs_augmentation():
    """The loader of epoch e sets the dataset's epoch to e (its augmentation stream), not epoch 0's again."""

    class Items(Dataset):
        epoch = -1

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.tensor(i)

    data = Items()
    loop.epoch_loader(data, 4, seed=0, epoch=3)
    assert data.epoch == 3


def test_train_cam_passes_lr_momentum_and_weight_decay_to_their_slots(monkeypatch):
    """classifier.lr, momentum and weight_decay reach SGD's own slots (IRN's PolyOptimizer mixed two of them up:
    the reference's momentum is what classifier.momentum's default reproduces, not a swap in the code)."""
    from advcam import config
    from advcam.train.classifier import train_cam

    groups = []
    monkeypatch.setattr(loop, "fit", lambda model, optimizer, *a, **k: groups.extend(optimizer.param_groups) or [])
    cfg = config.load(None, ["classifier.lr=0.02", "classifier.momentum=0.7", "classifier.weight_decay=0.0005"])
    train_cam(build_classifier("resnet_small", 3), None, cfg=cfg.classifier, seed=0, workers=0, resume=Path("r"),
              curves=Path("c"), fingerprint={})
    backbone, head = groups
    assert (backbone["lr"], backbone["momentum"], backbone["weight_decay"]) == (0.02, 0.7, 0.0005)
    assert (head["lr"], head["momentum"], head["weight_decay"]) == (pytest.approx(0.2), 0.7, 0.0005)


def test_rng_state_roundtrip():
    state = loop.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    loop.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_loss_goes_down_and_curves_written(tmp_path: Path):
    _, rows = _train(tmp_path, epochs=4)
    losses = [r[2] for r in rows]
    assert len(rows) == 16 and rows[-1][:2] == [4, 16]
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    with open(tmp_path / "curves.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 16 and list(table[0]) == ["epoch", "step", "loss", "lr"]
    assert float(table[0]["lr"]) == pytest.approx(0.05) and float(table[-1]["lr"]) < 0.01
    assert (tmp_path / "m.pt.resume.pt").is_file()  # deleted by loop.finish, after the final checkpoint


def test_a_diverging_training_is_reported_once(tmp_path: Path, caplog):
    """A learning rate far too high: the loss grows a thousandfold but stays finite, so nothing stopped the run
    and nothing said so (the VOC-size segmenter went from 24 to 1,595 in silence). Now a warning names the epoch
    and the ratio, once; the same training at a sane learning rate says nothing."""
    with caplog.at_level(logging.INFO, logger="advcam"):
        _, rows = _train(tmp_path / "bad", epochs=4, lr=50.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert loop.epoch_mean_loss(rows, 2) > 10 * rows[0][2]  # the premise: epochs 1 and 2 far above the start
    assert len(warnings) == 1 and "epoch 2 " in warnings[0] and "diverged" in warnings[0], warnings
    assert "lower the learning rate" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="advcam"):
        _train(tmp_path / "good", epochs=4)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_divergence_needs_two_high_epochs_or_the_last():
    rows = lambda *means: [[e + 1, e + 1, m, 0.1] for e, m in enumerate(means)]  # noqa: E731 (one step an epoch)
    assert not loop.diverging(rows(1.0, 20.0, 0.5), 2, last=False)  # one bad epoch that recovers
    assert loop.diverging(rows(1.0, 20.0, 30.0), 3, last=False)
    assert loop.diverging(rows(1.0, 20.0), 2, last=True)  # the last epoch is judged alone
    assert not loop.diverging(rows(1.0, 9.0, 9.5), 3, last=True)  # under 10x the first loss
    assert not loop.diverging(rows(-1.0, 20.0, 30.0), 3, last=True)  # no positive scale to compare with
    assert not loop.diverging(rows(1.0, 20.0, float("inf")), 3, last=True)  # non-finite: fit raises instead
    assert not loop.diverging([], 1, last=True)


def test_resume_after_kill_equals_straight_run(tmp_path: Path, caplog):
    straight, straight_rows = _train(tmp_path / "a", epochs=2)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", epochs=2, crash_at_epoch=1)
    assert (tmp_path / "b" / "m.pt.resume.pt").is_file()
    torch.manual_seed(123), random.seed(5), np.random.seed(7)  # the new process starts from other RNG states
    with caplog.at_level(logging.INFO, logger="advcam"):
        resumed, resumed_rows = _train(tmp_path / "b", epochs=2)
    assert "resuming" in caplog.text
    assert resumed_rows == straight_rows
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_resume_file_with_other_params_is_ignored(tmp_path: Path, caplog):
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, epochs=2, crash_at_epoch=1)
    with caplog.at_level(logging.INFO, logger="advcam"):
        _, rows = _train(tmp_path, epochs=1, fingerprint={"p": 2})
    assert "different params" in caplog.text and len(rows) == 4


# ---------------------------------------------------------------- stages on a tiny prepared synthetic dataset
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from advcam import config
    from advcam.steps import prepare

    cfg = config.load(None, ["device=cpu", "synthetic.image_size=32", "synthetic.num_train_aug=16",
                             "synthetic.num_train=8", "synthetic.num_val=8", "synthetic.num_classes=3",
                             "classifier.epochs=2", "classifier.batch_size=8", "classifier.crop_size=32",
                             "segmentation.epochs=2", "segmentation.batch_size=4", "segmentation.crop_size=32"])
    out = tmp_path_factory.mktemp("prepared") / "synthetic"
    prepare.run(cfg, out)
    return cfg, out


@pytest.fixture
def fits(monkeypatch) -> list[dict]:
    """loop.fit replaced by a stand-in that trains nothing: the fingerprint of each training asked for."""
    calls: list[dict] = []
    monkeypatch.setattr(loop, "fit", lambda *a, **k: calls.append(k["fingerprint"]) or [[1, 1, 0.5, 0.1]])
    return calls


def pseudo_from_gt(info, folder: Path) -> Path:
    """The seg list's ground-truth masks written as pseudo labels into ``folder``."""
    from PIL import Image

    folder.mkdir()
    for image_id in info.lists["seg"]:
        Image.fromarray(info.read_mask(image_id)).save(folder / f"{image_id}.png")
    return folder


def test_train_cls_stage(prepared, tmp_path: Path):
    from advcam.models import load_classifier
    from advcam.steps import train_cls

    cfg, data = prepared
    out = tmp_path / "models" / "classifier.pt"
    train_cls.run(cfg, data, out, tmp_path / "curves.csv")
    model = load_classifier(out, num_classes=3)
    assert model.header["arch"] == "resnet_small" and model.header["params"]["epochs"] == 2
    assert len(model.classes) == 3 and not (tmp_path / "models" / "classifier.pt.resume.pt").exists()
    with open(tmp_path / "curves.csv") as f:
        assert len(list(csv.DictReader(f))) == 4  # 16 images / batch 8 x 2 epochs


def test_a_finished_training_is_remembered_and_taken_again(prepared, tmp_path: Path, caplog, monkeypatch):
    """Snakemake and DVC delete a training job's outputs before they run it again (e.g. the dataset was prepared
    again for another seg list): the same params, data and code give the remembered weights and curve back, byte
    for byte, without a training step; anything else trains anew."""
    from advcam import config
    from advcam.steps import train_cls
    from advcam.train import loop, memo

    cfg, data = prepared
    out, curves = tmp_path / "models" / "classifier.pt", tmp_path / "curves.csv"
    train_cls.run(cfg, data, out, curves)
    weights, record = memo.memo_paths(out)
    assert weights.stat().st_ino == out.stat().st_ino and record.is_file()  # a hard link: no extra space
    first, first_curve = out.read_bytes(), curves.read_text()
    out.unlink(), curves.unlink()

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(loop, "fit", no_training)
    with caplog.at_level(logging.INFO, logger="advcam"):
        train_cls.run(cfg, data, out, curves)
    assert "its weights are taken" in caplog.text
    assert out.read_bytes() == first and curves.read_text() == first_curve
    # a param of a method this training does not use (SEAM's and EADER's while the method is cam): taken too
    unused = config.Config({**cfg.to_dict(), "classifier": {**cfg.classifier.to_dict(),
                                                             "seam": {**cfg.classifier.seam.to_dict(), "lr": 0.5},
                                                             "eader": {**cfg.classifier.eader.to_dict(), "alpha": 0.0}}})
    out.unlink(), curves.unlink()
    train_cls.run(unused, data, out, curves)
    assert out.read_bytes() == first
    with pytest.raises(AssertionError, match="trained again"):  # other params: no memo
        train_cls.run(config.load(None, [f"{k}={v}" for k, v in [
            ("device", "cpu"), ("synthetic.image_size", 32), ("synthetic.num_classes", 3), ("classifier.epochs", 2),
            ("classifier.batch_size", 8), ("classifier.crop_size", 32), ("seed", 1)]]), data, out, curves)
    weights.write_bytes(b"damaged")  # weights that do not match their record are never taken
    with pytest.raises(AssertionError, match="trained again"):
        train_cls.run(cfg, data, out, curves)


def test_train_seg_stage_and_bad_pseudo_labels(prepared, tmp_path: Path):
    from PIL import Image

    from advcam.data import load_info
    from advcam.models import load_segmenter
    from advcam.steps import train_seg

    cfg, data = prepared
    info = load_info(data)
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    for image_id in info.lists["infer"]:
        Image.fromarray(info.read_mask(image_id)).save(pseudo / f"{image_id}.png")
    out = tmp_path / "segmenter.pt"
    train_seg.run(cfg, data, pseudo, out, tmp_path / "seg.csv")
    assert load_segmenter(out, num_classes=4).arch == "deeplab_small"
    assert not (tmp_path / "segmenter.pt.resume.pt").exists()

    victim = info.lists["infer"][1]
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(pseudo / f"{victim}.png")
    with pytest.raises(AdvcamError, match=rf"{victim}\.png: pseudo label is 12x10 but image {victim} is 32x32"):
        train_seg.run(cfg, data, pseudo, tmp_path / "seg2.pt", tmp_path / "seg2.csv")
    (pseudo / f"{victim}.png").unlink()
    with pytest.raises(AdvcamError, match=rf"no pseudo label for 1 of 8 images.*{victim}"):
        train_seg.run(cfg, data, pseudo, tmp_path / "seg2.pt", tmp_path / "seg2.csv")


def test_corrected_image_level_labels_train_the_classifier_again(prepared, fits, tmp_path: Path):
    """The remembered weights are only taken for the same image-level labels: a user who corrects labels.json (and
    nothing else) gets a classifier trained on the corrected labels, not the old one."""
    import json
    import shutil

    from advcam.steps import train_cls

    cfg, data = prepared
    data = shutil.copytree(data, tmp_path / "data")
    out, curves = tmp_path / "classifier.pt", tmp_path / "curves.csv"
    train_cls.run(cfg, data, out, curves)
    train_cls.run(cfg, data, out, curves)
    assert len(fits) == 1  # same labels: remembered
    labels = json.loads((data / "labels.json").read_text())
    first = (data / "lists" / "train.txt").read_text().split()[0]
    labels[first] = [c for c in range(3) if c not in labels[first]][:1]
    (data / "labels.json").write_text(json.dumps(labels))
    train_cls.run(cfg, data, out, curves)
    assert len(fits) == 2, "the classifier was not trained again although its image-level labels changed"


def test_a_changed_training_image_trains_the_classifier_again(prepared, fits, tmp_path: Path):
    import shutil

    from PIL import Image

    from advcam.data import load_info
    from advcam.steps import train_cls

    cfg, data = prepared
    data = shutil.copytree(data, tmp_path / "data")
    out, curves = tmp_path / "classifier.pt", tmp_path / "curves.csv"
    train_cls.run(cfg, data, out, curves)
    info = load_info(data)
    image_id = info.lists["train"][0]
    Image.fromarray(255 - info.read_image(image_id)).save(info.image_path(image_id), quality=95)
    train_cls.run(cfg, data, out, curves)
    assert len(fits) == 2


def test_a_changed_pretrained_file_trains_the_classifier_again(prepared, fits, tmp_path: Path):
    """The fingerprint holds the weight file's content, not its path: other weights under the same name train
    anew."""
    from advcam import config
    from advcam.models.resnet import resnet_small
    from advcam.steps import train_cls

    cfg, data = prepared
    weights = tmp_path / "small.pth"
    cfg = config.Config({**cfg.to_dict(), "classifier": {**cfg.classifier.to_dict(), "pretrained": str(weights)}})
    out, curves = tmp_path / "classifier.pt", tmp_path / "curves.csv"
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(resnet_small().state_dict(), weights)
        train_cls.run(cfg, data, out, curves)
    assert len(fits) == 2


def test_the_classifiers_fingerprint_covers_the_data_code(prepared, fits, tmp_path: Path):
    """A change of the augmentation (advcam/data) trains the classifier again, as one of the training loop or the
    models does."""
    from advcam.steps import train_cls
    from advcam.utils.io import code_digest

    cfg, data = prepared
    train_cls.run(cfg, data, tmp_path / "classifier.pt", tmp_path / "curves.csv")
    assert fits[0]["code"] == code_digest("train", "models", "data")


def test_a_corrected_ground_truth_mask_trains_the_segmenter_again(prepared, fits, tmp_path: Path):
    """Semi-supervised mode: the fingerprint holds the content of the gt_ids' masks."""
    import shutil

    from PIL import Image

    from advcam import config
    from advcam.data import load_info, voc
    from advcam.steps import train_seg

    cfg, data = prepared
    data = shutil.copytree(data, tmp_path / "data")
    info = load_info(data)
    pseudo = pseudo_from_gt(info, tmp_path / "pseudo")
    gt = info.lists["seg"][0]
    cfg = config.Config({**cfg.to_dict(), "segmentation": {**cfg.segmentation.to_dict(), "gt_ids": [gt]}})
    out, curves = tmp_path / "segmenter.pt", tmp_path / "curves.csv"
    train_seg.run(cfg, data, pseudo, out, curves)
    mask = info.read_mask(gt)
    mask[mask == 255] = 0  # the object outlines, labelled as background
    im = Image.fromarray(mask, "P")
    im.putpalette(voc.palette())
    im.save(info.mask_path(gt))
    train_seg.run(cfg, data, pseudo, out, curves)
    assert len(fits) == 2


def test_another_seed_trains_the_segmenter_again(prepared, fits, tmp_path: Path):
    from advcam import config
    from advcam.data import load_info
    from advcam.steps import train_seg

    cfg, data = prepared
    pseudo = pseudo_from_gt(load_info(data), tmp_path / "pseudo")
    out, curves = tmp_path / "segmenter.pt", tmp_path / "curves.csv"
    train_seg.run(cfg, data, pseudo, out, curves)
    train_seg.run(cfg, data, pseudo, out, curves)
    assert len(fits) == 1  # the same run: remembered
    train_seg.run(config.Config({**cfg.to_dict(), "seed": cfg.seed + 1}), data, pseudo, out, curves)
    assert len(fits) == 2
