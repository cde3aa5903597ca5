"""Atomic, pickle-free file I/O.

Every file a stage writes goes through :func:`atomic_path`: it is written under a temporary name in the same
folder and renamed into place, so a killed run leaves either the whole file or nothing under the real name.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from PIL import Image

from advcam.utils.errors import AdvcamError

TMP_PREFIX = ".tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise AdvcamError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdvcamError(f"{path}: not valid JSON ({exc})") from None


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Write an uncompressed ``.npz`` atomically (object arrays are refused)."""
    for key, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise ValueError(f"save_npz: array {key!r} has dtype object")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_npz(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Load an ``.npz`` without unpickling; name the file on any defect."""
    path = Path(path)
    if not path.is_file():
        raise AdvcamError(f"file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
    except ValueError as exc:  # object arrays need pickle: refused
        raise AdvcamError(f"{path}: refused to load ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise AdvcamError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [k for k in keys if k not in out]
    if missing:
        raise AdvcamError(f"{path}: missing arrays {missing} (has {sorted(out)})")
    return out


def save_png(path: str | Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    """Save a uint8 (H, W) index image (optionally with a palette) or an (H, W, 3) RGB image atomically."""
    img = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        img = img.convert("P") if img.mode != "P" else img
        img.putpalette(palette)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def clean_stale_temps(folder: str | Path) -> int:
    """Remove temporary files a killed run left in ``folder``; return how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.glob(TMP_PREFIX + "*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def dump_params(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)
