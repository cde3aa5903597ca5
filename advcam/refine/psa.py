"""PSA's AffinityNet on ResNet-38 and its random walk (``refine.randomwalk.design: psa``).

SEAM's pipeline refines its CAMs as PSA (AffinityNet, Ahn and Kwak, CVPR 2018) does, and its reported pseudo labels
(63.6 mIoU on VOC train) are PSA's walk on SEAM's CAMs. This module reads the trained AffinityNet files of PSA and
SEAM (``resnet38_aff``, ``refine.randomwalk.psa.trained``) as they are, builds the network to train, and walks as
their ``infer_aff.py`` does.

Network (:class:`PSAAffinityNet`, their ``network/resnet38_aff.py``, with their names): ResNet-38's ``conv4``,
``conv5`` and ``conv6`` (:meth:`advcam.models.resnet38.ResNet38.forward_stages`) each go through a bias-free 1x1
conv and an ELU (``f8_3``: 512 -> 64, ``f8_4``: 1024 -> 128, ``f8_5``: 4096 -> 256); the 448 channels go through
``f9`` (448 -> 448) and an ELU: the embedding, at stride 8. The affinity of two pixels is
``exp(-mean_c |f_i - f_j|)`` (:func:`advcam.refine.affinity.pairwise_affinity`).

Walk (:func:`walk_scores`), per image:

1. the image, normalised, is padded with zeros at the bottom and right to a multiple of 8 and embedded;
2. the pairs are those of radius ``radius`` whose first pixel lies in ``[:-(r-1), (r-1):-(r-1)]`` (PSA's
   ``get_indices_of_pairs``), both directions, plus each pixel with itself (affinity 1). On a grid narrower than
   ``2r + 1`` the radius is ``(min(h, w) - 1) // 2`` (SEAM's ``resnet38_aff``; PSA's fails there);
3. the affinities are raised to ``beta`` and normalised (PSA divides the columns and multiplies from the right;
   the matrix is symmetric, so that is :func:`advcam.refine.randomwalk.transition_matrix`'s row normalisation
   applied from the left);
4. the maps: the background ``(1 - max_c CAM_c) ** alpha`` in front of the ``high_res`` maps, padded with zeros to
   the multiple of 8 and average-pooled by 8, are walked ``2 ** logt`` steps (PSA raises the matrix to that power by
   ``logt`` squarings; the sparse steps give the same product without a dense ``N x N`` matrix);
5. upsampled (bilinear) to the padded size, cropped to the image; the label is the argmax (0 = background,
   ``keys + 1``), with no unsure pixel.

PSA's defaults: ``alpha`` 16, ``beta`` 8, ``logt`` 8; SEAM's ``infer_aff.py``: ``alpha`` 6, ``beta`` 8, ``logt``
6. Without a trained file the network is trained as PSA's ``train_aff.py`` trains it (:func:`build_psa_affinity`,
its data in :mod:`advcam.refine.psa_labels`, the loop in :mod:`advcam.steps.refine`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advcam.models.classifier import freeze_batchnorm_stats
from advcam.models.resnet import read_torchvision_weights
from advcam.models.resnet38 import HEAD_PREFIXES, ResNet38, freeze_reference_layers
from advcam.models.trained import check_fits, plain_state_dict
from advcam.refine.affinity import pairwise_affinity
from advcam.refine.randomwalk import random_walk, transition_matrix
from advcam.utils.errors import AdvcamError

STRIDE = 8
HEADS = ("f8_3.weight", "f8_4.weight", "f8_5.weight", "f9.weight")


class PSAAffinityNet(ResNet38):
    """PSA's / SEAM's ``resnet38_aff``: ResNet-38 with their names, ``forward`` = the stride-8 embedding
    ``(B, 448, H/8, W/8)``."""

    embed_channels = 448

    def __init__(self) -> None:
        super().__init__()
        self.f8_3 = nn.Conv2d(512, 64, 1, bias=False)
        self.f8_4 = nn.Conv2d(1024, 128, 1, bias=False)
        self.f8_5 = nn.Conv2d(4096, 256, 1, bias=False)
        self.f9 = nn.Conv2d(448, 448, 1, bias=False)
        for m in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(m.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv4, conv5, conv6 = self.forward_stages(x)
        f = torch.cat([F.elu(self.f8_3(conv4)), F.elu(self.f8_4(conv5)), F.elu(self.f8_5(conv6))], 1)
        return F.elu(self.f9(f))

    def train(self, mode: bool = True) -> "PSAAffinityNet":
        super().train(mode)
        freeze_batchnorm_stats(self)  # PSA's resnet38d: every BatchNorm in eval mode, also in training
        return self

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, the heads ``f8_3``..``f9``: PSA's ``from_scratch_layers``, 10x lr)."""
        head = [cast(nn.Parameter, m.weight) for m in (self.f8_3, self.f8_4, self.f8_5, self.f9)]
        ids = {id(p) for p in head}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in ids], head


