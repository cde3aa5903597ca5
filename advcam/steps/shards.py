"""Image shards: split a list for scatter jobs, and gather their per-image files into one folder.

A shard is written ``I/N`` (1-based: ``2/3`` is the second of three). Shard ``I`` of ``N`` holds every
``N``-th id of the list starting at position ``I - 1``, so the shards are disjoint, cover the list, differ in
size by at most one image, and mix images from the whole list (lists sorted by source do not give one shard
all the large images). Every per-image result depends only on its image, so gathering the shards' files gives
the same bytes as one unsharded run.

Gathering hard-links each file into the target folder (a copy where links are not possible, e.g. across
file systems), under a temporary name renamed into place, so a killed gather leaves the shards intact and
never a partial file.

Work folders (``ADVCAM_WORK_DIR``, set by the workflow's rules): Snakemake deletes a job's outputs before it
runs it (and after it fails), and DVC deletes a stage's outputs before it reproduces it, so per-image work
written straight into a declared output folder is lost when a killed job is run again. With
``ADVCAM_WORK_DIR`` set, a stage computes its per-image files in ``$ADVCAM_WORK_DIR/<stage>/<key>/`` instead,
``<key>`` being a hash of the params record the files depend on (so a folder only ever holds files of one
record, and shards running at the same time share it safely), then publishes them into its declared output
by :func:`publish` (hard links). A rerun finds the finished files there and computes only the rest. When the
stage's final (gather) job has written all its outputs, :func:`discard_work` removes the stage's work folders of
other records and keeps this one's (hard links of the outputs), so a job that Snakemake or DVC runs again with the
same record (an upstream file or an unrelated param changed) computes only images it has no file for. The work
root holds a ``.gitignore`` of ``*``, so git never sees it; it is outside every DVC output; deleting it only costs
recomputation.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from advcam.data import map_ids as map_ids_of
from advcam.utils.errors import AdvcamError
from advcam.utils.io import clean_stale_temps, link_or_copy, read_json, write_json, write_text
from advcam.utils.progress import log

T = TypeVar("T")
_SHARD = re.compile(r"^\s*(\d+)\s*(?:/|-of-)\s*(\d+)\s*$")
WORK_ENV = "ADVCAM_WORK_DIR"
FINGERPRINT = ".advcam-params.json"  # a per-image folder's params record


def map_ids(stage: str, info: Any, data: Path, shard: tuple[int, int] | None, gather: Sequence[Path]) -> list[str]:
    """The images of a per-image stage (the infer list, then the seg list's other images:
    :func:`advcam.data.map_ids`), after checking that the infer list is not empty and that ``--shard`` and
    ``--gather`` are not both given."""
    ids = map_ids_of(info.lists)
    if not info.lists.get("infer"):
        raise AdvcamError(f"{data}: the infer list is empty")
    if shard is not None and gather:
        raise AdvcamError(f"{stage}: --shard and --gather exclude each other")
    return ids


def invalidate_if_changed(out: Path, fingerprint: dict, ids: list[str], suffix: str,
                          check: Callable[[], Any] | None = None) -> None:
    """Remove ``out/<id><suffix>`` when ``out`` was filled with another fingerprint; record the new one.

    ``check()`` runs before anything is removed (e.g. the new classifier loads): a bad input raises there and
    costs none of the old files."""
    path = out / FINGERPRINT
    try:
        old = read_json(path) if path.is_file() else None
    except AdvcamError:
        old = {"unreadable": str(path)}
    if old is not None and old != fingerprint:
        stale = [out / f"{i}{suffix}" for i in ids if (out / f"{i}{suffix}").exists()]
        if stale and check is not None:
            check()
        log.warning("%s: params or inputs changed since its files were written; recomputing %d file(s)",
                    out, len(stale))
        for p in stale:
            p.unlink()
    if old != fingerprint:
        write_json(path, fingerprint)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (or Snakemake's ``"I-of-N"``) -> ``(I, N)`` with ``1 <= I <= N``."""
    m = _SHARD.match(str(text))
    if not m:
        raise AdvcamError(f"--shard: expected I/N (e.g. 2/3), got {text!r}")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 1 <= index <= count:
        raise AdvcamError(f"--shard {text}: I must be in 1..N and N >= 1")
    return index, count


