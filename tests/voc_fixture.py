"""A tiny VOC-layout dataset for tests (importable helper, not a test module).

``make_voc_fixture(root)`` writes, deterministically::

    root/JPEGImages/<id>.jpg                  RGB JPEGs, size (H, W) = ``size`` (image_suffix=".png": PNGs)
    root/SegmentationClass/<id>.png           palette PNGs (VOC colour map): 0 bg, 1..C, 255 object borders
    root/ImageSets/Segmentation/train.txt     ``n_train`` ids
    root/ImageSets/Segmentation/val.txt       ``n_val`` ids
    (aug=True, like SBD)
    root/SegmentationClassAug/<id>.png        plain index PNGs (mode L, no palette) for train_aug + val ids
    root/ImageSets/Segmentation/train_aug.txt train ids + ``n_extra_aug`` more ids (sorted)
    (annotations=True, like VOC)
    root/Annotations/<id>.xml                 VOC annotation files: one <object> per class in the image, named, with
                                              its bounding box; a person-layout <part> (head) in the first
    (mask_free=k)
    root/HiddenMasks/<id>.png                 the first k train ids' masks, moved out of the mask folders (the
                                              truth for tests of labels read from their annotations)

Ids look like VOC's (``2007_000032``). Every image has 1 or 2 foreground classes (rectangles or ellipses,
filled with a class-specific colour plus noise, so a classifier can tell them apart); every object gets
a 2-pixel 255 border ring, as in VOC. The extra train_aug images have no ``SegmentationClass`` mask (as in
SBD, where only VOC's 2,913 images have one).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw

DEFAULT_CLASSES = ("cat", "dog", "car")


def voc_palette() -> list[int]:
    """VOC colour map (768 ints), self-contained so the fixture does not depend on the code under test."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def fixture_ids(n: int, start: int = 0) -> list[str]:
    """VOC-style ids: ``2007_000032``, ``2008_000039``, ..."""
    return [f"{2007 + (i % 5)}_{32 + 7 * i:06d}" for i in range(start, start + n)]


