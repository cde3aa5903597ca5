"""The embedded dataset: VOC-layout images of "creatures" generated deterministically from params.

Each object of class k is a large textured **body** (a rotated ellipse) with a small **part** (a "head")
at one end of its long axis. The two carry evidence of very different strength, so that a GAP classifier's
CAM lights the part and leaves most of the body cold (the headroom AdvCAM's climbing is meant to use):

- part: about a tenth of the object's area, a saturated colour and a filled shape (disc, square, triangle,
  diamond, plus, hexagon); the (colour, shape) pair is unique per class and no other pixel is saturated.
- body: a muted tint shared by every 4th class, with low-contrast stripes at a class-specific angle (amplitude
  `synthetic.body_contrast`, 16 grey levels)
  (weak evidence: classes sharing a tint differ only in the stripe angle).
- distractors: unlabelled clutter (ellipses, rectangles, triangles) drawn first; half of them wear a random
  class's body texture, some are headless bodies, so body texture alone is not a reliable cue.

Images hold 1-3 classes (30% / 45% / 25%, capped by ``max_objects`` and C), sometimes a second object of a
class. Masks are VOC palette PNGs with 0 = background, k+1 = class k, 255 on a 1-pixel ring inside each
object outline. Also written: ``SegmentationPart/<id>.png`` (0 = no object, 1 = body, 2 = part, 255 =
border) and ``synthetic.json`` (params, classes, per-object metadata), for analysing where CAMs fire.

Every image has its own RNG seeded with ``(seed, split, index)``, so the same params give byte-identical
files and changing ``num_val`` does not change the training images. PIL and numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from advcam.data import voc
from advcam.utils.io import atomic_path, save_png, write_json, write_text
from advcam.utils.progress import progress

CLASS_NAMES: tuple[str, ...] = (
    "owl", "fox", "crab", "frog", "bee", "fish", "snail", "moth", "newt", "wasp",
    "hare", "mole", "yak", "eel", "lynx", "toad", "wren", "swan", "seal", "boar")
PART_COLOURS = np.array([(225, 25, 25), (25, 190, 40), (30, 60, 230), (240, 215, 20), (215, 30, 215),
                         (20, 205, 215), (250, 125, 0), (250, 250, 250), (12, 12, 12), (135, 35, 230)], np.float32)
SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "diamond", "plus", "hexagon")
BODY_TINTS = np.array([(150, 118, 96), (98, 126, 150), (126, 142, 96), (146, 108, 134)], np.float32)
CLASS_MIX = (0.30, 0.45, 0.25)  # P(1, 2, 3 classes in an image)
SPLITS = {"train_aug": 0, "val": 1}
TINT_GAP = 30.0  # tints closer than this (max over channels) count as the same


@dataclass(frozen=True)
class Style:
    """How strong each cue is (sizes are fractions of the image side, amplitudes in 8-bit grey levels)."""

    body_size: tuple[float, float] = (0.17, 0.27)  # body half-length range
    part_radius: float = 0.05
    distractor_size: tuple[float, float] = (0.07, 0.16)
    stripe_period: float = 0.07
    body_amp: float = 16.0  # stripe amplitude
    tint_jitter: float = 10.0  # per-object std of the body tint
    noise: float = 6.0  # per-pixel std
    mixed_distractors: float = 0.6  # share of distractors wearing one cue of a class's body texture


STYLE = Style()
PREFIX = {"train_aug": "img", "val": "val"}


@dataclass(frozen=True)
class Appearance:
    """How class k looks: the part's colour and shape, the body's tint and stripe angle (radians)."""

    part_colour: tuple[int, int, int]
    part_shape: str
    body_tint: tuple[int, int, int]
    stripe_angle: float


@dataclass
class SyntheticDataset:
    """What :func:`generate` wrote: root folder, class names, lists and per-image object metadata."""

    root: Path
    classes: list[str]
    lists: dict[str, list[str]]
    objects: dict[str, list[dict[str, Any]]]


def class_names(num_classes: int) -> list[str]:
    return list(CLASS_NAMES[:num_classes])


def appearance(k: int, num_classes: int) -> Appearance:
    """Class k's look; the (part colour, part shape) pair is unique for k < 20."""
    colour = PART_COLOURS[k % len(PART_COLOURS)]
    tint = BODY_TINTS[k % len(BODY_TINTS)]
    return Appearance(part_colour=(int(colour[0]), int(colour[1]), int(colour[2])),
                      part_shape=SHAPES[(k + k // len(PART_COLOURS)) % len(SHAPES)],
                      body_tint=(int(tint[0]), int(tint[1]), int(tint[2])),
                      stripe_angle=float(np.pi * k / num_classes))


def _stripes(xx: np.ndarray, yy: np.ndarray, tint: Sequence[float] | np.ndarray, angle: float, period: float,
             phase: float, amp: float) -> np.ndarray:
    wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
    return np.asarray(tint, np.float32)[None, None, :] + amp * wave[:, :, None]


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, theta: float) -> np.ndarray:
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _rect(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, theta: float) -> np.ndarray:
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    return (np.abs(u) <= a) & (np.abs(v) <= b)


def _polygon(size: int, points: list[tuple[float, float]]) -> np.ndarray:
    canvas = Image.new("1", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.array(canvas, dtype=bool)


def _regular(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [(cx + r * np.cos(rot + 2 * np.pi * i / n), cy + r * np.sin(rot + 2 * np.pi * i / n)) for i in range(n)]


def _shape(kind: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """A filled part shape of radius ~r centred at (cx, cy)."""
    dx, dy = np.abs(xx - cx), np.abs(yy - cy)
    if kind == "disc":
        return dx ** 2 + dy ** 2 <= r ** 2
    if kind == "square":
        return (dx <= 0.85 * r) & (dy <= 0.85 * r)
    if kind == "diamond":
        return dx + dy <= 1.2 * r
    if kind == "plus":
        return ((dx <= 0.45 * r) & (dy <= 1.05 * r)) | ((dy <= 0.45 * r) & (dx <= 1.05 * r))
    if kind == "triangle":
        return _polygon(size, _regular(cx - 0.5, cy - 0.5, 1.2 * r, 3, -np.pi / 2))
    return _polygon(size, _regular(cx - 0.5, cy - 0.5, 1.05 * r, 6, 0.0))  # hexagon


def _inner_border(label: np.ndarray) -> np.ndarray:
    """Object pixels with a differently labelled 8-neighbour (a 1-pixel ring inside each outline)."""
    h, w = label.shape
    padded = np.pad(label, 1, mode="edge")
    diff = np.zeros(label.shape, bool)
    for dy in range(3):
        for dx in range(3):
            diff |= padded[dy:dy + h, dx:dx + w] != label
    return diff & (label > 0)


def _angle_gap(x: float, y: float) -> float:
    """Distance between two stripe angles (stripes repeat every pi)."""
    return abs((x - y + np.pi / 2) % np.pi - np.pi / 2)


def mixed_gap(num_classes: int) -> float:
    """How far (radians) a distractor's stripe angle stays from the angles of classes sharing its tint."""
    return min(np.pi / 4, np.pi / (2 * num_classes))


def _mixed_texture(rng: np.random.Generator, looks: list[Appearance], tint_jitter: float = STYLE.tint_jitter
                   ) -> tuple[np.ndarray, float]:
    """A distractor's (tint, stripe angle): one cue of a random class k, the other from no class sharing it.

    Half the time k's tint (jittered) with an angle far from every class of a similar tint, otherwise k's
    angle with a tint far from every class of a similar angle: neither cue alone names a class, only their
    conjunction on a real body does."""
    k, gap = int(rng.integers(0, len(looks))), mixed_gap(len(looks))
    if rng.random() < 0.5:
        tint = np.asarray(looks[k].body_tint, np.float32) + rng.normal(0, tint_jitter, 3).astype(np.float32)
        taken = [lk.stripe_angle for lk in looks if np.abs(tint - lk.body_tint).max() < TINT_GAP]
        for _ in range(100):
            angle = float(rng.uniform(0, np.pi))
            if all(_angle_gap(angle, t) > gap for t in taken):
                return tint, angle
        return tint, float(looks[k].stripe_angle + np.pi / 2)  # unreachable in practice
    angle = looks[k].stripe_angle
    near = [np.asarray(lk.body_tint, np.float32) for lk in looks if _angle_gap(lk.stripe_angle, angle) <= gap]
    while True:
        tint = rng.uniform(70, 180, 3).astype(np.float32)
        if all(np.abs(tint - t).max() >= TINT_GAP for t in near):
            return tint, angle


def render(rng: np.random.Generator, size: int, num_classes: int, max_objects: int, distractors: int,
           style: Style = STYLE) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One image: ``(rgb uint8 (S, S, 3), label uint8 (S, S), parts uint8 (S, S), objects metadata)``."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    looks = [appearance(k, num_classes) for k in range(num_classes)]
    period = max(3.0, style.stripe_period * s)
    # background: muted grey with a gentle gradient
    base = rng.uniform(95, 165) + rng.normal(0, 10, 3)
    ramp_dir = rng.uniform(0, 2 * np.pi)
    ramp = ((xx * np.cos(ramp_dir) + yy * np.sin(ramp_dir)) / s - 0.5) * rng.uniform(10, 35)
    img = base[None, None, :].astype(np.float32) + ramp[:, :, None]
    # distractors: unlabelled clutter wearing half of a class's body texture (or none of it)
    for _ in range(int(rng.integers(0, distractors + 1))):
        a, cx, cy = rng.uniform(*style.distractor_size) * s, rng.uniform(0, s), rng.uniform(0, s)
        kind, theta = int(rng.integers(0, 3)), rng.uniform(0, np.pi)
        if kind == 0:
            m = _ellipse(xx, yy, cx, cy, a, a * rng.uniform(0.5, 0.9), theta)
        elif kind == 1:
            m = _rect(xx, yy, cx, cy, a, 0.7 * a, theta)
        else:
            m = _polygon(s, _regular(cx, cy, 1.3 * a, 3, theta))
        if rng.random() < style.mixed_distractors:
            tint, angle = _mixed_texture(rng, looks, style.tint_jitter)
        else:
            tint, angle = rng.uniform(80, 170) + rng.normal(0, 14, 3), rng.uniform(0, np.pi)
        img[m] = _stripes(xx, yy, tint, angle, period, rng.uniform(0, 6.3), style.body_amp)[m]
    # objects: classes of the image, then sometimes a second object of one of them
    n_max = min(3, num_classes, max_objects)
    probs = np.asarray(CLASS_MIX[:n_max]) / sum(CLASS_MIX[:n_max])
    chosen = rng.choice(num_classes, size=int(rng.choice(np.arange(1, n_max + 1), p=probs)), replace=False)
    classes = [int(c) for c in chosen]
    while len(classes) < max_objects and rng.random() < 0.25:
        classes.append(int(rng.choice(chosen)))
    label = np.zeros((s, s), np.uint8)
    parts = np.zeros((s, s), np.uint8)
    inst = np.zeros((s, s), np.int32)
    occupied = np.zeros((s, s), bool)
    placed: list[int] = []
    for j, k in enumerate(classes):
        look, r = looks[k], max(2.0, style.part_radius * s) * rng.uniform(0.9, 1.1)
        for attempt in range(60):
            shrink = 1.0 if attempt < 30 else 0.75
            a = rng.uniform(*style.body_size) * s * shrink
            b, theta = a * rng.uniform(0.55, 0.85), rng.uniform(0, 2 * np.pi)
            reach = a + 2 * r + 1
            if 2 * reach >= s:
                a, reach = (s / 2 - 2 * r - 2), s / 2 - 1
                b = a * 0.7
            cx, cy = rng.uniform(reach, s - reach), rng.uniform(reach, s - reach)
            body = _ellipse(xx, yy, cx, cy, a, b, theta)
            px, py = cx + 0.9 * a * np.cos(theta), cy + 0.9 * a * np.sin(theta)
            part = _shape(look.part_shape, xx, yy, px, py, r, s)
            whole = body | part
            if (whole & occupied).sum() <= 0.15 * whole.sum() and not (part & occupied).any() \
                    and not (whole & (parts == 2)).any():  # never hide an earlier part
                break
        else:
            continue  # no room: drop this object (never the first, which always fits)
        texture = _stripes(xx, yy, np.asarray(look.body_tint) + rng.normal(0, style.tint_jitter, 3), look.stripe_angle,
                           period, rng.uniform(0, 6.3), style.body_amp)
        img[body] = texture[body]
        img[part] = np.asarray(look.part_colour, np.float32) + rng.normal(0, 8, 3).astype(np.float32)
        occupied |= whole
        parts[body], parts[part] = 1, 2
        label[whole] = k + 1
        inst[whole] = j + 1
        placed.append(j)
    objects = [{"class": classes[j], "name": CLASS_NAMES[classes[j]],
                "body_pixels": int(((inst == j + 1) & (parts == 1)).sum()),
                "part_pixels": int(((inst == j + 1) & (parts == 2)).sum())} for j in placed]
    border = _inner_border(label)
    label[border], parts[border] = voc.IGNORE, voc.IGNORE
    img += rng.normal(0, style.noise, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label, parts, objects


def _save_jpeg(path: Path, rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=95, subsampling=0)


def _param(params: Mapping[str, Any], key: str, default: Any) -> Any:
    return params[key] if key in params else default


def list_ids(params: Mapping[str, Any]) -> dict[str, list[str]]:
    """The ids of the lists ``train_aug``, ``val`` and ``train`` that :func:`generate` writes for ``params`` (the
    ``synthetic`` section), without generating anything."""
    seed = int(_param(params, "seed", 0))
    n_aug, n_train = int(_param(params, "num_train_aug", 480)), int(_param(params, "num_train", 120))
    n_val = int(_param(params, "num_val", 80))
    lists = {split: [f"{PREFIX[split]}_{i:05d}" for i in range(n)]
             for split, n in (("train_aug", n_aug), ("val", n_val))}
    pick = np.random.default_rng([seed, 2]).choice(n_aug, size=min(n_train, n_aug), replace=False)
    lists["train"] = [lists["train_aug"][i] for i in sorted(pick.tolist())]
    return lists


def generate(params: Mapping[str, Any], root: str | Path, style: Style | None = None) -> SyntheticDataset:
    """Write the dataset described by ``params`` (the ``synthetic`` section) in VOC layout under ``root``."""
    root = Path(root)
    seed = int(_param(params, "seed", 0))
    num_classes, size = int(_param(params, "num_classes", 6)), int(_param(params, "image_size", 96))
    max_obj = int(_param(params, "max_objects", 3))
    n_dist = int(_param(params, "distractors", 3))
    style = replace(style or STYLE, body_amp=float(_param(params, "body_contrast", (style or STYLE).body_amp)))
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"synthetic.num_classes must be 1..{len(CLASS_NAMES)}, got {num_classes}")
    lists = list_ids(params)
    pal = voc.palette()
    objects: dict[str, list[dict[str, Any]]] = {}
    jobs = [(split, i, image_id) for split in ("train_aug", "val") for i, image_id in enumerate(lists[split])]
    for split, i, image_id in progress(jobs, desc="generate synthetic", unit="img"):
        rng = np.random.default_rng([seed, SPLITS[split], i])
        rgb, label, parts, objs = render(rng, size, num_classes, max_obj, n_dist, style)
        _save_jpeg(voc.image_path(root, image_id), rgb)
        save_png(voc.mask_path(root, "SegmentationClass", image_id), label, pal)
        save_png(voc.mask_path(root, "SegmentationPart", image_id), parts)
        objects[image_id] = objs
    for name in ("train_aug", "train", "val"):
        write_text(voc.list_path(root, name), "".join(f"{i}\n" for i in lists[name]))
    classes = class_names(num_classes)
    looks = {name: appearance(k, num_classes).__dict__ for k, name in enumerate(classes)}
    write_json(root / "synthetic.json", {"params": {k: params[k] for k in params}, "classes": classes,
                                         "appearance": looks, "objects": objects})
    return SyntheticDataset(root=root, classes=classes, lists=lists, objects=objects)
