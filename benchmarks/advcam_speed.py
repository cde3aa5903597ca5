"""AdvCAM speed: the reference-style loop against ours (with and without the extension), in one run.

Same model (random weights: speed does not depend on training) and the same random images for every variant:

* ``reference``: one class at a time, Grad-CAM through an extra backward, parameter gradients on, the image
  update on the host in numpy (as ``obtain_CAM_masking.py`` does);
* ``ours-extension`` / ``ours-fallback``: :func:`advcam.attribution.advcam.advcam_maps` with the fused ops
  forced to the C++/CUDA extension or to the eager PyTorch composition;
* ``op-fused`` / ``op-eager``: the per-step work outside the network alone (masked L1 forward + backward +
  accumulation + ascent step with clamp) at this configuration's largest scale.

Writes ``benchmarks/results/<device>-<YYYY-MM-DD>.json`` and prints a table. Example (CPU, small)::

    python benchmarks/advcam_speed.py --model resnet_small --size 96 --images 4 --threads 1
    python benchmarks/advcam_speed.py --model resnet50 --size 500x375 --images 4 --device cuda
"""
from __future__ import annotations

import argparse
import datetime
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from advcam.attribution.advcam import advcam_maps, steps_for_scale
from advcam.attribution.cam import resize_image
from advcam.models import build_classifier
from advcam.ops import ascent_step_, masked_l1
from advcam.utils.io import write_json


def reference_climb(model, image: torch.Tensor, classes, steps: int, xi=0.08, lam=7.0, tau=0.5) -> torch.Tensor:
    """The reference loop at one scale (Grad-CAM backward, parameter gradients, host-side update)."""
    dev, out = image.device, []
    for c in classes:
        x_host = torch.stack([image, image.flip(-1)]).cpu().numpy()
        acc = 0.0
        for t in range(steps):
            x = torch.from_numpy(x_host).to(dev).requires_grad_(True)
            fmaps = model.features(x)
            logits = F.conv2d(fmaps, model.classifier.weight)
            score = F.relu(logits).sum((2, 3))
            model.zero_grad()
            grads, = torch.autograd.grad(score[:, c].sum(), fmaps, retain_graph=True)
            weights = grads.sum((2, 3), keepdim=True) / ((grads > 0).sum() + 1e-12)
            gcam = F.relu((fmaps * weights).sum(1, keepdim=True))
            regions = gcam[0] + gcam[1].flip(-1)
            if t == 0:
                init = regions.detach()
            acc = acc + regions[0].detach().cpu()
            logit = F.relu(logits).mean((2, 3))
            mask = (regions.detach() / regions.detach().max() > tau).to(regions.dtype)
            loss = 2 * logit[:, c].sum() - logit.sum() - lam * (torch.abs(regions - init) * mask).sum()
            model.zero_grad()
            loss.backward()
            g = x.grad.cpu().numpy()
            upd = x_host + xi * g / (np.abs(g).max() + 1e-12)
            x_host = np.clip(upd, x_host.min(), x_host.max()).astype(x_host.dtype)
        out.append(acc)
    return torch.stack(out)


def reference_maps(model, image, classes, scales, steps):
    return [reference_climb(model, resize_image(image, s), classes, steps_for_scale(steps, s)) for s in scales]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, reps: int = 1) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) / reps, out


def device_name(device: torch.device) -> str:
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


def parse_size(text: str) -> tuple[int, int]:
    """``96`` or ``WxH`` (``500x375``: width 500, height 375, as image sizes are usually written)."""
    if "x" in text:
        w, h = (int(v) for v in text.lower().split("x"))
        return h, w
    return int(text), int(text)


