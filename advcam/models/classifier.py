"""The CAM network: ResNet backbone + bias-free 1x1 classifier; GAP of the features gives the logits.

``resnet50`` follows IRN/AdvCAM's ``net/resnet50_cam.py``: strides (2, 2, 2, 1) -> output stride 16,
BatchNorm statistics frozen (always the running ImageNet statistics, even in train mode), and the first two
stages (conv1, bn1, layer1, layer2) frozen: IRN detaches the output of ``stage2`` in training, so those weights
never receive a gradient. The BN affine parameters of layer3/layer4 do train, as in IRN. Here the early stages
are frozen with ``requires_grad=False`` instead of a ``detach``, which gives the same updates but keeps the
gradient with respect to the input that adversarial climbing needs.

``resnet_small`` (the CPU variant for the embedded dataset) is trained from scratch: nothing is frozen and its
BatchNorm layers train normally, since frozen statistics of a randomly initialised network would be meaningless.
Its output stride is 8 (96 px -> 12x12 maps).

``resnet38`` is PSA's and SEAM's ResNet-38 (:mod:`advcam.models.resnet38`, output stride 8), frozen as they freeze
it: every BatchNorm (statistics and affine parameters) and ``conv1a``, ``b2``, ``b2_1``, ``b2_2``. With method
``cam`` it is PSA's CAM network (``network/resnet38_cls.py``): its classifier initialised by ``xavier_uniform_``, and
``Dropout2d(0.5)`` on the features before the average pool in training (``dropout7``; :attr:`CAMNet.dropout`, which
the CAM trainer sets from ``classifier.dropout``: :func:`reference_dropout`). IRN's ResNet-50 CAM network has no
dropout.

Checkpoint helpers shared with :mod:`advcam.models.deeplab` live here too.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from advcam.models import resnet, resnet38
from advcam.utils.checkpoint import load_checkpoint
from advcam.utils.errors import AdvcamError

CLASSIFIER_ARCHS = ("resnet50", "resnet38", "resnet_small")
Backbone = resnet.ResNet | resnet38.ResNet38


class CAMNet(nn.Module):
    """``features(x)`` -> (B, K, h, w); ``classifier`` = Conv2d(K, C, 1, bias=False);
    ``cam(x)`` = conv2d(features(x), classifier.weight) (before ReLU); ``forward(x)`` -> (B, C) logits, with
    ``Dropout2d(dropout)`` on the features before the pool in training mode (0: none; a training-time setting, not
    saved)."""

    method = "cam"
    dropout = 0.0

    def __init__(self, backbone: Backbone, num_classes: int, arch: str, frozen_bn: bool,
                 frozen_modules: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.frozen_bn = frozen_bn
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        for name in frozen_modules:
            getattr(backbone, name).requires_grad_(False)
        if frozen_bn:
            freeze_batchnorm_stats(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.features(x), self.classifier.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        if self.dropout > 0:
            feats = F.dropout2d(feats, self.dropout, training=self.training)
        return self.classifier(feats.mean(dim=(2, 3), keepdim=True)).flatten(1)

    def train(self, mode: bool = True) -> "CAMNet":
        super().train(mode)
        if self.frozen_bn:
            freeze_batchnorm_stats(self)
        return self

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, classifier parameters): IRN gives the second 10x the lr."""
        return ([p for p in self.backbone.parameters() if p.requires_grad], list(self.classifier.parameters()))


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Put every BatchNorm of ``model`` in eval mode (running statistics used and never updated)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def build_classifier(arch: str, num_classes: int, pretrained: str | Path | None = None) -> CAMNet:
    """A fresh CAM network; ``pretrained`` = a local weight file for the backbone (torchvision's format; for
    ``resnet38`` a state dict with PSA's / SEAM's names)."""
    backbone: Backbone
    if arch == "resnet50":
        backbone = resnet.resnet50(strides=(2, 2, 2, 1))
        frozen: tuple[str, ...] = ("conv1", "bn1", "layer1", "layer2")
    elif arch == "resnet38":
        backbone = resnet38.resnet38()
        resnet38.freeze_reference_layers(backbone)
        frozen = ()
    elif arch == "resnet_small":
        backbone = resnet.resnet_small(strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4))
        frozen = ()
    else:
        raise AdvcamError(f"classifier arch {arch!r} unknown (choose from {', '.join(CLASSIFIER_ARCHS)})")
    if pretrained:
        resnet.load_torchvision_weights(backbone, pretrained)
    model = CAMNet(backbone, num_classes, arch, frozen_bn=arch != "resnet_small", frozen_modules=frozen)
    if arch == "resnet38":
        nn.init.xavier_uniform_(model.classifier.weight)  # PSA's fc8
    return model


REFERENCE_DROPOUT = {"resnet38": 0.5}  # PSA's resnet38_cls dropout7; IRN's resnet50_cam has none


def reference_dropout(arch: str, dropout: float | None) -> float:
    """The CAM network's training dropout: ``classifier.dropout``, or where null its arch's reference's."""
    return float(REFERENCE_DROPOUT.get(arch, 0.0) if dropout is None else dropout)


