"""Classifiers trained elsewhere (``classifier.trained``): the reference code's weight files and advcam checkpoints.

AdvCAM is post-hoc: it climbs on any trained classifier. Three reference files are read as they are:

=======  ==========================================  ======================  =================
format   file                                        method / arch           keys
=======  ==========================================  ======================  =================
irn      IRN's and AdvCAM's ``res50_cam.pth``         ``cam`` / ``resnet50``  ``resnet50.*``, ``classifier.weight``
psa      PSA's ``resnet38_cls.pth``                   ``cam`` / ``resnet38``  ResNet-38 names, ``fc8.weight``
seam     SEAM's ``resnet38_SEAM.pth``                 ``seam`` / ``resnet38`` the same + ``f8_3``, ``f8_4``, ``f9``
=======  ==========================================  ======================  =================

IRN's network registers its ResNet-50 under ``resnet50`` and again inside its stages (``stage1``..``stage4``,
``backbone``) and the classifier inside ``newly_added``: its state dict holds each tensor under several names, and
``resnet50.*`` with ``classifier.weight`` are the whole network. SEAM's ``fc8`` has a background row first, which
SEAM never uses (its PCM input replaces the background map by ``1 - max``): it is dropped; ``f8_3``, ``f8_4``
and ``f9`` are the PCM's ``pcm_proj2``, ``pcm_proj3`` and ``pcm_embed``. Files saved from a ``DataParallel``
wrapper (``module.*``) or as ``{"state_dict": ...}`` / ``{"model": ...}`` are read too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from advcam.models.classifier import CAMNet, build_uninitialised, builder_for, load_classifier
from advcam.models.resnet import unwrap_state_dict
from advcam.models.resnet38 import HEAD_PREFIXES
from advcam.utils.errors import AdvcamError


@dataclass(frozen=True)
class Format:
    """A reference's trained-classifier file: what it is called, and the classifier it becomes."""

    name: str
    title: str
    method: str
    arch: str


FORMATS = {f.name: f for f in (Format("irn", "IRN's ResNet-50 CAM network", "cam", "resnet50"),
                               Format("psa", "PSA's ResNet-38 CAM network", "cam", "resnet38"),
                               Format("seam", "SEAM's ResNet-38 network", "seam", "resnet38"))}
IRN_ALIASES = ("stage1.", "stage2.", "stage3.", "stage4.", "backbone.", "newly_added.")
SEAM_PCM = {"f8_3.weight": "pcm_proj2.weight", "f8_4.weight": "pcm_proj3.weight", "f9.weight": "pcm_embed.weight"}


def plain_state_dict(path: Path) -> dict[str, torch.Tensor] | None:
    """The string-keyed mapping in ``path`` (unwrapped by :func:`advcam.models.resnet.unwrap_state_dict`), or None
    when ``path`` is not a plain tensor file (an advcam checkpoint, for instance)."""
    try:
        state = unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # noqa: BLE001 - not a plain tensor file: the caller tries the advcam format
        return None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        return None
    return state


def detect(state: Mapping[str, object]) -> Format | None:
    """The reference format of a state dict, by its keys (None: none of them)."""
    if any(k.startswith("resnet50.") for k in state):
        return FORMATS["irn"]
    if "conv1a.weight" in state:
        return FORMATS["seam" if "f9.weight" in state else "psa"]
    return None


