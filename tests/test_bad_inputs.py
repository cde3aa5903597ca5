"""A catalogue of bad inputs, each fed to the real CLI (``advcam.cli.main``) on a tiny VOC-layout dataset.

Every refusal must: exit with status 2, print exactly one line ``advcam <stage>: error: ...`` naming the file /
key / image id, show no traceback, and leave the working folder as it was (nothing half-written, nothing lost;
only the ``.advcam-params.json`` record of a per-image stage may appear). Images of other colour modes are
*converted*, never refused, except the kinds :mod:`advcam.data.voc` lists (float, 32-bit out of range).
docs/reliability.md lists each case with its outcome. Kill/interrupt faults live in ``test_faults.py``.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advcam import cli
from advcam.data import load_info
from advcam.data.voc import read_image
from advcam.models.classifier import build_classifier, classifier_header
from advcam.models.deeplab import build_segmenter, segmenter_header
from advcam.utils.checkpoint import FORMAT, save_checkpoint
from advcam.utils.errors import AdvcamError
from advcam.utils.io import TMP_PREFIX

sys.path.insert(0, str(Path(__file__).parent))
from voc_fixture import DEFAULT_CLASSES, make_voc_fixture  # noqa: E402

H, W = 40, 48
RECORD = ".advcam-params.json"  # a per-image stage's record of its params: may be written before a refusal


# ------------------------------------------------------------------ helpers
class Payload:
    """A crafted pickle: unpickling it would call ``os.mkdir(marker)``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def voc_master(tmp_path_factory) -> Path:
    return make_voc_fixture(tmp_path_factory.mktemp("voc") / "VOC", n_train=4, n_val=2, size=(H, W))