def shard_items(items: Sequence[T], index: int, count: int) -> list[T]:
    """The items of shard ``index`` (1-based) of ``count``: every ``count``-th item from ``index - 1``."""
    if count < 1 or not 1 <= index <= count:
        raise AdvcamError(f"shard {index}/{count}: I must be in 1..N and N >= 1")
    return list(items[index - 1::count])


def split(items: Sequence[T], count: int) -> list[list[T]]:
    """All ``count`` shards of ``items`` (some may be empty when there are fewer items than shards)."""
    return [shard_items(items, i, count) for i in range(1, count + 1)]


def gather(shards: Sequence[Path], ids: Sequence[str], suffix: str, out: Path,
           is_valid: Callable[[Path, str], bool], fingerprint: dict | None, what: str) -> int:
    """Link ``<shard>/<id><suffix>`` of shard ``k`` (the ``k``-th of ``len(shards)``) into ``out``.

    Each shard folder must hold every id of its shard (as :func:`shard_items` assigns them), unless ``out``
    already has a valid file for it; when ``fingerprint`` is given, each shard's ``.advcam-params.json``
    must equal it (shards computed with other params or inputs are never mixed in). Returns the number of
    files linked; raises AdvcamError naming the shard folder and the first missing image, before linking any."""
    todo: list[tuple[Path, Path]] = []
    n = len(shards)
    for k, folder in enumerate(shards, start=1):  # every shard is checked before anything is linked
        folder = Path(folder)
        if not folder.is_dir():
            raise AdvcamError(f"{what}: shard folder {folder} not found (shard {k} of {n})")
        if fingerprint is not None:
            record = folder / FINGERPRINT
            got = read_json(record) if record.is_file() else None
            if got != fingerprint:
                raise AdvcamError(f"{what}: shard folder {folder} was computed with other params or inputs "
                                  f"({record} differs from this run's); recompute that shard")
        for image_id in shard_items(ids, k, n):
            src, dst = folder / f"{image_id}{suffix}", out / f"{image_id}{suffix}"
            if src.is_file() and is_valid(src, image_id):
                todo.append((src, dst))
            elif not is_valid(dst, image_id):
                raise AdvcamError(f"{what}: image {image_id}: {src} is missing or invalid (shard {k} of the {n} "
                                  f"folder(s) given to gather); recompute that shard, or give every shard's folder")
    for src, dst in todo:
        link_or_copy(src, dst)
    return len(todo)


def work_key(record: dict) -> str:
    """The name of the work folder of ``record``: a hash of its canonical JSON."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def work_folder(stage: str, record: dict) -> Path | None:
    """``$ADVCAM_WORK_DIR/<stage>/<key of record>`` (created), or None when ``ADVCAM_WORK_DIR`` is unset."""
    root = os.environ.get(WORK_ENV, "").strip()
    if not root:
        return None
    root_path = Path(root)
    folder = root_path / stage / work_key(record)
    folder.mkdir(parents=True, exist_ok=True)
    ignore = root_path / ".gitignore"
    if not ignore.is_file():
        write_text(ignore, "# advcam's resumable per-image work (advcam/steps/shards.py); never committed\n*\n")
    return folder


def publish(work: Path, out: Path, names: Sequence[str]) -> None:
    """Link ``work/<name>`` into ``out/<name>`` for each name, in order (atomically, a copy where links fail).
    Callers list the params record last, so ``out`` never holds a record newer than its files."""
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    for name in names:
        src = work / name
        if not src.is_file():
            raise AdvcamError(f"{work}: {name} is missing from the work folder; run the stage again")
        link_or_copy(src, out / name)


def discard_work(stage: str, keep: dict | None = None) -> int:
    """Remove the work folders of ``$ADVCAM_WORK_DIR/<stage>`` except the one of the record ``keep``; return how
    many were removed. Called when the stage's final job has written all its outputs. The kept folder's files
    are hard links of the outputs (no extra disk space until DVC replaces the outputs by copies from its
    cache), and a later run with the same record finds them there: after Snakemake or DVC deleted the outputs
    to run the job again (because an upstream file or an unrelated param changed), only images without a file
    are computed. A no-op without ``ADVCAM_WORK_DIR``."""
    root = os.environ.get(WORK_ENV, "").strip()
    folder = Path(root) / stage if root else None
    if folder is None or not folder.is_dir():
        return 0
    kept = work_key(keep) if keep is not None else None
    removed = 0
    for sub in folder.iterdir():
        if sub.name != kept:
            shutil.rmtree(sub) if sub.is_dir() else sub.unlink()
            removed += 1
    return removed
