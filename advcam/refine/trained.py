"""Random-walk networks trained elsewhere (``refine.randomwalk.trained``), taken instead of training one.

Two kinds of file are read:

- **IRN's** ``res50_irn.pth`` (design ``irn``), as IRN's ``train_irn.py`` saves it: the state dict of its
  ``AffinityDisplacementLoss``. Its ResNet-50 is under ``resnet50.*`` (the torchvision names, strides 2, 2, 2, 1) and
  again under the aliases ``stage1``..``stage5`` and ``backbone.0``..``4``; the boundary branch is ``fc_edge1``..
  ``fc_edge6`` (again under ``edge_layers``). :class:`advcam.refine.irn.BoundaryNet` is that branch: ``fc_edgeN`` is
  ``heads.N-1`` (N = 1..5) and ``fc_edge6`` is ``edge``. The displacement branch (``fc_dp*``, ``dp_layers``,
  ``mean_shift``: instance segmentation only) and the training's index buffers (``path_indices*``, ``disp_target``;
  ``ind_from`` and ``ind_to`` in IRN's first release) are not used. Files from a ``DataParallel`` wrapper
  (``module.*``) are read too.
- **advcam's own** ``pseudo/.affinity.pt`` of an earlier run (design ``irn``: its boundary network; ``affinitynet``:
  its affinity network), so a network trained once, on VOC's train_aug for instance, serves other runs.

The arch is the file's (IRN's: ``resnet50``). Errors name the file and say what it holds instead.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from advcam.models.trained import check_fits, plain_state_dict
from advcam.refine import irn
from advcam.refine.affinity import build_affinity_net
from advcam.utils.checkpoint import load_checkpoint
from advcam.utils.errors import AdvcamError

KINDS = {"irn": "boundary", "affinitynet": "affinity"}  # design -> the kind in an advcam .affinity.pt's header
IRN_TITLE = "IRN's trained boundary network (res50_irn.pth: resnet50.* with fc_edge1..6)"
# keys of IRN's file that are not the boundary network: aliases of its tensors, the displacement branch, index buffers
IRN_UNUSED = ("stage1.", "stage2.", "stage3.", "stage4.", "stage5.", "backbone.", "edge_layers.", "dp_layers.",
              "fc_dp", "mean_shift.", "path_indices", "disp_target", "ind_from", "ind_to")
EDGE_KEY = re.compile(r"fc_edge([1-6])\.(.+)")


def irn_renamed(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the boundary network's tensors of IRN's state dict under advcam's names, the file's keys that have no place)."""
    ours: dict[str, torch.Tensor] = {}
    other = []
    for key, value in state.items():
        edge = EDGE_KEY.fullmatch(key)
        if key.startswith("resnet50."):
            ours["backbone." + key[len("resnet50."):]] = value
        elif edge:
            n = int(edge.group(1))
            ours[("edge." if n == 6 else f"heads.{n - 1}.") + edge.group(2)] = value
        elif not key.startswith(IRN_UNUSED):
            other.append(key)
    return ours, other


def what_it_is(state: Mapping[str, Any]) -> str:
    """What a weight file that is not IRN's boundary network looks like, and where it goes instead."""
    if "fc_edge6.weight" in state:
        return "IRN's trained boundary network, res50_irn.pth (design irn takes it)"
    if "classifier.weight" in state and any(k.startswith("resnet50.") for k in state):
        return "IRN's CAM network, res50_cam.pth (give it as classifier.trained)"
    if "f8_5.weight" in state:
        return ("PSA's or SEAM's trained AffinityNet (give it as refine.randomwalk.psa.trained, with "
                "refine.randomwalk.design=psa)")
    if "conv1a.weight" in state:
        return "a ResNet-38 network (a classifier: classifier.trained)"
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return "a torchvision ResNet's ImageNet weights (give them as refine.randomwalk.pretrained)"
    return "another network"


def load_irn_boundary(path: Path, state: Mapping[str, torch.Tensor]) -> irn.BoundaryNet:
    """IRN's boundary network of ``res50_irn.pth``'s state dict (eval mode); errors name ``path``."""
    with torch.device("meta"):
        own = irn.build_boundary_net("resnet50").state_dict()
    ours, other = irn_renamed(state)
    for key in own:  # BatchNorm step counters, absent from files saved before PyTorch 0.4.1 (unused in eval mode)
        if key.endswith(".num_batches_tracked") and key not in ours:
            ours[key] = torch.zeros((), dtype=torch.long)
    check_fits(path, IRN_TITLE, ours, own, other)
    model = irn.build_boundary_net("resnet50")
    model.load_state_dict(ours)  # strict: every parameter and buffer
    return model.eval()


