"""`advcam params --check FILE`: DVC's first stage, ``check_params``.

DVC removes a stage's outputs before it runs the stage, so whatever makes a stage fail at its start costs its
finished outputs (a trained segmenter, a prepared dataset). This check runs before any stage and refuses, with
the same one-line messages as the stages:

- params the schema refuses, as advcam reads the file and as Snakemake reads it (YAML 1.1, where an unquoted
  VOC id ``2007_000032`` is the number 2007000032);
- a dataset folder, image or mask folder, or list file that is missing (``dataset.kind: voc``; the images
  themselves are checked by ``prepare``), or a list name the synthetic dataset does not write; a
  ``dataset.labels_file`` that is missing or has a bad line;
- a ``predict.list`` that the dataset does not have;
- ``segmentation.gt_ids`` outside the segmenter's training list, or a ``gt_fraction`` outside [0, 1] (the
  segmenter is the stage it would cost);
- a ``classifier.trained`` file that is missing or holds another kind of classifier than the params ask for;
- ``refine.method: randomwalk`` with an affinity network arch it has no variant for (``resnet38``, the
  classifier's where ``refine.randomwalk.arch`` is null), or with ``design: psa`` and a
  ``refine.randomwalk.psa.trained`` file that is missing or not PSA's / SEAM's trained AffinityNet, or with a
  ``refine.randomwalk.trained`` file that is missing or not the design's network (IRN's ``res50_irn.pth`` or an
  earlier run's ``.affinity.pt``);
- a ``pretrained`` weight file (``classifier``, ``segmentation``, ``refine.randomwalk``) that is missing, unreadable,
  or does not fit its arch (keys and shapes against the backbone built on the ``meta`` device: no memory, no
  computation).

When all is well it writes FILE, always the same text, so a valid change reruns nothing after this stage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from advcam import config
from advcam.data import role_list_names, synthetic, voc
from advcam.models import resnet
from advcam.models.classifier import build_classifier
from advcam.models.deeplab import build_segmenter
from advcam.models.trained import load_trained
from advcam.refine import psa
from advcam.refine import trained as taken
from advcam.refine.affinity import affinity_source, build_affinity_net
from advcam.steps.prepare import check_layout, labels_file_path
from advcam.train.segmentation import select_gt_ids
from advcam.utils.errors import AdvcamError
from advcam.utils.io import write_text
from advcam.utils.progress import log

CHECKED = "params valid (advcam params --check)\n"


def as_snakemake_reads(params: Path) -> None:
    """Validate ``params`` as Snakemake's configfile reader sees it (PyYAML, YAML 1.1), as the workflow does."""
    try:
        data = yaml.safe_load(params.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise AdvcamError(f"{params}: cannot read ({exc})") from None
    config.validate(data or {}, f"{params} (as Snakemake reads it: YAML 1.1)", coerce_strings=True)


def dataset_lists(cfg: Any) -> dict[str, list[str]]:
    """The ids of each role's list: read from a VOC-layout dataset (whose root, image and mask folders and list
    files must exist), or those the synthetic dataset will generate."""
    ds = cfg.dataset
    names = role_list_names(ds)
    if ds.kind == "voc":
        root = Path(ds.root).expanduser().absolute()
        labels_file = labels_file_path(ds, root)
        if labels_file is not None:
            voc.read_labels_file(labels_file, list(ds.classes) if ds.classes is not None else list(voc.VOC_CLASSES))
        return check_layout(root, ds.mask_dir, names, str(ds.get("image_labels", "masks")))
    return {role: synthetic_list(cfg, name, "dataset." + ("seg_list" if role == "seg" else f"{role}_list"))
            for role, name in names.items()}


def synthetic_list(cfg: Any, name: str, key: str) -> list[str]:
    """The ids of list ``name`` of the synthetic dataset; AdvcamError naming ``key`` when it writes no such list."""
    generated = synthetic.list_ids(cfg.synthetic.to_dict())
    if name not in generated:
        raise AdvcamError(f"{key}: the synthetic dataset has no list {name!r} (it writes "
                          f"{', '.join(sorted(generated))})")
    return generated[name]


def predict_list_exists(cfg: Any) -> None:
    """``predict.list``, where set, is a list file of the VOC-layout dataset or a list the synthetic one writes."""
    name = (cfg.get("predict") or {}).get("list")
    if not name:
        return
    if cfg.dataset.kind == "voc":
        voc.read_list(Path(cfg.dataset.root).expanduser().absolute(), str(name))
    else:
        synthetic_list(cfg, str(name), "predict.list")


def dataset_classes(cfg: Any) -> list[str]:
    """The dataset's foreground class names as ``prepare`` will name them."""
    ds = cfg.dataset
    if ds.classes is not None:
        return list(ds.classes)
    return list(voc.VOC_CLASSES) if ds.kind == "voc" else synthetic.class_names(int(cfg.synthetic.num_classes))


def trained_fits(cfg: Any) -> None:
    """``classifier.trained``, where set, is a classifier that ``train-cls`` takes (the same check, the same
    message): IRN's ResNet-50 CAM network or an advcam classifier checkpoint that fits the dataset and params."""
    c = cfg.classifier
    if c.get("trained"):
        classes = dataset_classes(cfg)
        load_trained(str(c.trained), len(classes), classes, c.method, c.arch)


def gt_ids_fit(cfg: Any, lists: dict[str, list[str]]) -> None:
    """``segmentation.gt_ids`` name images of the segmenter's training list; ``gt_fraction`` is in [0, 1]."""
    seg, ds = cfg.segmentation, cfg.dataset
    has_mask = None  # the synthetic dataset has every mask
    if ds.kind == "voc":
        root = Path(ds.root).expanduser().absolute()
        has_mask = lambda i: voc.mask_path(root, ds.mask_dir, i).is_file()  # noqa: E731
    select_gt_ids(lists["seg"], seg.get("gt_ids", []), float(seg.get("gt_fraction", 0.0)), int(cfg.seed),
                  role_list_names(cfg.dataset)["seg"], has_mask)


def weights_fit(build: Callable[..., torch.nn.Module], arch: str, path: str, key: str) -> None:
    """``path`` is a readable torchvision weight file whose backbone keys and shapes fit ``arch``."""
    with torch.device("meta"):
        model = build(arch, 2, None)
    try:
        backbone = model.backbone
        assert isinstance(backbone, torch.nn.Module)
        resnet.read_torchvision_weights(path, backbone.state_dict(), resnet.ignored_prefixes(backbone))
    except AdvcamError as exc:
        raise AdvcamError(f"{key}: {exc}") from None


def run(cfg: Any, params: Path | None, out: Path) -> None:
    if params is not None:
        as_snakemake_reads(params)
    gt_ids_fit(cfg, dataset_lists(cfg))
    predict_list_exists(cfg)
    trained_fits(cfg)
    weights: list[tuple[str, Callable[..., torch.nn.Module], str, Any]] = [
        ("classifier.pretrained", build_classifier, cfg.classifier.arch, cfg.classifier.pretrained),
        ("segmentation.pretrained", build_segmenter, cfg.segmentation.arch, cfg.segmentation.pretrained)]
    rw = cfg.refine.randomwalk
    if cfg.refine.method == "randomwalk" and rw.design == "psa" and psa.trained_file(rw):
        psa.load_trained(rw)
    elif cfg.refine.method == "randomwalk" and rw.design == "psa":
        weights.append(("refine.randomwalk.pretrained", lambda a, n, p: build_classifier(a, n), "resnet38",
                        psa.pretrained_source(cfg.classifier, rw)))
    elif cfg.refine.method == "randomwalk" and taken.trained_file(rw):
        taken.check_outside(str(taken.trained_file(rw)))  # the workflow's refine output, deleted before refine runs
        taken.load_trained(rw)
    elif cfg.refine.method == "randomwalk":
        arch, pretrained = affinity_source(cfg.classifier, cfg.refine.randomwalk)
        if cfg.refine.randomwalk.get("pretrained"):
            weights.append(("refine.randomwalk.pretrained", lambda a, n, p: build_affinity_net(a), arch, pretrained))
    for key, build, arch, path in weights:
        if path:
            weights_fit(build, arch, path, key)
    write_text(out, CHECKED)
    log.info("params valid: wrote %s", out)
