"""Shared training-loop pieces: SGD param groups, poly LR, seeded data order, resume files, CSV curves.

:func:`fit` runs the epochs of both training stages. After every epoch it writes ``<out>.resume.pt`` (model,
optimizer, finished epochs, RNG states, curve so far, a fingerprint of the params) and the curves CSV, both
atomically. A run that is killed and started again continues from the last finished epoch and ends with the
same weights as an uninterrupted run (on CPU): the data order and the augmentation of epoch ``e`` depend only
on ``(seed, e)``, and the global RNG states are restored.

Data-parallel training: under ``torchrun`` (``WORLD_SIZE`` > 1), :func:`fit` joins the process group (gloo on
CPU, nccl on CUDA, one GPU per process by ``LOCAL_RANK``), wraps the loss in ``DistributedDataParallel`` and
makes BatchNorm layers that train use the statistics of the whole global batch. Every process draws the same
global batches (``batch_size`` is the global batch) and works on its own contiguous slice of each, so N
processes follow the loss curve of one process within float tolerance (the same maths for losses that
average over images, as the classifier's; a loss that is a sum over pixels divided by their count, as the
segmenter's (``SumOverCount``), is divided by the count over all processes). Rank 0 writes the curves and the resume
file. The EADER trainer has its own loop and does not use this (it trains unsharded in every process).
"""
from __future__ import annotations

import csv
import gc
import io
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from advcam.train import live
from advcam.train.distributed import GlobalBatchSlices, data_parallel, global_loss, join_process_group, world
from advcam.utils.checkpoint import ZIP_OVERHEAD, load_checkpoint, save_checkpoint, state_nbytes
from advcam.utils.errors import AdvcamError
from advcam.utils.io import check_free_space, write_text
from advcam.utils.progress import log, progress

POLY_POWER = 0.9  # IRN / DeepLab poly schedule: lr = base * (1 - step / max_step) ** 0.9
HEAD_LR_MULT = 10.0  # IRN: the newly added layer trains with 10x the backbone lr
CURVE_COLUMNS = ("epoch", "step", "loss", "lr")
DIVERGENCE_FACTOR = 10.0  # epochs whose mean loss is this many times the first step's: training diverged


def poly_lr(base_lr: float, step: int, max_step: int, power: float = POLY_POWER) -> float:
    """The poly schedule at ``step`` (0-based) of ``max_step``."""
    return base_lr * (1.0 - min(step, max_step) / max(max_step, 1)) ** power


