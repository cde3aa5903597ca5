"""advcam.data: synthetic generator, VOC reading, DatasetInfo, transforms and datasets."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advcam.data import DatasetInfo, voc
from advcam.data import transforms as T
from advcam.data.datasets import ClassificationDataset, SegmentationDataset
from advcam.data.synthetic import (CLASS_NAMES, list_ids, _mixed_texture, appearance, class_names, generate,
                                    mixed_gap)
from advcam.utils.errors import AdvcamError

sys.path.insert(0, str(Path(__file__).parent))
from voc_fixture import voc_palette  # noqa: E402

TINY = {"seed": 3, "num_classes": 4, "image_size": 48, "num_train_aug": 24, "num_train": 8, "num_val": 6,
        "max_objects": 3, "distractors": 3}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return generate(TINY, tmp_path_factory.mktemp("syn") / "voc")


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _info(root: Path, classes: list[str], ids: list[str]) -> DatasetInfo:
    labels = {i: voc.labels_from_mask(voc.read_mask(voc.mask_path(root, "SegmentationClass", i), len(classes)))
              for i in ids}
    return DatasetInfo(folder=root, root=root, kind="synthetic", classes=tuple(classes),
                       mask_dir="SegmentationClass", lists={"train": ids, "infer": ids, "val": ids}, labels=labels)


# ---------------------------------------------------------------- synthetic generator
def test_generator_is_byte_deterministic(syn, tmp_path):
    again = generate(TINY, tmp_path / "again")
    assert _digest(syn.root) == _digest(again.root)
    other = generate({**TINY, "seed": 4}, tmp_path / "other")
    assert _digest(syn.root) != _digest(other.root)
    # the ids are known without generating (what `advcam params --check` checks gt_ids against)
    assert list_ids(TINY) == syn.lists and list_ids({**TINY, "seed": 4}) == other.lists


def test_body_contrast_scales_the_body_stripes_only(syn, tmp_path):
    """synthetic.body_contrast is the stripes' amplitude: 16 (the default) reproduces the default bytes; a higher
    value spreads the body pixels' grey levels and leaves the masks as they were."""
    same = generate({**TINY, "body_contrast": 16.0}, tmp_path / "same")
    files = lambda root: {k: v for k, v in _digest(root).items() if k != "synthetic.json"}  # noqa: E731
    assert files(syn.root) == files(same.root)  # synthetic.json records the params as given
    strong = generate({**TINY, "body_contrast": 48.0}, tmp_path / "strong")
    spread = {}
    for name, data in (("default", syn), ("strong", strong)):
        values = []
        for image_id in data.lists["train_aug"]:
            parts = np.array(Image.open(data.root / "SegmentationPart" / f"{image_id}.png"))
            rgb = np.array(Image.open(data.root / "JPEGImages" / f"{image_id}.jpg")).astype(float)
            values.append(rgb[parts == 1].std(axis=0).mean())
        spread[name] = float(np.mean(values))
        masks = sorted((data.root / "SegmentationClass").iterdir())
        assert [m.name for m in masks] == [m.name for m in sorted((syn.root / "SegmentationClass").iterdir())]
    assert spread["strong"] > 1.5 * spread["default"], spread
    for m in sorted((syn.root / "SegmentationClass").iterdir()):
        assert m.read_bytes() == (strong.root / "SegmentationClass" / m.name).read_bytes(), m.name


def test_val_images_do_not_depend_on_train_size(syn, tmp_path):
    bigger = generate({**TINY, "num_train_aug": 30}, tmp_path / "bigger")
    first = syn.lists["val"][0]
    assert (syn.root / "JPEGImages" / f"{first}.jpg").read_bytes() == \
        (bigger.root / "JPEGImages" / f"{first}.jpg").read_bytes()


def test_val_images_are_not_training_images(syn):
    """The val split draws from its own random stream: val image k is not train_aug image k."""
    for k, val_id in enumerate(syn.lists["val"]):
        val = (syn.root / "JPEGImages" / f"{val_id}.jpg").read_bytes()
        assert val != (syn.root / "JPEGImages" / f"{syn.lists['train_aug'][k]}.jpg").read_bytes(), val_id


