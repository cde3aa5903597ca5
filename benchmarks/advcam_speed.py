"""AdvCAM speed: the reference-style loop against ours (with and without the extension), in one run.

Same model (random weights: speed does not depend on training) and the same random images for every variant:

* ``reference``: one class at a time, Grad-CAM through an extra backward, parameter gradients on, the image
  update on the host in numpy (as ``obtain_CAM_masking.py`` does);
* ``ours-extension`` / ``ours-fallback``: :func:`advcam.attribution.advcam.advcam_maps` with the fused ops
  forced to the C++/CUDA extension or to the eager PyTorch composition;
* ``ours-bf16``, ``ours-bf16-cl``, ``ours-bf16-cl-fold``, ``ours-fast`` (``--fast-variants``): the speed
  options of ``cam.advcam`` added one at a time (bf16 autocast, channels_last, BatchNorm folding, CUDA graph);
  each reports the correlation of its maps with ``ours-extension``'s;
* ``op-fused`` / ``op-eager``: the per-step work outside the network alone (masked L1 forward + backward +
  accumulation + ascent step with clamp) at this configuration's largest scale, with the bytes it must move.

On CUDA (``--roofline``) the run also measures the two ceilings (a large device-to-device copy; a large bf16
matrix product), counts the FLOPs of the climbing loop (``FlopCounterMode``: forward and input backward per
step), times the parts of one step at scale 1 with CUDA events, and reports each variant's achieved TFLOP/s
as a fraction of the measured matrix ceiling and its projected time for VOC train_aug (10,582 images); those
measurements are in ``roofline.py``.
Each variant is warmed up on one whole image first (cuDNN autotuning, extension load).

Writes ``benchmarks/results/<device>-<YYYY-MM-DD>.json`` and prints a table. Example (CPU, small)::

    python benchmarks/advcam_speed.py --model resnet_small --size 96 --images 4 --threads 1
    python benchmarks/advcam_speed.py --model resnet50 --size 500x375 --images 4 --device cuda \
        --fast-variants --roofline --reference-images 2
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from advcam.attribution.advcam import advcam_maps, advcam_maps_images, prepare_model, steps_for_scale
from advcam.attribution.cam import resize_image
from advcam.models import build_classifier
from advcam.ops import ascent_step_, masked_l1
from advcam.utils.device import device_name
from advcam.utils.io import write_json
from advcam.utils.progress import progress
from roofline import batch_scaling, ceilings, loop_flops, median_ms, op_bytes, step_parts


def reference_climb(model, image: torch.Tensor, classes, steps: int, xi=0.08, lam=7.0, tau=0.5) -> torch.Tensor:
    """The reference loop at one scale (Grad-CAM backward, parameter gradients, host-side update)."""
    dev, out = image.device, []
    for c in classes:
        x_host = torch.stack([image, image.flip(-1)]).cpu().numpy()
        acc = torch.zeros(())
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
            if x.grad is None:
                raise RuntimeError("reference loop: no input gradient")
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


def timed(fn: Callable[[], Any], device: torch.device, reps: int = 1) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) / reps, out


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
        if device.type == "cuda":  # GPU time alone: the same step captured as a CUDA graph, timed with events
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            res[backend + "-graph"] = median_ms(graph.replay, device, reps) / 1e3
    return res


VOC_IMAGES = 10_582  # SBD train_aug
FAST_VARIANTS: dict[str, dict[str, Any]] = {  # the speed options of cam.advcam, added one at a time
    "ours-tf32": {"precision": "tf32"},
    "ours-bf16": {"precision": "bf16"},
    "ours-bf16-cl": {"precision": "bf16", "channels_last": True},
    "ours-bf16-cl-fold": {"precision": "bf16", "channels_last": True, "fold_batchnorm": True},
    "ours-fast": {"precision": "bf16", "channels_last": True, "fold_batchnorm": True, "cuda_graph": True},
    "ours-tf32-fast": {"precision": "tf32", "channels_last": True, "fold_batchnorm": True, "cuda_graph": True},
    "ours-fast-batch4": {"precision": "bf16", "channels_last": True, "fold_batchnorm": True, "cuda_graph": True,
                         "batch_images": 4},
}


def run_variant(model, images, classes, cfg, device):
    """Warm up on the first two images (all scales; both class counts), then time all images.

    Returns (seconds for all images, seconds of the very first call, the first image's maps): the first call
    includes cuDNN's and the extension's first use and, with ``cuda_graph``, the eager steps and the captures.
    With ``batch_images`` > 1 the images climb in batches of that many (they all have one size here)."""
    batch = int(cfg["advcam"].get("batch_images", 1))
    if batch > 1:
        def run_all():
            return [maps for k in range(0, len(images), batch)
                    for maps in advcam_maps_images(model, images[k:k + batch], classes[k:k + batch], cfg)]
        first_s, _ = timed(lambda: advcam_maps_images(model, images[:batch], classes[:batch], cfg), device)
        secs, out = timed(run_all, device)
        return secs, first_s, out[0]
    first_s, _ = timed(lambda: advcam_maps(model, images[0], classes[0], cfg), device)
    for im, c in zip(images[1:2], classes[1:2]):
        advcam_maps(model, im, c, cfg)
    secs, out = timed(lambda: [advcam_maps(model, im, c, cfg) for im, c in zip(images, classes)], device)
    return secs, first_s, out[0]


def map_corr(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    u = torch.cat([m.detach().float().flatten().cpu() for m in a]).double()
    v = torch.cat([m.detach().float().flatten().cpu() for m in b]).double()
    return float(torch.corrcoef(torch.stack([u, v]))[0, 1])


# the optional parts of a table row: (key that must be present, text)
VARIANT_NOTES = [
    ("speedup_vs_reference", lambda r: f", {r['speedup_vs_reference']:.1f}x vs reference"),
    ("fraction_of_bf16_matmul",
     lambda r: f", {r['tflops']:.0f} TFLOP/s = {100 * r['fraction_of_bf16_matmul']:.1f}% of bf16 matmul"),
    ("map_corr_vs_fp32", lambda r: f", maps r={r['map_corr_vs_fp32']:.5f} vs ours fp32"),
    ("max_rel_diff_vs_ours_fp32", lambda r: f", max rel diff {r['max_rel_diff_vs_ours_fp32']:.1e}"),
]
OP_NOTES = [
    ("fraction_of_copy", lambda r: f" ({100 * r['fraction_of_copy']:.0f}% of copy)"),
    ("graph_s_per_step", lambda r: f"; graphed {r['graph_s_per_step'] * 1e6:.1f} us"),
    ("graph_fraction_of_copy", lambda r: f" ({100 * r['graph_fraction_of_copy']:.0f}% of copy)"),
    ("graph_speedup_fused", lambda r: f", fused {r['graph_speedup_fused']:.2f}x as fast"),
]


def notes(row: dict, spec) -> str:
    return "".join(text(row) for key, text in spec if key in row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet_small", choices=["resnet_small", "resnet50", "resnet38"])
    ap.add_argument("--size", default="96", help="image size: N or WxH (e.g. 500x375)")
    ap.add_argument("--scales", default="1.0,0.5,1.5,2.0")
    ap.add_argument("--steps", type=int, default=27)
    ap.add_argument("--images", type=int, default=4, help="images; classes per image alternate 1, 2 (1.5 on average)")
    ap.add_argument("--num-classes", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--skip-reference", action="store_true", help="skip the (slow) reference-style loop")
    ap.add_argument("--reference-images", type=int, default=0,
                    help="time the reference loop on the first N images only (0: all; same 1/2 class pattern)")
    ap.add_argument("--fast-variants", action="store_true", help="also time the speed options (FAST_VARIANTS)")
    ap.add_argument("--variants", default="", help="comma-separated subset of the variants to time (default all)")
    ap.add_argument("--tag", default="", help="suffix of the result file name (<device>-<date>-<tag>.json)")
    ap.add_argument("--roofline", action="store_true",
                    help="measure the copy and bf16 matmul ceilings, count FLOPs, time the parts of a step")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark = True for every variant (the reference too)")
    ap.add_argument("--op-reps", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    scales = [float(s) for s in args.scales.split(",")]
    hw = parse_size(args.size)
    torch.manual_seed(0)
    model = build_classifier(args.model, args.num_classes).to(device).eval()
    images = [torch.randn(3, *hw, device=device) for _ in range(args.images)]
    classes = [[i % args.num_classes] if i % 2 == 0 else [(i + 1) % args.num_classes, (i + 5) % args.num_classes]
               for i in range(args.images)]
    n_cls = sum(len(c) for c in classes)
    cfg: dict[str, Any] = {"scales": scales, "flip": True, "advcam": {"steps": args.steps}}

    extra: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    maps: dict[str, list] = {}

    def save() -> tuple[dict, Path]:
        """Write what is measured so far (a time limit may stop the run between sections)."""
        result = {"device": device_name(device), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "model": args.model, "size_hw": list(hw), "scales": scales,
                  "steps": args.steps, "images": args.images, "classes_per_image": n_cls / len(images),
                  "cudnn_benchmark": bool(args.cudnn_benchmark),
                  "tf32_global": {"conv": bool(torch.backends.cudnn.allow_tf32),
                                  "matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                                  "note": "the reference loop runs under these; climb() sets TF32 per its precision"},
                  "note": "random weights and images; GPU times from CUDA-synchronised wall clock (variants) and CUDA "
                          "events (ceilings, step parts)", "results": rows, **extra}
        out = Path(args.out) / f"{result['device']}-{result['date']}{'-' + args.tag if args.tag else ''}.json"
        write_json(out, result)
        return result, out

    if args.roofline:
        extra["ceilings"] = ceilings(device)
        per_image = loop_flops(model, hw, scales, args.steps, classes, device) / len(images)
        extra["flops_per_image"] = per_image
        print(f"ceilings: copy {extra['ceilings']['copy_tb_per_s']:.2f} TB/s, bf16 matmul "
              f"{extra['ceilings']['bf16_matmul_tflops']:.0f} TFLOP/s; climbing loop {per_image / 1e12:.1f} TFLOP "
              f"per image (floor {per_image / 1e12 / extra['ceilings']['bf16_matmul_tflops']:.3f} s)", flush=True)
        save()

    variants: list[tuple[str, dict]] = [("ours-extension", {"backend": "extension"}),
                                        ("ours-fallback", {"backend": "fallback"})]
    if args.fast_variants:
        variants += [(k, dict(v)) for k, v in FAST_VARIANTS.items()]  # backend auto: they run without the extension
    if args.variants:
        keep = set(args.variants.split(","))
        variants = [(k, v) for k, v in variants if k in keep]
    for name, options in variants:
        print(f"{name}: timing {len(images)} images ...", flush=True)
        run_cfg = {**cfg, "advcam": {**cfg["advcam"], **options}}
        net = prepare_model(model, run_cfg)
        try:
            secs, first_s, first = run_variant(net, images, classes, run_cfg, device)
        except Exception as err:  # one variant failing (e.g. a graph capture) must not lose the others
            rows[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
            print(f"{name}: FAILED {rows[name]['error']}", flush=True)
            continue
        rows[name] = {"options": options, "s_per_image": secs / len(images), "s_per_class": secs / n_cls,
                      "first_image_s": first_s}
        maps[name] = first
        base = "ours-extension" if "ours-extension" in maps else "ours-fallback"  # fp32, ops either way
        if name != base and base in maps:
            rows[name]["map_corr_vs_fp32"] = map_corr(first, maps[base])
        if "flops_per_image" in extra:
            tflops = extra["flops_per_image"] / rows[name]["s_per_image"] / 1e12
            rows[name]["tflops"] = tflops
            rows[name]["fraction_of_bf16_matmul"] = tflops / extra["ceilings"]["bf16_matmul_tflops"]
        rows[name]["voc_train_aug_hours_one_device"] = rows[name]["s_per_image"] * VOC_IMAGES / 3600
        print(f"{name}: {rows[name]['s_per_image']:.3f} s/image", flush=True)
        del net
        save()
    if not args.skip_reference:
        k = args.reference_images or len(images)
        ref_cls = sum(len(c) for c in classes[:k])
        reference_maps(model, images[0], classes[0][:1], scales, 2)  # warm-up (cuDNN, allocator)
        pairs = list(zip(images[:k], classes[:k]))
        secs, ref_maps = timed(lambda: [reference_maps(model, im, c, scales, args.steps)
                                        for im, c in progress(pairs, desc="reference loop", unit="img")], device)
        rows["reference"] = {"s_per_image": secs / k, "s_per_class": secs / ref_cls, "images": k,
                             "voc_train_aug_hours_one_device": secs / k * VOC_IMAGES / 3600}
        fp32_maps = maps.get("ours-extension", maps.get("ours-fallback"))
        if fp32_maps is not None:
            rows["reference"]["max_rel_diff_vs_ours_fp32"] = max(
                float((o.cpu() - r).abs().max() / r.abs().max().clamp_min(1e-30))
                for o, r in zip(fp32_maps, ref_maps[0]))
            rows["reference"]["map_corr_vs_fp32"] = map_corr(ref_maps[0], fp32_maps)
        for name, r in rows.items():
            if name.startswith("ours") and "s_per_class" in r:  # per class: the reference may time fewer images
                r["speedup_vs_reference"] = rows["reference"]["s_per_class"] / r["s_per_class"]

    big = max(scales)
    big_hw = tuple(max(1, round(v * big)) for v in hw)
    with torch.no_grad():
        feat = tuple(model.cam(torch.zeros(1, 3, *big_hw, device=device)).shape[-2:])
    ops = op_benchmark(device, torch.float32, 2, feat, big_hw, args.op_reps)
    nbytes = op_bytes(2, feat, big_hw)
    rows["op-fused"] = {"s_per_step": ops["extension"], "shape_maps": [2, *feat], "shape_images": [2, 2, 3, *big_hw],
                        "bytes": nbytes, "tb_per_s": nbytes / ops["extension"] / 1e12}
    rows["op-eager"] = {"s_per_step": ops["fallback"], "speedup_fused": ops["fallback"] / ops["extension"],
                        "tb_per_s": nbytes / ops["fallback"] / 1e12}
    if "extension-graph" in ops:
        rows["op-fused"].update(graph_s_per_step=ops["extension-graph"],
                                graph_tb_per_s=nbytes / ops["extension-graph"] / 1e12)
        rows["op-eager"].update(graph_s_per_step=ops["fallback-graph"],
                                graph_speedup_fused=ops["fallback-graph"] / ops["extension-graph"])
    save()
    if "ceilings" in extra:
        rows["op-fused"]["fraction_of_copy"] = rows["op-fused"]["tb_per_s"] / extra["ceilings"]["copy_tb_per_s"]
        if "graph_tb_per_s" in rows["op-fused"]:
            rows["op-fused"]["graph_fraction_of_copy"] = (rows["op-fused"]["graph_tb_per_s"]
                                                          / extra["ceilings"]["copy_tb_per_s"])
    if args.roofline:
        fast: dict[str, Any] = {**FAST_VARIANTS["ours-bf16-cl-fold"]} if args.fast_variants else {}
        net = prepare_model(model, {"advcam": fast})
        extra["step_parts_scale1"] = {"options": fast, **step_parts(net, images[0], 2, fast, device)}
        extra["step_parts_scale1_fp32"] = step_parts(model, images[0], 2, {}, device)
        graphed = {**fast, "cuda_graph": device.type == "cuda"}
        extra["batch_scaling_ms_per_class_step"] = {
            "options": graphed, **batch_scaling(net, images[0], [c for c in (0.5, 1.0) if c in scales], graphed, device,
                                                (1, 2, 4))}

    result, out = save()

    print(f"{result['device']}  {args.model}  {hw[0]}x{hw[1]}  scales {scales}  steps {args.steps}  "
          f"{args.images} images ({n_cls / len(images):.2f} classes/image)  threads {result['threads']}")
    print(f"{'variant':<20}{'time':>14}  notes")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<20}{'failed':>14}  {r['error'][:100]}")
        elif "s_per_image" in r:
            note = f"{r['s_per_class']:.3f} s/class" + notes(r, VARIANT_NOTES)
            print(f"{name:<20}{r['s_per_image']:>10.3f} s/im  {note}")
        else:
            note = (f"fused op is {r['speedup_fused']:.2f}x as fast" if "speedup_fused" in r
                    else f"maps {r['shape_maps']}, {r['bytes'] / 1e6:.1f} MB")
            note += f", {r['tb_per_s']:.2f} TB/s" + notes(r, OP_NOTES)
            print(f"{name:<20}{r['s_per_step'] * 1e6:>10.1f} us/st  {note}")
    for key in ("step_parts_scale1", "step_parts_scale1_fp32"):
        if key in extra:
            sp = extra[key]
            print(f"{key}: forward {sp['forward_ms']:.2f} ms, input backward {sp['input_backward_ms']:.2f} ms, "
                  f"fused ops {sp['fused_ops_ms']:.3f} ms (batch {sp['batch']})")
    if "batch_scaling_ms_per_class_step" in extra:
        for scale, row in extra["batch_scaling_ms_per_class_step"].items():
            if scale != "options":
                print(f"batch scaling at scale {scale}: ms per class and step "
                      + ", ".join(f"n={k}: {v:.2f}" for k, v in row.items()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
