"""Device selection and seeding."""
from __future__ import annotations

import contextlib
import platform
import random
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from advcam.utils.errors import AdvcamError


def resolve_device(name: str = "auto") -> torch.device:
    """The ``device`` param as a torch device: ``auto`` is CUDA where available, else the CPU; ``cuda`` on a
    machine without CUDA is an AdvcamError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AdvcamError("device: cuda requested but this PyTorch build sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators (CPU and every CUDA device) with ``seed``, and
    nothing else (no deterministic-algorithm switches: docs/reliability.md, Determinism)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of ``module``'s trainable parameters for the duration (restored after)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the duration; each submodule's own mode is restored after (also on an
    error), so a model in training keeps its BatchNorm statistics and its mode."""
    training = [m for m in module.modules() if m.training]
    module.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True  # not m.train(), which would set every child too


def native_bf16(device: torch.device, cpuinfo: str | None = None) -> bool | None:
    """Whether ``device`` computes bf16 in hardware: the GPU's own answer on CUDA; on a Linux CPU, whether it
    has AMX-BF16 or AVX512-BF16 (elsewhere bf16 convolutions are emulated and slower than float32); ``None``
    where this cannot be told (a CPU without ``/proc/cpuinfo``). ``cpuinfo``: its text, to check another CPU's."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return None
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", cpuinfo))


def device_name(device: torch.device) -> str:
    """A file-name-safe label of the hardware: ``cuda-<GPU name>`` or ``cpu-<CPU model name>`` (benchmarks)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "unknown"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
        except OSError:
            pass
    return f"{device.type}-" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown")
