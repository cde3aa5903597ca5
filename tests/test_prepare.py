"""Stage prepare: synthetic generation, VOC indexing (incl. SBD train_aug), validation, atomic output."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from advcam import config
from advcam.cli import main as cli_main
from advcam.data import load_info, voc
from advcam.steps import prepare
from advcam.steps.info import dataset_summary
from advcam.utils.errors import AdvcamError

sys.path.insert(0, str(Path(__file__).parent))
from voc_fixture import DEFAULT_CLASSES, make_voc_fixture, write_annotation  # noqa: E402

SYN = ["synthetic.image_size=40", "synthetic.num_train_aug=10", "synthetic.num_train=4", "synthetic.num_val=3",
       "synthetic.num_classes=3"]


def voc_cfg(root: Path, *extra: str) -> config.Config:
    return config.load(None, ["dataset.kind=voc", f"dataset.root={root}", f"dataset.classes={list(DEFAULT_CLASSES)}",
                              "dataset.train_list=train", *extra])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".tmp-"))


def test_prepare_synthetic(tmp_path):
    out = tmp_path / "data" / "synthetic"
    info = prepare.run(config.load(None, SYN), out)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "labels.json", "lists", "voc"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["root"] == "voc" and meta["kind"] == "synthetic" and meta["classes"] == ["owl", "fox", "crab"]
    assert meta["lists"] == {"train": "train_aug", "infer": "train", "seg": "train", "val": "val"}
    again = load_info(out)
    assert again.root == out / "voc" and again.num_classes == 3
    assert {r: len(v) for r, v in again.lists.items()} == {"train": 10, "infer": 4, "seg": 4, "val": 3}
    assert again.lists["seg"] == again.lists["infer"]  # dataset.seg_list null: the segmenter trains on infer
    assert set(again.lists["infer"]) <= set(again.lists["train"])
    for i in again.lists["val"]:
        assert again.labels[i] == voc.labels_from_mask(again.read_mask(i)) and again.labels[i]
        assert again.read_image(i).shape == (40, 40, 3)
    assert info.labels == again.labels
    # same params: byte-identical prepared folder (no timestamps, absolute paths or ordering noise)
    prepare.run(config.load(None, SYN), tmp_path / "again")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            assert p.read_bytes() == (tmp_path / "again" / p.relative_to(out)).read_bytes(), p
    assert leftovers(out.parent) == []


def test_prepare_voc_fixture(tmp_path):
    root = make_voc_fixture(tmp_path / "VOC", n_train=5, n_val=3)
    out = tmp_path / "prep"
    info = prepare.run(voc_cfg(root), out)
    assert info.root == root.absolute() and info.mask_dir == "SegmentationClass"
    assert info.lists["train"] == info.lists["infer"] == (root / "ImageSets/Segmentation/train.txt").read_text().split()
    for i in info.lists["train"] + info.lists["val"]:
        assert info.labels[i] == voc.labels_from_mask(np.array(Image.open(info.mask_path(i))))
    assert info.read_image(info.lists["val"][0]).shape == (40, 48, 3)
    assert set(json.loads((out / "labels.json").read_text())) == set(info.lists["train"] + info.lists["val"])


def test_prepare_sbd_train_aug(tmp_path):
    root = make_voc_fixture(tmp_path / "VOC", n_train=3, n_val=2, aug=True, n_extra_aug=3)
    info = prepare.run(voc_cfg(root, "dataset.mask_dir=SegmentationClassAug", "dataset.train_list=train_aug"),
                       tmp_path / "prep")
    assert len(info.lists["train"]) == 6 and set(info.lists["infer"]) < set(info.lists["train"])
    extra = sorted(set(info.lists["train"]) - set(info.lists["infer"]))
    assert not (root / "SegmentationClass" / f"{extra[0]}.png").exists()
    assert info.read_mask(extra[0]).dtype == np.uint8 and info.labels[extra[0]]
    # the plain SegmentationClass folder lacks masks of the extra train_aug ids: named in the error
    with pytest.raises(AdvcamError, match=f"{extra[0]}.*no mask.*SegmentationClass/{extra[0]}.png"):
        prepare.run(voc_cfg(root, "dataset.train_list=train_aug"), tmp_path / "bad")



def test_sbd_train_aug_with_voc_masks_and_annotations_names_the_sbd_masks(tmp_path, caplog):
    """VOC2012 has an annotation for every image: with mask_dir SegmentationClass the extra train_aug ids take
    their labels from the annotations, and the log points at SBD's masks, where IRN and AdvCAM take them."""
    root = make_voc_fixture(tmp_path / "VOC", n_train=3, n_val=2, aug=True, n_extra_aug=3, annotations=True)
    with caplog.at_level(logging.INFO, logger="advcam"):
        info = prepare.run(voc_cfg(root, "dataset.train_list=train_aug"), tmp_path / "prep")
    assert "3 from Annotations/<id>.xml" in caplog.text
    assert "dataset.mask_dir: SegmentationClassAug takes the labels of train_aug's images" in caplog.text
    sbd = prepare.run(voc_cfg(root, "dataset.train_list=train_aug", "dataset.mask_dir=SegmentationClassAug"),
                      tmp_path / "sbd")
    assert info.labels == sbd.labels  # the fixture's annotations name the classes its masks show


