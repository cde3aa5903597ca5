"""Segmentation training on pseudo labels, as the references' DeepLab-v2 retraining (deeplab-pytorch).

- Loss: pixel cross-entropy, 255 ignored; optionally class-balanced (:func:`class_weights`). With several
  ``train_scales`` (deeplab-pytorch's MSC: 1.0, 0.75, 0.5) the crop also runs at the smaller scales, and the
  loss is the sum of the cross-entropies of every scale's logits and of their pixel-wise maximum (4 terms).
  ``loss_at="labels"`` (the default, deeplab-pytorch's ``resize_labels``): each term at its logits' size, the
  labels shrunk to it by nearest neighbour (PIL ``NEAREST``), each term the mean over its labelled pixels;
  ``loss_at="logits"`` (a deviation, the default before 2026-12-01): the logits upsampled (bilinear) to the crop.
- Optimiser: SGD, poly LR (power 0.9, recomputed every ``lr_update_every`` = 10 steps as deeplab-pytorch's
  ``PolynomialLR``), backbone at 1x, ASPP weights at 10x, ASPP biases at 20x without
  weight decay (DeepLab-v2's ``lr_mult``/``decay_mult``).
- Augmentation (``SegmentationDataset``): random scale, horizontal flip, crop padded with 255.

Pseudo labels are index PNGs ``<pseudo>/<id>.png`` (0 = background, 1..C, 255 = not confident), the same
size as their image. :func:`check_pseudo_labels` checks every one up front (existence and size, from the
headers) so a bad folder fails before training starts; :func:`pseudo_label_reader` checks the values.

Semi-supervised mode (the AdvCAM paper's): :func:`select_gt_ids` picks the images trained on their
ground-truth masks; :func:`training_label_reader` reads those masks and the pseudo labels of the rest.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from advcam.data import DatasetInfo
from advcam.models.deeplab import DeepLab
from advcam.train import loop
from advcam.train.distributed import SumOverCount
from advcam.utils.errors import AdvcamError
from advcam.utils.progress import progress

IGNORE = 255


def _size(path: Path, what: str) -> tuple[int, int]:
    """(W, H) from the file header."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError) as exc:
        raise AdvcamError(f"{path}: cannot read {what} ({exc})") from None


def check_pseudo_labels(info: DatasetInfo, ids: Sequence[str], pseudo: Path) -> None:
    """Every id has ``<pseudo>/<id>.png`` of its image's size; AdvcamError naming the first offenders."""
    missing = [i for i in ids if not (pseudo / f"{i}.png").is_file()]
    if missing:
        raise AdvcamError(f"{pseudo}: no pseudo label for {len(missing)} of {len(ids)} images "
                          f"(e.g. {missing[0]}.png); run `advcam refine` first")
    for image_id in progress(ids, desc="train-seg: check the pseudo labels' sizes", unit="img"):
        path = pseudo / f"{image_id}.png"
        got, want = _size(path, "pseudo label"), _size(info.image_path(image_id), "image")
        if got != want:
            raise AdvcamError(f"{path}: pseudo label is {got[0]}x{got[1]} but image {image_id} is "
                              f"{want[0]}x{want[1]} (W x H)")


def read_pseudo_label(info: DatasetInfo, pseudo: Path, image_id: str) -> np.ndarray:
    """``<pseudo>/<id>.png`` as uint8 ``(H, W)``, checked for its size and values."""
    path = pseudo / f"{image_id}.png"
    if not path.is_file():
        raise AdvcamError(f"{path}: pseudo label not found for image {image_id}")
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise AdvcamError(f"{path}: pseudo label must be an index PNG (mode P or L), got mode {im.mode}")
        label = np.array(im, dtype=np.uint8)
    want = _size(info.image_path(image_id), "image")
    if (label.shape[1], label.shape[0]) != want:
        raise AdvcamError(f"{path}: pseudo label is {label.shape[1]}x{label.shape[0]} but image {image_id} "
                          f"is {want[0]}x{want[1]} (W x H)")
    bad = np.setdiff1d(np.unique(label), np.r_[np.arange(info.num_classes + 1), IGNORE])
    if bad.size:
        raise AdvcamError(f"{path}: pseudo label values {bad.tolist()[:5]} outside 0..{info.num_classes} and 255")
    return label