def load_advcam_network(path: Path, header: Mapping[str, Any], state: Mapping[str, Any], design: str) -> nn.Module:
    """The network of an advcam ``.affinity.pt`` (``header``, ``state``) for ``design`` (eval mode)."""
    kind, want = header.get("kind"), KINDS[design]
    if kind != want:
        held = {"boundary": "a boundary network (design irn)", "affinity": "an affinity network (design affinitynet)",
                "affinity-psa": "PSA's AffinityNet (design psa)"}.get(str(kind), f"no affinity network (kind {kind!r})")
        takes = "IRN's res50_irn.pth or a boundary network" if design == "irn" else "an affinity network"
        raise AdvcamError(f"{path}: an advcam checkpoint of {held}; design {design} takes {takes} (pseudo/.affinity.pt "
                          f"of a design {design} run)")
    arch = str(header.get("arch"))
    if arch not in ("resnet50", "resnet_small"):
        raise AdvcamError(f"{path}: {want} network of unknown arch {arch!r}")
    model = irn.build_boundary_net(arch) if design == "irn" else build_affinity_net(arch)
    weights = state.get("model")
    if not isinstance(weights, Mapping):
        raise AdvcamError(f"{path}: advcam {want} network without its weights ('model')")
    check_fits(path, f"advcam's {want} network on {arch}", weights, model.state_dict())
    model.load_state_dict(weights)
    return model.eval()


def load_walk_network(path: str | Path, design: str) -> nn.Module:
    """The random walk's network in ``path`` for ``design`` (``irn``: IRN's ``res50_irn.pth`` or an advcam boundary
    network; ``affinitynet``: an advcam affinity network), in eval mode. Raises AdvcamError naming the file."""
    if design not in KINDS:
        raise AdvcamError(f"design {design} takes no trained file here (design psa: refine.randomwalk.psa.trained)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise AdvcamError(f"{path}: file not found")
    try:
        header, state = load_checkpoint(path)
    except AdvcamError:  # not an advcam checkpoint: a reference's plain state dict?
        header = None
    if header is not None:
        return load_advcam_network(path, header, state, design)
    plain = plain_state_dict(path)
    expected = IRN_TITLE if design == "irn" else "an advcam affinity network (pseudo/.affinity.pt)"
    if plain is None:
        raise AdvcamError(f"{path}: not a weight file (expected {expected})")
    if design != "irn" or "fc_edge6.weight" not in plain:
        raise AdvcamError(f"{path}: not {expected}: it looks like {what_it_is(plain)}")
    return load_irn_boundary(path, plain)


def check_outside(path: str | Path, folder: str | Path = "pseudo") -> None:
    """Refuse a taken file inside ``folder``, the workflow's refine output (``pseudo/``), where an earlier run leaves its
    ``.affinity.pt``: Snakemake and DVC delete that folder before they run the stage that would read it."""
    file, out = Path(path).expanduser().resolve(), Path(folder).resolve()
    if out in file.parents:
        raise AdvcamError(f"refine.randomwalk.trained: {path} lies in {folder}/, the refine stage's output folder, "
                          f"which Snakemake and DVC delete before they run the stage: copy it out first (e.g. to "
                          f"weights/) and give the copy")


def trained_file(cfg_rw: Mapping[str, Any]) -> str | None:
    """``refine.randomwalk.trained`` (a Config section or a dict); None: the network is trained here."""
    path = cfg_rw.get("trained")
    return str(path) if path else None


def load_trained(cfg_rw: Mapping[str, Any]) -> nn.Module:
    """The network of ``refine.randomwalk.trained`` (set) for ``refine.randomwalk.design``; errors name the param."""
    path = trained_file(cfg_rw)
    if path is None:
        raise AdvcamError("refine.randomwalk.trained: unset (null: the network is trained here)")
    try:
        model = load_walk_network(path, str(cfg_rw["design"]))
    except AdvcamError as exc:
        raise AdvcamError(f"refine.randomwalk.trained: {exc}") from None
    arch = cfg_rw.get("arch")
    if arch and arch != getattr(model, "arch", arch):
        raise AdvcamError(f"refine.randomwalk.trained: {path} holds a network on {getattr(model, 'arch')}; set "
                          f"refine.randomwalk.arch to it or to null (it is {arch})")
    return model


__all__ = ["KINDS", "irn_renamed", "what_it_is", "load_irn_boundary", "load_advcam_network", "load_walk_network",
           "check_outside", "trained_file", "load_trained"]