def test_images_without_masks_take_their_labels_from_voc_annotations(tmp_path, caplog):
    """The weakly supervised case: training images labelled at image level only (VOC's Annotations/<id>.xml, no
    mask). Before, prepare refused every image without a mask. Their labels are the objects' names, equal to the
    classes of the masks hidden from the folder; the other images keep their mask's labels."""
    root = make_voc_fixture(tmp_path / "VOC", n_train=6, n_val=3, annotations=True, mask_free=3)
    free = (root / "ImageSets/Segmentation/train.txt").read_text().split()[:3]
    with caplog.at_level(logging.INFO, logger="advcam"):
        info = prepare.run(voc_cfg(root), tmp_path / "prep")
    for i in free:
        assert not info.mask_path(i).exists()
        assert info.labels[i] == voc.labels_from_mask(np.array(Image.open(root / "HiddenMasks" / f"{i}.png")))
        assert info.labels[i]
    for i in info.lists["train"][3:] + info.lists["val"]:
        assert info.labels[i] == voc.labels_from_mask(info.read_mask(i))
    meta = json.loads((tmp_path / "prep" / "dataset.json").read_text())
    assert meta["image_labels"] == "masks" and meta["label_sources"] == {"mask": 6, "xml": 3}
    assert "3 from Annotations/<id>.xml" in caplog.text and "SegmentationClassAug" not in caplog.text
    assert ("image-level labels: 6 from masks, 3 from Annotations/<id>.xml (dataset.image_labels: masks)"
            in dataset_summary(tmp_path / "prep"))


def test_image_labels_xml_reads_every_annotation(tmp_path):
    """dataset.image_labels=xml (PSA's and SEAM's cls_labels): an object in the annotation counts even where the
    mask shows none of it (VOC's tiny objects are all border); with masks it does not."""
    root = make_voc_fixture(tmp_path / "VOC", n_train=3, n_val=2, annotations=True)
    first = (root / "ImageSets/Segmentation/train.txt").read_text().split()[0]
    in_mask = voc.labels_from_mask(np.array(Image.open(root / "SegmentationClass" / f"{first}.png")))
    missing = next(k for k in range(len(DEFAULT_CLASSES)) if k not in in_mask)
    objects = [(DEFAULT_CLASSES[k], (1, 1, 4, 4)) for k in sorted([*in_mask, missing])]
    write_annotation(root, first, objects, (40, 48))
    by_mask = prepare.run(voc_cfg(root), tmp_path / "masks")
    by_xml = prepare.run(voc_cfg(root, "dataset.image_labels=xml"), tmp_path / "xml")
    assert by_mask.labels[first] == in_mask and by_xml.labels[first] == sorted([*in_mask, missing])
    others = [i for i in by_mask.labels if i != first]
    assert all(by_xml.labels[i] == by_mask.labels[i] for i in others)
    meta = json.loads((tmp_path / "xml" / "dataset.json").read_text())
    assert meta["label_sources"] == {"mask": 0, "xml": 5}
    bare = make_voc_fixture(tmp_path / "bare", n_train=2, n_val=2)
    with pytest.raises(AdvcamError, match=r"annotation folder not found: .*bare/Annotations \(dataset.image_labels"):
        prepare.run(voc_cfg(bare, "dataset.image_labels=xml"), tmp_path / "none")


