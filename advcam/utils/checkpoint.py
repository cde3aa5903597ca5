"""Checkpoints: plain state dicts + a JSON header, saved atomically, loaded with ``weights_only=True``.

Loading never runs code from the file: ``torch.load(weights_only=True)`` only rebuilds tensors, numbers,
strings and plain containers, and refuses any other pickled object (a crafted ``__reduce__`` payload is
refused before it can run). Every defect becomes an :class:`AdvcamError` naming the file.
"""
from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from advcam.utils.errors import AdvcamError
from advcam.utils.io import atomic_path, check_free_space

FORMAT = "advcam-checkpoint-v1"
ZIP_OVERHEAD = 1.1  # torch.save's zip container: a few % over the raw tensor bytes, kept generous


def state_nbytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state: a lower bound of the checkpoint's size on disk."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, Mapping):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


def save_checkpoint(path: str | Path, header: Mapping[str, Any], **state: Any) -> None:
    """Save ``state`` (state dicts, tensors, numbers) with a JSON-able ``header`` (arch, classes, params...).

    Checks first that the file fits on the disk (AdvcamError otherwise), so a full disk fails with a clear
    message instead of a half-written temporary file. The same state gives the same bytes."""
    path = Path(path)
    payload = {"format": FORMAT, "header": json.dumps(dict(header), sort_keys=True), **state}
    check_free_space(path.parent, int(state_nbytes(state) * ZIP_OVERHEAD), f"checkpoint {path.name}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)  # to a file object: the archive's inner names do not depend on the temp name


def _reason(exc: BaseException) -> str:
    """A one-line reason from torch.load's exception (its pickle errors are long and advise unsafe loading)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"(Unsupported (?:global|operand)[^.\n]*?)(?: was not an allowed global| ?\n|\.|$)",
                          text)
        what = f": {found.group(1).strip()}" if found else ""
        return ("refused: the file holds pickled Python objects other than tensors and plain containers"
                f"{what}; advcam never unpickles code, load only checkpoints written by advcam")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"not a PyTorch checkpoint ({type(exc).__name__}: {first})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Return ``(header, state)``; refuses anything that is not an advcam checkpoint, never unpickles code."""
    path = Path(path)
    if path.is_dir():
        raise AdvcamError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise AdvcamError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise AdvcamError(f"{path}: checkpoint file is empty (0 bytes); delete it and rerun the stage")
    with open(path, "rb") as f:
        first = f.read(1)
    if first != b"\x80" and not zipfile.is_zipfile(path):  # torch.save writes a zip, its legacy format a pickle
        raise AdvcamError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle: text, or another "
                          "format)")
    if torch.device(map_location).type == "cuda" and not torch.cuda.is_available():
        raise AdvcamError(f"{path}: map_location {str(map_location)!r} asks for CUDA, which this machine lacks")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise before the refusal
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # weights-only unpickler raises many types (KeyError for text files, ...)
        raise AdvcamError(f"{path}: {_reason(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AdvcamError(f"{path}: not an advcam checkpoint (no '{FORMAT}' header)")
    try:
        header = json.loads(payload.pop("header"))
    except (KeyError, TypeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise AdvcamError(f"{path}: advcam checkpoint with a damaged header (expected a JSON object)")
    payload.pop("format")
    return header, payload
