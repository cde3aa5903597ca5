"""advcam.data: the prepared dataset folder written by ``advcam prepare`` and read by every later stage.

A prepared folder ``data/<name>/`` holds ``dataset.json`` (kind, root, mask_dir, classes, which source list
each role came from), ``labels.json`` (id -> 0-based foreground class ids) and ``lists/<role>.txt`` for the
roles ``train`` (the classifier's images), ``infer`` (seeds and pseudo labels are scored on it), ``seg`` (the
segmenter trains on its pseudo labels) and ``val``. :func:`load_info` reads it back as a :class:`DatasetInfo`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from advcam.data import voc
from advcam.utils.errors import AdvcamError
from advcam.utils.io import read_json


def image_size(info: Any, image_id: str) -> tuple[int, int]:
    """``(H, W)`` of an image from its file header (no decoding)."""
    path = Path(info.image_path(image_id))
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, ValueError) as exc:
        raise AdvcamError(f"image {image_id}: cannot read {path} ({exc})") from None


def image_classes(info: Any, image_id: str) -> list[int]:
    """The image-level labels (0-based foreground classes) of ``image_id``; AdvcamError naming labels.json."""
    if image_id not in info.labels:
        raise AdvcamError(f"image {image_id}: no image-level labels in {Path(info.folder) / 'labels.json'}")
    return [int(c) for c in info.labels[image_id]]


ROLES: tuple[str, ...] = ("train", "infer", "seg", "val")
OPTIONAL_ROLES: dict[str, str] = {"seg": "infer"}  # folders prepared before the seg role: seg = infer


def role_list_names(ds: Any) -> dict[str, str]:
    """The list file (name) of each role: the ``dataset`` section's lists, ``seg`` defaulting to the infer list."""
    return {"train": ds.train_list, "infer": ds.infer_list, "seg": ds.get("seg_list") or ds.infer_list,
            "val": ds.val_list}


