"""A finished training, remembered: the same fingerprint gives back its weights and curve without training again.

Snakemake and DVC delete a training job's outputs before they run it again, and they run it again whenever an
input they track changed, also where the change does not reach the training: ``-S dataset.seg_list=train_aug``
prepares the dataset again, and the classifier would retrain for hours on VOC. So a training step remembers its
result next to its output ``<out>``:

- ``<out>.done.pt``: the final checkpoint (a hard link of ``<out>``: no extra space while both exist);
- ``<out>.done.json``: the training's fingerprint (params, class names, the images' and labels' content, the
  advcam code) and its curve rows.

When a step starts with the fingerprint on record, :func:`recall` links the checkpoint back to ``<out>`` and
writes the curve, and the step ends: byte for byte what training again would give on CPU with the same seed.
Any change of params, data or code trains anew. Delete the two files to force a new training.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from advcam.train.loop import write_curves
from advcam.utils.errors import AdvcamError
from advcam.utils.io import files_digest, link_or_copy, read_json, write_json
from advcam.utils.progress import log


def memo_paths(out: Path) -> tuple[Path, Path]:
    """(``<out>.done.pt``, ``<out>.done.json``)."""
    out = Path(out)
    return out.with_name(out.name + ".done.pt"), out.with_name(out.name + ".done.json")


def weights_digest(path: str | Path | None) -> str | None:
    """Content hash of a pretrained weight file for a fingerprint (its path where it is missing: the model
    builder then names it)."""
    if not path:
        return None
    file = Path(path).expanduser()
    return files_digest([file]) if file.is_file() else str(path)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def remember(out: Path, rows: Sequence[Sequence[float]], fingerprint: Mapping[str, Any]) -> None:
    """Record the finished training whose checkpoint ``out`` was just written (process rank 0 only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    weights, record = memo_paths(out)
    record.unlink(missing_ok=True)  # never a record naming other weights, even for a moment
    link_or_copy(Path(out), weights)
    write_json(record, {"fingerprint": _plain(dict(fingerprint)), "sha1": files_digest([weights]),
                        "curve": [list(r) for r in rows]})


def recall(out: Path, curves: Path, fingerprint: Mapping[str, Any], desc: str) -> bool:
    """Restore ``out`` and ``curves`` from a finished training with this fingerprint; False when there is none
    (or its files do not match their record). Every rank of a distributed run gets the same answer, so all of
    them skip the training; only rank 0 writes the files."""
    weights, record = memo_paths(out)
    if not (weights.is_file() and record.is_file()):
        return False
    try:
        memo = read_json(record)
    except AdvcamError:  # an unreadable record is no record
        return False
    if not isinstance(memo, dict) or memo.get("fingerprint") != _plain(dict(fingerprint)) or memo.get("sha1") != files_digest([weights]):
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        link_or_copy(weights, Path(out))
        write_curves(Path(curves), memo.get("curve", []))
    log.info("%s: %s holds a finished training with the same params, data and code: its weights are taken "
             "(delete it and %s to train again)", desc, weights, record.name)
    return True


__all__ = ["memo_paths", "remember", "recall", "weights_digest"]