def test_image_labels_and_suffix_are_ignored_for_the_synthetic_dataset(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="advcam"):
        info = prepare.run(config.load(None, [*SYN, "dataset.image_labels=xml", "dataset.image_suffix=.png"]),
                           tmp_path / "syn")
    assert "dataset.image_labels=xml ignored for the synthetic dataset" in caplog.text
    assert "dataset.image_suffix=.png ignored for the synthetic dataset" in caplog.text
    assert info.image_path(info.lists["val"][0]).suffix == ".jpg"
    sources = json.loads((tmp_path / "syn" / "dataset.json").read_text())["label_sources"]
    assert sources == {"mask": 13, "xml": 0}  # train_aug (10, holding train) + val (3)
    assert all(info.labels[i] == voc.labels_from_mask(info.read_mask(i)) for i in info.lists["val"])


def test_png_images_are_read_with_their_suffix_and_without_loss(tmp_path):
    """A dataset of PNG images (dataset.image_suffix: .png) is read as it is, pixel for pixel, instead of being
    converted to lossy JPEG first; with VOC's .jpg the error names the suffix found and the param."""
    root = make_voc_fixture(tmp_path / "VOC", n_train=3, n_val=2, image_suffix=".png")
    info = prepare.run(voc_cfg(root, "dataset.image_suffix=.png"), tmp_path / "prep")
    for i in info.lists["train"] + info.lists["val"]:
        assert info.image_path(i) == root / "JPEGImages" / f"{i}.png"
        assert np.array_equal(info.read_image(i), np.asarray(Image.open(root / "JPEGImages" / f"{i}.png")))
    assert json.loads((tmp_path / "prep" / "dataset.json").read_text())["image_suffix"] == ".png"
    first = info.lists["train"][0]
    with pytest.raises(AdvcamError, match=f"found {first}.png: dataset.image_suffix is '.jpg', set it to"):
        prepare.run(voc_cfg(root), tmp_path / "bad")
    with pytest.raises(config.ConfigError, match="dataset.image_suffix"):
        voc_cfg(root, "dataset.image_suffix=png")  # the dot is part of the suffix
    lists = root / "ImageSets" / "Segmentation"  # DeepLab's two-column lists name the PNGs: the same ids
    (lists / "train.txt").write_text("".join(f"/JPEGImages/{i}.png /SegmentationClass/{i}.png\n"
                                             for i in info.lists["train"]))
    assert prepare.run(voc_cfg(root, "dataset.image_suffix=.png"), tmp_path / "two").lists == info.lists


def test_list_files_in_the_deeplab_two_column_form(tmp_path):
    """SBD-aug downloads list "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png": the same ids as one per line."""
    root = make_voc_fixture(tmp_path / "VOC", n_train=3, n_val=2, aug=True, n_extra_aug=3)
    lists = root / "ImageSets" / "Segmentation"
    plain = prepare.run(voc_cfg(root, "dataset.mask_dir=SegmentationClassAug", "dataset.train_list=train_aug"),
                        tmp_path / "plain")
    ids = (lists / "train_aug.txt").read_text().split()
    (lists / "train_aug.txt").write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))
    (lists / "val.txt").write_text("".join(f"JPEGImages/{i}.jpg\n" for i in plain.lists["val"]))
    info = prepare.run(voc_cfg(root, "dataset.mask_dir=SegmentationClassAug", "dataset.train_list=train_aug"),
                       tmp_path / "deeplab")
    assert info.lists == plain.lists and info.labels == plain.labels
    (lists / "val.txt").write_text("/Other/x.jpg\n")  # any other path is still refused, naming the line
    with pytest.raises(AdvcamError, match=r"val.txt:1: invalid image id '/Other/x.jpg'"):
        prepare.run(voc_cfg(root), tmp_path / "bad")


