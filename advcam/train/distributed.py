"""Data-parallel training under ``torchrun``: process group, global-batch slices, DDP, global BatchNorm.

Used by :func:`advcam.train.loop.fit` (see its module docstring for the contract): every process draws the
same global batches and trains on its contiguous slice of each. A loss that is a mean over images is weighted
by the process's share of the global batch; a loss that is a sum over elements divided by their count (a
:class:`SumOverCount`, e.g. a mean over the labelled pixels) is divided by the count over all processes. Either
way DDP's gradient average is the gradient of the global batch's loss, and the curve is that loss.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Mapping, Sequence, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from advcam.utils.errors import AdvcamError


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the joined process group; ``(0, 1)`` outside distributed training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        raise AdvcamError(f"environment variable WORLD_SIZE is {value!r}: expected a whole number of processes "
                          "(set by torchrun; unset it to run as one process)")
    return int(value)


def refuse_torchrun(stage: str, method: str | None = None) -> None:
    """Stages other than the data-parallel trainings would run whole in every torchrun process, each writing
    the same files (and removing the others' temporaries): refuse them under ``WORLD_SIZE`` > 1."""
    size = launched_size()
    if size <= 1 or stage == "train-seg" or (stage == "train-cls" and method != "eader"):
        return
    what = "EADER's trainer (classifier.method eader)" if stage == "train-cls" else f"advcam {stage}"
    raise AdvcamError(f"{what} runs as one process, but WORLD_SIZE is {size} (torchrun): every process would do "
                      "the whole work and write the same files. Run it without torchrun (cams uses every visible "
                      "GPU itself; workflow.shards splits the images over jobs); train-cls (cam, seam) and "
                      "train-seg train data-parallel under torchrun")


class GlobalBatchSlices(Sampler[list[int]]):
    """Batches of one process: its contiguous slice (sizes differ by at most one) of each global batch.

    The global batches are ``order`` cut into ``batch_size`` pieces (the last partial one dropped when
    ``drop_last``); one process (``size`` 1) gets them whole. The order is fixed when the sampler is made, so
    iterating it again, or from DataLoader worker processes, gives the same batches."""

    def __init__(self, order: Sequence[int], batch_size: int, drop_last: bool, rank: int = 0, size: int = 1) -> None:
        n = len(order)
        if min(batch_size, n) < size:
            raise AdvcamError(f"batch size {min(batch_size, n)} is smaller than the {size} training processes; "
                              f"every process needs at least one image per batch")
        self.order, self.batch_size, self.drop_last = list(order), batch_size, drop_last
        self.rank, self.size = rank, size

    def __len__(self) -> int:
        n = len(self.order)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(len(self)):
            batch = self.order[b * self.batch_size:(b + 1) * self.batch_size]
            yield batch[self.rank * len(batch) // self.size:(self.rank + 1) * len(batch) // self.size]


class AllReduceSum(torch.autograd.Function):
    """A differentiable sum over the processes: the forward all-reduces the tensor, the backward the gradient
    (what ``torch.distributed.nn.functional.all_reduce`` did, which PyTorch deprecates for a private module)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of the global batch over all processes.

    For gloo on CPU, where ``nn.SyncBatchNorm`` is not available; the same parameters, buffers and maths
    (biased variance to normalise, unbiased for the running estimate). The all-reduces are differentiable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
        dist.all_reduce(count)
        mean = AllReduceSum.apply(x.sum((0, 2, 3))) / count
        centred = x - mean[None, :, None, None]
        var = AllReduceSum.apply((centred * centred).sum((0, 2, 3))) / count
        tracked = self.num_batches_tracked
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None \
                and tracked is not None:
            with torch.no_grad():
                tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * count / (count - 1).clamp(min=1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


class SumOverCount:
    """A loss ``sum / max(count, min_count)`` over the elements of a batch (pixels, say), where the number of
    elements differs between images (ignored pixels): :meth:`parts` gives ``(sum, count)``, a call the loss.
    ``sum`` and ``count`` may be vectors, one entry per term of a loss that adds several such means.

    Under DDP, :func:`global_loss` divides each process's sum by the count over **all** processes, so N
    processes train on one process's loss (sum of the per-element losses over all processes / total count), not
    on the mean of the processes' means. ``count`` may be a total weight (a class-weighted mean)."""

    min_count: float = 1.0

    def parts(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        total, count = self.parts(model, batch)
        return (total / count.to(total.dtype).clamp(min=self.min_count)).sum()


class LossStep(nn.Module):
    """``forward(batch) = loss_fn(model, batch)`` (``loss_fn.parts(model, batch)`` for a :class:`SumOverCount`):
    what DDP wraps, so any loss function (one that calls ``model.features`` or ``model.seam_forward`` as well as
    ``model(x)``) runs inside DDP's forward."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.loss_fn, SumOverCount):
            return self.loss_fn.parts(self.model, batch)
        return self.loss_fn(self.model, batch)


def join_process_group(model: nn.Module) -> bool:
    """Under torchrun (``WORLD_SIZE`` > 1): put the model on this process's GPU (``LOCAL_RANK``) when it is
    on CUDA and join the process group (nccl on CUDA, gloo on CPU). False when not distributed."""
    if launched_size() <= 1:
        return False
    if not dist.is_available():
        raise AdvcamError("WORLD_SIZE > 1 (torchrun) but this PyTorch build has no torch.distributed")
    device = next(model.parameters()).device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        model.to(device)  # in place: the optimizer keeps the same parameter objects
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def data_parallel(model: nn.Module, loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]
                  ) -> DistributedDataParallel:
    """DDP around :class:`LossStep`, after making the BatchNorm layers global-batch ones."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the children in place (the root is no BN)
    else:
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = GlobalBatchNorm2d  # same state, global statistics
    return DistributedDataParallel(LossStep(model, loss_fn), device_ids=[device] if device.type == "cuda" else None)


def _batch_len(batch: Any) -> int:
    values = batch.values() if isinstance(batch, Mapping) else batch
    return next(len(v) for v in values if isinstance(v, torch.Tensor))


def global_loss(step: nn.Module, batch: Mapping[str, Any], size: int) -> tuple[torch.Tensor, float]:
    """This process's share of the global batch's loss, scaled so that DDP's gradient average is the gradient of
    the global batch's loss, and that global loss (for the curve).

    A mean over images is weighted by the process's share of the images; a :class:`SumOverCount` loss is this
    process's sum times the number of processes over the count of all processes (for a loss of several terms,
    ``parts`` giving vectors of sums and counts, the sum of those terms)."""
    loss = step(batch)
    if isinstance(loss, tuple):
        total, count = loss
        stats = torch.stack([total.detach(), count.detach().to(total.dtype)])
        dist.all_reduce(stats)
        inner = cast(LossStep, step.module if isinstance(step, DistributedDataParallel) else step)
        if not isinstance(inner.loss_fn, SumOverCount):
            raise TypeError(f"global_loss: a (sum, count) loss needs a SumOverCount, got {inner.loss_fn!r}")
        norm = stats[1].clamp(min=inner.loss_fn.min_count)
        return (total * (size / norm)).sum(), float((stats[0] / norm).sum())
    n = float(_batch_len(batch))
    stats = torch.stack([loss.detach() * n, torch.tensor(n, dtype=loss.dtype, device=loss.device)])
    dist.all_reduce(stats)
    total = float(stats[1])
    weight = n * size / total
    return (loss if weight == 1.0 else loss * weight), float(stats[0]) / total
