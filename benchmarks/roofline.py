"""Where AdvCAM's time goes (``advcam_speed.py --roofline``): the device's two ceilings, the FLOPs of the climbing
loop, the parts of one step, and how batching classes scales.

Each works on any device (CUDA events on a GPU, the host clock elsewhere); ``advcam_speed.py`` calls them and
writes what they measure into its result file.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from advcam.attribution.advcam import steps_for_scale
from advcam.attribution.cam import resize_image
from advcam.attribution.graphs import tf32_mode
from advcam.ops import ascent_step_, masked_l1
from advcam.utils.device import frozen


def median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, the host clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return float(np.median(times))


def ceilings(device: torch.device, copy_mib: int = 2048, matmul_n: int = 8192, reps: int = 10) -> dict:
    """The two measured ceilings: device-to-device copy (bytes read + written per second) and bf16 matmul."""
    src = torch.rand(copy_mib * 2**18, device=device)  # float32: copy_mib MiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, reps)
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: a @ b, device, reps)
    return {"copy_bytes": 2 * copy_mib * 2**20, "copy_ms": copy_ms,
            "copy_tb_per_s": 2 * copy_mib * 2**20 / copy_ms / 1e9,
            "matmul_n": matmul_n, "matmul_ms": mm_ms, "bf16_matmul_tflops": 2 * matmul_n**3 / mm_ms / 1e9}


def step_flops(model, hw: tuple[int, int], batch: int, device: torch.device) -> tuple[float, float]:
    """FLOPs of one climbing step's network work at input size ``hw``: (forward, forward + input backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, 3, *hw, device=device)
    with frozen(model):
        with FlopCounterMode(display=False) as fwd:
            with torch.no_grad():
                model.cam(x)
        with FlopCounterMode(display=False) as both:
            xg = x.requires_grad_(True)
            model.cam(xg).sum().backward()  # parameters frozen: the input gradient only
    return float(fwd.get_total_flops()), float(both.get_total_flops())


def loop_flops(model, hw, scales, steps, classes, device) -> float:
    """FLOPs of AdvCAM's network work for images with ``classes`` (lists): per class and scale, ``T - 1``
    forward + input-backward steps and one last forward, on the image and its flip."""
    total = 0.0
    for s in scales:
        shw = tuple(max(1, round(v * s)) for v in hw)
        fwd, both = step_flops(model, shw, 2, device)
        t = steps_for_scale(steps, s)
        total += sum(len(c) for c in classes) * ((t - 1) * both + fwd)
    return total


def step_parts(model, image, n_cls: int, options: dict, device, reps: int = 20) -> dict:
    """Milliseconds of the parts of one climbing step at scale 1 (CUDA events): network forward, input
    backward (forward + backward minus forward), and the fused ops (masked L1 with accumulation, its
    backward, the ascent step)."""
    bf16, cl = options.get("precision") == "bf16", bool(options.get("channels_last"))
    x = torch.stack([image, image.flip(-1)]).repeat(n_cls, 1, 1, 1).contiguous()

    def forward(xx):
        inp = xx.contiguous(memory_format=torch.channels_last) if cl else xx
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            return model.cam(inp).float()

    def fwd_only():
        with torch.no_grad():
            forward(x)

    def fwd_bwd():
        xg = x.detach().requires_grad_(True)
        torch.autograd.grad(forward(xg).sum(), xg)

    with torch.no_grad():
        cams = forward(x)
    a = F.relu(cams[:, 0]).reshape(n_cls, 2, *cams.shape[-2:]).sum(1).contiguous()
    a0, acc = a * 0.9, torch.zeros_like(a)
    g = torch.randn_like(x)

    def ops():
        aa = a.clone().requires_grad_(True)
        loss = masked_l1(aa, a0, 0.5, acc=acc, backend="extension")
        torch.autograd.grad(loss.sum(), aa)
        ascent_step_(x.clone().view(n_cls, -1), g.view(n_cls, -1), 0.08, backend="extension")

    strict = options.get("precision", "fp32") == "tf32" if device.type == "cuda" else None
    with frozen(model), tf32_mode(strict):  # fp32: true float32 on CUDA, as climb() runs it
        f = median_ms(fwd_only, device, reps)
        fb = median_ms(fwd_bwd, device, reps)
        o = median_ms(ops, device, reps)
    return {"forward_ms": f, "input_backward_ms": fb - f, "fused_ops_ms": o, "step_ms": fb + o,
            "batch": list(x.shape)}


def batch_scaling(model, image, scales, options: dict, device, sizes=(1, 2, 4, 8), steps: int = 6) -> dict:
    """Milliseconds per class and step of :func:`climb` when ``n`` climbing images (classes) share a batch:
    how much batching more classes (e.g. of several images of one size) would gain at each scale."""
    from advcam.attribution.advcam import climb

    opts = {k: v for k, v in options.items() if k in ("precision", "channels_last", "cuda_graph")}
    out: dict[str, dict[str, float]] = {}
    for s in scales:
        img = resize_image(image, s)
        out[str(s)] = {str(n): median_ms(lambda: climb(model, img, list(range(n)), steps=steps, **opts), device, 3, 1)
                       / n / steps for n in sizes}
    return out


def op_bytes(n: int, feat, image_hw, itemsize: int = 4) -> int:
    """Fewest bytes one step's fused ops move: masked L1 forward (read a, a0, acc; write acc), backward
    (read a, a0; write the gradient), ascent step (read x and g; write x)."""
    maps, images = n * int(np.prod(feat)), n * 2 * 3 * int(np.prod(image_hw))
    return itemsize * (4 * maps + 3 * maps + 3 * images)