def _break(case: str, root: Path) -> str:
    """Damage the fixture for one case; return a regex the error message must match."""
    lists = root / "ImageSets" / "Segmentation"
    first = (lists / "train.txt").read_text().split()[0]
    if case == "missing root":
        return "dataset folder not found: .*nowhere"
    if case == "missing list":
        (lists / "val.txt").unlink()
        return r"list file not found: .*val\.txt"
    if case == "missing image":
        (root / "JPEGImages" / f"{first}.jpg").unlink()
        return f"id '{first}' has no image \\(expected .*JPEGImages/{first}.jpg\\)"
    if case == "upper-case extension":
        path = root / "JPEGImages" / f"{first}.jpg"
        path.rename(path.with_name(f"{first}.JPG"))
        return (f"id '{first}' has no image \\(expected .*{first}.jpg\\); found {first}.JPG: dataset.image_suffix is "
                "'.jpg', set it to the images' suffix")
    if case == "unreadable image":
        path = root / "JPEGImages" / f"{first}.jpg"
        path.write_bytes(path.read_bytes()[:300])
        return f"{first}.jpg: unreadable image"
    if case == "bad label":
        path = root / "SegmentationClass" / f"{first}.png"
        mask = np.array(Image.open(path))
        mask[0, 0] = 7
        Image.fromarray(mask).save(path)
        return f"{first}.png: mask has label 7 outside 0..3 .*3 classes"
    if case in ("separator", "dotdot"):
        bad = "../JPEGImages/x" if case == "dotdot" else "sub/x"
        (lists / "val.txt").write_text(f"{bad}\n")
        return f"val.txt:1: invalid image id '{bad}'"
    if case == "duplicate":
        (lists / "train.txt").write_text(f"{first}\n{first}\n")
        return f"train.txt:2: duplicate id '{first}'"
    if case == "empty":
        (lists / "val.txt").write_text("\n")
        return r"val\.txt: list is empty"
    if case == "no mask, no annotation":
        (root / "SegmentationClass" / f"{first}.png").unlink()
        return (f"id '{first}' has no mask \\(expected .*{first}.png\\) and no annotation "
                f"\\(.*Annotations/{first}.xml\\)")
    if case in ("val without mask", "unknown object", "broken annotation", "not an annotation", "xml, none",
                "annotation without objects"):
        val = (lists / "val.txt").read_text().split()[0]
        write_annotation(root, first, [("cat", (1, 1, 5, 5))], (40, 48))
        (root / "SegmentationClass" / f"{first}.png").unlink()
        if case == "val without mask":
            write_annotation(root, val, [("cat", (1, 1, 5, 5))], (40, 48))
            (root / "SegmentationClass" / f"{val}.png").unlink()
            return f"val.txt: id '{val}' has no mask .*; val images are scored against their masks"
        if case == "unknown object":
            write_annotation(root, first, [("cat", (1, 1, 5, 5)), ("unicorn", (2, 2, 6, 6))], (40, 48))
            return f"{first}.xml: object 2 is a 'unicorn', which is not one of dataset.classes \\(cat, dog, car\\)"
        if case == "annotation without objects":  # a training image needs a class, as with masks
            write_annotation(root, first, [], (40, 48))
            return (f"train.txt: 1 image\\(s\\) of the classifier's training list have no foreground class in "
                    f"their labels, e.g. id '{first}' \\(.*Annotations/{first}.xml\\)")
        if case == "broken annotation":
            (root / "Annotations" / f"{first}.xml").write_text("<annotation><object><name>cat</name>")
            return f"{first}.xml: not a readable VOC annotation"
        if case == "not an annotation":
            (root / "Annotations" / f"{first}.xml").write_text("<svg><object><name>cat</name></object></svg>")
            return f"{first}.xml: not a VOC annotation \\(its root element is <svg>"
        return f"id '{val}' has no annotation \\(expected .*Annotations/{val}.xml; dataset.image_labels is xml\\)"
    if case == "size mismatch":
        Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "SegmentationClass" / f"{first}.png")
        return f"{first}.png: mask is 5x5 but its image"
    raise AssertionError(case)