def pseudo_label_reader(info: DatasetInfo, pseudo: Path) -> Callable[[str], np.ndarray]:
    """``label_fn(id) -> uint8 (H, W)``: :func:`read_pseudo_label`. The readers are partials of module functions,
    not closures, so that a dataset holding one pickles: loader workers started by ``spawn`` or ``forkserver``
    (macOS's and Windows' default, and Linux's from Python 3.14) receive the dataset pickled."""
    return functools.partial(read_pseudo_label, info, Path(pseudo))


def select_gt_ids(ids: Sequence[str], gt_ids: Iterable[str] = (), gt_fraction: float = 0.0,
                  seed: int = 0, list_name: str = "seg", has_mask: Callable[[str], bool] | None = None) -> list[str]:
    """The images trained on ground truth: ``gt_ids`` plus ``round(gt_fraction * len(ids))`` ids drawn
    without replacement from ``ids`` by ``seed`` (the draw ignores ``gt_ids``, so the two may overlap).

    The draw is a permutation of the sorted ids, so it does not depend on list order; with ``has_mask`` it
    draws from the ids that have a mask only (images labelled by their annotations have none), which is the
    same draw when all have one. Returned in the order of ``ids``. AdvcamError naming the id and ``list_name``
    when ``gt_ids`` names an image outside ``ids``, and when fewer images than the draw needs have a mask.
    """
    known = set(ids)
    chosen = set()
    for image_id in gt_ids:
        if image_id not in known:
            raise AdvcamError(f"segmentation.gt_ids: image {image_id!r} is not in the segmenter's training list "
                              f"({list_name}.txt, dataset.seg_list)")
        chosen.add(image_id)
    if not 0.0 <= gt_fraction <= 1.0:
        raise AdvcamError(f"segmentation.gt_fraction must be in [0, 1], got {gt_fraction}")
    n = int(round(gt_fraction * len(ids)))
    if n:
        pool = sorted(i for i in known if has_mask is None or has_mask(i))
        if len(pool) < n:
            raise AdvcamError(f"segmentation.gt_fraction {gt_fraction} asks for the masks of {n} images of "
                              f"{list_name}.txt (dataset.seg_list), but only {len(pool)} of its {len(ids)} images "
                              "have one")
        order = np.random.default_rng(int(seed)).permutation(len(pool))
        chosen.update(pool[i] for i in order[:n])
    return [i for i in ids if i in chosen]


def _gt_path(info: DatasetInfo, image_id: str) -> Path:
    path = Path(info.mask_path(image_id))
    if not path.is_file():
        raise AdvcamError(f"image {image_id}: semi-supervised mode needs its ground-truth mask, "
                          f"but {path} does not exist (segmentation.gt_ids / gt_fraction)")
    return path


def read_gt_mask(info: DatasetInfo, image_id: str) -> np.ndarray:
    """The ground-truth mask of ``image_id``; AdvcamError naming the id when it has none."""
    _gt_path(info, image_id)
    return info.read_mask(image_id)


def gt_mask_reader(info: DatasetInfo) -> Callable[[str], np.ndarray]:
    """``label_fn(id)``: :func:`read_gt_mask` (picklable, as :func:`pseudo_label_reader`)."""
    return functools.partial(read_gt_mask, info)


