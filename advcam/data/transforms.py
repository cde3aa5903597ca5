"""Image transforms on numpy arrays (HWC), after IRN's ``imutils`` and DeepLab's training augmentation.

Every random transform takes an explicit ``np.random.Generator`` so callers control determinism.
Normalisation uses ImageNet's mean/std on [0, 1] pixels; padding after normalisation with 0 therefore
pads with the mean colour, as the reference does.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageEnhance

MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_MEAN = np.asarray(MEAN, np.float32) * 255.0
_STD = np.asarray(STD, np.float32) * 255.0


def normalize_array(img: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> float32 ``(H, W, 3)``, ``(x / 255 - mean) / std``."""
    return (img.astype(np.float32) - _MEAN) / _STD


def normalize(img: np.ndarray) -> torch.Tensor:
    """uint8 RGB ``(H, W, 3)`` -> normalised float32 tensor ``(3, H, W)``."""
    return torch.from_numpy(np.ascontiguousarray(normalize_array(img).transpose(2, 0, 1)))


def denormalize(tensor: torch.Tensor) -> np.ndarray:
    """Normalised ``(3, H, W)`` tensor -> uint8 RGB ``(H, W, 3)`` (clipped, rounded)."""
    arr = tensor.detach().float().cpu().numpy().transpose(1, 2, 0) * _STD + _MEAN
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def resize(arr: np.ndarray, size_hw: tuple[int, int], order: str) -> np.ndarray:
    """Resize an HWC uint8 image or an HW label map; ``order`` is bicubic, bilinear or nearest (labels)."""
    h, w = size_hw
    if arr.shape[:2] == (h, w):
        return arr
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                "nearest": Image.Resampling.NEAREST}[order]
    return np.asarray(Image.fromarray(arr).resize((w, h), resample))


def scaled_size(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """``(H, W)`` of an image of shape ``(H, W, ...)`` at ``scale``: rounded, at least one pixel (IRN's
    ``pil_rescale``)."""
    return max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale)))


def random_resize_long(img: np.ndarray, min_long: int, max_long: int, rng: np.random.Generator) -> np.ndarray:
    """IRN's ``random_resize_long``: resize so the long side is uniform in [min_long, max_long] (bicubic)."""
    target = int(rng.integers(min_long, max_long + 1))
    return resize(img, scaled_size(img.shape, target / max(img.shape[:2])), "bicubic")