def make_sgd(groups: tuple[Sequence[nn.Parameter], Sequence[nn.Parameter]], lr: float, weight_decay: float,
             momentum: float, head_mult: float = HEAD_LR_MULT) -> torch.optim.SGD:
    """SGD with (backbone, head) groups; the head gets ``head_mult`` x the lr (stored as ``lr_mult``)."""
    backbone, head = groups
    return torch.optim.SGD([{"params": list(backbone), "lr": lr, "lr_mult": 1.0},
                            {"params": list(head), "lr": lr * head_mult, "lr_mult": head_mult}],
                           lr=lr, momentum=momentum, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every group's lr to ``lr_mult * lr``; return ``lr`` (the base, backbone lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr


def set_poly_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, max_step: int, every: int = 1) -> float:
    """Set every group's lr to ``lr_mult * poly_lr(...)`` of the last step that is a multiple of ``every``
    (deeplab-pytorch's ``PolynomialLR(step_size=10)`` holds the rate between updates); return the base lr."""
    return set_lr(optimizer, poly_lr(base_lr, step - step % every, max_step))


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``n`` items in ``epoch``: a permutation that depends only on ``(seed, epoch)``.

    The two 64-bit draws before the permutation keep the order of advcam's earlier releases, and so every
    number measured with them: their loader drew the permutation from its generator after the base seeds of
    two iterators (the progress bar's tqdm.auto opened every loader twice, see :mod:`advcam.utils.progress`)."""
    generator = _epoch_generator(seed, epoch)
    for _ in range(2):
        torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(n, generator=generator).tolist()


def epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, workers: int = 0,
                 drop_last: bool | None = None) -> DataLoader:
    """A shuffled loader whose batches depend only on ``(seed, epoch)`` (:func:`epoch_order`), not on
    ``workers`` or on how often it is iterated. ``drop_last`` None drops the last partial batch (IRN, SEAM)
    unless the dataset is smaller than one batch; False keeps it (EADER's loader). In distributed training,
    this process's slices of the same global batches (:class:`GlobalBatchSlices`)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)  # type: ignore[attr-defined]
    n = len(dataset)  # type: ignore[arg-type]
    rank, size = world()
    drop = n >= batch_size if drop_last is None else bool(drop_last)
    sampler = GlobalBatchSlices(epoch_order(n, seed, epoch), batch_size, drop, rank, size)
    # The generator seeds the worker processes' RNGs, so loading never draws from the global one.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=False,
                      generator=_epoch_generator(seed, epoch))


def rng_state() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch) as tensors, so ``weights_only`` loading accepts them."""
    version, py_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    return {"python": torch.tensor(py_state, dtype=torch.int64), "python_version": version,
            "python_gauss": gauss, "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
            "numpy_gauss": [int(has_gauss), float(cached)], "torch": torch.get_rng_state()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"]), state["python_gauss"]))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])


def write_curves(path: Path, rows: Iterable[Sequence[float]]) -> None:
    """Write the training curve CSV (epoch, step, loss, lr) atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CURVE_COLUMNS)
    for epoch, step, loss, lr in rows:
        writer.writerow([int(epoch), int(step), f"{loss:.6f}", f"{lr:.8g}"])
    write_text(path, buf.getvalue())
    live.log_curves(path, rows)  # dvclive mirror for `dvc plots` (a no-op without dvclive)


def resume_path_for(out: Path) -> Path:
    return out.with_name(out.name + ".resume.pt")


def read_resume(path: Path, fingerprint: Mapping[str, Any]) -> dict | None:
    """The state of a resume file written with the same fingerprint; None (logged) when absent, unreadable
    or written with other params or data."""
    if not path.is_file():
        return None
    try:
        header, state = load_checkpoint(path)
    except AdvcamError as exc:
        log.warning("ignoring unreadable resume file (%s)", exc)
        return None
    if header.get("kind") != "resume" or header.get("fingerprint") != dict(fingerprint):
        log.info("ignoring resume file %s: written with different params; training from scratch", path)
        return None
    return state


def _try_resume(path: Path, fingerprint: Mapping[str, Any], model: nn.Module,
                optimizer: torch.optim.Optimizer) -> tuple[int, list[list[float]]]:
    """Restore a resume file written with the same fingerprint; return (finished epochs, curve rows)."""
    state = read_resume(path, fingerprint)
    if state is None:
        return 0, []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    epoch = int(state["epoch"])
    log.info("resuming from %s after epoch %d", path, epoch)
    return epoch, [list(r) for r in state["curve"]]


def check_checkpoint_space(model: nn.Module, optimizer: torch.optim.Optimizer, resume: Path, desc: str) -> int:
    """Fail before training when its checkpoints will not fit on the disk (AdvcamError naming the folder and both
    sizes): the resume file (weights + one optimizer buffer per parameter), its next version written beside it
    before the rename, and the final checkpoint. Returns the bytes needed."""
    weights = state_nbytes(model.state_dict())
    buffers = sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])
    need = int((2 * (weights + buffers) + weights) * ZIP_OVERHEAD)
    out = resume.name[:-len(".resume.pt")] if resume.name.endswith(".resume.pt") else resume.name
    check_free_space(resume.parent, need, f"{desc}: the checkpoints of {out} (resume file and final weights)")
    return need


def epoch_mean_loss(rows: Sequence[Sequence[float]], epoch: int) -> float | None:
    """The mean loss of epoch ``epoch`` (1-based) in curve rows ``[epoch, step, loss, lr]``; None if it has none."""
    values = [float(r[2]) for r in rows if int(r[0]) == epoch]
    return sum(values) / len(values) if values else None


def diverging(rows: Sequence[Sequence[float]], epoch: int, last: bool,
              factor: float = DIVERGENCE_FACTOR) -> tuple[float, float] | None:
    """``(epoch's mean loss, first loss)`` when the curve rows (``[epoch, step, loss, lr]``) up to epoch ``epoch``
    show a diverging run, else None: the epoch's mean loss is more than ``factor`` times the run's first loss (the
    untrained model's), and so was the epoch before (a run that recovers from one bad epoch is not judged) unless
    ``epoch`` is the ``last``. A non-finite loss stops training anyway; a first loss that is not positive gives
    no scale and is not judged."""
    first = float(rows[0][2]) if rows else float("nan")
    if not first > 0:
        return None
    now, before = epoch_mean_loss(rows, epoch), epoch_mean_loss(rows, epoch - 1)
    high = lambda m: m is not None and np.isfinite(m) and m > factor * first  # noqa: E731
    return (float(now), first) if high(now) and (last or high(before)) else None  # type: ignore[arg-type]


def warn_if_diverging(desc: str, rows: Sequence[Sequence[float]], epoch: int, last: bool,
                      hint: str = "lower the learning rate, or check the pretrained weights") -> bool:
    """Log a warning (and return True) when :func:`diverging` says so at epoch ``epoch``."""
    found = diverging(rows, epoch, last)
    if found is None:
        return False
    now, first = found
    log.warning("%s: the mean loss of epoch %d is %.4g, %.0fx the first step's %.4g: training diverged; %s",
                desc, epoch, now, now / first, first, hint)
    return True


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, loader_for_epoch: Callable[[int], DataLoader],
        loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor], *, epochs: int, base_lr: float,
        resume: Path, curves: Path, fingerprint: Mapping[str, Any], desc: str,
        lr_every: int = 1) -> list[list[float]]:
    """Train ``epochs`` epochs (resuming from ``resume`` if it fits); return the curve rows. The poly learning
    rate is recomputed every ``lr_every`` steps (:func:`set_poly_lr`). An epoch whose mean loss is far above the
    run's first loss is reported once (:func:`warn_if_diverging`); a non-finite loss stops training.

    ``loss_fn(model, batch)`` returns the scalar loss of one batch. The caller saves the final checkpoint and
    then calls :func:`finish` to delete the resume file. Before the first epoch it checks that the checkpoints
    will fit on the disk (:func:`check_checkpoint_space`), so a full disk fails in seconds, not after an epoch.
    """
    check_checkpoint_space(model, optimizer, resume, desc)
    distributed = join_process_group(model)
    steps_per_epoch = len(loader_for_epoch(0))
    if steps_per_epoch == 0:
        raise AdvcamError(f"{desc}: the training list is empty")
    max_step = steps_per_epoch * epochs
    start, rows = _try_resume(resume, fingerprint, model, optimizer)
    rank, size = world()
    step_fn = data_parallel(model, loss_fn) if distributed else None
    loss: torch.Tensor | None = None
    warned = False
    if distributed:
        log.info("%s: process %d of %d (%s), global batch sliced across processes", desc, rank + 1, size,
                 dist.get_backend())
    for epoch in range(start, epochs):
        model.train()
        total, count = 0.0, 0
        bar = progress(loader_for_epoch(epoch), desc=f"{desc} epoch {epoch + 1}/{epochs}", total=steps_per_epoch,
                       unit="batch")
        for i, batch in enumerate(bar):
            step = epoch * steps_per_epoch + i
            lr = set_poly_lr(optimizer, base_lr, step, max_step, lr_every)
            if step_fn is None:
                loss = loss_fn(model, batch)
                value = loss.item()
            else:
                loss, value = global_loss(step_fn, batch, size)
            if not np.isfinite(value):
                raise AdvcamError(f"{desc}: loss became {value} at epoch {epoch + 1}, step {step + 1}; "
                                  f"lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + value, count + 1
            rows.append([epoch + 1, step + 1, value, lr])
            if hasattr(bar, "set_postfix"):
                # refresh=False: shown at the bar's next timed refresh (a forced one per batch fills log files)
                bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{lr:.2e}",  # type: ignore[attr-defined]
                                refresh=False)
        log.info("%s epoch %d/%d: mean loss %.4f", desc, epoch + 1, epochs, total / max(count, 1))
        if not warned and rank == 0:
            warned = warn_if_diverging(desc, rows, epoch + 1, epoch + 1 == epochs)
        if rank == 0:
            save_checkpoint(resume, {"kind": "resume", "fingerprint": dict(fingerprint)}, model=model.state_dict(),
                            optimizer=optimizer.state_dict(), epoch=epoch + 1, rng=rng_state(), curve=rows)
            write_curves(curves, rows)
    if rank == 0:
        write_curves(curves, rows)
        log.info("wrote %s (%d steps)", curves, len(rows))
    if distributed:
        # Release the DDP wrapper (its Reducer holds the process group) before the group goes: a Reducer freed
        # after destroy_process_group joins gloo threads whose peer has exited, and can hang forever.
        step_fn = loss = None
        gc.collect()
        dist.barrier()  # every process has the final weights before any writes or ends
        dist.destroy_process_group()
    return rows


def finish(resume: Path) -> None:
    """Delete the resume file after the final checkpoint is written."""
    resume.unlink(missing_ok=True)
