"""Class activation maps: multi-scale + flip inference and the ``<id>.npz`` CAM file (IRN's make_cam).

For every scale the image is resized (see below), run together with its horizontal flip, and
``ReLU(CAM)`` of the image's classes is kept with the flipped half flipped back and added
(:func:`cam_at_scale`). :func:`combine_scales` then sums the scales at two sizes, as IRN's ``make_cam``:
the stride-4 size ``ceil(H/4) x ceil(W/4)`` (``cam``) and the "up" size ``S*ceil(H/S)`` cropped to
``H x W`` (``high_res``), S = the network's output stride (16 for the reference ResNet-50, as IRN; the
small CPU network has 8, where IRN's fixed 16 would stretch the maps); each map is normalised on its own
(``cam.normalise``, :func:`normalise_maps`): divided by its maximum + 1e-5 (IRN, AdvCAM), or, for a SEAM
classifier, min-max normalised as SEAM's ``infer_SEAM.py`` does. A SEAM classifier's maps are also resized as
SEAM's reference does (``cam.resize``): each scale's map to its scaled input (``align_corners=True``, as
``resnet38_SEAM.Net.forward``), then to the image (``align_corners=False``, as ``infer_SEAM.py``); a CAM classifier
on ResNet-38 (PSA's network) as PSA's ``infer_cls.py`` does: each scale's map straight to the image.

Methods plug in through :data:`METHODS`: ``name -> fn(model, image, classes, cfg_cam) -> list`` of per-scale
maps ``(n, h_s, w_s)`` (unnormalised, any resolution). :func:`compute_maps` looks the method up, runs it
and combines the scales, so every method writes the same file format.

Each scale's image is the references' (``cam.image_resize: bicubic``): the 8-bit image resized with PIL bicubic to
``round(H * scale)`` (IRN's and AdvCAM's ``pil_rescale``), then normalised; ``bilinear`` (an option) resizes the
normalised tensor on the device instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advcam import config
from advcam.data import transforms
from advcam.data.transforms import scaled_size
from advcam.utils import param
from advcam.utils.device import evaluating
from advcam.utils.errors import AdvcamError
from advcam.utils.io import load_npz, save_npz

EPS = 1e-5
CAM_KEYS = ("keys", "cam", "high_res")
NORMALISE = ("auto", "max", "min_max")
RESIZE = ("auto", "irn", "seam", "psa")

MapFn = Callable[[nn.Module, torch.Tensor, Sequence[int], Any], "list[torch.Tensor]"]


class ClassMapNet(Protocol):
    """What attribution reads of a classifier beyond ``nn.Module`` (DESIGN.md section 2): the bias-free 1x1
    ``classifier`` and ``cam(x)``, the raw class maps. CAMNet, SEAMNet, EADERNet and any user module with
    these members qualify."""

    classifier: nn.Conv2d

    def cam(self, x: torch.Tensor) -> torch.Tensor: ...


def class_map_net(model: nn.Module) -> ClassMapNet:
    """``model`` seen through :class:`ClassMapNet` (a static view: nothing is checked or copied)."""
    return cast(ClassMapNet, model)


def strided_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """``ceil(size / stride)`` per side (IRN ``get_strided_size``)."""
    return (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1


def strided_up_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """``stride * ceil(size / stride)`` per side (IRN ``get_strided_up_size``)."""
    h, w = strided_size(size, stride)
    return h * stride, w * stride


IMAGE_RESIZES = ("bicubic", "bilinear")


def resize_image(image: torch.Tensor, scale: float, how: str = "bicubic") -> torch.Tensor:
    """Resize a normalised ``(3, H, W)`` image by ``scale`` to :func:`scaled_size` (no copy at scale 1).

    ``how="bicubic"`` is the references' (IRN's and AdvCAM's ``pil_rescale(img, s, order=3)``, SEAM's PIL
    ``CUBIC``): the image's 8-bit pixels (:func:`advcam.data.transforms.denormalize`, exact for an image read
    from a file) resized by PIL's bicubic filter, then normalised again, on the image's device and dtype.
    ``how="bilinear"`` resizes the normalised tensor where it is (``align_corners=False``, no antialiasing).
    """
    size = scaled_size((int(image.shape[-2]), int(image.shape[-1])), scale)
    if size == tuple(image.shape[-2:]):
        return image
    if how == "bilinear":
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if how != "bicubic":
        raise AdvcamError(f"cam.image_resize: unknown image resize {how!r} (known: {', '.join(IMAGE_RESIZES)})")
    pixels = transforms.resize(transforms.denormalize(image), size, "bicubic")
    return transforms.normalize(pixels).to(image.device, image.dtype)


def cam_at_scale(model: nn.Module, image: torch.Tensor, classes: Sequence[int], scale: float = 1.0,
                 flip: bool = True, image_resize: str = "bicubic") -> torch.Tensor:
    """``ReLU(CAM)`` of ``classes`` for ``image`` resized by ``scale`` (:func:`resize_image` ``how=image_resize``),
    at feature resolution ``(n, h, w)``.

    ``image`` is a normalised ``(3, H, W)`` tensor on the model's device. With ``flip`` the image and its
    horizontal flip run in one batch and the flipped maps are flipped back and added. No grad mode is set
    here: callers choose (``compute_maps`` runs plain CAM under ``torch.inference_mode``).
    """
    x = resize_image(image, scale, image_resize)
    batch = torch.stack([x, x.flip(-1)]) if flip else x[None]
    maps = F.relu(class_map_net(model).cam(batch))
    idx = torch.as_tensor(list(classes), dtype=torch.long, device=maps.device)
    maps = maps.index_select(1, idx)
    out = maps[0]
    if flip:
        out = out + maps[1].flip(-1)
    return out


def normalise_maps(maps: torch.Tensor, how: str = "max") -> torch.Tensor:
    """Each map of ``(n, h, w)`` scaled on its own: ``max`` divides by its maximum + 1e-5 (IRN's ``make_cam``,
    AdvCAM); ``min_max`` is SEAM's ``infer_SEAM.py``: negatives and pixels below minimum + 1e-5 set to zero,
    then ``(m - min - 1e-5) / (max - min + 1e-5)``, clipped at zero (the reference leaves the zeroed pixels at
    a small negative value, below every background threshold; downstream stages need maps >= 0)."""
    if how == "max":
        return maps / (maps.amax(dim=(-2, -1), keepdim=True) + EPS)
    if how != "min_max":
        raise AdvcamError(f"cam.normalise: {how!r} is not one of max, min_max")
    maps = maps.clamp_min(0)
    lo, hi = maps.amin(dim=(-2, -1), keepdim=True), maps.amax(dim=(-2, -1), keepdim=True)
    maps = torch.where(maps < lo + EPS, torch.zeros_like(maps), maps)
    return ((maps - lo - EPS) / (hi - lo + EPS)).clamp_min(0)


def _resolve(cfg_cam: Any, model: nn.Module, key: str, known: Sequence[str], seam: str, other: str) -> str:
    """``cam.<key>`` for ``model``: ``auto`` follows the classifier's reference inference (``seam`` for a SEAM
    classifier, ``other`` for the others)."""
    how = str(param(cfg_cam, key, "auto"))
    if how not in known:
        raise AdvcamError(f"cam.{key}: {how!r} is not one of {', '.join(known)}")
    if how == "auto":
        return seam if getattr(model, "method", None) == "seam" else other
    return how


def resolve_normalise(cfg_cam: Any, model: nn.Module) -> str:
    """``cam.normalise`` for ``model``: ``auto`` is ``min_max`` for a SEAM classifier, ``max`` otherwise."""
    return _resolve(cfg_cam, model, "normalise", NORMALISE, "min_max", "max")


def resolve_resize(cfg_cam: Any, model: nn.Module) -> str:
    """``cam.resize`` for ``model``: ``auto`` is ``seam`` for a SEAM classifier, ``psa`` for a CAM classifier on
    ResNet-38 (PSA's network), ``irn`` otherwise."""
    psa = getattr(model, "method", None) == "cam" and getattr(model, "arch", None) == "resnet38"
    return _resolve(cfg_cam, model, "resize", RESIZE, "seam", "psa" if psa else "irn")


def combine_scales(maps: Sequence[torch.Tensor], size: tuple[int, int], stride: int = 16, normalise: str = "max",
                   input_sizes: Sequence[tuple[int, int]] | None = None, to_image: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-scale maps ``(n, h_s, w_s)`` into ``(cam, high_res)`` for an image of ``size = (H, W)``.

    ``cam`` is ``(n, ceil(H/4), ceil(W/4))``; ``high_res`` is ``(n, H, W)``: resized to the ``stride`` up size
    ``stride * ceil(H / stride)`` (where a feature cell of the scale-1 map covers exactly ``stride`` pixels),
    then cropped. ``stride`` is the network's output stride (16 = the reference ResNet-50, IRN's value).
    With ``input_sizes`` (SEAM's resize, one size per map: the scaled image it was computed on) each map is
    first resized to its input size with ``align_corners=True``, and from there to both sizes (no crop). With
    ``to_image`` (PSA's resize) ``high_res`` is each map resized straight to ``(H, W)`` (no crop).
    Both are float32, each map normalised on its own by :func:`normalise_maps` (``normalise``: max, min_max).
    """
    if not maps:
        raise ValueError("combine_scales: no maps")
    h, w = int(size[0]), int(size[1])
    n = maps[0].shape[0]
    small, up = strided_size((h, w), 4), strided_up_size((h, w), int(stride))
    if input_sizes is not None and len(input_sizes) != len(maps):
        raise ValueError(f"combine_scales: {len(maps)} maps but {len(input_sizes)} input sizes")
    if input_sizes is not None or to_image:
        up = (h, w)
    dev = maps[0].device
    if n == 0:
        return torch.zeros((0, *small), device=dev), torch.zeros((0, h, w), device=dev)
    cam = torch.zeros((n, *small), dtype=torch.float32, device=dev)
    high = torch.zeros((n, *up), dtype=torch.float32, device=dev)
    for k, m in enumerate(maps):
        if m.ndim != 3 or m.shape[0] != n:
            raise ValueError(f"combine_scales: expected maps of shape ({n}, h, w), got {tuple(m.shape)}")
        m = m.float()[None]
        if input_sizes is not None:
            m = F.interpolate(m, size=tuple(input_sizes[k]), mode="bilinear", align_corners=True)
        cam += F.interpolate(m, size=small, mode="bilinear", align_corners=False)[0]
        high += F.interpolate(m, size=up, mode="bilinear", align_corners=False)[0]
    return normalise_maps(cam, normalise), normalise_maps(high[:, :h, :w], normalise)


def combine_resized(maps: Sequence[torch.Tensor], size: tuple[int, int], scales: Sequence[float], resize: str,
                    stride: int, normalise: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`combine_scales` of the maps of ``scales`` with the resize ``resize`` (irn, seam, psa: a resolved
    ``cam.resize``)."""
    inputs = [scaled_size(size, s) for s in scales] if resize == "seam" else None
    return combine_scales(maps, size, stride, normalise, inputs, to_image=resize == "psa")


def model_stride(model: nn.Module, default: int = 16) -> int:
    """The classifier's output stride (``output_stride`` of the model or its ``backbone``; else ``default``)."""
    for obj in (model, getattr(model, "backbone", None)):
        stride = getattr(obj, "output_stride", None)
        if isinstance(stride, int) and stride > 0:
            return stride
    return default


def plain_cam(model: nn.Module, image: torch.Tensor, classes: Sequence[int], cfg_cam: Any) -> list[torch.Tensor]:
    """The reference CAM: one :func:`cam_at_scale` per scale in ``cfg_cam.scales``, without gradients."""
    with torch.inference_mode():
        how = str(param(cfg_cam, "image_resize", "bicubic"))
        return [cam_at_scale(model, image, classes, float(s), bool(cfg_cam.flip), how) for s in cfg_cam.scales]


def advcam(model: nn.Module, image: torch.Tensor, classes: Sequence[int], cfg_cam: Any) -> list[torch.Tensor]:
    """AdvCAM (adversarial climbing), one map per scale: :func:`advcam.attribution.advcam.advcam_maps`."""
    from advcam.attribution.advcam import advcam_maps

    return advcam_maps(model, image, classes, cfg_cam)


METHODS: dict[str, MapFn] = {"cam": plain_cam, "advcam": advcam}


def compute_maps(model: nn.Module, image: torch.Tensor, classes: Sequence[int], cfg_cam: Any) -> dict[str, np.ndarray]:
    """Maps of one image as the CAM file holds them: ``keys`` int64 (n,), ``cam`` and ``high_res`` float32.

    ``image`` is a normalised ``(3, H, W)`` tensor (moved to the model's device and dtype here); ``classes`` are
    the image's 0-based foreground classes (sorted and de-duplicated, as ``keys`` holds them). ``cfg_cam`` is
    ``cfg.cam`` of :func:`advcam.config.load`, or a plain dict of ``cam`` params (the others take their
    defaults). The method is ``cfg_cam.method`` (a key of :data:`METHODS`). The model computes in eval mode; a
    model in training mode gets its modes back.
    """
    return compute_maps_images(model, [image], [classes], cfg_cam)[0]


def compute_maps_images(model: nn.Module, images: Sequence[torch.Tensor], classes: Sequence[Sequence[int]],
                        cfg_cam: Any, on_scale: Callable[[float, int, int], None] | None = None
                        ) -> list[dict[str, np.ndarray]]:
    """:func:`compute_maps` for several images. AdvCAM climbs those of one size together
    (:func:`advcam.attribution.advcam.advcam_maps_images`; the maps are those of one image at a time up to float
    rounding), calling ``on_scale(scale, index, count)`` as each scale starts; the other methods take them one
    by one."""
    if isinstance(cfg_cam, Mapping) and not isinstance(cfg_cam, config.Config):  # a plain dict: defaults filled in
        cfg_cam = config.Config(config.validate({"cam": dict(cfg_cam)}, "cfg_cam")["cam"])
    method = str(cfg_cam.method)
    if method not in METHODS:
        raise AdvcamError(f"cam.method: unknown attribution method {method!r} (known: {', '.join(sorted(METHODS))})")
    keys = [np.asarray(sorted({int(c) for c in cs}), dtype=np.int64) for cs in classes]
    head = getattr(getattr(model, "classifier", None), "weight", None)
    num = int(head.shape[0]) if head is not None else None
    bad = sorted({int(c) for key in keys for c in key if num is not None and not 0 <= c < num})
    if bad:
        raise AdvcamError(f"class ids {bad} outside 0..{num - 1 if num else 0} (the classifier's classes)")
    normalise = resolve_normalise(cfg_cam, model)
    resize = resolve_resize(cfg_cam, model)
    scales = [float(s) for s in param(cfg_cam, "scales", [1.0])]
    weight = next(iter(model.parameters()), None)
    if weight is not None:  # the model's device, and its dtype (a float64 model takes float64 images)
        images = [im.to(weight.device, weight.dtype if im.is_floating_point() and weight.is_floating_point()
                        else im.dtype) for im in images]
    todo = [k for k, key in enumerate(keys) if key.size]
    maps: dict[int, list[torch.Tensor]] = {}
    with evaluating(model):  # the maps of the network in eval mode; a model in training gets its modes back
        if method == "advcam" and todo and len({tuple(images[k].shape) for k in todo}) == 1:
            from advcam.attribution.advcam import advcam_maps_images

            climbed = advcam_maps_images(model, [images[k] for k in todo], [keys[k].tolist() for k in todo],
                                         cfg_cam, on_scale=on_scale)
            maps = dict(zip(todo, climbed))
        else:
            maps = {k: METHODS[method](model, images[k], keys[k].tolist(), cfg_cam) for k in todo}
    out: list[dict[str, np.ndarray]] = []
    for k, (image, key) in enumerate(zip(images, keys)):
        size = (int(image.shape[-2]), int(image.shape[-1]))
        if not key.size:
            small = strided_size(size, 4)
            out.append({"keys": key, "cam": np.zeros((0, *small), np.float32),
                        "high_res": np.zeros((0, *size), np.float32)})
            continue
        if resize == "seam" and len(maps[k]) != len(scales):
            raise AdvcamError(f"cam.resize seam: method {method!r} gave {len(maps[k])} maps for "
                              f"{len(scales)} scales; it needs one map per scale of cam.scales")
        with torch.no_grad():
            cam, high = combine_resized([m.detach() for m in maps[k]], size, scales, resize, model_stride(model),
                                        normalise)
        out.append({"keys": key, "cam": cam.cpu().numpy().astype(np.float32, copy=False),
                    "high_res": high.cpu().numpy().astype(np.float32, copy=False)})
    return out


def save_cam(path: str | Path, maps: dict[str, np.ndarray]) -> None:
    """Write a CAM file atomically (``keys`` int64, ``cam``/``high_res`` float32; no pickle)."""
    save_npz(path, keys=np.asarray(maps["keys"], dtype=np.int64),
             cam=np.asarray(maps["cam"], dtype=np.float32), high_res=np.asarray(maps["high_res"], dtype=np.float32))


def load_cam(path: str | Path, size: tuple[int, int] | None = None, num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Read and check a CAM file; ``size = (H, W)`` of its image when known. Any defect -> AdvcamError."""
    data = load_npz(path, CAM_KEYS)
    keys, cam, high = data["keys"], data["cam"], data["high_res"]
    if keys.ndim != 1 or keys.dtype != np.int64 or cam.dtype != np.float32 or high.dtype != np.float32:
        raise AdvcamError(f"{path}: CAM file has wrong dtypes/shape (keys {keys.dtype}{keys.shape}, "
                          f"cam {cam.dtype}, high_res {high.dtype}); expected int64 (n,), float32, float32")
    n = keys.shape[0]
    if high.ndim != 3 or cam.ndim != 3 or high.shape[0] != n or cam.shape[0] != n:
        raise AdvcamError(f"{path}: CAM arrays disagree: keys ({n},), cam {cam.shape}, high_res {high.shape}")
    if tuple(cam.shape[1:]) != strided_size(tuple(high.shape[1:]), 4):
        raise AdvcamError(f"{path}: cam {cam.shape} is not the stride-4 size of high_res {high.shape}")
    if size is not None and tuple(high.shape[1:]) != tuple(size):
        raise AdvcamError(f"{path}: CAM size {tuple(high.shape[1:])} does not match its image {tuple(size)}")
    if num_classes is not None and n and (keys.min() < 0 or keys.max() >= num_classes):
        raise AdvcamError(f"{path}: class keys {keys.tolist()} outside 0..{num_classes - 1}")
    return data


def is_valid_cam(path: str | Path, size: tuple[int, int] | None = None, classes: Sequence[int] | None = None) -> bool:
    """True when ``path`` is a complete, well-formed CAM file (used to resume), of the image's ``classes`` when
    given (an image whose labels changed is computed again)."""
    try:
        keys = load_cam(path, size)["keys"]
    except AdvcamError:
        return False
    return classes is None or keys.tolist() == [int(c) for c in classes]


__all__ = ["cam_at_scale", "combine_scales", "compute_maps", "compute_maps_images", "plain_cam", "METHODS",
           "save_cam", "load_cam", "is_valid_cam", "model_stride", "strided_size", "strided_up_size", "scaled_size",
           "resize_image"]