def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision's ``RandomResizedCrop(size)`` (EADER's training crop): a box of a random share ``scale`` of the
    area and a log-uniform aspect ratio in ``ratio`` (10 tries; else the centre box of the clamped ratio), resized
    to ``size x size`` (bilinear)."""
    h, w = img.shape[:2]
    box = None
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            box = (top, left, ch, cw)
            break
    if box is None:
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            cw, ch = int(round(h * ratio[1])), h
        else:
            cw, ch = w, h
        box = ((h - ch) // 2, (w - cw) // 2, ch, cw)
    top, left, ch, cw = box
    return resize(np.ascontiguousarray(img[top:top + ch, left:left + cw]), (size, size), "bilinear")


def random_scale(img: np.ndarray, mask: np.ndarray, low: float, high: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """IRN's ``random_scale((img, label), (low, high), order=(3, 0))``: a factor drawn uniformly in [low, high],
    the uint8 image resized bicubic, the mask nearest, both to the rounded size (``pil_rescale``)."""
    factor = float(rng.uniform(low, high))
    size = scaled_size(img.shape, factor)
    return resize(img, size, "bicubic"), resize(mask, size, "nearest")


def deeplab_rescale(arr: np.ndarray, mask: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """deeplab-pytorch's training rescale (``_augmentation``): the size truncated, ``(int(H * f), int(W * f))``;
    the float image resized by ``cv2.INTER_LINEAR`` (bilinear between pixel centres, no antialiasing), the mask
    by PIL nearest. ``arr`` is a float32 ``(H, W, C)`` image; the reference resizes it before subtracting the
    mean, which gives the same numbers since the resize is linear with weights that sum to one."""
    size = (max(1, int(arr.shape[0] * factor)), max(1, int(arr.shape[1] * factor)))
    if size == arr.shape[:2]:
        return arr, mask
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]
    out = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    return out[0].numpy().transpose(1, 2, 0), resize(mask, size, "nearest")


def color_jitter(img: np.ndarray, rng: np.random.Generator, brightness: float = 0.3, contrast: float = 0.3,
                 saturation: float = 0.3, hue: float = 0.1) -> np.ndarray:
    """torchvision's ``ColorJitter`` on a PIL image, as SEAM's ``train_SEAM.py`` uses it (0.3, 0.3, 0.3, 0.1).

    Brightness, contrast and saturation factors are uniform in [1 - v, 1 + v] (PIL ``ImageEnhance``: blend with
    black, with the mean grey level, with the greyscale image); the hue shift is uniform in [-hue, hue] of the
    circle, applied to PIL's 8-bit HSV hue with wrap-around. The four run in a random order; one whose range is
    0 is skipped, as torchvision does (the hue step's HSV round trip is lossy). RGB uint8 in and out.
    """
    pil = Image.fromarray(np.ascontiguousarray(img))
    ranges = (brightness, contrast, saturation, hue)
    factors = [rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
               rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue)]
    steps = (lambda p, f: ImageEnhance.Brightness(p).enhance(f), lambda p, f: ImageEnhance.Contrast(p).enhance(f),
             lambda p, f: ImageEnhance.Color(p).enhance(f), shift_hue)
    for k in rng.permutation(4):
        if ranges[k] > 0:
            pil = steps[k](pil, factors[k])
    return np.asarray(pil, dtype=np.uint8)


def shift_hue(pil: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by ``shift`` (a fraction of the circle, in [-0.5, 0.5]) in PIL's 8-bit HSV."""
    h, s, v = pil.convert("HSV").split()
    hue = (np.asarray(h, dtype=np.int64) + int(shift * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8), "L"), s, v)).convert("RGB")


PAD_PLACES = ("random", "bottom_right")


def crop_box(hw: tuple[int, int], crop: int, rng: np.random.Generator | None, pad: str = "random"
             ) -> tuple[slice, slice, slice, slice]:
    """Where an image of size ``hw`` lands in a ``crop`` x ``crop`` container.

    Returns ``(container_rows, container_cols, image_rows, image_cols)``: a side longer than ``crop`` is cut
    at a random offset; a shorter one is placed at a random offset in the container (``pad="random"``, IRN's
    random crop) or at its start, padded at the bottom / right (``pad="bottom_right"``, deeplab-pytorch's
    ``_augmentation``). ``rng=None`` centres both (deterministic evaluation crops).
    """
    if pad not in PAD_PLACES:
        raise ValueError(f"crop_box: pad must be one of {PAD_PLACES}, got {pad!r}")
    out = []
    for n in hw:
        space = n - crop
        pick = (lambda k: k // 2) if rng is None else (lambda k: int(rng.integers(0, k + 1)))
        cont, img = (0, pick(space)) if space > 0 else (0 if pad == "bottom_right" and rng is not None
                                                         else pick(-space), 0)
        length = min(crop, n)
        out.append((slice(cont, cont + length), slice(img, img + length)))
    (cr, ir), (cc, ic) = out
    return cr, cc, ir, ic


def crop_with_pad(arrays: list[np.ndarray], pads: list[float], crop: int,
                  rng: np.random.Generator | None, pad: str = "random") -> list[np.ndarray]:
    """Crop (and pad with ``pads``) arrays of the same H, W to ``crop`` x ``crop`` with one shared box
    (:func:`crop_box`; ``pad`` places short sides)."""
    return crop_at(arrays, pads, crop, crop_box(arrays[0].shape[:2], crop, rng, pad))


def crop_at(arrays: list[np.ndarray], pads: list[float], crop: int,
            box: tuple[slice, slice, slice, slice]) -> list[np.ndarray]:
    """Each array's ``crop`` x ``crop`` container (filled with its pad) holding the ``box`` of :func:`crop_box`."""
    cr, cc, ir, ic = box
    out = []
    for arr, fill in zip(arrays, pads):
        container = np.full((crop, crop) + arr.shape[2:], fill, arr.dtype)
        container[cr, cc] = arr[ir, ic]
        out.append(container)
    return out