def build_uninitialised(build: Callable[[str, int], nn.Module], arch: str, num_classes: int) -> nn.Module:
    """``build(arch, num_classes)`` on the CPU without initialising its weights (built on the meta device, then given
    empty memory): for a network whose every parameter and buffer a strict ``load_state_dict`` sets next. Spares
    the random initialisation (a second for ResNet-38's 105 M parameters)."""
    with torch.device("meta"):
        model = build(arch, num_classes)
    return model.to_empty(device="cpu")


def load_model_checkpoint(path: str | Path, kind: str, build: Callable[[str, int], nn.Module],
                          num_classes: int | None, map_location: str | torch.device,
                          loaded: tuple[dict, dict] | None = None) -> tuple[nn.Module, dict]:
    """Read an advcam checkpoint of ``kind``, rebuild it with ``build(arch, n)`` and load its weights.

    Raises :class:`AdvcamError` naming the file on a wrong kind, a damaged header, an unexpected class count
    (when ``num_classes`` is given) or weights that do not fit the architecture. ``loaded`` = the
    ``(header, state)`` of :func:`load_checkpoint` when the caller has read the file already. Returns
    (model in eval mode, header).
    """
    header, state = loaded if loaded is not None else load_checkpoint(path, map_location=map_location)
    got = header.get("kind")
    if got != kind:
        raise AdvcamError(f"{path}: is a {got or 'unknown'} checkpoint, expected a {kind} checkpoint")
    for key in ("arch", "num_classes"):
        if key not in header:
            raise AdvcamError(f"{path}: checkpoint header has no {key!r}")
    n, arch = header["num_classes"], header["arch"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not isinstance(arch, str):
        raise AdvcamError(f"{path}: damaged checkpoint header (arch {arch!r}, num_classes {n!r})")
    if num_classes is not None and n != num_classes:
        raise AdvcamError(f"{path}: {kind} has {n} output classes, expected {num_classes} "
                          f"(trained on a different dataset?)")
    try:
        model = build_uninitialised(build, arch, n)
    except AdvcamError as exc:
        raise AdvcamError(f"{path}: {exc}") from None
    weights = state.get("model")
    if not isinstance(weights, Mapping):
        raise AdvcamError(f"{path}: checkpoint has no model weights")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError) as exc:  # a tampered state dict
        first = str(exc).strip().splitlines()[0]
        raise AdvcamError(f"{path}: weights do not fit arch {arch!r} ({first})") from None
    model.to(map_location)
    return model.eval(), header


# Training method -> "module:function" building a fresh classifier ``fn(arch, num_classes, pretrained=None)``.
# Every method's model keeps the CAMNet interface (features, classifier, cam, forward).
BUILDERS: dict[str, str] = {
    "cam": "advcam.models.classifier:build_classifier",
    "seam": "advcam.models.seam:build_seam",
    "eader": "advcam.models.eader:build_eader",
}


def builder_for(method: str) -> Callable[..., nn.Module]:
    """The build function of a classifier training method (see :data:`BUILDERS`)."""
    if method not in BUILDERS:
        raise AdvcamError(f"classifier method {method!r} unknown (choose from {', '.join(BUILDERS)})")
    module, name = BUILDERS[method].split(":")
    return getattr(importlib.import_module(module), name)


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu",
                    num_classes: int | None = None, classes: Sequence[str] | None = None) -> CAMNet:
    """Load a classifier written by ``advcam train-cls`` (any method), in eval mode; ``.header`` holds its header.

    ``num_classes`` / ``classes`` (the dataset's foreground class names, in label order), when given, must
    match the checkpoint's: a classifier of another dataset is refused, naming the file and both counts or
    class lists. Wrong kinds (a segmenter, an affinity net), files that are not advcam checkpoints and
    weights of another architecture are refused too (:func:`load_model_checkpoint`).
    """
    header, state = load_checkpoint(path, map_location="cpu")
    method = str(header.get("method", "cam")) if header.get("kind") == "classifier" else "cam"
    try:
        build = builder_for(method)
    except AdvcamError as exc:
        raise AdvcamError(f"{path}: {exc}") from None
    if header.get("kind") == "classifier" and classes is not None:
        saved = header.get("classes")
        if isinstance(saved, list) and saved and list(saved) != list(classes):
            if num_classes is None or len(saved) == num_classes:  # a count mismatch gets its own message
                raise AdvcamError(f"{path}: classifier was trained on classes {saved}, but the dataset has "
                                  f"{list(classes)} (trained on a different dataset?)")
    model, header = load_model_checkpoint(path, "classifier", build, num_classes, map_location,
                                          loaded=(header, state))
    model.header = header  # type: ignore[assignment]
    model.classes = list(header.get("classes") or [])  # type: ignore[assignment]
    return model  # type: ignore[return-value]


def classifier_header(model: nn.Module, classes: list[str], params: Mapping[str, Any]) -> dict:
    """The JSON header of a classifier checkpoint (``arch``, ``method`` and ``num_classes`` are attributes of
    every classifier: CAMNet, SEAMNet, EADERNet)."""
    arch, method, num_classes = (getattr(model, k) for k in ("arch", "method", "num_classes"))
    return {"kind": "classifier", "arch": str(arch), "method": str(method), "classes": list(classes),
            "num_classes": int(num_classes), "params": dict(params)}