class Work:
    """One working folder: a copy of the VOC fixture and the standard output paths of every stage."""

    def __init__(self, tmp: Path, master: Path, capsys):
        self.tmp, self.capsys = tmp, capsys
        self.root = tmp / "VOC"
        shutil.copytree(master, self.root)
        self.data = tmp / "data"
        self.paths = {
            "prepare": {"out": self.data},
            "train-cls": {"data": self.data, "out": tmp / "models/classifier.pt", "curves": tmp / "plots/cls.csv"},
            "cams": {"data": self.data, "model": tmp / "models/classifier.pt", "out": tmp / "cams",
                     "metrics": tmp / "metrics/seeds.json", "curve": tmp / "plots/seeds.csv"},
            "refine": {"data": self.data, "cams": tmp / "cams", "out": tmp / "pseudo",
                       "metrics": tmp / "metrics/pseudo.json"},
            "train-seg": {"data": self.data, "pseudo": tmp / "pseudo", "out": tmp / "models/segmenter.pt",
                          "curves": tmp / "plots/seg.csv"},
        }

    @property
    def lists(self) -> Path:
        return self.root / "ImageSets" / "Segmentation"

    def ids(self, name: str = "train") -> list[str]:
        return (self.lists / f"{name}.txt").read_text().split()

    def image(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def mask(self, image_id: str) -> Path:
        return self.root / "SegmentationClass" / f"{image_id}.png"

    def argv(self, stage: str, *sets: str, **paths: Path) -> list[str]:
        common = ["device=cpu", "dataset.kind=voc", f"dataset.root={self.root}", "dataset.train_list=train",
                  "dataset.infer_list=train", f"dataset.classes={list(DEFAULT_CLASSES)}", "cam.method=cam",
                  "cam.scales=[1.0]", "classifier.arch=resnet_small", "classifier.epochs=1",
                  "classifier.batch_size=2", "classifier.crop_size=32", "segmentation.arch=deeplab_small",
                  "segmentation.epochs=1", "segmentation.batch_size=2", "segmentation.crop_size=32"]
        where = {**self.paths[stage], **paths}
        return [stage, "--params-json", "{}", *[a for s in (*common, *sets) for a in ("--set", s)],
                *[a for k, v in where.items() for a in (f"--{k}", str(v))]]

    def run(self, stage: str, *sets: str, **paths: Path) -> tuple[int, str]:
        self.capsys.readouterr()
        code = cli.main(self.argv(stage, *sets, **paths))
        return code, self.capsys.readouterr().err

    def ok(self, stage: str, *sets: str, **paths: Path) -> None:
        code, err = self.run(stage, *sets, **paths)
        assert code == 0, err

    def refused(self, stage: str, *names: object, sets: tuple[str, ...] = (), **paths: Path) -> str:
        """Run a stage that must refuse its input; check the message and that nothing was written or lost."""
        before = snapshot(self.tmp)
        code, err = self.run(stage, *sets, **paths)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[advcam ")]
        assert code == 2, err
        assert "Traceback" not in err and len(lines) == 1, err
        line = lines[0]
        assert line.startswith(f"advcam {stage}: error: "), line
        for name in names:
            assert str(name) in line, f"{name!r} not in: {line}"
        unchanged(before, snapshot(self.tmp))
        return line

    def prepared(self, *sets: str) -> list[str]:
        self.ok("prepare", *sets)
        return load_info(self.data).lists["infer"]

    def classifier(self, num_classes: int = 3, classes: list[str] | None = None) -> Path:
        torch.manual_seed(0)
        model = build_classifier("resnet_small", num_classes)
        names = classes or [*DEFAULT_CLASSES, "x", "y", "z"][:num_classes]
        path = self.paths["cams"]["model"]
        save_checkpoint(path, classifier_header(model, names, {}), model=model.state_dict())
        return path

    def pseudo_from_masks(self) -> list[str]:
        ids = self.prepared()
        info = load_info(self.data)
        folder = self.paths["train-seg"]["pseudo"]
        folder.mkdir(parents=True)
        for image_id in ids:
            Image.fromarray(info.read_mask(image_id)).save(folder / f"{image_id}.png")
        return ids


@pytest.fixture
def work(tmp_path, voc_master, capsys) -> Work:
    return Work(tmp_path, voc_master, capsys)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def unchanged(before: dict, after: dict) -> None:
    """Nothing lost or modified, nothing new but a stage's params record, no temporary files."""
    assert {k: after.get(k) for k in before if Path(k).name != RECORD} == \
        {k: v for k, v in before.items() if Path(k).name != RECORD}, "files were changed or removed"
    assert set(before) <= set(after), "files were removed"
    new = sorted(set(after) - set(before))
    assert all(Path(k).name == RECORD for k in new), f"half-written outputs: {new}"
    assert not [k for k in after if Path(k).name.startswith(TMP_PREFIX)]


def save_as(path: Path, arr: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> None:
    im = Image.fromarray(arr)
    im = im.convert(mode) if mode else im
    im.save(path, format=fmt)  # the .jpg name is kept: images are recognised by content, not by name


# ------------------------------------------------------------------ image files
@pytest.mark.parametrize("what", ["truncated", "zero-byte", "garbage"])
@pytest.mark.parametrize("role", ["train", "val"])  # train-only images: 1/8-scale draft decode; val: full decode
def test_damaged_image_is_named_by_prepare(work, what, role):
    victim = work.ids(role)[1]
    path = work.image(victim)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "zero-byte": b"", "garbage": b"\xff\xd8 no jpeg"}[what])
    work.refused("prepare", f"JPEGImages/{victim}.jpg", "unreadable image")


def test_image_damaged_after_prepare_is_named_by_training(work):
    victim = work.prepared()[0]
    work.classifier()
    path = work.image(victim)
    path.write_bytes(path.read_bytes()[:300])
    work.refused("train-cls", f"{victim}.jpg", "unreadable image")
    work.refused("cams", f"{victim}.jpg")


def test_image_damaged_after_prepare_is_one_line_with_loader_workers(work):
    victim = work.prepared()[0]
    work.image(victim).write_bytes(work.image(victim).read_bytes()[:300])
    work.refused("train-cls", f"{victim}.jpg", "unreadable image", sets=("workers=1",))


def test_damaged_mask_is_named(work):
    victim = work.ids("val")[0]
    work.mask(victim).write_bytes(b"")
    work.refused("prepare", f"SegmentationClass/{victim}.png", "unreadable mask")


RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (H, W), dtype=np.uint8)
RGB = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
DARK = GREY // 2  # a dark 16-bit image must stay dark (a per-image stretch would double it)


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "CMYK", "I;16", "I"])
def test_other_colour_modes_are_converted_to_rgb(work, mode):
    """Grayscale, bilevel, palette, RGBA, CMYK and 16-bit images go through every stage as RGB."""
    victim = work.ids()[0]
    path = work.image(victim)
    if mode == "L":
        save_as(path, GREY, fmt="JPEG")
    elif mode == "CMYK":
        save_as(path, RGB, "CMYK", fmt="JPEG")
    elif mode == "RGBA":
        save_as(path, np.dstack([RGB, GREY]))
    elif mode == "I;16":
        save_as(path, DARK.astype(np.uint16) * 257)
    elif mode == "I":
        save_as(path, DARK.astype(np.int32) * 257, fmt="TIFF")
    else:
        save_as(path, RGB, mode)
    with Image.open(path) as im:
        assert im.mode == mode
    work.prepared()
    work.classifier()
    work.ok("cams")
    work.ok("refine")
    img = read_image(path)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    if mode in ("I;16", "I"):  # 16-bit: a fixed scale v * 255 / 65535, not the image's own range
        assert np.array_equal(img[..., 0], DARK) and np.array_equal(img[..., 2], DARK)
    if mode == "RGBA":
        assert np.array_equal(img, RGB)
    assert (work.tmp / "pseudo" / f"{victim}.png").is_file()