def build_psa_affinity(pretrained: str | Path | None = None) -> PSAAffinityNet:
    """A fresh AffinityNet to train (PSA's ``train_aff.py``): ``pretrained`` = ResNet-38 weights with PSA's names
    (the converted ImageNet weights, or a trained PSA / SEAM file whose heads are ignored); frozen as PSA freezes
    it (``conv1a``, ``b2*`` and every BatchNorm)."""
    model = PSAAffinityNet()
    if pretrained:
        with torch.device("meta"):
            own = ResNet38().state_dict()
        state = read_torchvision_weights(pretrained, own, HEAD_PREFIXES)  # every backbone key, checked
        model.load_state_dict({k: v for k, v in state.items() if not v.is_meta}, strict=False)  # (absent counters)
    freeze_reference_layers(model)
    return model


def load_psa_affinity(path: str | Path) -> PSAAffinityNet:
    """The trained AffinityNet of PSA's or SEAM's ``resnet38_aff`` file (eval mode). Raises AdvcamError naming the
    file when it is missing, is another network (a ResNet-38 classifier, ImageNet weights), or misses tensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AdvcamError(f"{path}: file not found")
    state = plain_state_dict(path)
    if state is None:
        raise AdvcamError(f"{path}: not a weight file (expected PSA's or SEAM's trained AffinityNet, resnet38_aff)")
    if "f8_5.weight" not in state:
        classifier = "fc8.weight" in state or "f9.weight" in state
        what = ("a ResNet-38 classifier (give it as classifier.trained)" if classifier
                else "ResNet-38's ImageNet weights" if "conv1a.weight" in state else "another network")
        raise AdvcamError(f"{path}: not PSA's or SEAM's trained AffinityNet (resnet38_aff: ResNet-38 with f8_3, f8_4, "
                          f"f8_5, f9): it looks like {what}")
    with torch.device("meta"):
        own = PSAAffinityNet().state_dict()
    state = dict(state)
    for key in own:  # BatchNorm step counters, absent from files saved before PyTorch 0.4.1 (unused: momentum)
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    check_fits(path, "PSA's or SEAM's trained AffinityNet", state, own)
    with torch.device("meta"):
        model = PSAAffinityNet()
    model = model.to_empty(device="cpu")
    model.load_state_dict(state)  # strict: every parameter and buffer
    return model.eval()


def trained_file(cfg_rw: Any) -> str | None:
    """``refine.randomwalk.psa.trained`` (a Config section or a dict); None: train one."""
    path = cfg_rw["psa"]["trained"]
    return str(path) if path else None


def pretrained_source(classifier: Mapping[str, Any], cfg_rw: Mapping[str, Any]) -> str | None:
    """The ResNet-38 weights the AffinityNet trains from: ``refine.randomwalk.pretrained``, else
    ``classifier.pretrained`` while the classifier is a ResNet-38 (PSA and SEAM start both from ImageNet)."""
    path = cfg_rw.get("pretrained") or (classifier.get("pretrained") if classifier["arch"] == "resnet38" else None)
    return str(path) if path else None


def load_trained(cfg_rw: Any) -> PSAAffinityNet:
    """The AffinityNet of ``refine.randomwalk.psa.trained`` (set); errors name the param."""
    path = trained_file(cfg_rw)
    if path is None:
        raise AdvcamError("refine.randomwalk.psa.trained: unset (null: the AffinityNet is trained here)")
    try:
        return load_psa_affinity(path)
    except AdvcamError as exc:
        raise AdvcamError(f"refine.randomwalk.psa.trained: {exc}") from None


def pair_radius(h: int, w: int, radius: int) -> int:
    """The radius of the walk on an ``h x w`` grid: ``radius``, or ``(min(h, w) - 1) // 2`` on a grid narrower than
    ``2 radius + 1`` (SEAM's ``resnet38_aff``)."""
    edge = min(h, w)
    return (edge - 1) // 2 if edge < 2 * radius + 1 else radius


def padded_to_stride(x: torch.Tensor) -> torch.Tensor:
    """``(..., H, W)`` padded with zeros at the bottom and right to multiples of 8 (PSA's ``infer_aff.py``)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % STRIDE, 0, (-h) % STRIDE))


def affinities(model: PSAAffinityNet, image: torch.Tensor, radius: int) -> tuple[torch.Tensor, int]:
    """(pairwise affinities ``(K, h, w)``, the radius used) of one normalised image ``(3, H, W)``."""
    emb = model(padded_to_stride(image)[None])
    h, w = emb.shape[-2:]
    r = pair_radius(h, w, radius)
    if r < 1:
        return emb.new_zeros((0, *emb.shape[-2:])), 0
    return pairwise_affinity(emb, r)[0], r


def walk_scores(high_res: torch.Tensor, aff: torch.Tensor, radius: int, *, alpha: float = 16.0, beta: float = 8.0,
                logt: int = 8) -> torch.Tensor:
    """The walked scores ``(1 + n, H, W)`` (background first) of the ``high_res`` maps ``(n, H, W)`` over the
    stride-8 affinities ``aff`` (``(K, ceil(H/8), ceil(W/8))``, pairs of ``radius``); see the module doc."""
    n, height, width = high_res.shape
    h, w = -(-height // STRIDE), -(-width // STRIDE)
    if tuple(aff.shape[-2:]) != (h, w):
        raise ValueError(f"walk_scores: affinities {tuple(aff.shape)} do not fit an image of {height}x{width}")
    fg = high_res.float().to(aff.device)
    top = fg.amax(0, keepdim=True) if n else fg.new_zeros((1, height, width))
    maps = torch.cat([(1 - top) ** float(alpha), fg])
    pooled = F.avg_pool2d(padded_to_stride(maps)[None], STRIDE)[0]
    walked = random_walk(pooled, transition_matrix(aff, radius, beta, cropped=True), 2 ** int(logt))
    return F.interpolate(walked[None], size=(h * STRIDE, w * STRIDE), mode="bilinear",
                         align_corners=False)[0, :, :height, :width]


def walk_labels(high_res: torch.Tensor, keys: Sequence[int], aff: torch.Tensor, radius: int, *,
                alpha: float = 16.0, beta: float = 8.0, logt: int = 8) -> np.ndarray:
    """Pseudo label ``(H, W)`` uint8 (0 = background, ``keys + 1``): the argmax of :func:`walk_scores`."""
    scores = walk_scores(high_res, aff, radius, alpha=alpha, beta=beta, logt=logt)
    lookup = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1]).astype(np.uint8)
    return lookup[scores.argmax(0).cpu().numpy()]


__all__ = ["PSAAffinityNet", "build_psa_affinity", "load_psa_affinity", "trained_file", "pretrained_source",
           "load_trained", "pair_radius", "padded_to_stride", "affinities", "walk_scores", "walk_labels", "STRIDE",
           "HEADS"]