def _border(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels within ``width`` of a label change (a 255 ring like VOC's object outlines)."""
    h, w = mask.shape
    padded = np.pad(mask, width, mode="edge")
    out = np.zeros(mask.shape, bool)
    for dy in range(2 * width + 1):
        for dx in range(2 * width + 1):
            out |= padded[dy:dy + h, dx:dx + w] != mask
    return out


def _draw(rng: np.random.Generator, num_classes: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 and its label map (H, W) uint8 with 1-2 classes and 255 borders."""
    n = int(rng.integers(1, 3)) if num_classes > 1 else 1
    classes = sorted(rng.choice(num_classes, size=n, replace=False).tolist())
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for c in classes:
        bw, bh = int(rng.integers(w // 4, w // 2 + 1)), int(rng.integers(h // 4, h // 2 + 1))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        shape = draw.rectangle if c % 2 == 0 else draw.ellipse
        shape([x0, y0, x0 + bw, y0 + bh], fill=c + 1)
    lab = np.array(mask, dtype=np.uint8)
    present = [c for c in classes if (lab == c + 1).any()]
    if not present:  # cannot happen with these sizes; keep the >= 1 class promise anyway
        lab[h // 4: h // 2, w // 4: w // 2] = classes[0] + 1
    colours = np.array([[(37 * k + 80) % 256, (91 * k + 40) % 256, (151 * k + 200) % 256]
                        for k in range(num_classes + 1)], np.float32)
    colours[0] = (110, 110, 110)
    img = colours[lab] + rng.normal(0, 12, (h, w, 3))
    lab[_border(lab)] = 255
    return np.clip(img, 0, 255).astype(np.uint8), lab


def write_annotation(root: Path, image_id: str, objects: Sequence[tuple[str, tuple[int, int, int, int]]],
                     size: tuple[int, int]) -> Path:
    """``root/Annotations/<id>.xml`` in VOC's format: ``objects`` are ``(name, (xmin, ymin, xmax, ymax))``; the
    first object gets a person-layout ``<part>`` named ``head`` (a name that is not a class)."""
    h, w = size
    parts = []
    for k, (name, (x0, y0, x1, y1)) in enumerate(objects):
        box = f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
        part = f"<part><name>head</name>{box}</part>" if k == 0 else ""
        parts.append(f"  <object>\n    <name>{escape(name)}</name>\n    <pose>Unspecified</pose>\n"
                     f"    <truncated>0</truncated>\n    <difficult>{k % 2}</difficult>\n"
                     f"    {box}{part}\n  </object>\n")
    path = Path(root) / "Annotations" / f"{image_id}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation>\n  <folder>VOC2012</folder>\n  <filename>{image_id}.jpg</filename>\n"
                    f"  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>\n"
                    f"  <segmented>1</segmented>\n{''.join(parts)}</annotation>\n")
    return path


def _objects(lab: np.ndarray, classes: Sequence[str]) -> list[tuple[str, tuple[int, int, int, int]]]:
    """The (name, 1-based inclusive box) of each class in a label map, as VOC's annotations give them."""
    out = []
    for c in range(1, len(classes) + 1):
        ys, xs = np.nonzero(lab == c)
        if ys.size:
            out.append((classes[c - 1], (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)))
    return out


def make_voc_fixture(root: Path, n_train: int = 4, n_val: int = 3,
                     classes: Sequence[str] = DEFAULT_CLASSES, size: int | tuple[int, int] = (40, 48), *,
                     aug: bool = False, n_extra_aug: int = 2, seed: int = 0, annotations: bool = False,
                     mask_free: int = 0, image_suffix: str = ".jpg") -> Path:
    """Write a small VOC-layout folder at ``root`` and return ``root``.

    ``size`` is an int (square) or ``(H, W)``. ``aug=True`` adds SBD's ``SegmentationClassAug/`` (index
    PNGs without palette, for the train_aug and val ids) and ``train_aug.txt`` (train + ``n_extra_aug``
    extra ids, sorted). Images are non-square by default to catch H/W mix-ups. ``annotations=True`` writes
    VOC's ``Annotations/<id>.xml`` for every image; ``mask_free=k`` leaves the first ``k`` train ids without a
    mask in any mask folder (they keep their annotation, which ``mask_free`` needs), and saves those masks in
    ``HiddenMasks/`` for tests to compare with. ``image_suffix`` ``.png`` writes the images as PNGs (lossless).
    """
    if mask_free and not annotations:
        raise ValueError("mask_free images need annotations=True (nothing else would label them)")
    root = Path(root)
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    pal = voc_palette()
    train, val = fixture_ids(n_train), fixture_ids(n_val, start=n_train)
    extra = fixture_ids(n_extra_aug, start=n_train + n_val) if aug else []
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if aug:
        (root / "SegmentationClassAug").mkdir(exist_ok=True)
    hidden = set(train[:mask_free])
    for i in train + val + extra:
        img, lab = _draw(rng, len(classes), h, w)
        Image.fromarray(img).save(root / "JPEGImages" / f"{i}{image_suffix}", **({"quality": 95} if image_suffix
                                                                                  == ".jpg" else {}))
        if annotations:
            write_annotation(root, i, _objects(lab, classes), (h, w))
        if i in hidden:
            (root / "HiddenMasks").mkdir(exist_ok=True)
            Image.fromarray(lab).save(root / "HiddenMasks" / f"{i}.png")
            continue
        if i not in extra:
            pim = Image.fromarray(lab).convert("P")
            pim.putpalette(pal)
            pim.save(root / "SegmentationClass" / f"{i}.png")
        if aug:
            Image.fromarray(lab).save(root / "SegmentationClassAug" / f"{i}.png")
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val))
    if aug:
        (lists / "train_aug.txt").write_text("".join(f"{i}\n" for i in sorted(train + extra)))
    return root
