"""Checkpoints: plain state dicts + a JSON header, saved atomically, loaded with ``weights_only=True``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from advcam.utils.errors import AdvcamError
from advcam.utils.io import atomic_path

FORMAT = "advcam-checkpoint-v1"


def save_checkpoint(path: str | Path, header: Mapping[str, Any], **state: Any) -> None:
    """Save ``state`` (state dicts, tensors, numbers) with a JSON-able ``header`` (arch, classes, params...)."""
    payload = {"format": FORMAT, "header": json.dumps(dict(header), sort_keys=True), **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Return ``(header, state)``; refuses anything that is not an advcam checkpoint, never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise AdvcamError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # weights-only unpickler raises many types (KeyError for text files, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdvcamError(f"{path}: not a loadable advcam checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AdvcamError(f"{path}: not an advcam checkpoint (no '{FORMAT}' header)")
    header = json.loads(payload.pop("header"))
    payload.pop("format")
    return header, payload