def op_benchmark(device, dtype, n, feat, image_hw, reps):
    """Per-step fused ops vs the eager composition at one scale: returns seconds per step for both."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand((n, *feat), generator=g).to(device, dtype)
    a0 = (a + 0.1 * torch.randn((n, *feat), generator=g).to(device, dtype)).clamp_min(0)
    x = torch.randn((n, 2, 3, *image_hw), generator=g).to(device, dtype)
    grad = torch.randn_like(x)
    res = {}
    for backend in ("extension", "fallback"):
        acc = torch.zeros_like(a)
        xx = x.clone()

        def step():
            aa = a.clone().requires_grad_(True)
            loss = masked_l1(aa, a0, 0.5, acc=acc, backend=backend)
            (ga,) = torch.autograd.grad(loss.sum(), aa)
            ascent_step_(xx.view(n, -1), grad.view(n, -1), 0.08, backend=backend)
            return ga

        step()
        res[backend], _ = timed(step, device, reps)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet_small", choices=["resnet_small", "resnet50"])
    ap.add_argument("--size", default="96", help="image size: N or WxH (e.g. 500x375)")
    ap.add_argument("--scales", default="1.0,0.5,1.5,2.0")
    ap.add_argument("--steps", type=int, default=27)
    ap.add_argument("--images", type=int, default=4, help="images; classes per image alternate 1, 2 (1.5 on average)")
    ap.add_argument("--num-classes", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--skip-reference", action="store_true", help="skip the (slow) reference-style loop")
    ap.add_argument("--op-reps", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    scales = [float(s) for s in args.scales.split(",")]
    hw = parse_size(args.size)
    torch.manual_seed(0)
    model = build_classifier(args.model, args.num_classes).to(device).eval()
    images = [torch.randn(3, *hw, device=device) for _ in range(args.images)]
    classes = [[i % args.num_classes] if i % 2 == 0 else [(i + 1) % args.num_classes, (i + 5) % args.num_classes]
               for i in range(args.images)]
    n_cls = sum(len(c) for c in classes)
    cfg = {"scales": scales, "flip": True, "advcam": {"steps": args.steps}}

    rows: dict[str, dict] = {}
    first: dict[str, list] = {}
    variants = [("ours-extension", "extension"), ("ours-fallback", "fallback")]
    for name, backend in variants:
        run_cfg = {**cfg, "advcam": {**cfg["advcam"], "backend": backend}}
        warm = {**run_cfg, "scales": [scales[0]], "advcam": {**run_cfg["advcam"], "steps": 2}}
        advcam_maps(model, images[0], classes[0], warm)  # builds/loads the extension, warms up the allocator
        secs, out = timed(lambda: [advcam_maps(model, im, c, run_cfg) for im, c in zip(images, classes)], device)
        rows[name] = {"s_per_image": secs / len(images), "s_per_class": secs / n_cls}
        first[name] = out[0]
    if not args.skip_reference:
        secs, out = timed(lambda: [reference_maps(model, im, c, scales, args.steps) for im, c in zip(images, classes)],
                          device)
        rows["reference"] = {"s_per_image": secs / len(images), "s_per_class": secs / n_cls}
        err = max(float((o.cpu() - r).abs().max() / r.abs().max().clamp_min(1e-30))
                  for o, r in zip(first["ours-extension"], out[0]))
        rows["reference"]["max_rel_diff_vs_ours_fp32"] = err
        for name in ("ours-extension", "ours-fallback"):
            rows[name]["speedup_vs_reference"] = rows["reference"]["s_per_image"] / rows[name]["s_per_image"]

    big = max(scales)
    big_hw = tuple(max(1, round(v * big)) for v in hw)
    with torch.no_grad():
        feat = tuple(model.cam(torch.zeros(1, 3, *big_hw, device=device)).shape[-2:])
    ops = op_benchmark(device, torch.float32, 2, feat, big_hw, args.op_reps)
    rows["op-fused"] = {"s_per_step": ops["extension"], "shape_maps": [2, *feat], "shape_images": [2, 2, 3, *big_hw]}
    rows["op-eager"] = {"s_per_step": ops["fallback"], "speedup_fused": ops["fallback"] / ops["extension"]}

    result = {"device": device_name(device), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "model": args.model, "size_hw": list(hw), "scales": scales,
              "steps": args.steps, "images": args.images, "classes_per_image": n_cls / len(images),
              "note": "wall-clock on a possibly shared machine; random weights and images", "results": rows}
    out = Path(args.out) / f"{result['device']}-{result['date']}.json"
    write_json(out, result)

    print(f"{result['device']}  {args.model}  {hw[0]}x{hw[1]}  scales {scales}  steps {args.steps}  "
          f"{args.images} images ({n_cls / len(images):.2f} classes/image)  threads {result['threads']}")
    print(f"{'variant':<16}{'time':>14}  notes")
    for name, r in rows.items():
        if "s_per_image" in r:
            note = f"{r['s_per_class']:.3f} s/class"
            if "speedup_vs_reference" in r:
                note += f", {r['speedup_vs_reference']:.1f}x vs reference"
            if "max_rel_diff_vs_ours_fp32" in r:
                note += f", max rel diff vs ours (fp32 drift) {r['max_rel_diff_vs_ours_fp32']:.1e}"
            print(f"{name:<16}{r['s_per_image']:>10.3f} s/im  {note}")
        else:
            note = (f"fused op is {r['speedup_fused']:.2f}x as fast" if "speedup_fused" in r
                    else f"maps {r['shape_maps']}")
            print(f"{name:<16}{r['s_per_step'] * 1e6:>10.1f} us/st  {note}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
