"""Atomic, pickle-free file I/O, and the free-space check.

Every file a stage writes goes through :func:`atomic_path`: it is written under a temporary name in the same
folder, flushed to disk (``fsync``) and renamed into place, so a killed run (or a crashed machine) leaves
either the whole file or nothing under the real name. What a killed run leaves is a ``.tmp-<name>.*`` file,
which :func:`clean_stale_temps` / :func:`clean_stale_temps_for` remove. :func:`sole_writer` keeps a second process
from writing into (and cleaning) a folder that one is writing into. :func:`check_free_space` lets a stage fail
early, with a clear message, when its outputs will not fit on the disk.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from advcam.utils.errors import AdvcamError
from advcam.utils.progress import progress

TMP_PREFIX = ".tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync(path: Path) -> None:
    """Flush a file's data to the disk, so that the rename never publishes a file whose data is lost."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on failure remove it.

    ``durable`` (default) fsyncs the written file before the rename, so even a power cut cannot leave an
    empty or partial file under the real name (a SIGKILL cannot either way)."""
    path = Path(path)
    if path.is_dir():
        raise AdvcamError(f"{path}: is a folder, but a file is to be written there; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def sole_writer(folder: str | Path, what: str) -> Iterator[Path]:
    """Create ``folder`` and hold an exclusive ``flock`` on the folder itself while the block runs.

    A second advcam process that would write into the same folder (e.g. two ``advcam cams`` runs with one
    ``--out``) is refused with a message instead of removing the first one's temporary files as stale. The
    lock is on the directory, so no file is added to the output; it dies with its process, also by SIGKILL.
    Where the file system has no ``flock`` (Windows, some network mounts) the block runs unguarded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield folder
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AdvcamError(f"{what}: another process is writing into {folder} now; wait for it to finish, or "
                              "give this run another output folder") from None
        except OSError:  # a file system without flock: unguarded
            pass
        yield folder
    finally:
        os.close(fd)  # releases the lock


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
            np.savez(f, **arrays)  # type: ignore[arg-type]  # the stub matches **arrays against allow_pickle


def load_npz(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Load an ``.npz`` without unpickling; name the file on any defect."""
    path = Path(path)
    if not path.is_file():
        raise AdvcamError(f"file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
            raise AdvcamError(f"{path}: not an .npz archive (a single .npy array); expected named arrays")
        with data:
            out = {k: data[k] for k in data.files}
    except ValueError as exc:  # object arrays / pickled data need the unpickler: refused, never executed
        raise AdvcamError(f"{path}: refused to load: it holds pickled Python objects ({exc}); advcam never "
                          "unpickles, write arrays of numbers only") from None
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


def temp_target(name: str, names: set[str]) -> str | None:
    """The output name (one of ``names``) that the temporary file name ``name`` was written for, or None."""
    if not name.startswith(TMP_PREFIX):
        return None
    rest = name[len(TMP_PREFIX):]
    for i, ch in enumerate(rest):
        if ch == "." and rest[:i] in names:
            return rest[:i]
    return None


def clean_stale_temps(folder: str | Path, names: Iterable[str] | None = None) -> int:
    """Remove temporary files a killed run left in ``folder``; return how many.

    With ``names``, only the temporaries of those output names: safe while other jobs write other files into
    the same folder (shards sharing a work folder). One listing of the folder either way."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    only = None if names is None else set(names)
    n = 0
    for p in folder.glob(TMP_PREFIX + "*"):
        if p.is_file() and (only is None or temp_target(p.name, only) is not None):
            p.unlink(missing_ok=True)
            n += 1
    return n


def clean_stale_temps_for(paths: Iterable[str | Path]) -> int:
    """Remove the temporary files a killed run left for these output ``paths`` only; return how many.

    Unlike :func:`clean_stale_temps` it leaves other writers' temporaries in the same folder alone (safe when
    several jobs write into one folder, e.g. shards of a stage or two trainings writing into ``models/``)."""
    n = 0
    for path in paths:
        path = Path(path)
        if not path.parent.is_dir():
            continue
        for p in path.parent.glob(glob.escape(f"{TMP_PREFIX}{path.name}.") + "*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


DISK_MARGIN = 64 * 1024**2  # kept free on top of what a stage needs (logs, temporaries of other jobs)


def check_free_space(folder: str | Path, needed_bytes: int, what: str, margin: int = DISK_MARGIN) -> int:
    """Fail early when ``folder``'s file system has less than ``needed_bytes + margin`` free; return the free bytes.

    ``folder`` need not exist yet (its nearest existing parent is checked). ``what`` names the outputs in the
    message, e.g. ``"cams: 1,464 CAM files"``. A file system whose free space cannot be read is not refused."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return -1
    need = max(int(needed_bytes), 0)
    if free < need + margin:
        raise AdvcamError(f"not enough free disk space for {what} in {folder}: needs about {human_bytes(need)} "
                          f"(+{human_bytes(margin)} margin), only {human_bytes(free)} free on {probe}; "
                          "free some space or point the output elsewhere")
    return free


def ids_digest(ids: Iterable[str]) -> str:
    """Hash of a list of ids (its order included)."""
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()


def files_digest(paths: Iterable[str | Path], desc: str | None = None) -> str:
    """Content hash of files in order, so a resume file never continues on other inputs; ``desc`` shows a
    progress bar (hashing a VOC list reads every file)."""
    paths = list(paths)
    h = hashlib.sha1()
    for path in progress(paths, desc=desc, unit="file") if desc else paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """Publish ``src`` as ``dst`` atomically: a hard link when possible, else a copy."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # linked by an earlier gather (a rename onto the same file would leave the temporary name)
    with atomic_path(dst, durable=False) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def code_digest(*parts: str, extra: Iterable[str | Path] = ()) -> str:
    """Hash of advcam's Python sources (of the subpackages ``parts``, e.g. ``"attribution"``, or the whole package)
    and the ``extra`` files: part of a fingerprint, so neither a resume file, a remembered training nor a work
    folder outlives a change of the code that made it."""
    package = Path(__file__).resolve().parents[1]
    roots = [package / p for p in parts] if parts else [package]
    files = sorted(f for root in roots for f in root.rglob("*.py"))
    return files_digest([*files, *sorted(Path(f) for f in extra)])
