"""Torch datasets for classifier and segmentation training, with the references' augmentation.

Determinism: item ``i`` draws all its randomness from ``np.random.default_rng([seed, epoch, i])``, so
an item depends only on (seed, epoch, index), never on worker count or loading order. Call
``dataset.set_epoch(epoch)`` before iterating each epoch (before the DataLoader's iterator is created, so
worker processes get the new epoch too); without it every epoch sees the augmentation of epoch 0.

Evaluation mode (``train=False``) does no random work: the image is normalised and centre-cropped/padded
to ``crop_size`` so batches stack. Full-image inference does not use these classes (see ``DatasetInfo``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from advcam.data import DatasetInfo
from advcam.data import transforms as T
from advcam.utils.errors import AdvcamError

IGNORE = 255


class AugmentedDataset(Dataset):
    """Shared bookkeeping: ids, crop size, train/eval, per-item RNG from (seed, epoch, index)."""

    def __init__(self, info: DatasetInfo, ids: Sequence[str], crop_size: int, train: bool, seed: int):
        if crop_size < 1:
            raise AdvcamError(f"crop_size must be positive, got {crop_size}")
        self.info, self.ids = info, list(ids)
        self.crop_size, self.train, self.seed, self.epoch = int(crop_size), bool(train), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (items are a pure function of seed, epoch, index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])


class ClassificationDataset(AugmentedDataset):
    """Items ``{"image": (3, S, S) float32, "label": (C,) float32 multi-hot, "id": str}``.

    Training augmentation, as IRN's classification dataset scaled to ``crop_size`` S: resize the long side
    to a random length in [0.625 S, 1.25 S] (IRN: 320..640 for crop 512, bicubic; ``resize_long`` sets the
    range), horizontal flip with p = 0.5, optional colour jitter (``color_jitter`` = brightness, contrast,
    saturation, hue of :func:`advcam.data.transforms.color_jitter`; none in IRN), normalise, then a random
    S x S crop where short sides are zero-padded (the mean colour after normalisation). ``resized_crop`` (a range
    of area shares) replaces the resize and the crop by torchvision's ``RandomResizedCrop(S)`` (EADER's).
    """

    def __init__(self, info: DatasetInfo, ids: Sequence[str], crop_size: int, train: bool = True, seed: int = 0,
                 *, resize_long: tuple[int, int] | None = None,
                 color_jitter: tuple[float, float, float, float] | None = None,
                 resized_crop: tuple[float, float] | None = None):
        super().__init__(info, ids, crop_size, train, seed)
        self.resize_long = resize_long or (round(0.625 * crop_size), round(1.25 * crop_size))
        self.color_jitter, self.resized_crop = color_jitter, resized_crop

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        img = self.info.read_image(image_id)
        rng = self.rng(index) if self.train else None
        if rng is not None:
            if self.resized_crop is not None:
                img = T.random_resized_crop(img, self.crop_size, rng, self.resized_crop)
            else:
                img = T.random_resize_long(img, *self.resize_long, rng)
            if rng.random() < 0.5:
                img = img[:, ::-1]
            if self.color_jitter is not None:
                img = T.color_jitter(img, rng, *self.color_jitter)
        (arr,) = T.crop_with_pad([T.normalize_array(img)], [0.0], self.crop_size, rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))),
                "label": torch.from_numpy(self.info.label_vector(image_id)), "id": image_id}


def augmentation_options(how: str, key: str, reference: dict[str, Any]) -> dict[str, Any]:
    """:class:`ClassificationDataset` keywords for a training method's ``augmentation`` param ``key``: its
    reference's (``reference``, the keywords given) or the CAM classifier's (``shared``: none)."""
    if how == "shared":
        return {}
    if how != "reference":
        raise AdvcamError(f"{key}: {how!r} is not one of reference, shared")
    return dict(reference)


class SegmentationDataset(AugmentedDataset):
    """Items ``{"image": (3, S, S) float32, "mask": (S, S) int64 (255 = ignore), "id": str}``.

    ``label_fn(id)`` returns the uint8 ``(H, W)`` target (ground truth or pseudo label). Training
    augmentation: a random scale, one of ``scale_choices`` when given (deeplab-pytorch's ``random.choice(scales)``
    and its resize, :func:`~advcam.data.transforms.deeplab_rescale`), else drawn uniformly in ``scale_range``
    (IRN's ``random_scale``: bicubic image, nearest mask, :func:`~advcam.data.transforms.random_scale`); a random
    S x S crop with padding (image 0, mask 255); a horizontal flip with p = 0.5. ``pad="bottom_right"`` is
    deeplab-pytorch's ``_augmentation`` (short sides padded at the bottom / right, then crop, then flip);
    ``pad="random"`` is IRN's (flip, then the image placed at a random offset in the crop).
    """

    def __init__(self, info: DatasetInfo, ids: Sequence[str], label_fn: Callable[[str], np.ndarray],
                 crop_size: int, train: bool = True, seed: int = 0, *,
                 scale_range: tuple[float, float] = (0.5, 1.5), scale_choices: Sequence[float] = (),
                 pad: str = "random"):
        super().__init__(info, ids, crop_size, train, seed)
        if pad not in T.PAD_PLACES:
            raise AdvcamError(f"crop padding must be one of {', '.join(T.PAD_PLACES)}, got {pad!r}")
        self.label_fn, self.scale_range = label_fn, scale_range
        self.scale_choices, self.pad = [float(c) for c in scale_choices], pad

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        img = self.info.read_image(image_id)
        mask = np.asarray(self.label_fn(image_id))
        if mask.shape != img.shape[:2]:
            raise AdvcamError(f"image id {image_id!r}: label is {mask.shape[0]}x{mask.shape[1]} but the image is "
                              f"{img.shape[0]}x{img.shape[1]}")
        mask = mask.astype(np.uint8, copy=False)
        rng = self.rng(index) if self.train else None
        flip_last = self.pad == "bottom_right"
        if rng is not None and self.scale_choices:
            factor = self.scale_choices[int(rng.integers(len(self.scale_choices)))]
            arr, mask = T.deeplab_rescale(T.normalize_array(img), mask, factor)
        else:
            if rng is not None:
                img, mask = T.random_scale(img, mask, *self.scale_range, rng)
            arr = T.normalize_array(img)
        if rng is not None and not flip_last and rng.random() < 0.5:
            arr, mask = arr[:, ::-1], mask[:, ::-1]
        arr, mask = T.crop_with_pad([arr, mask], [0.0, IGNORE], self.crop_size, rng, self.pad)
        if rng is not None and flip_last and rng.random() < 0.5:
            arr, mask = arr[:, ::-1], mask[:, ::-1]
        return {"image": torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))),
                "mask": torch.from_numpy(mask.astype(np.int64)), "id": image_id}