@dataclass(frozen=True)
class DatasetInfo:
    """A prepared dataset: where its files are, its classes, lists and image-level labels."""

    folder: Path
    root: Path
    kind: str
    classes: tuple[str, ...]
    mask_dir: str
    lists: dict[str, list[str]]
    labels: dict[str, list[int]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """C, the number of foreground classes (labels 1..C in masks)."""
        return len(self.classes)

    @property
    def image_suffix(self) -> str:
        """The images' file suffix (``dataset.image_suffix``; folders prepared before it: VOC's ``.jpg``)."""
        return str(self.meta.get("image_suffix", voc.IMAGE_SUFFIX))

    def image_path(self, image_id: str) -> Path:
        return voc.image_path(self.root, voc.check_id(image_id, "image id"), self.image_suffix)

    def mask_path(self, image_id: str) -> Path:
        return voc.mask_path(self.root, self.mask_dir, voc.check_id(image_id, "image id"))

    def read_image(self, image_id: str) -> np.ndarray:
        """RGB uint8 ``(H, W, 3)`` (grayscale, RGBA, CMYK... converted; see :mod:`advcam.data.voc`)."""
        return voc.read_image(self.image_path(image_id))

    def read_mask(self, image_id: str) -> np.ndarray:
        """uint8 ``(H, W)``: 0 = background, 1..C, 255 = ignore; AdvcamError on any other value."""
        return voc.read_mask(self.mask_path(image_id), self.num_classes)

    def label_vector(self, image_id: str) -> np.ndarray:
        """Multi-hot float32 ``(C,)`` image-level label of ``image_id``."""
        try:
            classes = self.labels[image_id]
        except KeyError:
            raise AdvcamError(f"{self.folder / 'labels.json'}: no labels for image id {image_id!r}") from None
        vec = np.zeros(self.num_classes, np.float32)
        vec[classes] = 1.0
        return vec

    def map_ids(self) -> list[str]:
        """The images CAMs and pseudo labels are made for: :func:`map_ids` of the lists."""
        return map_ids(self.lists)

    def check_lists(self, ds: Any, what: str) -> None:
        """AdvcamError when the ``dataset`` params ``ds`` name other lists than the folder was prepared with.

        A stage reads its images from the folder's lists, so without this e.g. ``advcam train-seg --set
        dataset.seg_list=train_aug`` on a folder prepared for ``train`` would train on ``train`` and say nothing.
        (Snakemake and DVC run ``prepare`` again when a dataset param changes.) Folders whose ``dataset.json``
        records no list names are not checked.
        """
        prepared = self.meta.get("lists")
        if not isinstance(prepared, dict):
            return
        wanted = role_list_names(ds)
        for role in ROLES:
            if role in prepared and str(prepared[role]) != str(wanted[role]):
                raise AdvcamError(f"{what}: dataset.{role}_list gives the {role} list {wanted[role]!r}, but {self.folder} "
                                  f"was prepared with {prepared[role]!r} ({self.folder / 'dataset.json'}); run "
                                  f"`advcam prepare` with these params first")

    def require_listed(self, image_ids: Sequence[str], what: str) -> None:
        """AdvcamError naming the first of ``image_ids`` that is in none of the lists (``what``: the caller)."""
        for image_id in image_ids:
            if not any(image_id in ids for ids in self.lists.values()):
                counts = ", ".join(f"{role}: {len(ids)} images" for role, ids in self.lists.items())
                raise AdvcamError(f"{what}: image {image_id!r} is in none of the lists of {self.folder} ({counts})")


def map_ids(lists: dict[str, list[str]]) -> list[str]:
    """The images CAMs and pseudo labels are made for: the infer list, then the seg list's other images."""
    infer = list(lists.get("infer", []))
    seen = set(infer)
    return infer + [i for i in lists.get("seg", []) if i not in seen]


def _read_role(folder: Path, role: str) -> list[str]:
    path = folder / "lists" / f"{role}.txt"
    if not path.is_file():
        raise AdvcamError(f"{folder}: missing {path.relative_to(folder)}; run `advcam prepare` first")
    return voc.parse_list_file(path, hint="; run `advcam prepare` again")


def load_info(folder: str | Path) -> DatasetInfo:
    """Read a prepared dataset folder (``advcam prepare``'s output) back as a :class:`DatasetInfo`."""
    folder = Path(folder)
    if not (folder / "dataset.json").is_file():
        raise AdvcamError(f"{folder}: not a prepared dataset (no dataset.json); run `advcam prepare` first")
    meta = read_json(folder / "dataset.json")
    if not isinstance(meta, dict):
        raise AdvcamError(f"{folder / 'dataset.json'}: expected a JSON object")
    missing = [k for k in ("kind", "root", "mask_dir", "classes") if k not in meta]
    if missing:
        raise AdvcamError(f"{folder / 'dataset.json'}: missing keys {missing}")
    root = Path(meta["root"])
    root = root if root.is_absolute() else folder / root
    labels_raw = read_json(folder / "labels.json")
    if not isinstance(labels_raw, dict):
        raise AdvcamError(f"{folder / 'labels.json'}: expected an object mapping image id -> class ids")
    classes = tuple(meta["classes"])
    labels: dict[str, list[int]] = {}
    for image_id, cls in labels_raw.items():
        if not isinstance(cls, list) or any(not isinstance(c, int) or not 0 <= c < len(classes) for c in cls):
            raise AdvcamError(f"{folder / 'labels.json'}: image id {image_id!r} has labels {cls!r} outside "
                              f"0..{len(classes) - 1}")
        labels[image_id] = cls
    lists = {role: _read_role(folder, role) for role in ROLES
             if role not in OPTIONAL_ROLES or (folder / "lists" / f"{role}.txt").is_file()}
    for role, fallback in OPTIONAL_ROLES.items():
        lists.setdefault(role, list(lists[fallback]))
    for role, ids in lists.items():
        unlabelled = [i for i in ids if i not in labels]
        if unlabelled:
            raise AdvcamError(f"{folder / 'labels.json'}: no labels for id {unlabelled[0]!r} of lists/{role}.txt")
    return DatasetInfo(folder=folder, root=root, kind=str(meta["kind"]), classes=classes,
                       mask_dir=str(meta["mask_dir"]), lists=lists, labels=labels, meta=meta)


__all__ = ["DatasetInfo", "load_info", "map_ids", "role_list_names", "ROLES"]