def test_class_mix_of_the_synthetic_images():
    """1, 2 or 3 classes per image (30 / 45 / 25 %), drawn without replacement; an object without room is dropped,
    so a few images have fewer classes than drawn. 300 fixed renders give 83 / 160 / 57."""
    from advcam.data.synthetic import render

    counts = {1: 0, 2: 0, 3: 0}
    for i in range(300):
        *_, objects = render(np.random.default_rng([0, 0, i]), 48, 6, 3, 0)
        counts[len({o["class"] for o in objects})] += 1
    assert 70 <= counts[1] <= 96 and 45 <= counts[3] <= 66, counts


def test_ignore_ring_lies_inside_the_objects(syn):
    """The 255 ring is the objects' own outer pixels: the mask's non-background pixels are exactly the objects'
    body and part pixels, none of the background's."""
    for image_id, objects in syn.objects.items():
        mask = np.array(Image.open(syn.root / "SegmentationClass" / f"{image_id}.png"))
        assert int((mask != 0).sum()) == sum(o["body_pixels"] + o["part_pixels"] for o in objects), image_id


def test_voc_layout_and_lists(syn):
    root = syn.root
    lists = {n: (root / "ImageSets/Segmentation" / f"{n}.txt").read_text().split() for n in ("train_aug", "train", "val")}
    assert lists == syn.lists
    assert (len(lists["train_aug"]), len(lists["train"]), len(lists["val"])) == (24, 8, 6)
    assert set(lists["train"]) <= set(lists["train_aug"])
    assert lists["train"] == [i for i in lists["train_aug"] if i in set(lists["train"])]  # in train_aug's order
    assert not set(lists["val"]) & set(lists["train_aug"])
    for i in lists["train_aug"] + lists["val"]:
        with Image.open(root / "JPEGImages" / f"{i}.jpg") as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (48, 48))
        with Image.open(root / "SegmentationClass" / f"{i}.png") as m:
            assert m.mode == "P" and m.getpalette()[:12] == voc.palette()[:12]
    assert syn.classes == ["owl", "fox", "crab", "frog"]


def test_masks_have_borders_and_classes(syn):
    counts = {1: 0, 2: 0, 3: 0}
    for i, objs in syn.objects.items():
        mask = voc.read_mask(voc.mask_path(syn.root, "SegmentationClass", i), 4)
        present = voc.labels_from_mask(mask)
        assert 1 <= len(present) <= 3
        assert sorted({o["class"] for o in objs}) == present
        assert (mask == 255).any()
        # every border pixel touches an object pixel or another border pixel; objects are ringed
        obj = (mask > 0) & (mask < 255)
        assert ((mask == 255) & ~obj).sum() > 0.3 * obj.sum() ** 0.5
        counts[len(present)] += 1
    assert counts[1] > 0 and counts[2] + counts[3] > counts[1]


def test_parts_are_small_and_discriminative(syn):
    ratios = [o["part_pixels"] / o["body_pixels"] for objs in syn.objects.values() for o in objs]
    assert max(ratios) < 0.5 and np.median(ratios) < 0.2 and min(r > 0 for r in ratios)
    for i in syn.lists["val"]:
        parts = np.array(Image.open(syn.root / "SegmentationPart" / f"{i}.png"))
        mask = np.array(Image.open(syn.root / "SegmentationClass" / f"{i}.png"))
        assert np.array_equal(parts == 255, mask == 255)
        assert np.array_equal(parts > 0, mask > 0) and (parts == 2).sum() < (parts == 1).sum()
    looks = [appearance(k, 20) for k in range(20)]
    assert len({(a.part_colour, a.part_shape) for a in looks}) == 20          # parts unique per class
    assert looks[0].body_tint == looks[4].body_tint                         # bodies share tints
    assert len(set(class_names(20))) == 20 and class_names(3) == list(CLASS_NAMES[:3])