CASES = ["missing root", "missing list", "missing image", "upper-case extension", "unreadable image", "bad label",
         "separator", "dotdot", "duplicate", "empty", "size mismatch", "no mask, no annotation", "val without mask",
         "unknown object", "broken annotation", "not an annotation", "xml, none", "annotation without objects"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_and_leaves_nothing(tmp_path, case):
    root = make_voc_fixture(tmp_path / "VOC", n_train=3, n_val=2)
    pattern = _break(case, root)
    out = tmp_path / "work" / "prep"
    cfg = voc_cfg(tmp_path / "nowhere" if case == "missing root" else root,
                  *(["dataset.image_labels=xml"] if case == "xml, none" else []))
    with pytest.raises(AdvcamError, match=pattern):
        prepare.run(cfg, out)
    assert not out.exists() and leftovers(out.parent) == []


def test_failure_keeps_previous_output_and_success_replaces_it(tmp_path):
    root = make_voc_fixture(tmp_path / "VOC", n_train=3, n_val=2)
    out = tmp_path / "prep"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (tmp_path / ".tmp-prep.stale").mkdir()  # what a killed run leaves: cleaned up
    with pytest.raises(AdvcamError):
        prepare.run(voc_cfg(root, "dataset.val_list=nope"), out)
    assert (out / "old.txt").read_text() == "old"
    prepare.run(voc_cfg(root), out)
    assert not (out / "old.txt").exists() and (out / "dataset.json").is_file()
    assert leftovers(tmp_path) == []


def test_many_problems_are_counted(tmp_path):
    root = make_voc_fixture(tmp_path / "VOC", n_train=8, n_val=2)
    for p in sorted((root / "JPEGImages").glob("*.jpg"))[:7]:
        p.unlink()
    with pytest.raises(AdvcamError, match=r"7 problem\(s\).*and 2 more"):
        prepare.run(voc_cfg(root), tmp_path / "prep")


def test_cli_prepare_reports_one_line(tmp_path, capsys):
    root = make_voc_fixture(tmp_path / "VOC", n_train=2, n_val=2)
    (root / "ImageSets/Segmentation/val.txt").unlink()
    code = cli_main(["prepare", "--out", str(tmp_path / "p"), "--set", "dataset.kind=voc",
                     "--set", f"dataset.root={root}", "--set", "dataset.train_list=train"])
    err = capsys.readouterr().err
    assert code == 2 and "list file not found" in err and "val.txt" in err
    assert cli_main(["prepare", "--out", str(tmp_path / "p"), "--set", "dataset.kind=voc", "--set",
                     f"dataset.root={root}", "--set", "dataset.train_list=train", "--set", "dataset.val_list=train",
                     "--set", f"dataset.classes={list(DEFAULT_CLASSES)}"]) == 0
    assert load_info(tmp_path / "p").lists["val"] == load_info(tmp_path / "p").lists["train"]


def test_a_class_without_training_images_is_named(tmp_path, caplog):
    """Class names that do not match the masks (one too many here) leave a class with no training image: prepare
    says which, instead of training a classifier that cannot learn it."""
    root = make_voc_fixture(tmp_path / "voc")
    names = list(DEFAULT_CLASSES) + ["unicorn"]
    with caplog.at_level(logging.WARNING, logger="advcam"):
        prepare.run(voc_cfg(root, f"dataset.classes={names}"), tmp_path / "data")
    warned = [r.getMessage() for r in caplog.records if "so the classifier cannot learn" in r.getMessage()]
    assert len(warned) == 1 and "unicorn" in warned[0] and "train.txt" in warned[0], caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="advcam"):
        prepare.run(voc_cfg(root), tmp_path / "data2")
    assert "unicorn" not in caplog.text


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_images_labelled_only_by_annotations_run_through_the_stages(tmp_path, capsys, suffix):
    """Half of the classifier's and the segmenter's images have no mask, only VOC annotations: every stage runs,
    CAMs and pseudo labels are made for all of them, and the seeds and pseudo labels are scored on the images
    that have a mask. The same with PNG images (dataset.image_suffix)."""
    root = make_voc_fixture(tmp_path / "VOC", n_train=6, n_val=2, annotations=True, mask_free=3,
                            image_suffix=suffix)
    free = (root / "ImageSets/Segmentation/train.txt").read_text().split()[:3]
    data, cams, pseudo = tmp_path / "data", tmp_path / "cams", tmp_path / "pseudo"
    sets = ["device=cpu", "dataset.kind=voc", f"dataset.root={root}", "dataset.train_list=train",
            f"dataset.classes={list(DEFAULT_CLASSES)}", "cam.method=cam", "cam.scales=[1.0]",
            "classifier.arch=resnet_small", "classifier.epochs=1", "classifier.batch_size=2",
            "classifier.crop_size=32", "segmentation.arch=deeplab_small", "segmentation.epochs=1",
            "segmentation.batch_size=2", "segmentation.crop_size=32", f"dataset.image_suffix={suffix}"]
    common = ["--params-json", "{}", *[a for s in sets for a in ("--set", s)]]
    steps = [["prepare", "--out", data],
             ["train-cls", "--data", data, "--out", tmp_path / "cls.pt", "--curves", tmp_path / "cls.csv"],
             ["cams", "--data", data, "--model", tmp_path / "cls.pt", "--out", cams, "--metrics",
              tmp_path / "seeds.json", "--curve", tmp_path / "seeds.csv"],
             ["refine", "--data", data, "--cams", cams, "--out", pseudo, "--metrics", tmp_path / "pseudo.json"],
             ["train-seg", "--data", data, "--pseudo", pseudo, "--out", tmp_path / "seg.pt", "--curves",
              tmp_path / "seg.csv"]]
    for step in steps:
        assert cli_main([str(step[0]), *common, *map(str, step[1:])]) == 0, step[0]
    assert all((cams / f"{i}.npz").is_file() and (pseudo / f"{i}.png").is_file() for i in free)
    seeds = json.loads((tmp_path / "seeds.json").read_text())
    assert seeds["num_images"] == 6 and seeds["num_images_scored"] == 3
    assert json.loads((tmp_path / "pseudo.json").read_text())["num_images_scored"] == 3
    assert (tmp_path / "seg.pt").is_file()
    # semi-supervised: gt_fraction draws from the images that have a mask (half of them here: all of those)
    seg = [*map(str, steps[-1][1:5]), "--out", str(tmp_path / "semi.pt"), "--curves", str(tmp_path / "semi.csv")]
    assert cli_main(["train-seg", *common, "--set", "segmentation.gt_fraction=0.5", *seg]) == 0
    capsys.readouterr()
    assert cli_main(["train-seg", *common, "--set", "segmentation.gt_fraction=1.0", *seg]) == 2
    err = capsys.readouterr().err
    assert "asks for the masks of 6 images of train.txt (dataset.seg_list), but only 3 of its 6" in err