def check_gt_masks(info: DatasetInfo, ids: Sequence[str]) -> None:
    """Every id has a ground-truth mask of its image's size (from the headers)."""
    if not ids:
        return
    for image_id in progress(ids, desc="train-seg: check the ground-truth masks' sizes", unit="img"):
        path = _gt_path(info, image_id)
        got, want = _size(path, "ground-truth mask"), _size(info.image_path(image_id), "image")
        if got != want:
            raise AdvcamError(f"{path}: ground-truth mask is {got[0]}x{got[1]} but image {image_id} is "
                              f"{want[0]}x{want[1]} (W x H)")


def read_training_label(info: DatasetInfo, pseudo: Path, gt_ids: frozenset[str], image_id: str) -> np.ndarray:
    """The ground-truth mask of ``image_id`` if it is in ``gt_ids``, else its pseudo label."""
    return read_gt_mask(info, image_id) if image_id in gt_ids else read_pseudo_label(info, pseudo, image_id)


def training_label_reader(info: DatasetInfo, pseudo: Path, gt_ids: Iterable[str] = ()) -> Callable[[str], np.ndarray]:
    """``label_fn(id)``: :func:`read_training_label` (picklable, as :func:`pseudo_label_reader`)."""
    return functools.partial(read_training_label, info, Path(pseudo), frozenset(gt_ids))


def class_weights(label_fn: Callable[[str], np.ndarray], ids: Sequence[str], num_classes: int) -> np.ndarray:
    """Median frequency balancing (Eigen & Fergus 2015) over the training labels, ``(num_classes,)`` float32.

    With ``n_c`` = pixels labelled c over all ``ids`` and ``P_c`` = labelled (not 255) pixels of the images
    that contain c, the frequency of c is ``f_c = n_c / P_c`` and its weight ``w_c = median(f) / f_c``, the
    median taken over the classes that occur. A class that never occurs gets weight 1 (it is never a target).
    """
    n = np.zeros(num_classes, np.float64)
    p = np.zeros(num_classes, np.float64)
    for image_id in progress(ids, desc="class weights", unit="img"):
        label = np.asarray(label_fn(image_id))
        counts = np.bincount(label[label != IGNORE].ravel(), minlength=num_classes)[:num_classes]
        n += counts
        p[counts > 0] += counts.sum()
    present = n > 0
    weights = np.ones(num_classes, np.float64)
    if present.any():
        freq = n[present] / p[present]
        weights[present] = np.median(freq) / freq
    return weights.astype(np.float32)


