"""``advcam info``: what advcam would run with here - params, device, the fused-op extension, the dataset.

Nothing is built or computed: the extension is reported as loaded, built (cached), or not built yet (it builds on
the first AdvCAM run, about 20 s); the dataset summary reads the prepared folder's lists and labels only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from advcam.utils.errors import AdvcamError


def device_summary(cfg: Any) -> list[str]:
    """The resolved device and what torch sees."""
    from advcam.utils.device import resolve_device

    try:
        device = str(resolve_device(cfg.device))
    except AdvcamError as exc:
        device = f"unavailable ({exc})"
    lines = [f"device: {device} (device: {cfg.device})", f"torch: {torch.__version__}"]
    if torch.cuda.is_available():
        lines.append(f"cuda: {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
                     + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    else:
        lines.append("cuda: not available")
    lines.append(f"threads: {torch.get_num_threads()}")
    return lines


def extension_summary() -> list[str]:
    """Build status of the fused C++/CUDA ops, without building them."""
    from advcam.ops import fused

    backend = os.environ.get("ADVCAM_OPS_BACKEND", "auto")
    if fused._ext is not None:  # noqa: SLF001 - loaded in this process already
        return [f"extension: loaded (backend {backend})"]
    try:
        with_cuda = fused._want_cuda()  # noqa: SLF001
        src = fused.source_dir()
    except AdvcamError as exc:
        return [f"extension: unavailable ({exc}); AdvCAM uses the pure-PyTorch fallback"]
    folder = fused.build_dir(with_cuda)
    built = sorted(folder.glob("advcam_ops_*.so"))
    kind = "C++ + CUDA" if with_cuda else "C++ (CPU)"
    if built:
        status = f"built ({kind}, cached at {built[0]})"
    else:
        status = f"not built yet ({kind}; builds on the first AdvCAM run, about 20 s, into {folder})"
    return [f"extension: {status}", f"extension sources: {src}", f"ops backend: {backend} (ADVCAM_OPS_BACKEND)"]


def dataset_summary(data: Path) -> list[str]:
    """Kind, root, classes, list sizes and label sources of a prepared dataset folder (or why there is none)."""
    if not (Path(data) / "dataset.json").is_file():
        return [f"dataset: {data} is not prepared yet (run `advcam prepare` or `snakemake`)"]
    from advcam.data import load_info

    info = load_info(data)
    lines = [f"dataset: {data} ({info.kind}), images in {info.root}",
             f"classes ({info.num_classes}): {', '.join(info.classes)}"]
    for role, ids in info.lists.items():
        lines.append(f"list {role}: {len(ids)} images")
    counts = [0] * info.num_classes
    for classes in info.labels.values():
        for c in classes:
            if 0 <= int(c) < info.num_classes:
                counts[int(c)] += 1
    lines.append("images per class: " + ", ".join(f"{n} {c}" for n, c in zip(info.classes, counts)))
    sources = info.meta.get("label_sources")
    if isinstance(sources, dict):  # folders prepared before 2026-12-03 do not record it
        from_file = (f", {sources['file']} from {info.meta.get('labels_file', 'dataset.labels_file')}"
                     if sources.get("file") else "")
        mode = info.meta.get("image_labels", "masks")
        lines.append(f"image-level labels: {sources.get('mask', 0)} from masks, {sources.get('xml', 0)} from "
                     f"Annotations/<id>.xml{from_file} (dataset.image_labels: {mode})")
    return lines


def report(cfg: Any, data: Path) -> str:
    """The whole ``advcam info`` text."""
    parts = ["# device", *device_summary(cfg), "", "# fused ops", *extension_summary(), "",
             "# dataset", *dataset_summary(data), "", "# params (resolved)",
             yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip()]
    return "\n".join(parts) + "\n"