def write_labels_file(path: Path, rows: dict[str, list[str]], comment: bool = True) -> Path:
    text = ("# id, then its classes\n\n" if comment else "") + "".join(f"{i} {' '.join(c)}\n" for i, c in rows.items())
    path.write_text(text)
    return path


def hidden_labels(root: Path, image_id: str) -> list[int]:
    return voc.labels_from_mask(np.array(Image.open(root / "HiddenMasks" / f"{image_id}.png")))


def test_images_without_masks_take_their_labels_from_a_labels_file(tmp_path):
    """dataset.labels_file: one line per image (its id, then its class names). An image without a mask takes its
    labels from its line, before its annotation; images with a mask keep the mask's labels; with image_labels
    file every image takes its line."""
    root = make_voc_fixture(tmp_path / "VOC", n_train=6, n_val=2, annotations=True, mask_free=3)
    free = (root / "ImageSets/Segmentation/train.txt").read_text().split()[:3]
    for i in free[1:]:
        (root / "Annotations" / f"{i}.xml").unlink()  # free[1:] have only the file; free[0] has both
    rows = {i: [DEFAULT_CLASSES[c] for c in hidden_labels(root, i)] for i in free}
    rows[free[0]] = ["car"]  # the file's line, not the annotation, labels it
    write_labels_file(root / "labels.txt", rows)
    info = prepare.run(voc_cfg(root, "dataset.labels_file=labels.txt"), tmp_path / "prep")  # relative to the root
    assert info.labels[free[0]] == [2] and all(info.labels[i] == hidden_labels(root, i) for i in free[1:])
    for i in info.lists["train"][3:] + info.lists["val"]:
        assert info.labels[i] == voc.labels_from_mask(info.read_mask(i))
    meta = json.loads((tmp_path / "prep" / "dataset.json").read_text())
    assert meta["label_sources"] == {"mask": 5, "xml": 0, "file": 3} and meta["labels_file"] == str(root / "labels.txt")
    assert any(f"3 from {root / 'labels.txt'}" in line for line in dataset_summary(tmp_path / "prep"))
    every = {i: ["dog"] for i in [*info.lists["train"], *info.lists["val"]]}
    write_labels_file(tmp_path / "all.txt", every, comment=False)
    by_file = prepare.run(voc_cfg(root, f"dataset.labels_file={tmp_path / 'all.txt'}", "dataset.image_labels=file"),
                          tmp_path / "file")
    assert all(v == [1] for v in by_file.labels.values())
    assert json.loads((tmp_path / "file" / "dataset.json").read_text())["label_sources"]["file"] == 8