def test_distractors_never_wear_a_whole_body_texture():
    """A distractor's texture shares one cue (tint or stripe angle) with a class, never both."""
    for c in (1, 2, 6, 20):
        looks = [appearance(k, c) for k in range(c)]
        rng, gap = np.random.default_rng(c), mixed_gap(c)
        hits = 0
        for _ in range(300):
            tint, angle = _mixed_texture(rng, looks)
            for look in looks:
                same_tint = np.abs(tint - np.asarray(look.body_tint)).max() < 30
                d_angle = abs((angle - look.stripe_angle + np.pi / 2) % np.pi - np.pi / 2)
                assert not (same_tint and d_angle <= gap), (c, tint, angle, look)
                hits += same_tint or d_angle < 1e-6
        assert hits > 250  # most distractors do carry one cue of some class


def test_generator_at_minimum_size(tmp_path):
    out = generate({**TINY, "image_size": 32, "num_train_aug": 6, "num_train": 2, "num_val": 2,
                    "num_classes": 1, "max_objects": 8}, tmp_path / "min")
    for i in out.lists["train_aug"]:
        mask = voc.read_mask(voc.mask_path(out.root, "SegmentationClass", i), 1)
        assert voc.labels_from_mask(mask) == [0]


# ---------------------------------------------------------------- VOC reading
def test_palette_matches_voc():
    pal = voc.palette()
    assert len(pal) == 768 and pal[3:6] == [128, 0, 0] and pal[765:] == [224, 224, 192]
    assert pal == voc_palette()


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "..", "", " x", "x..y"])
def test_check_id_rejects_paths(bad):
    with pytest.raises(AdvcamError, match="invalid image id"):
        voc.check_id(bad, "list.txt:1")
    assert voc.check_id("2007_000032", "x") == "2007_000032"


def test_read_mask_modes(tmp_path):
    lab = np.array([[0, 1, 2], [255, 2, 0]], np.uint8)
    Image.fromarray(lab).save(tmp_path / "l.png")
    pim = Image.fromarray(lab).convert("P")
    pim.putpalette(voc.palette())
    pim.save(tmp_path / "p.png")
    rgb = np.array(voc.palette(), np.uint8).reshape(256, 3)[lab]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    for name in ("l.png", "p.png", "rgb.png"):
        out = voc.read_mask(tmp_path / name, 2)
        assert out.dtype == np.uint8 and np.array_equal(out, lab), name
    with pytest.raises(AdvcamError, match=r"l\.png.*label 2 outside 0\.\.1.*1 classes"):
        voc.read_mask(tmp_path / "l.png", 1)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "odd.png")
    with pytest.raises(AdvcamError, match=r"odd\.png.*\(1, 2, 3\)"):
        voc.read_mask(tmp_path / "odd.png", 2)
    assert voc.labels_from_mask(lab) == [0, 1]


def test_read_image_converts_to_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full((5, 7), 9, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "grey16.png")
    for name in ("grey.png", "rgba.png", "cmyk.jpg", "grey16.png"):
        out = voc.read_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (5, 7, 3), name
    assert np.array_equal(voc.read_image(tmp_path / "grey.png")[..., 2], rgb[..., 0])
    assert np.array_equal(voc.read_image(tmp_path / "grey16.png")[..., 1], rgb[..., 0])
    assert np.array_equal(voc.read_image(tmp_path / "rgba.png"), rgb)
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(AdvcamError, match="junk.jpg"):
        voc.read_image(tmp_path / "junk.jpg")


def test_sixteen_bit_masks_and_images(tmp_path):
    """A 16-bit mask value above 255 is refused, not wrapped to 8 bits; a 16-bit grey level v becomes
    round(v * 255 / 65535), not a truncation."""
    Image.fromarray(np.array([[0, 256]], np.uint16)).save(tmp_path / "m16.png")
    with pytest.raises(AdvcamError, match="label 256 outside"):
        voc.read_mask(tmp_path / "m16.png", 3)
    Image.fromarray(np.array([[200, 65535, 129]], np.uint16)).save(tmp_path / "g16.png")
    assert voc.read_image(tmp_path / "g16.png")[0, :, 0].tolist() == [1, 255, 1]