@pytest.mark.parametrize("mode", ["F", "I32"])
def test_float_and_32_bit_images_are_refused(work, mode):
    victim = work.ids()[2]
    if mode == "F":
        save_as(work.image(victim), GREY.astype(np.float32) / 255, fmt="TIFF")
        words = "floating-point image (mode F)"
    else:
        save_as(work.image(victim), GREY.astype(np.int32) * 70000, fmt="TIFF")
        words = "outside 0..65535"
    work.refused("prepare", f"{victim}.jpg", words)


def test_decompression_bomb_is_refused(work, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W // 4)
    work.refused("prepare", "decompression bomb", f"{work.ids()[0]}.")


# ------------------------------------------------------------------ masks
def test_mask_of_another_size_is_named(work):
    victim = work.ids()[1]
    save_as(work.mask(victim), np.zeros((H - 2, W), np.uint8))
    work.refused("prepare", f"SegmentationClass/{victim}.png", f"mask is {H - 2}x{W}", f"is {H}x{W}")


def test_mask_of_the_turned_image_and_a_missing_augmented_mask_get_hints(work):
    """A mask drawn on the EXIF-turned image (H and W swapped) names EXIF; masks missing from SegmentationClass
    while SegmentationClassAug exists name dataset.mask_dir."""
    victim = work.ids()[1]
    keep = work.mask(victim).read_bytes()
    save_as(work.mask(victim), np.zeros((W, H), np.uint8))
    work.refused("prepare", f"mask is {W}x{H}", "turned by 90 degrees", "EXIF orientation")
    work.mask(victim).write_bytes(keep)
    (work.root / "SegmentationClassAug").mkdir()
    work.mask(victim).unlink()
    work.refused("prepare", f"id {victim!r} has no mask", "dataset.mask_dir is SegmentationClass",
                 "mask_dir: SegmentationClassAug")


def test_list_with_a_byte_order_mark_and_val_images_in_training_lists(work, caplog):
    """A list saved with a UTF-8 byte-order mark reads as without; val images in the training lists (SBD's
    train_aug leak) are named in a warning."""
    train = work.lists / "train.txt"
    train.write_bytes(b"\xef\xbb\xbf" + train.read_bytes())
    val = work.ids("val")
    train.write_text(train.read_text(encoding="utf-8-sig") + f"{val[0]}\n", encoding="utf-8-sig")
    with caplog.at_level("WARNING", logger="advcam"):
        work.ok("prepare")
    ids = (work.data / "lists" / "train.txt").read_text().split()
    assert ids[0] == work.ids()[0].lstrip("\ufeff") and "\ufeff" not in "".join(ids)
    assert any("train.txt and val.txt share 1 image(s), e.g. " + val[0] in r.message and "classifier" in r.message
               for r in caplog.records), caplog.text


@pytest.mark.parametrize("value", [4, 200, 254])
def test_mask_label_out_of_range_is_named(work, value):
    victim = work.ids("val")[1]
    mask = np.array(Image.open(work.mask(victim)))
    mask[3, 5] = value
    save_as(work.mask(victim), mask)
    work.refused("prepare", f"{victim}.png", f"label {value} outside 0..3 and 255")


def test_train_image_without_foreground_is_refused_unless_allowed(work):
    victim = work.ids()[2]
    save_as(work.mask(victim), np.zeros((H, W), np.uint8))
    work.refused("prepare", "train.txt", f"{victim}", "no foreground class", "dataset.allow_background_only")
    work.ok("prepare", "dataset.allow_background_only=true")
    assert load_info(work.data).labels[victim] == []


def test_background_only_image_outside_the_training_list_is_accepted(work):
    """Only the classifier's training list must have foreground: a background-only image of the val list, or of
    an infer list other than the training list, is prepared."""
    victim = work.ids("val")[0]
    save_as(work.mask(victim), np.zeros((H, W), np.uint8))
    work.ok("prepare")
    assert load_info(work.data).labels[victim] == []
    work.ok("prepare", "dataset.infer_list=val")
    assert victim in load_info(work.data).lists["infer"] and load_info(work.data).labels[victim] == []


# ------------------------------------------------------------------ lists and ids
def test_empty_list_is_named(work):
    (work.lists / "val.txt").write_text("\n \n")
    work.refused("prepare", "val.txt", "list is empty")


def test_duplicate_id_is_named(work):
    ids = work.ids()
    (work.lists / "train.txt").write_text("\n".join([*ids, ids[1]]) + "\n")
    work.refused("prepare", f"train.txt:{len(ids) + 1}", f"duplicate id '{ids[1]}'", "line 2")


@pytest.mark.parametrize("role, text, words", [("infer", "", "list is empty"),
                                               ("infer", "dup", "duplicate id"),
                                               ("infer", "../../outside/secret", "invalid image id")])
def test_tampered_prepared_list_is_named(work, role, text, words):
    ids = work.prepared()
    work.classifier()
    path = work.data / "lists" / f"{role}.txt"
    path.write_text({"": "", "dup": f"{ids[0]}\n{ids[0]}\n"}.get(text, f"{text}\n"))
    work.refused("cams", f"lists/{role}.txt", words)


BAD_IDS = ["../../outside/secret", "sub/x", "..", "a\\b", "/etc/passwd", ".hidden", "bell\x07", "x" * 201]


@pytest.mark.parametrize("bad", BAD_IDS, ids=["dotdot-path", "separator", "dotdot", "backslash", "absolute",
                                              "hidden", "control-char", "too-long"])
def test_unsafe_id_is_refused(work, bad):
    (work.lists / "val.txt").write_text(f"{work.ids('val')[0]}\n{bad}\n")
    line = work.refused("prepare", "val.txt:2", "invalid image id")
    assert repr(bad) in line


def test_unsafe_list_name_and_mask_dir_are_refused(work):
    work.refused("prepare", "invalid image id", sets=("dataset.val_list=../../outside/secret",))
    work.refused("prepare", "dataset.mask_dir", sets=("dataset.mask_dir=../outside",))


AUDIT = r"""
import json, os, sys
outside = os.path.realpath(sys.argv[1])
touched = []
def hook(event, args):
    for a in args:
        if isinstance(a, (str, bytes, os.PathLike)):
            try:
                p = os.fsdecode(a)
                real = os.path.realpath(os.path.abspath(p))
            except (ValueError, TypeError):  # e.g. bytecode passed to compile(): not a path
                continue
            if real == outside or real.startswith(outside + os.sep):
                touched.append([event, p])
sys.addaudithook(hook)
from advcam.cli import main
codes = [main(json.loads(a)) for a in sys.argv[2:]]
print(json.dumps({"codes": codes, "touched": touched}))
"""


def test_no_file_outside_the_dataset_root_is_read_or_written(work):
    """A list (and a tampered prepared list) pointing at a valid image + mask outside the root: never opened."""
    outside = work.tmp / "outside"
    outside.mkdir()
    shutil.copy(work.image(work.ids()[0]), outside / "secret.jpg")
    shutil.copy(work.mask(work.ids()[0]), outside / "secret.png")
    ids = work.prepared()
    work.classifier()
    (work.lists / "train.txt").write_text(f"{ids[0]}\n../../outside/secret\n")
    (work.data / "lists" / "infer.txt").write_text("../outside/secret\n")  # data/JPEGImages/../outside: none
    (work.data / "lists" / "val.txt").write_text("../../outside/secret\n")
    before = snapshot(work.tmp)
    argv = [work.argv("prepare", out=work.tmp / "data2"), work.argv("cams"), work.argv("refine"),
            work.argv("train-seg")]
    run = subprocess.run([sys.executable, "-c", AUDIT, str(outside), *map(json.dumps, argv)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "ADVCAM_PROGRESS": "0"})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["codes"] == [2, 2, 2, 2], run.stderr
    assert result["touched"] == []
    assert "Traceback" not in run.stderr and run.stderr.count("invalid image id") == 4, run.stderr
    unchanged(before, snapshot(work.tmp))


# ------------------------------------------------------------------ params
@pytest.mark.parametrize("override, words", [
    ("classifier.epochs=abc", ["classifier.epochs", "not of type 'integer'", "minimum 1"]),
    ("classifier.lr=-0.1", ["classifier.lr", "exclusiveMinimum 0"]),
    ("cam.advcam.steps=0", ["cam.advcam.steps", "minimum"]),
    ("cam.scales=[]", ["cam.scales", "minItems 1"]),
    ("device=gpu", ["device", "'gpu'", "enum ['auto', 'cpu', 'cuda']"]),
    ("cam.bogus=1", ["unknown key cam.bogus", "allowed here:", "scales"]),
    ("bogus=1", ["unknown key bogus"]),
    ("cam=3", ["cam", "not of type 'object'"]),
    ("refine.bg_threshold=0.9", ["refine.bg_threshold (0.9) must not exceed refine.fg_threshold"]),
    ("dataset.classes=[background,a,b]", ["dataset.classes lists 'background'", "foreground classes only"]),
    ("refine={method: randomwalk, randomwalk: {crop_size: 32}}",
     ["refine.randomwalk.crop_size 32 gives a 8 x 8 label grid", "no training pair within refine.randomwalk."
      "train_radius 10", "at least 73"]),
])
def test_bad_param_quotes_key_and_allowed_range(work, override, words):
    work.prepared()
    work.refused("train-cls", *words, sets=(override,))


def test_bad_params_file_is_named(work, capsys):
    bad = work.tmp / "params.yaml"
    bad.write_text("classifier:\n  epochs: 0\n")
    assert cli.main(["train-cls", "--params", str(bad), "--data", str(work.data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "classifier.epochs" in err and "minimum 1" in err
    bad.write_text("classifier: [unclosed\n")
    assert cli.main(["train-cls", "--params", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


# ------------------------------------------------------------------ checkpoints
def test_classifier_with_another_class_count_is_refused(work):
    work.prepared()
    work.classifier(num_classes=5)
    work.refused("cams", "classifier.pt", "has 5 output classes, expected 3")


def test_classifier_of_other_classes_is_refused(work):
    work.prepared()
    work.classifier(classes=["plane", "bus", "cow"])
    work.refused("cams", "classifier.pt", "trained on classes ['plane', 'bus', 'cow']")


def test_checkpoint_of_another_kind_or_architecture_is_refused(work):
    work.prepared()
    path = work.paths["cams"]["model"]
    path.parent.mkdir(parents=True)
    seg = build_segmenter("deeplab_small", 4)
    save_checkpoint(path, segmenter_header(seg, list(DEFAULT_CLASSES), {}), model=seg.state_dict())
    work.refused("cams", "classifier.pt", "is a segmenter checkpoint, expected a classifier checkpoint")
    cls = build_classifier("resnet_small", 3)
    save_checkpoint(path, {**classifier_header(cls, list(DEFAULT_CLASSES), {}), "arch": "resnet50"},
                    model=cls.state_dict())
    work.refused("cams", "classifier.pt", "weights do not fit arch 'resnet50'")
    save_checkpoint(path, {**classifier_header(cls, list(DEFAULT_CLASSES), {}), "method": "gradcam++"},
                    model=cls.state_dict())
    work.refused("cams", "classifier.pt", "method 'gradcam++' unknown")
    torch.save(cls.state_dict(), path)  # a bare state dict (e.g. torchvision weights), no advcam header
    work.refused("cams", "classifier.pt", "not an advcam checkpoint")


@pytest.mark.parametrize("what", ["zero-byte", "text", "random bytes", "json", "npz", "truncated", "zip"])
def test_file_that_is_not_a_checkpoint_is_refused(work, what):
    work.prepared()
    path = work.classifier()
    data = path.read_bytes()
    if what == "npz":
        with open(path, "wb") as f:
            np.savez(f, a=np.zeros(3))
    elif what == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    else:
        path.write_bytes({"zero-byte": b"", "text": b"hello\n", "random bytes": os.urandom(4096),
                          "json": json.dumps({"format": FORMAT}).encode(), "truncated": data[: len(data) // 2]}[what])
    line = work.refused("cams", "classifier.pt")
    if what in ("text", "json") or (what == "random bytes" and not path.read_bytes().startswith(b"\x80")):
        assert "not a PyTorch checkpoint (neither a zip archive nor a pickle" in line, line


def test_folder_and_cuda_map_location_are_named(tmp_path):
    from advcam.utils.checkpoint import load_checkpoint

    with pytest.raises(AdvcamError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)
    if not torch.cuda.is_available():
        ckpt = tmp_path / "c.pt"
        torch.save({"format": FORMAT}, ckpt)
        with pytest.raises(AdvcamError, match="asks for CUDA, which this machine lacks"):
            load_checkpoint(ckpt, map_location="cuda")


def test_bad_checkpoint_keeps_existing_cams(work):
    """Pointing cams at a wrong file must not delete the CAM files of the previous classifier."""
    work.prepared()
    work.classifier()
    work.ok("cams")
    work.paths["cams"]["model"].write_text("not a checkpoint")
    before = snapshot(work.tmp)
    assert cli.main(work.argv("cams")) == 2
    assert snapshot(work.tmp) == before


# ------------------------------------------------------------------ crafted pickles (refused, never run)
@pytest.mark.parametrize("container", ["zip", "legacy", "plain pickle"])
def test_crafted_pickle_in_checkpoint_is_not_executed(work, container):
    work.prepared()
    path = work.classifier()
    marker = work.tmp / "pwned"
    payload = {"format": FORMAT, "header": json.dumps({"kind": "classifier"}), "model": Payload(marker)}
    with open(path, "wb") as f:
        if container == "plain pickle":
            pickle.dump(payload, f)
        else:
            torch.save(payload, f, _use_new_zipfile_serialization=container == "zip")
    work.refused("cams", "classifier.pt", "refused", "pickled Python objects")
    assert not marker.exists()


def test_crafted_pickle_in_cam_file_is_not_executed(work):
    ids = work.prepared()
    work.classifier()
    work.ok("cams")
    marker = work.tmp / "pwned"
    cam = work.tmp / "cams" / f"{ids[0]}.npz"
    with open(cam, "wb") as f:
        np.savez(f, keys=np.array([Payload(marker)], dtype=object), cam=np.zeros((1, 10, 12), np.float32),
                 high_res=np.zeros((1, H, W), np.float32))
    work.refused("refine", f"{ids[0]}.npz", "refused to load", "pickled")
    assert not marker.exists()
    work.ok("cams")  # the cams stage treats it as an unfinished file: recomputed, still not executed
    assert not marker.exists()
    with np.load(cam, allow_pickle=False) as z:
        assert z["high_res"].shape[1:] == (H, W)


def test_cam_file_of_another_size_is_named(work):
    ids = work.prepared()
    work.classifier()
    work.ok("cams")
    with open(work.tmp / "cams" / f"{ids[0]}.npz", "wb") as f:  # the first id: no earlier label is finished
        np.savez(f, keys=np.array([0]), cam=np.zeros((1, 3, 3), np.float32), high_res=np.zeros((1, 9, 9), np.float32))
    work.refused("refine", f"{ids[0]}.npz", "does not match its image")


# ------------------------------------------------------------------ pseudo labels
@pytest.mark.parametrize("what", ["size", "value", "rgb"])
def test_bad_pseudo_label_stops_train_seg_naming_it(work, what):
    ids = work.pseudo_from_masks()
    path = work.tmp / "pseudo" / f"{ids[1]}.png"
    label = np.array(Image.open(path))
    if what == "size":
        save_as(path, label[:, : W - 3])
        words = [f"pseudo label is {W - 3}x{H}", f"image {ids[1]} is {W}x{H}"]
    elif what == "value":
        label[0, 0] = 9
        save_as(path, label)
        words = ["values [9] outside 0..3 and 255"]
    else:
        save_as(path, np.dstack([label] * 3))
        words = ["mode RGB"]
    work.refused("train-seg", f"pseudo/{ids[1]}.png", *words)


# ------------------------------------------------------------------ disk space
Usage = namedtuple("Usage", "total used free")


def fill_disk(monkeypatch) -> None:
    """Every file system reports 1 MiB free (below the 64 MiB margin of check_free_space)."""
    import advcam.utils.io as io

    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: Usage(2**40, 2**40 - 2**20, 2**20))


def test_full_disk_stops_prepare_and_training(work, monkeypatch):
    fill_disk(monkeypatch)
    work.refused("prepare", "not enough free disk space", "synthetic images", sets=(
        "dataset.kind=synthetic", "dataset.classes=null", "synthetic.num_classes=3", "synthetic.image_size=32",
        "synthetic.num_train_aug=4", "synthetic.num_train=2", "synthetic.num_val=2"))
    monkeypatch.undo()
    work.prepared()
    fill_disk(monkeypatch)
    work.refused("train-cls", "not enough free disk space", "classifier.pt")
    monkeypatch.undo()
    work.pseudo_from_masks()
    fill_disk(monkeypatch)
    work.refused("train-seg", "not enough free disk space", "segmenter.pt")


@pytest.mark.parametrize("stage", ["cams", "refine"])
def test_full_disk_stops_per_image_stages_before_writing(work, stage, monkeypatch):
    """A rerun with one output left to compute: refused before writing, naming the folder, the space needed and
    the space free; the finished files (and the previous metrics) stay as they were."""
    ids = work.prepared()
    work.classifier()
    work.ok("cams")
    if stage == "refine":
        work.ok("refine")
    out = work.paths[stage]["out"]
    suffix = ".npz" if stage == "cams" else ".png"
    (out / f"{ids[-1]}{suffix}").unlink()
    fill_disk(monkeypatch)
    work.refused(stage, "not enough free disk space", f"in {out}:", "needs about", "only 1.0 MiB free")
    assert sorted(p.name for p in out.glob(f"*{suffix}")) == sorted(f"{i}{suffix}" for i in ids[:-1])


def test_params_check_refuses_what_a_stage_would_fail_on(work, tmp_path):
    """`advcam params --check` (DVC's first stage) refuses, before any stage removes outputs: an unquoted VOC id
    as Snakemake reads it, a missing dataset folder or list, missing or unfitting weight files; all well, it
    writes its file."""
    from advcam import config
    from advcam.data import synthetic
    from advcam.models.resnet import resnet_small

    out = tmp_path / "logs" / "params.checked"

    def check(*sets: str, params: Path | None = None) -> tuple[int, str]:
        argv = work.argv("prepare", *sets)
        argv[0:1] = ["params", "--check", str(out)]
        argv = [a for a in argv if a != str(work.data) and a != "--out"]
        if params is not None:
            i = argv.index("--params-json")
            argv[i:i + 2] = ["--params", str(params)]
        work.capsys.readouterr()
        return cli.main(argv), work.capsys.readouterr().err

    code, err = check()
    assert code == 0 and out.read_text().startswith("params valid"), err
    out.unlink()
    weights = tmp_path / "small.pth"
    torch.save(resnet_small().state_dict(), weights)
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text("segmentation:\n  gt_ids: [2008_000039]\n")
    cases = [
        ((), unquoted, ["unquoted.yaml (as Snakemake reads it", "gt_ids[0]: 2008000039", "quote it"]),
        ((f"dataset.root={tmp_path / 'nowhere'}",), None, ["dataset folder not found", "nowhere"]),
        (("dataset.val_list=vall",), None, ["list file not found", "vall.txt", "lists there"]),
        (("dataset.mask_dir=SegmentationClassAug",), None, ["mask folder (dataset.mask_dir) not found"]),
        (("dataset.image_labels=xml",), None, ["annotation folder not found", "Annotations", "image_labels is xml"]),
        ((f"classifier.pretrained={tmp_path / 'missing.pth'}",), None,
         ["classifier.pretrained: pretrained weights not found", "missing.pth"]),
        ((f"segmentation.pretrained={weights}", "segmentation.arch=deeplab_resnet50"), None,
         ["segmentation.pretrained: ", "small.pth: keys do not match"]),
        (("segmentation.gt_ids=[nope_123]",), None,
         ["segmentation.gt_ids: image 'nope_123' is not in the segmenter's training list"]),
        (("dataset.kind=synthetic", "segmentation.gt_ids=[val_00000]"), None,
         ["segmentation.gt_ids: image 'val_00000' is not in the segmenter's training list"]),
        (("dataset.kind=synthetic", "dataset.seg_list=trainval"), None,
         ["dataset.seg_list: the synthetic dataset has no list 'trainval'"]),
    ]
    for sets, params, names in cases:
        code, err = check(*sets, params=params)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[advcam ")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (sets, err)
        assert lines[0].startswith("advcam params: error: "), lines
        assert all(n in lines[0] for n in names), (names, lines[0])
        assert not out.exists(), sets
    # gt_ids are checked against the segmenter's list (here train_aug), not the infer list
    lists = synthetic.list_ids(config.defaults()["synthetic"])
    extra = next(i for i in lists["train_aug"] if i not in lists["train"])
    code, err = check("dataset.kind=synthetic", "dataset.seg_list=train_aug", f"segmentation.gt_ids=[{extra}]")
    assert code == 0 and out.is_file(), err
    out.unlink()
    code, err = check(f"classifier.pretrained={weights}")
    assert code == 0 and out.is_file(), err
