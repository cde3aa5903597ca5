"""Mirror the training-curve CSVs into dvclive folders, for tools that read dvclive's layout.

Every training loop (classifier, segmenter, affinity network) writes its curve CSV (epoch, step, loss, lr)
through :func:`advcam.train.loop.write_curves`, which calls :func:`log_curves`. That rewrites
``<csv folder>/dvclive/<csv name>/`` from the full curve so far: ``plots/metrics/{loss,lr,epoch}.tsv`` (x = the
training step) and ``metrics.json`` (the last row). A run that resumes therefore ends with the same folder as an
uninterrupted one. The folder is built under a temporary name and renamed into place, so a killed run never
leaves half a folder. Where the folder already holds the first rows of the curve (``.advcam-rows.json`` records
how many and their digest: the previous epoch's write), the new folder is a copy of it with only the new rows
logged; otherwise (a rerun from scratch, a resume from an earlier epoch, another run's folder) it is written from
the whole curve. Logging every row again each epoch cost time that grew with the square of the training
length (9 s an epoch at 9,240 steps, 0.3 s with the copy; a third of a 417-epoch run).

dvclive is optional: without it (or with ``ADVCAM_DVCLIVE=0``) this is a no-op. It is created with
``dvcyaml=None`` and ``save_dvc_exp=False``: dvclive never rewrites ``dvc.yaml`` nor makes experiments itself.
``dvc.yaml`` does not point at these folders: ``dvc plots`` draws the loss and learning-rate curves from the CSVs.

dvclive's ``Live`` also opens the enclosing DVC repository on creation and never closes it (each call leaked
about 100 file descriptors: 60 epochs of a training run would pass the usual limit of 1,024), and, inside a git
repository without DVC, runs ``dvc init`` there and stages its files. The mirror is a file writer only, so it
uses :class:`_FilesOnly`, a ``Live`` that skips both the repository and DVC Studio. It sets each row's step
rather than calling ``next_step``, which rewrites the summary and looks for a VS Code queue on every row: the
whole curve is written again each epoch, so that cost grew with the square of the training length (32 s per
epoch at 3,600 steps).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

log = logging.getLogger("advcam")

ENV_SWITCH = "ADVCAM_DVCLIVE"


def live_dir(curves: str | Path) -> Path:
    """``plots/train_cls.csv`` -> ``plots/dvclive/train_cls``; ``pseudo/.affinity.csv`` -> ``pseudo/dvclive/affinity``."""
    curves = Path(curves)
    return curves.parent / "dvclive" / (curves.stem.lstrip(".") or "curves")


def enabled() -> bool:
    """True when dvclive is importable and not switched off with ``ADVCAM_DVCLIVE=0``."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import dvclive  # noqa: F401
    except ImportError:
        return False
    return True


MARK = ".advcam-rows.json"


def _digest(rows: list[list[float]]) -> str:
    return hashlib.sha256(json.dumps([[float(v) for v in r] for r in rows]).encode()).hexdigest()


def _rows_held(folder: Path, rows: list[list[float]]) -> int:
    """How many first rows of ``rows`` the folder holds (its mark's count, where their digest matches), else 0."""
    try:
        mark = json.loads((folder / MARK).read_text())
        n = int(mark["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return n if 0 < n <= len(rows) and mark.get("digest") == _digest(rows[:n]) else 0


def log_curves(curves: str | Path, rows: Iterable[Sequence[float]]) -> Path | None:
    """Write the dvclive folder of a curve (rows of epoch, step, loss, lr); return it, or None when disabled.

    dvclive failures are logged as warnings and never stop training.
    """
    if not enabled():
        return None
    table = [list(r) for r in rows]
    target = live_dir(curves)
    target.parent.mkdir(parents=True, exist_ok=True)
    held = _rows_held(target, table)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        if held:
            shutil.copytree(target, tmp, dirs_exist_ok=True)
        _write(tmp, table[held:], resume=bool(held))
        (tmp / MARK).write_text(json.dumps({"rows": len(table), "digest": _digest(table)}))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; give it the mode of a normal folder
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as exc:  # a logging side channel: warn, keep training
        log.warning("dvclive: could not write %s (%s: %s)", target, type(exc).__name__, exc)
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@functools.lru_cache(maxsize=None)
def _files_only_live() -> type:
    from dvclive import Live

    class _FilesOnly(Live):  # type: ignore[misc]
        """dvclive's writer of metrics and plots, without a DVC repository or DVC Studio."""

        def _init_dvc(self) -> None:  # Live's opens (or `dvc init`s) the enclosing repository
            pass

        def _init_studio(self) -> None:  # no Studio events: this is not an experiment
            self._studio_events_to_skip.update(("start", "data", "done"))

    return _FilesOnly


def _write(folder: Path, rows: list[list[float]], resume: bool = False) -> None:
    """Log ``rows`` into ``folder``: a new dvclive folder, or (``resume``) after the rows it holds."""
    live = _files_only_live()(dir=str(folder), resume=resume, report=None, save_dvc_exp=False, dvcyaml=None,
                              monitor_system=False)
    try:
        for epoch, step, loss, lr in rows:  # each log_metric appends its row; end() writes the summary once
            live.step = int(step)
            live.log_metric("loss", float(loss))
            live.log_metric("lr", float(lr))
            live.log_metric("epoch", int(epoch))
        if rows:  # a resumed Live's summary holds the folder's old step, which end() would restore
            live.summary["step"] = live.step
    finally:
        live.end()