def test_truncated_jpeg_caught_by_draft_check(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert voc.check_image(tmp_path / "full.jpg", full=False) == (64, 80)
    for full in (True, False):
        with pytest.raises(AdvcamError, match="cut.jpg"):
            voc.check_image(tmp_path / "cut.jpg", full=full)


# ---------------------------------------------------------------- transforms and datasets
def test_normalize_roundtrip():
    img = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    t = T.normalize(img)
    assert t.shape == (3, 6, 5) and t.dtype == torch.float32
    assert np.array_equal(T.denormalize(t), img)
    assert abs(float(T.normalize(np.full((1, 1, 3), 124, np.uint8))[0])) < 0.01  # ~mean -> ~0


def test_normalize_is_torchvisions_imagenet_normalisation_per_channel():
    """IRN's (and torchvision's) Normalize: (x / 255 - mean) / std with each RGB channel's own ImageNet mean and
    std."""
    img = np.array([[[10, 128, 250]]], np.uint8)
    want = [(10 / 255 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (250 / 255 - 0.406) / 0.225]
    assert np.allclose(T.normalize(img)[:, 0, 0].numpy(), want, atol=1e-6)


def test_random_resize_long_draws_the_long_side_in_the_closed_range_bicubic():
    """IRN's random_resize_long: the long side is random.randint(min_long, max_long) (both ends included) and the
    image is resized bicubically."""
    img = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    longs = {max(T.random_resize_long(img, 30, 31, np.random.default_rng(s)).shape[:2]) for s in range(40)}
    assert longs == {30, 31}
    out = T.random_resize_long(img, 20, 20, np.random.default_rng(0))
    assert out.shape == (10, 20, 3)  # the long side (the width, 40) becomes 20
    assert np.array_equal(out, np.asarray(Image.fromarray(img).resize((20, 10), Image.Resampling.BICUBIC)))


def test_evaluation_crop_is_centred_whatever_the_pad_place():
    """Without an rng (evaluation) a short image is centred in the crop, also with deeplab-pytorch's bottom_right
    padding, which only places training crops."""
    for pad in T.PAD_PLACES:
        cr, cc, ir, ic = T.crop_box((3, 5), 8, None, pad)
        assert (cr, cc, ir, ic) == (slice(2, 5), slice(1, 6), slice(0, 3), slice(0, 5)), pad


def test_crop_with_pad_places_small_images_inside():
    img, mask = np.ones((3, 5, 1), np.float32), np.ones((3, 5), np.uint8)
    a, m = T.crop_with_pad([img, mask], [0.0, 255], 4, None)
    assert a.shape == (4, 4, 1) and m.shape == (4, 4)
    assert a.sum() == 3 * 4 and (m == 255).sum() == 4 and (a[..., 0] == 1).tolist() == (m == 1).tolist()


def test_crop_pad_bottom_right_is_deeplab_pytorchs():
    """deeplab-pytorch's _augmentation pads a short image at the bottom and right, crops, then flips: the
    image sits at the top, on the left or (flipped) on the right; IRN's crop places it anywhere."""
    img, mask = np.ones((3, 5, 1), np.float32), np.ones((3, 5), np.uint8)
    a, m = T.crop_with_pad([img, mask], [0.0, 255], 8, np.random.default_rng(0), "bottom_right")
    assert (m[:3, :5] == 1).all() and (m[3:] == 255).all() and (m[:, 5:] == 255).all() and a[:3, :5].all()
    big = np.arange(100, dtype=np.uint8).reshape(10, 10)  # longer than the crop: still a random cut
    cuts = {int(T.crop_with_pad([big], [255], 4, np.random.default_rng(k), "bottom_right")[0][0, 0])
            for k in range(20)}
    assert len(cuts) > 5
    with pytest.raises(ValueError, match="pad must be one of"):
        T.crop_box((3, 5), 8, None, "centre")


def test_segmentation_dataset_scale_choices_and_padding(syn):
    ids = syn.lists["val"]
    info = _info(syn.root, syn.classes, ids)
    ones = lambda i: np.ones(info.read_image(i).shape[:2], np.uint8)  # noqa: E731
    h, w = info.read_image(ids[0]).shape[:2]
    ds = SegmentationDataset(info, ids, ones, crop_size=2 * max(h, w), train=True, seed=3, scale_choices=[0.5],
                             pad="bottom_right")
    sides = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        m = ds[0]["mask"].numpy()
        rows, cols = np.nonzero(m == 1)
        assert (rows.min(), rows.max() + 1) == (0, round(h / 2))  # at the top, scaled by the one choice
        assert cols.max() + 1 - cols.min() == round(w / 2)
        sides.add("left" if cols.min() == 0 else "right" if cols.max() == m.shape[1] - 1 else "inside")
    assert sides == {"left", "right"}  # flipped after the crop, never placed inside
    irn = SegmentationDataset(info, ids, ones, crop_size=2 * max(h, w), train=True, seed=3, scale_choices=[0.5],
                              pad="random")
    tops = {int(np.nonzero(irn[k]["mask"].numpy() == 1)[0].min()) for k in range(len(ids))}
    assert len(tops) > 1  # IRN's crop: a random offset
    with pytest.raises(AdvcamError, match="crop padding"):
        SegmentationDataset(info, ids, ones, 48, pad="centre")


class Fixed:
    """An rng stand-in: ``uniform`` returns the factors given (then the middle of its range) and records its bounds
    in ``bounds``, ``permutation`` returns the order given, ``integers`` its lowest value."""

    def __init__(self, factors, order=(0, 1, 2, 3)):
        self.factors, self.order, self.bounds = list(factors), list(order), []

    def uniform(self, low, high):
        self.bounds.append((float(low), float(high)))
        return self.factors.pop(0) if self.factors else (low + high) / 2

    def integers(self, low, high=None):
        return 0 if high is None else low

    def permutation(self, n):
        return np.asarray(self.order)


def test_color_jitter_is_pil_enhance_in_the_drawn_order():
    from PIL import ImageEnhance

    img = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    out = T.color_jitter(img, Fixed([1.2, 0.8, 1.25, 0.0], [2, 0, 1, 3]))
    pil = Image.fromarray(img)
    pil = ImageEnhance.Color(pil).enhance(1.25)
    pil = ImageEnhance.Brightness(pil).enhance(1.2)
    pil = ImageEnhance.Contrast(pil).enhance(0.8)
    expected = np.asarray(T.shift_hue(pil, 0.0))
    assert out.dtype == np.uint8 and out.shape == img.shape and np.array_equal(out, expected)
    # neutral factors change nothing but the 8-bit HSV round trip of the hue step (a few levels)
    round_trip = np.asarray(T.shift_hue(Image.fromarray(img), 0.0))
    assert np.array_equal(T.color_jitter(img, Fixed([1.0, 1.0, 1.0, 0.0], [0, 1, 2, 3])), round_trip)
    assert 0 < np.abs(round_trip.astype(int) - img.astype(int)).max() <= 8
    # half a turn of hue: red becomes cyan
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    cyan = np.asarray(T.shift_hue(Image.fromarray(red), 0.5))
    assert (cyan[..., 0] < 10).all() and (cyan[..., 1:] > 240).all()
    # a range of 0 skips its step, as torchvision does: strength 0 is the identity, without the hue round trip
    assert np.array_equal(T.color_jitter(img, np.random.default_rng(3), 0, 0, 0, 0), img)
    a, b = (T.color_jitter(img, np.random.default_rng(5)) for _ in range(2))
    assert np.array_equal(a, b) and not np.array_equal(a, T.color_jitter(img, np.random.default_rng(6)))


def test_colour_jitter_ranges_are_torchvisions():
    """torchvision's ColorJitter draws brightness, contrast and saturation in [1 - v, 1 + v] and the hue shift in
    [-hue, hue], each from its own argument; the defaults are SEAM's (0.3, 0.3, 0.3, 0.1)."""
    img = np.zeros((4, 4, 3), np.uint8)
    rng = Fixed([])
    T.color_jitter(img, rng, 0.1, 0.2, 0.4, 0.05)
    assert rng.bounds == [pytest.approx(b) for b in [(0.9, 1.1), (0.8, 1.2), (0.6, 1.4), (-0.05, 0.05)]]
    rng = Fixed([])
    T.color_jitter(img, rng)
    assert rng.bounds == [pytest.approx(b) for b in [(0.7, 1.3)] * 3 + [(-0.1, 0.1)]]


def test_random_resized_crop_box_is_torchvisions():
    """torchvision's RandomResizedCrop: a log-uniform aspect ratio w / h; the box is sqrt(area * ratio) wide and
    sqrt(area / ratio) high."""
    img = np.arange(40 * 60 * 3).reshape(40, 60, 3).astype(np.uint8)
    rng = Fixed([0.5, float(np.log(2.0))])  # half the area (1200 px) at w / h = 2; the box at the top left
    out = T.random_resized_crop(img, 24, rng, scale=(0.08, 1.0), ratio=(0.5, 4.0))
    assert rng.bounds == [pytest.approx((0.08, 1.0)), pytest.approx((np.log(0.5), np.log(4.0)))]
    assert np.array_equal(out, T.resize(np.ascontiguousarray(img[0:24, 0:49]), (24, 24), "bilinear"))  # 24 x 49


def test_random_resized_crop_follows_torchvision():
    img = np.arange(40 * 60 * 3, dtype=np.int64).reshape(40, 60, 3).astype(np.uint8)
    out = T.random_resized_crop(img, 24, np.random.default_rng(0))
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    a, b = (T.random_resized_crop(img, 24, np.random.default_rng(9)) for _ in range(2))
    assert np.array_equal(a, b)
    # the whole area at ratio 1.5 = the whole 40 x 60 image, resized
    whole = T.random_resized_crop(img, 24, np.random.default_rng(1), scale=(1.0, 1.0), ratio=(1.5, 1.5))
    assert np.array_equal(whole, T.resize(img, (24, 24), "bilinear"))
    # an impossible box (the whole area at aspect 1 in a 40 x 60 image) falls back to the centre 40 x 40 at ratio 1
    centre = T.random_resized_crop(img, 24, np.random.default_rng(2), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert np.array_equal(centre, T.resize(np.ascontiguousarray(img[:, 10:50]), (24, 24), "bilinear"))


def test_classification_dataset(syn):
    ids = syn.lists["train"]
    info = _info(syn.root, syn.classes, ids)
    ds = ClassificationDataset(info, ids, crop_size=40, train=True, seed=7)
    item = ds[0]
    assert item["image"].shape == (3, 40, 40) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.float32 and item["label"].shape == (4,)
    assert item["label"].nonzero().flatten().tolist() == info.labels[ids[0]] and item["id"] == ids[0]
    assert torch.equal(ds[1]["image"], ClassificationDataset(info, ids, 40, True, 7)[1]["image"])
    first = [ds[i]["image"] for i in range(4)]
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i]["image"]) for i, a in enumerate(first))
    ds.set_epoch(0)
    assert all(torch.equal(a, ds[i]["image"]) for i, a in enumerate(first))
    evl = ClassificationDataset(info, ids, crop_size=64, train=False)
    assert torch.equal(evl[0]["image"][:, 8:56, 8:56], T.normalize(info.read_image(ids[0])))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, num_workers=0)))
    assert batch["image"].shape == (3, 3, 40, 40) and len(batch["id"]) == 3
    # colour jitter (SEAM's reference augmentation) changes the colours, not the labels, deterministically
    jit = ClassificationDataset(info, ids, crop_size=40, train=True, seed=7, color_jitter=(0.3, 0.3, 0.3, 0.1))
    assert torch.equal(jit[0]["label"], item["label"]) and torch.equal(jit[0]["image"], jit[0]["image"])
    assert not torch.equal(jit[0]["image"], item["image"])
    # EADER's RandomResizedCrop fills the crop (no padding) and keeps the labels
    rrc = ClassificationDataset(info, ids, crop_size=40, train=True, seed=7, resized_crop=(0.08, 1.0))
    assert rrc[0]["image"].shape == (3, 40, 40) and torch.equal(rrc[0]["label"], item["label"])
    assert not torch.equal(rrc[0]["image"], item["image"])