def renamed(fmt: Format, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the tensors under advcam's names, the file's keys that have no place in the network)."""
    if fmt.name == "irn":
        ours = {"backbone." + k[len("resnet50."):]: v for k, v in state.items() if k.startswith("resnet50.")}
        ours.update({k: v for k, v in state.items() if k == "classifier.weight"})
        other = [k for k in state if not k.startswith(("resnet50.", "classifier.weight", *IRN_ALIASES))]
        return ours, other
    ours = {"backbone." + k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    head = {"fc8.weight": "classifier.weight", **(SEAM_PCM if fmt.name == "seam" else {})}
    ours.update({head[k]: v for k, v in state.items() if k in head})
    if fmt.name == "seam" and torch.is_tensor(ours.get("classifier.weight")):
        ours["classifier.weight"] = ours["classifier.weight"][1:]  # SEAM's unused background row
    other = [k for k in state if k.startswith(HEAD_PREFIXES) and k not in head]
    return ours, other


def reference_state(path: Path, num_classes: int) -> tuple[Format, dict[str, torch.Tensor]] | None:
    """(format, state dict of the advcam classifier) of a reference's trained file, or None when ``path`` is
    none of them. Raises AdvcamError naming the file when it is one but does not fit: keys, shapes, class count."""
    state = plain_state_dict(path)
    fmt = detect(state) if state is not None else None
    if state is None or fmt is None:
        return None
    if "f8_5.weight" in state:
        raise AdvcamError(f"{path}: PSA's or SEAM's trained AffinityNet (resnet38_aff), not a classifier; give it as "
                          "refine.randomwalk.psa.trained")
    if "fc_edge6.weight" in state:
        raise AdvcamError(f"{path}: IRN's trained boundary network (res50_irn.pth), not a classifier; give it as "
                          "refine.randomwalk.trained")
    with torch.device("meta"):  # names and shapes only
        own = builder_for(fmt.method)(fmt.arch, num_classes).state_dict()
    ours, other = renamed(fmt, state)
    filled = {k: torch.zeros((), dtype=torch.long) if k.endswith(".num_batches_tracked") else torch.tensor(True)
              for k in own if k.endswith((".num_batches_tracked", "_extra_state")) and k not in ours}
    ours.update(filled)  # BatchNorm step counters (unused with momentum) and SEAM's use_pcm flag (on)
    weight = ours.get("classifier.weight")  # first: another dataset's network is the likeliest misfit
    if isinstance(weight, torch.Tensor) and weight.dim() == 4 and weight.shape[0] != num_classes:
        extra = f" (its fc8 has {weight.shape[0] + 1} rows: background first)" if fmt.name == "seam" else ""
        raise AdvcamError(f"{path}: classifier has {weight.shape[0]} output classes{extra}, expected {num_classes} "
                          "(trained on a different dataset?)")
    check_fits(path, fmt.title, ours, own, other)
    return fmt, ours


def check_fits(path: Path, title: str, state: Mapping[str, object], own: Mapping[str, torch.Tensor],
               other: Sequence[str] = ()) -> None:
    """Raise AdvcamError naming ``path`` unless ``state`` has exactly the keys of ``own`` (a network's state dict,
    on the meta device will do) with their shapes; ``other``: more of the file's keys that have no place."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own)) + sorted(other)
    if unexpected or missing:
        parts = [f"{len(keys)} {what}, e.g. {', '.join(keys[:3])}"
                 for what, keys in (("unexpected", unexpected), ("missing", missing)) if keys]
        raise AdvcamError(f"{path}: not {title} ({'; '.join(parts)})")
    wrong = [f"{k} {tuple(getattr(v, 'shape', ()))} vs {tuple(own[k].shape)}" for k, v in state.items()
             if not isinstance(v, torch.Tensor) or v.shape != own[k].shape]
    if wrong:
        raise AdvcamError(f"{path}: shapes do not match {title} ({len(wrong)} tensors, e.g. {wrong[:2]})")


def load_trained(path: str | Path, num_classes: int, classes: Sequence[str] | None, method: str,
                 arch: str) -> tuple[nn.Module, str]:
    """The classifier of ``classifier.trained`` and its format (``irn``, ``psa``, ``seam`` or ``advcam``), checked
    against the dataset (``num_classes``, ``classes`` where known) and the params (``method``, ``arch``); errors
    name the param. A reference's file needs the method and arch of its row in :data:`FORMATS`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AdvcamError(f"classifier.trained: file not found: {path}")
    try:
        found = reference_state(path, num_classes)
    except AdvcamError as exc:
        raise AdvcamError(f"classifier.trained: {exc}") from None
    if found is not None:
        fmt, state = found
        if (method, arch) != (fmt.method, fmt.arch):
            raise AdvcamError(f"classifier.trained: {path} is {fmt.title}; set classifier.method={fmt.method} "
                              f"and classifier.arch={fmt.arch} (they are {method} and {arch})")
        model = build_uninitialised(builder_for(fmt.method), fmt.arch, num_classes)
        model.load_state_dict(state)  # strict: every parameter and buffer
        return model.eval(), fmt.name
    try:
        loaded: CAMNet = load_classifier(path, num_classes=num_classes, classes=classes)
    except AdvcamError as exc:
        raise AdvcamError(f"classifier.trained: {exc} (expected a reference's trained network: IRN's res50_cam.pth, "
                          "PSA's resnet38_cls.pth, SEAM's resnet38_SEAM.pth; or an advcam classifier checkpoint)"
                          ) from None
    if (loaded.method, loaded.arch) != (method, arch):
        raise AdvcamError(f"classifier.trained: {path} holds a {loaded.method} classifier of arch {loaded.arch}; "
                          f"set classifier.method={loaded.method} and classifier.arch={loaded.arch}")
    return loaded, "advcam"


__all__ = ["Format", "FORMATS", "detect", "renamed", "reference_state", "check_fits", "load_trained",
           "plain_state_dict"]