@pytest.mark.parametrize("case", ["missing file", "unknown class", "duplicate id", "file mode without a file",
                                  "file mode, image without a line", "no mask, no annotation, no line"])
def test_a_labels_file_that_does_not_fit_is_refused_naming_it(tmp_path, case):
    """prepare refuses, naming the file and line, and writes nothing; check_params refuses the same."""
    from advcam.steps import check

    root = make_voc_fixture(tmp_path / "VOC", n_train=3, n_val=2, annotations=True, mask_free=1)
    free = (root / "ImageSets/Segmentation/train.txt").read_text().split()[0]
    good = {free: [DEFAULT_CLASSES[c] for c in hidden_labels(root, free)]}
    path = root / "labels.txt"
    sets, message = [f"dataset.labels_file={path}"], ""
    if case == "missing file":
        message = f"labels file not found: {path} (dataset.labels_file)"
    elif case == "unknown class":
        write_labels_file(path, {**good, "2009_000046": ["unicorn"]})
        message = f"{path}:4: 'unicorn' is not one of dataset.classes (cat, dog, car)"
    elif case == "duplicate id":
        path.write_text(f"{free} cat\n{free} dog\n")
        message = f"{path}:2: duplicate id '{free}' (first on line 1)"
    elif case == "file mode without a file":
        sets, message = ["dataset.image_labels=file"], "dataset.image_labels is file but dataset.labels_file is not set"
    elif case == "file mode, image without a line":
        write_labels_file(path, good)
        sets.append("dataset.image_labels=file")
        message = "has no line in the labels file (dataset.image_labels is file)"
    else:
        write_labels_file(path, {})
        (root / "Annotations" / f"{free}.xml").unlink()
        message = f"no annotation ({root / 'Annotations' / free}.xml) and no line in dataset.labels_file"
    with pytest.raises(AdvcamError) as err:
        prepare.run(voc_cfg(root, *sets), tmp_path / "prep")
    assert message in str(err.value)
    assert not (tmp_path / "prep").exists() and leftovers(tmp_path) == []
    if case in ("missing file", "unknown class", "duplicate id", "file mode without a file"):
        with pytest.raises(AdvcamError, match="labels"):
            check.dataset_lists(voc_cfg(root, *sets))
