"""VOC-layout folders: lists, image and mask reading with validation, the VOC colour map.

A VOC-layout root holds ``JPEGImages/<id>.jpg`` (or another ``dataset.image_suffix``), ``<mask_dir>/<id>.png``
(``SegmentationClass`` or SBD's ``SegmentationClassAug``) and ``ImageSets/Segmentation/<list>.txt`` (one id per
line), and may hold VOC's ``Annotations/<id>.xml``, from which :func:`labels_from_xml` reads image-level labels
(the objects' names).

Masks: palette (``P``) and plain index (``L``) PNGs are read as class indices (0 = background, 1..C,
255 = ignore). An RGB(A) *colour* mask is converted through the VOC colour map when every colour in it is
one of the first C+1 palette colours or the ignore colour (224, 224, 192); any other colour is refused,
naming the file and the colour. Anything else outside 0..C / 255 is refused, naming the value and C.

Images are always returned as RGB uint8 ``(H, W, 3)``; every other kind is *converted*, the same way in
:func:`check_image` (prepare) and :func:`read_image` (every later stage):

- grayscale (``L``, ``1``, ``LA``), palette (``P``), RGBA (alpha dropped, not composited), CMYK (PIL's
  profile-free conversion; Adobe's inverted CMYK JPEGs are handled by PIL) and YCbCr: PIL's ``convert("RGB")``;
- 16-bit grayscale (``I;16*``, and 32-bit ``I`` with values in 0..65535): scaled to 8 bits as
  ``round(v * 255 / 65535)`` (a fixed scale, so a dark image stays dark), repeated over the three channels;
  16-bit RGB PNGs are reduced to 8 bits per channel by PIL when they are opened.

Refused, naming the file: floating-point images (``F``: no agreed value range), 32-bit integer images with
values outside 0..65535, modes PIL cannot convert to RGB, zero-byte, truncated or corrupt files, and images
over PIL's decompression-bomb limit. EXIF orientation is ignored on purpose: VOC masks are aligned with the
stored pixel grid, not with the displayed orientation.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from advcam.utils.errors import AdvcamError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
IMAGE_DIR = "JPEGImages"
ANNOTATION_DIR = "Annotations"
LIST_DIR = Path("ImageSets") / "Segmentation"
IGNORE = 255


def palette() -> list[int]:
    """The VOC colour map: 256 RGB triples (768 ints); index i's bits are spread over R, G, B."""
    out: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= (c & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


MAX_ID_BYTES = 200  # leaves room for advcam's temporary names (".tmp-<id>.png.<random>.png") within 255 bytes


def check_id(image_id: str, where: str) -> str:
    """Refuse ids that could reach outside the dataset root or clash with advcam's own files.

    Refused: empty ids, path separators (``/``, ``\\``), ``..`` anywhere, a leading ``.`` (hidden files: the
    names of advcam's temporaries and records), surrounding whitespace, control characters and ids longer
    than :data:`MAX_ID_BYTES` bytes.
    """
    bad = (not image_id or "/" in image_id or "\\" in image_id or ".." in image_id or image_id.startswith(".")
           or image_id != image_id.strip() or any(ord(ch) < 32 or ord(ch) == 127 for ch in image_id)
           or len(image_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES)
    if bad:
        raise AdvcamError(f"{where}: invalid image id {image_id!r} (ids must be plain file stems of at most "
                          f"{MAX_ID_BYTES} bytes, without path separators, '..', a leading '.' or control "
                          "characters)")
    return image_id


def list_path(root: Path, name: str) -> Path:
    return Path(root) / LIST_DIR / f"{name}.txt"


def read_list(root: Path, name: str) -> list[str]:
    """Ids of ``ImageSets/Segmentation/<name>.txt``: checked for safety, duplicates and emptiness.

    Lines may carry extra whitespace-separated fields (SBD-style ``id label``); only the first is used.
    """
    path = list_path(root, name)
    check_id(name, f"list name {name!r}")
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        raise AdvcamError(f"list file not found: {path} (lists there: {', '.join(have) or 'none'})")
    return parse_list_file(path, first_field=True)


# DeepLab / SBD-aug lists: "/JPEGImages/<id>.jpg ..." (or another image suffix: the id is the name before it)
DEEPLAB_FIELD = re.compile(r"^/?JPEGImages/([^/\\]+)\.[A-Za-z0-9]+$")


def parse_list_file(path: Path, first_field: bool = False, hint: str = "") -> list[str]:
    """Ids of a list file, one per line (blank lines skipped): each checked by :func:`check_id`, no duplicates,
    at least one. ``first_field``: use the first whitespace-separated field of a line (else the whole line);
    a first field ``/JPEGImages/<id>.jpg`` (the DeepLab / SBD-aug two-column lists; any image suffix) gives
    ``<id>``.
    ``hint`` is appended to the error messages."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark (Windows editors) is dropped
    except (OSError, UnicodeDecodeError) as exc:
        raise AdvcamError(f"{path}: cannot read list ({exc})") from None
    ids: list[str] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        field = line.split()[0] if first_field else line.strip()
        deeplab = DEEPLAB_FIELD.match(field) if first_field else None
        image_id = check_id(deeplab.group(1) if deeplab else field, f"{path}:{n}")
        if image_id in seen:
            raise AdvcamError(f"{path}:{n}: duplicate id {image_id!r} (first on line {seen[image_id]}){hint}")
        seen[image_id] = n
        ids.append(image_id)
    if not ids:
        raise AdvcamError(f"{path}: list is empty{hint}")
    return ids


IMAGE_SUFFIX = ".jpg"  # VOC's; dataset.image_suffix names another (e.g. .png: no lossy conversion to JPEG)


def image_path(root: Path, image_id: str, suffix: str = IMAGE_SUFFIX) -> Path:
    return Path(root) / IMAGE_DIR / f"{image_id}{suffix}"


def mask_path(root: Path, mask_dir: str, image_id: str) -> Path:
    return Path(root) / mask_dir / f"{image_id}.png"


def annotation_path(root: Path, image_id: str) -> Path:
    return Path(root) / ANNOTATION_DIR / f"{image_id}.xml"


WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files


def _rgb(im: Image.Image, path: Path) -> np.ndarray:
    """The pixels of an open image as RGB uint8 ``(H, W, 3)``, following the module's conversion policy."""
    if im.mode in WIDE_GREY_MODES:
        wide = np.asarray(im).astype(np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise AdvcamError(f"{path}: {im.mode} image has values outside 0..65535 ({int(wide.min())}.."
                              f"{int(wide.max())}); only 8- and 16-bit images are supported, convert it to 8-bit RGB")
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise AdvcamError(f"{path}: floating-point image (mode F) is not supported (no agreed value range); "
                          "convert it to 8-bit RGB")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_image(path: Path) -> np.ndarray:
    """Decode an image file fully into RGB uint8 ``(H, W, 3)``; AdvcamError names an unreadable file."""
    try:
        with Image.open(path) as im:
            rgb = _rgb(im, path)
    except FileNotFoundError:
        raise AdvcamError(f"image not found: {path}") from None
    except IMAGE_ERRORS as exc:  # PIL raises these for corrupt/truncated/oversized files
        raise AdvcamError(f"{path}: unreadable image ({exc})") from None
    return np.ascontiguousarray(rgb)


def check_image(path: Path, full: bool = True) -> tuple[int, int]:
    """Check that ``path`` decodes (and would convert to RGB); return its ``(H, W)``.

    ``full=False`` decodes a JPEG at 1/8 scale (PIL draft mode): the whole stream is still read, so
    truncation is caught, at a fraction of the cost of a full decode.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            if not full and im.format == "JPEG":
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
            if im.mode in WIDE_GREY_MODES or im.mode == "F":
                _rgb(im, path)  # the refusals of read_image, found now rather than in a later stage
            elif im.mode not in ("RGB", "L", "P", "RGBA", "CMYK", "1", "LA", "YCbCr", "RGBX", "PA", "La"):
                im.convert("RGB")  # an unusual mode: make sure it converts
    except FileNotFoundError:
        raise AdvcamError(f"image not found: {path}") from None
    except IMAGE_ERRORS as exc:
        raise AdvcamError(f"{path}: unreadable image ({exc})") from None
    return h, w


def _rgb_to_index(rgb: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    pal = np.asarray(palette(), np.int64).reshape(256, 3)
    allowed = list(range(num_classes + 1)) + [IGNORE]
    codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    table = {int(codes[i]): i for i in allowed}
    flat = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    colours, inverse = np.unique(flat, return_inverse=True)
    lut = np.zeros(len(colours), np.uint8)
    for k, code in enumerate(colours.tolist()):
        if code not in table:
            colour = (code >> 16, (code >> 8) & 255, code & 255)
            raise AdvcamError(f"{path}: RGB colour mask has colour {colour}, which is not a VOC palette colour "
                              f"of classes 0..{num_classes} or 255; save masks as palette or index PNGs")
        lut[k] = table[code]
    return lut[inverse.reshape(flat.shape)]


def check_mask(mask: np.ndarray, num_classes: int, path: Path | str) -> np.ndarray:
    """Refuse values outside 0..C and 255, naming the file, the first bad value and C."""
    counts = np.bincount(mask.ravel(), minlength=256)
    counts[: num_classes + 1] = 0
    counts[IGNORE] = 0
    bad = np.flatnonzero(counts)
    if bad.size:
        raise AdvcamError(f"{path}: mask has label {int(bad[0])} outside 0..{num_classes} and 255 "
                          f"(dataset has {num_classes} classes; bad values: {bad.tolist()[:8]})")
    return mask


def read_mask(path: Path, num_classes: int) -> np.ndarray:
    """Read a mask PNG as uint8 ``(H, W)`` indices (0 bg, 1..C, 255 ignore), validated."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("P", "L"):
                arr = np.array(im, dtype=np.uint8)  # a P image's array is its indices, palette ignored
            elif mode in ("RGB", "RGBA"):
                arr = _rgb_to_index(np.asarray(im.convert("RGB")), num_classes, path)
            elif mode in ("I", "I;16", "I;16B", "I;16L"):
                wide = np.asarray(im).astype(np.int64)
                if wide.min() < 0 or wide.max() > 255:
                    bad = int(wide.max() if wide.max() > 255 else wide.min())
                    raise AdvcamError(f"{path}: mask has label {bad} outside 0..{num_classes} and 255 "
                                      f"(dataset has {num_classes} classes)")
                arr = wide.astype(np.uint8)
            else:
                raise AdvcamError(f"{path}: mask mode {mode} is not supported (expected a palette or index PNG)")
    except FileNotFoundError:
        raise AdvcamError(f"mask not found: {path}") from None
    except IMAGE_ERRORS as exc:
        raise AdvcamError(f"{path}: unreadable mask ({exc})") from None
    return check_mask(arr, num_classes, path)


def read_label(path: Path, size: tuple[int, int]) -> np.ndarray | None:
    """A finished pseudo label as uint8 ``(H, W)``, or None when it is missing, unreadable or mis-sized."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L") or (im.size[1], im.size[0]) != tuple(size):
                return None
            return np.array(im, dtype=np.uint8)
    except (OSError, ValueError):
        return None


def labels_from_mask(mask: np.ndarray) -> list[int]:
    """Image-level labels: 0-based foreground classes present (0 and 255 excluded)."""
    counts = np.bincount(mask.ravel(), minlength=256)
    return [int(v) - 1 for v in np.flatnonzero(counts[1:IGNORE]) + 1]


def read_labels_file(path: Path, classes: Sequence[str]) -> dict[str, list[int]]:
    """Image-level labels from a text file (``dataset.labels_file``): one image per line, its id and then the names
    of its classes, separated by whitespace (``2007_000032 aeroplane person``; an id alone: no foreground class).
    Blank lines and lines starting with ``#`` are skipped. Returns id -> sorted 0-based indices in ``classes``.

    Refused, naming the file and line: an unreadable file, an invalid or duplicate id, a class name that is not one
    of ``classes``."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise AdvcamError(f"labels file not found: {path} (dataset.labels_file)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdvcamError(f"{path}: cannot read labels file ({exc})") from None
    index = {name: k for k, name in enumerate(classes)}
    labels: dict[str, list[int]] = {}
    first: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        image_id = check_id(fields[0], f"{path}:{n}")
        if image_id in first:
            raise AdvcamError(f"{path}:{n}: duplicate id {image_id!r} (first on line {first[image_id]})")
        unknown = [name for name in fields[1:] if name not in index]
        if unknown:
            raise AdvcamError(f"{path}:{n}: {unknown[0]!r} is not one of dataset.classes ({', '.join(classes)})")
        first[image_id] = n
        labels[image_id] = sorted({index[name] for name in fields[1:]})
    return labels


def labels_from_xml(path: Path, classes: Sequence[str]) -> list[int]:
    """Image-level labels from a VOC annotation file: the 0-based indices in ``classes`` of its objects' names
    (``<annotation><object><name>``), sorted, each once.

    Every object counts, ``difficult`` and ``truncated`` ones too, as in the ``cls_labels`` that PSA and SEAM
    build from these files. The names of person-layout parts (``<object><part><name>``: head, hand, foot) are
    not objects and are skipped. A file that does not parse or whose root is not ``<annotation>``, an object
    without a name and a name that is not one of ``classes`` are refused, naming the file (the last like a mask
    value outside 1..C: a class list that does not fit the data).
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AdvcamError(f"{path}: not a readable VOC annotation ({exc})") from None
    except OSError as exc:
        raise AdvcamError(f"{path}: cannot read annotation ({exc})") from None
    if root.tag != "annotation":
        raise AdvcamError(f"{path}: not a VOC annotation (its root element is <{root.tag}>, not <annotation>)")
    index = {name: k for k, name in enumerate(classes)}
    found: set[int] = set()
    for n, obj in enumerate(root.iter("object"), 1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise AdvcamError(f"{path}: object {n} has no <name>")
        if name not in index:
            raise AdvcamError(f"{path}: object {n} is a {name!r}, which is not one of dataset.classes "
                              f"({', '.join(classes)})")
        found.add(index[name])
    return sorted(found)