class SegmentationLoss(SumOverCount):
    """Cross-entropy over the labelled pixels (0 when a batch has none), as ``(sum, count)`` parts.

    Unweighted: the mean over labelled pixels (``count`` = labelled pixels). With class ``weight``:
    ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (PyTorch's weighted mean, ``count`` = the labelled pixels' total
    weight), so the loss stays on the same scale. Under torchrun both sums run over all processes
    (:class:`~advcam.train.distributed.SumOverCount`), so N processes train on one process's loss.
    """

    def __init__(self, weight: torch.Tensor | None = None, scales: Sequence[float] = (1.0,),
                 loss_at: str = "labels") -> None:
        if loss_at not in LOSS_AT:
            raise AdvcamError(f"segmentation.loss_at: {loss_at!r} is not one of {', '.join(LOSS_AT)}")
        self.weight, self.loss_at = weight, loss_at
        self.min_count = 1.0 if weight is None else 1e-12
        self.scales = tuple(float(s) for s in scales)

    def parts(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``(sum, count)`` entry per term (per output of :func:`msc_logits`)."""
        device = next(model.parameters()).device
        outputs = msc_logits(model, batch["image"].to(device), self.scales, at_crop=self.loss_at == "logits")
        full = batch["mask"].to(device).long()
        weight = None if self.weight is None else self.weight.to(device=device, dtype=outputs[0].dtype)
        totals, counts = [], []
        for o in outputs:
            mask = full if o.shape[-2:] == full.shape[-2:] else shrink_labels(full, (o.shape[-2], o.shape[-1]))
            totals.append(F.cross_entropy(o, mask, weight=weight, ignore_index=IGNORE, reduction="sum"))
            labelled = mask != IGNORE
            counts.append(labelled.sum().to(o.dtype) if weight is None else weight[mask[labelled]].sum())
        return torch.stack(totals), torch.stack(counts)


LOSS_AT = ("labels", "logits")


def shrink_labels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)`` labels resized to ``size`` by nearest neighbour with PIL's sampling (the pixel whose centre
    is nearest), as deeplab-pytorch's ``resize_labels`` (``Image.NEAREST``)."""
    out = F.interpolate(mask[:, None].float(), size=size, mode="nearest-exact")
    return out[:, 0].long()


def msc_logits(model: torch.nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,),
               at_crop: bool = True) -> list[torch.Tensor]:
    """Training logits, one per scale (the crop resized by it, bilinear), plus their pixel-wise maximum when
    there are several (deeplab-pytorch's MSC returns the same 1 + n + 1 outputs).

    ``at_crop``: every output upsampled (bilinear) to the crop size (``model(x)``). Otherwise each is the model's
    own-resolution ``model.logits(x)`` (stride 8) and the maximum is taken at the first scale's size (the others
    resized to it), as deeplab-pytorch's MSC in training, whose first output is the 1.0 scale's."""
    size = images.shape[-2:]
    outputs = []
    net = model if at_crop else getattr(model, "logits", model)
    for scale in scales:
        x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                       align_corners=False)
        out = net(x)
        if at_crop and out.shape[-2:] != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        outputs.append(out)
    if len(outputs) > 1:
        first = outputs[0].shape[-2:]
        same = [o if o.shape[-2:] == first else F.interpolate(o, size=first, mode="bilinear", align_corners=False)
                for o in outputs]
        outputs.append(torch.stack(same).amax(0))
    return outputs


def segmentation_loss(model: torch.nn.Module, batch: Mapping[str, Any], weight: torch.Tensor | None = None,
                      scales: Sequence[float] = (1.0,), loss_at: str = "labels") -> torch.Tensor:
    """The loss of :class:`SegmentationLoss` for one batch."""
    return SegmentationLoss(weight, scales, loss_at)(model, batch)


def make_deeplab_sgd(model: DeepLab, lr: float, weight_decay: float, momentum: float) -> torch.optim.SGD:
    """SGD with DeepLab-v2's groups: backbone 1x, ASPP weights 10x, ASPP biases 20x and no weight decay."""
    backbone, weights, biases = model.deeplab_param_groups()
    return torch.optim.SGD([{"params": backbone, "lr": lr, "lr_mult": 1.0},
                            {"params": weights, "lr": 10 * lr, "lr_mult": 10.0},
                            {"params": biases, "lr": 20 * lr, "lr_mult": 20.0, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_segmenter(model: DeepLab, dataset: Dataset, *, epochs: int, batch_size: int, lr: float,
                    weight_decay: float, momentum: float, seed: int, workers: int, resume: Path, curves: Path,
                    fingerprint: Mapping[str, Any], class_weight: np.ndarray | None = None,
                    train_scales: Sequence[float] = (1.0,), lr_update_every: int = 10,
                    loss_at: str = "labels") -> list[list[float]]:
    """Train ``model`` in place (see the module docstring for the recipe); return the curve rows.

    ``class_weight`` (from :func:`class_weights`) switches on the balanced cross-entropy; ``train_scales`` the
    multi-scale (MSC) loss.
    """
    optimizer = make_deeplab_sgd(model, lr, weight_decay, momentum)
    weight = None if class_weight is None else torch.as_tensor(np.asarray(class_weight, np.float32))
    return loop.fit(model, optimizer, lambda e: loop.epoch_loader(dataset, batch_size, seed, e, workers),
                    SegmentationLoss(weight, train_scales, loss_at), epochs=epochs, base_lr=lr, resume=resume, curves=curves,
                    fingerprint=fingerprint, desc="train-seg", lr_every=lr_update_every)
