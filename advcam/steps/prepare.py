"""Stage ``prepare``: generate (synthetic) or index (voc) the dataset into a prepared folder.

Writes ``out/dataset.json``, ``out/labels.json`` (id -> 0-based foreground classes) and
``out/lists/{train,infer,seg,val}.txt``; for the synthetic dataset also ``out/voc/`` (the generated VOC
layout). Everything it indexes is validated first (lists, ids, images, masks, annotations; see :func:`index`),
and the folder is built under a temporary name next to ``out`` and renamed at the end, replacing an existing
``out``: a failed or killed run leaves the previous ``out`` (or nothing) and no partial folder.

Image-level labels (``dataset.image_labels``): ``masks`` (default; IRN's and AdvCAM's ``cls_labels``) derives
them from each image's mask, and takes them from VOC's ``Annotations/<id>.xml`` for an image without a mask,
so images labelled at image level only (VOC's detection images, a dataset of one's own) can train the
classifier and get pseudo labels; ``xml`` reads every image's annotation (PSA's and SEAM's ``cls_labels``).
Val images need a mask (they are scored against it); infer and seg images without one are not scored.
``dataset.json`` records how many labels came from each source.

Every image of the classifier's training list (``dataset.train_list``) must have a foreground class in its
labels: one without is refused, named, unless ``dataset.allow_background_only`` is true (such images then
train the classifier as pure negatives). An all-background mask in a training list is usually a wrong
``dataset.mask_dir`` or class list. Before generating the synthetic dataset, the free disk space is checked.

Images: images of the infer and val lists (used at full resolution later) are fully decoded; images only
in the train list are decoded in JPEG draft mode (1/8 scale), which reads the whole file and so still
catches truncation, at a fraction of the cost. Masks are read in full (they give the labels).
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from advcam.data import ROLES, DatasetInfo, load_info, role_list_names, voc
from advcam.data.synthetic import generate
from advcam.utils.errors import AdvcamError
from advcam.utils.io import TMP_PREFIX, check_free_space, write_json, write_text
from advcam.utils.progress import log, progress

MAX_REPORTED = 5  # problems listed in one error message
SYNTHETIC_BYTES_PER_PIXEL = 6  # upper bound on disk: JPEG (<= 3 B/px at quality 95 + headers), two PNGs (<= 1 B/px)


def _check_mask_dir(mask_dir: str) -> str:
    """``dataset.mask_dir`` must name a folder inside the dataset root (no absolute path, no ``..``)."""
    parts = Path(mask_dir).parts
    if not mask_dir or Path(mask_dir).is_absolute() or ".." in parts or "\\" in mask_dir:
        raise AdvcamError(f"dataset.mask_dir: {mask_dir!r} must be a folder inside dataset.root "
                          "(e.g. SegmentationClass), not an absolute path or one with '..'")
    return mask_dir


def _check_foreground(lists: dict[str, list[str]], labels: dict[str, list[int]], list_file: Path,
                      source_of: Any) -> None:
    """Refuse classifier-training images without a foreground class (see the module docstring)."""
    empty = [i for i in lists["train"] if not labels[i]]
    if empty:
        raise AdvcamError(f"{list_file}: {len(empty)} image(s) of the classifier's training list have no foreground "
                          f"class in their labels, e.g. id {empty[0]!r} ({source_of(empty[0])}); check "
                          "dataset.mask_dir and dataset.classes, remove them from the list, or set "
                          "dataset.allow_background_only=true to train on them as pure negatives")


class MissingMask(AdvcamError):
    """An id of a list whose mask file does not exist (the hint about ``SegmentationClassAug`` looks for these)."""


def _check_one(root: Path, mask_dir: str, classes: list[str], image_id: str, list_file: Path, full: bool,
               need_mask: bool, image_labels: str, suffix: str = voc.IMAGE_SUFFIX,
               file_labels: dict[str, list[int]] | None = None) -> tuple[list[int], str] | AdvcamError:
    """Labels of one image and where they came from (``mask``, ``file`` or ``xml``), or the problem with it
    (returned, not raised, so all problems are collected). ``need_mask``: the image is scored against its mask
    (val). ``file_labels``: the labels of ``dataset.labels_file``, where set."""
    img_path, msk_path = voc.image_path(root, image_id, suffix), voc.mask_path(root, mask_dir, image_id)
    xml_path = voc.annotation_path(root, image_id)
    in_file = file_labels is not None and image_id in file_labels
    try:
        if not img_path.is_file():
            others = sorted(p.name for p in img_path.parent.glob(glob.escape(image_id) + ".*") if p.is_file())
            found = (f"; found {', '.join(others[:3])}: dataset.image_suffix is {suffix!r}, set it to the images' "
                     "suffix (one for all images)") if others else ""
            raise AdvcamError(f"{list_file}: id {image_id!r} has no image (expected {img_path}){found}")
        has_mask, has_xml = msk_path.is_file(), xml_path.is_file()
        if image_labels == "xml" and not has_xml:
            raise AdvcamError(f"{list_file}: id {image_id!r} has no annotation (expected {xml_path}; "
                              "dataset.image_labels is xml)")
        if image_labels == "file" and not in_file:
            raise AdvcamError(f"{list_file}: id {image_id!r} has no line in the labels file (dataset.image_labels "
                              "is file)")
        if not has_mask and (need_mask or not (has_xml or in_file)):
            sources = (f", no annotation ({xml_path}) and no line in dataset.labels_file" if file_labels is not None
                       else f" and no annotation ({xml_path})")
            why = ("; val images are scored against their masks" if need_mask else
                   f"{sources} to take its image-level labels from")
            raise MissingMask(f"{list_file}: id {image_id!r} has no mask (expected {msk_path}){why}")
        h, w = voc.check_image(img_path, full=full)
        labels: list[int] = []
        if has_mask:
            mask = voc.read_mask(msk_path, len(classes))
            if mask.shape != (h, w):
                turned = ("; it fits the image turned by 90 degrees: advcam ignores EXIF orientation, so masks "
                          "must follow the stored pixels") if mask.shape == (w, h) else ""
                raise AdvcamError(f"{msk_path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image {img_path} "
                                  f"is {h}x{w}{turned}")
            labels = voc.labels_from_mask(mask)
        if image_labels == "file" or (in_file and not has_mask and image_labels == "masks"):
            return list((file_labels or {})[image_id]), "file"
        if image_labels == "xml" or not has_mask:
            return voc.labels_from_xml(xml_path, classes), "xml"
        return labels, "mask"
    except AdvcamError as exc:
        return exc


def check_layout(root: Path, mask_dir: str, list_names: dict[str, str],
                 image_labels: str = "masks") -> dict[str, list[str]]:
    """The lists (ids by role) of a VOC-layout ``root`` whose image and mask folders (and, for ``image_labels``
    xml, annotation folder) exist; raises AdvcamError naming a missing folder or list file, an unsafe or
    duplicate id, or an empty list."""
    if not root.is_dir():
        raise AdvcamError(f"dataset folder not found: {root} (dataset.root)")
    for sub, key in ((voc.IMAGE_DIR, "image folder"), (_check_mask_dir(mask_dir), "mask folder (dataset.mask_dir)")):
        if not (root / sub).is_dir():
            raise AdvcamError(f"{key} not found: {root / sub}")
    if image_labels == "xml" and not (root / voc.ANNOTATION_DIR).is_dir():
        raise AdvcamError(f"annotation folder not found: {root / voc.ANNOTATION_DIR} (dataset.image_labels is xml)")
    return {role: voc.read_list(root, name) for role, name in list_names.items()}


def index(root: Path, mask_dir: str, classes: list[str], list_names: dict[str, str],
          workers: int | None = None, image_labels: str = "masks", sources: dict[str, str] | None = None,
          suffix: str = voc.IMAGE_SUFFIX, file_labels: dict[str, list[int]] | None = None
          ) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    """Read and validate the lists of a VOC-layout ``root``; return ``(lists by role, labels by id)``.

    Image-level labels (``image_labels``): ``masks`` takes them from each image's mask, and where it has no mask
    from its line in ``file_labels`` (``dataset.labels_file``), else from its ``Annotations/<id>.xml``; ``xml``
    from the annotation of every image; ``file`` from ``file_labels`` for every image. Val images must have a
    mask. ``sources``, if given, receives where each id's labels came from (``mask`` / ``file`` / ``xml``).

    Raises AdvcamError for a missing folder or list, unsafe or duplicate ids, an empty list, and (all
    collected, the first few listed) ids without an image, without a mask or annotation to label them (val:
    without a mask), unreadable images, masks with labels outside 0..C / 255, masks whose size differs from
    their image, and annotations that do not parse or name an object outside ``classes``.
    """
    lists = check_layout(root, mask_dir, list_names, image_labels)
    first_list: dict[str, Path] = {}
    full: dict[str, bool] = {}
    for role, ids in lists.items():
        for image_id in ids:
            first_list.setdefault(image_id, voc.list_path(root, list_names[role]))
            full[image_id] = full.get(image_id, False) or role != "train"
    scored = set(lists.get("val", []))
    ids = list(first_list)
    n_workers = workers or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=n_workers)
    try:
        results = list(progress(pool.map(lambda i: _check_one(root, mask_dir, classes, i, first_list[i], full[i],
                                                                i in scored, image_labels, suffix, file_labels),
                                          ids),
                                desc=f"index {root.name}", total=len(ids), unit="img"))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    problems = [r for r in results if isinstance(r, AdvcamError)]
    if problems:
        more = f" (and {len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
        aug = "SegmentationClassAug"
        hint = (f"; dataset.mask_dir is {mask_dir}, and {root / aug} exists (the SBD-augmented masks of train_aug: "
                f"mask_dir: {aug})" if mask_dir != aug and (root / aug).is_dir()
                and any(isinstance(p, MissingMask) for p in problems) else "")
        raise AdvcamError(f"{len(problems)} problem(s) in dataset {root}: "
                          + "; ".join(str(p) for p in problems[:MAX_REPORTED]) + more + hint)
    done = cast(list[tuple[list[int], str]], results)
    if sources is not None:
        sources.update((image_id, source) for image_id, (_, source) in zip(ids, done))
    return lists, {image_id: labels for image_id, (labels, _) in zip(ids, done)}


def _class_counts(ids: list[str], labels: dict[str, list[int]], classes: list[str]) -> dict[str, int]:
    counts = [0] * len(classes)
    for image_id in ids:
        for c in labels[image_id]:
            counts[c] += 1
    return dict(zip(classes, counts))


def labels_file_path(ds: Any, root: Path) -> Path | None:
    """``dataset.labels_file`` (relative to the dataset root, or absolute), or None where unset; AdvcamError when
    ``dataset.image_labels`` is file without it."""
    name = ds.get("labels_file")
    if not name:
        if str(ds.get("image_labels", "masks")) == "file":
            raise AdvcamError("dataset.image_labels is file but dataset.labels_file is not set: name the file of "
                              "image-level labels (one line per image: its id, then its class names)")
        return None
    path = Path(str(name)).expanduser()
    return path if path.is_absolute() else Path(root) / path


def _build(cfg: Any, tmp: Path) -> dict[str, Any]:
    ds = cfg.dataset
    names = role_list_names(ds)
    meta: dict[str, Any] = {"kind": ds.kind}
    image_labels = str(ds.get("image_labels", "masks"))
    suffix = str(ds.get("image_suffix", voc.IMAGE_SUFFIX))
    if ds.kind == "synthetic":
        syn = cfg.synthetic
        if ds.classes is not None and len(ds.classes) != syn.num_classes:
            raise AdvcamError(f"dataset.classes has {len(ds.classes)} names but synthetic.num_classes is "
                              f"{syn.num_classes}")
        if ds.mask_dir != "SegmentationClass":
            log.warning("dataset.mask_dir=%s ignored for the synthetic dataset (it writes SegmentationClass)",
                        ds.mask_dir)
        if image_labels != "masks":
            log.warning("dataset.image_labels=%s ignored for the synthetic dataset (it writes no annotations; its "
                        "labels come from its masks)", image_labels)
            image_labels = "masks"
        if ds.get("labels_file"):
            log.warning("dataset.labels_file=%s ignored for the synthetic dataset (its labels come from its masks)",
                        ds.get("labels_file"))
        if suffix != voc.IMAGE_SUFFIX:
            log.warning("dataset.image_suffix=%s ignored for the synthetic dataset (it writes %s images)", suffix,
                        voc.IMAGE_SUFFIX)
            suffix = voc.IMAGE_SUFFIX
        n_images = int(syn.num_train_aug) + int(syn.num_val)
        check_free_space(tmp, n_images * int(syn.image_size) ** 2 * SYNTHETIC_BYTES_PER_PIXEL,
                         f"prepare: {n_images} synthetic images")
        generated = generate(syn.to_dict(), tmp / "voc")
        root, root_ref, mask_dir = tmp / "voc", "voc", "SegmentationClass"
        classes = list(ds.classes) if ds.classes is not None else generated.classes
        meta["synthetic"] = syn.to_dict()
        log.info("generated %d synthetic images (%d classes, %d px)", len(generated.objects),
                 syn.num_classes, syn.image_size)
    else:
        root = Path(ds.root).expanduser().absolute()
        root_ref, mask_dir = str(root), _check_mask_dir(ds.mask_dir)
        classes = list(ds.classes) if ds.classes is not None else list(voc.VOC_CLASSES)
    labels_file = labels_file_path(ds, root) if ds.kind != "synthetic" else None
    file_labels = voc.read_labels_file(labels_file, classes) if labels_file is not None else None
    if labels_file is not None:
        meta["labels_file"] = str(labels_file)
    sources: dict[str, str] = {}
    lists, labels = index(root, mask_dir, classes, names, image_labels=image_labels, sources=sources,
                          suffix=suffix, file_labels=file_labels)
    def source_of(image_id: str) -> Path:
        """The file an image's labels came from: its annotation, the labels file or its mask."""
        if sources[image_id] == "xml":
            return voc.annotation_path(root, image_id)
        if sources[image_id] == "file" and labels_file is not None:
            return labels_file
        return voc.mask_path(root, mask_dir, image_id)

    if not ds.get("allow_background_only", False):
        _check_foreground(lists, labels, voc.list_path(root, names["train"]), source_of)
    counts = {src: sum(1 for v in sources.values() if v == src)
              for src in ("mask", "xml", *(("file",) if labels_file is not None else ()))}
    if counts.get("file"):
        log.info("image-level labels: %d image(s) from their masks, %d from %s", counts["mask"], counts["file"],
                 labels_file)
    if counts["xml"]:
        aug = "SegmentationClassAug"  # SBD's masks of train_aug: labels from masks, as IRN's and AdvCAM's are
        hint = (f" ({root / aug} exists: dataset.mask_dir: {aug} takes the labels of train_aug's images from "
                "their masks)" if image_labels == "masks" and mask_dir != aug and (root / aug).is_dir() else "")
        log.info("image-level labels: %d image(s) from their masks, %d from %s/<id>.xml%s", counts["mask"],
                 counts["xml"], voc.ANNOTATION_DIR, hint)
    if not any(voc.mask_path(root, mask_dir, i).is_file() for i in lists["infer"]):
        log.warning("infer: none of the %d images of %s.txt has a mask in %s: seeds and pseudo labels will be made "
                    "but not scored", len(lists["infer"]), names["infer"], mask_dir)
    meta.update({"root": root_ref, "mask_dir": mask_dir, "classes": classes, "lists": names,
                 "image_suffix": suffix, "image_labels": image_labels,
                 "label_sources": counts,
                 "counts": {role: len(ids) for role, ids in lists.items()},
                 "class_counts": {role: _class_counts(ids, labels, classes) for role, ids in lists.items()}})
    for role in ("train", "seg"):  # the classic leak: SBD's train_aug holds VOC val images unless they are removed
        shared = sorted(set(lists[role]) & set(lists["val"]))
        if shared:
            log.warning("%s.txt and %s.txt share %d image(s), e.g. %s: the %s trains on images it is scored on "
                        "(remove them from %s.txt)", names[role], names["val"], len(shared), ", ".join(shared[:3]),
                        "classifier" if role == "train" else "segmenter", names[role])
    unseen = [c for c, n in meta["class_counts"]["train"].items() if n == 0]
    if unseen:
        log.warning("train: no image of %s in %s.txt, so the classifier cannot learn %s (check dataset.classes "
                    "against the mask values 1..%d)", ", ".join(unseen), names["train"],
                    "it" if len(unseen) == 1 else "them", len(classes))
    for role in ROLES:
        write_text(tmp / "lists" / f"{role}.txt", "".join(f"{i}\n" for i in lists[role]))
        empty = [i for i in lists[role] if not labels[i]]
        log.info("%s: %d images from %s.txt; images per class: %s", role, len(lists[role]), names[role],
                 ", ".join(f"{k} {v}" for k, v in meta["class_counts"][role].items()))
        if empty:
            log.warning("%s: %d image(s) have no foreground class in their labels, e.g. %s", role, len(empty),
                        ", ".join(f"{i} ({source_of(i).parent.name})" for i in empty[:3]))
    write_json(tmp / "labels.json", labels)
    write_json(tmp / "dataset.json", meta)
    return meta


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def run(cfg: Any, out: Path) -> DatasetInfo:
    """Prepare the dataset described by ``cfg.dataset`` (and ``cfg.synthetic``) into ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f"{TMP_PREFIX}{out.name}.*"):  # left by a killed earlier run
        _remove(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the prepared folder gets ordinary permissions
    try:
        _build(cfg, tmp)
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    log.info("wrote %s (dataset.json, labels.json, lists/)", out)
    return load_info(out)