def test_classification_dataset_defaults_flip_and_padding(syn):
    """IRN's augmentation: the long side in 320..640 for crop 512 (0.625 to 1.25 times the crop), a horizontal
    flip with p = 0.5, and short sides padded with 0 after normalisation (the mean colour)."""
    ids = syn.lists["train"]
    info = _info(syn.root, syn.classes, ids)
    assert ClassificationDataset(info, ids, 512).resize_long == (320, 640)
    ds = ClassificationDataset(info, ids, crop_size=48, train=True, seed=0, resize_long=(48, 48))
    img = info.read_image(ids[0])
    plain, flipped = T.normalize(img), T.normalize(np.ascontiguousarray(img[:, ::-1]))
    seen = set()
    for epoch in range(16):
        ds.set_epoch(epoch)
        x = ds[0]["image"]
        seen.add("plain" if torch.equal(x, plain) else "flipped" if torch.equal(x, flipped) else "other")
    assert seen == {"plain", "flipped"}  # with the size fixed, a flip is the only change
    x = ClassificationDataset(info, ids, crop_size=64, train=True, seed=0, resize_long=(48, 48))[0]["image"]
    assert int((x.abs().sum(0) == 0).sum()) == 64 * 64 - 48 * 48


def test_bottom_right_flip_moves_image_and_mask_together_and_scales_are_drawn(syn):
    """deeplab-pytorch's _augmentation: the flip after the crop turns image and mask together, and the scale is
    random.choice(scales) over all the choices."""
    ids = syn.lists["val"]
    info = _info(syn.root, syn.classes, ids)
    ds = SegmentationDataset(info, ids, info.read_mask, crop_size=48, train=True, seed=0, scale_choices=[1.0],
                             pad="bottom_right")
    gt, rgb = info.read_mask(ids[0]), info.read_image(ids[0])
    seen = set()
    for epoch in range(16):
        ds.set_epoch(epoch)
        item = ds[0]
        mask, image = item["mask"].numpy(), T.denormalize(item["image"])
        if np.array_equal(mask, gt[:, ::-1]) and not np.array_equal(mask, gt):
            assert np.array_equal(image, rgb[:, ::-1]), "mask flipped without its image"
            seen.add("flipped")
        elif np.array_equal(mask, gt):
            assert np.array_equal(image, rgb), "image flipped without its mask"
            seen.add("plain")
    assert seen == {"flipped", "plain"}
    ones = lambda i: np.ones(info.read_image(i).shape[:2], np.uint8)  # noqa: E731
    two = SegmentationDataset(info, ids, ones, crop_size=96, train=True, seed=0, scale_choices=[0.5, 1.0],
                              pad="bottom_right")
    sizes = set()
    for epoch in range(16):
        two.set_epoch(epoch)
        sizes.add(int((two[0]["mask"].numpy() == 1).sum()))
    assert sizes == {24 * 24, 48 * 48}


def test_segmentation_dataset(syn):
    ids = syn.lists["val"]
    info = _info(syn.root, syn.classes, ids)
    ds = SegmentationDataset(info, ids, info.read_mask, crop_size=56, train=True, seed=1)
    seen_pad = False
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 56, 56) and item["mask"].shape == (56, 56)
        assert item["mask"].dtype == torch.int64
        vals = set(item["mask"].unique().tolist())
        assert vals <= set(range(5)) | {255}
        pad = item["mask"] == 255
        seen_pad |= bool((pad & (item["image"].abs().sum(0) == 0)).any())
        assert torch.equal(item["mask"], ds[i]["mask"])  # deterministic
    assert seen_pad  # 48 px images scaled by <= 1.5 in a 56 crop: some padding with (0, 255)
    evl = SegmentationDataset(info, ids, info.read_mask, crop_size=48, train=False)
    assert torch.equal(evl[0]["mask"], torch.from_numpy(info.read_mask(ids[0]).astype(np.int64)))
    with pytest.raises(AdvcamError, match=ids[0]):
        SegmentationDataset(info, ids, lambda i: np.zeros((3, 3), np.uint8), 48)[0]
