"""AdvCAM (Lee et al., CVPR 2021): adversarial climbing of the image towards larger class maps.

Per class ``c`` of the image and per scale, starting from the clean image ``x_0`` (and its flip, climbed as
a second image of the same tensor, as in the reference):

    x_t = clamp(x_{t-1} + xi * g / (max|g| + 1e-12), min x_{t-1}, max x_{t-1}),  g = dL/dx at x_{t-1}
    L   = y_c - sum_{k != c} y_k - lam * || M * |A(x_{t-1}) - A(x_0)| ||_1
    M   = 1(A(x_{t-1}) / max A(x_{t-1}) > tau)

``y`` = average-pooled ReLU(class maps) over all classes, summed over the two flips; ``A`` = the flip-merged
Grad-CAM of class ``c`` on the last stage, as the reference computes it (sum-pooled score, gradient weights
averaged over the positive gradient entries of the whole batch). With a bias-free 1x1 classifier that is
exactly ``A_b = ReLU(CAM_c,b) * n_b / (K+ * (n_0 + n_1) + 1e-12)``, ``n_b`` = pixels with ``CAM_c > 0`` in
flip ``b``, ``K+`` = positive classifier weights of ``c``; the scalars are constants for the gradient (the
reference's hook gradients carry no graph), so no Grad-CAM backward is needed. The returned map is
``sum_{t < T} A(x_t)`` (the reference accumulates these Grad-CAM-scaled maps; the last update is skipped
because its image is never evaluated).

Fast path: every class and both flips in one batch (each class climbs its own copy), gradients w.r.t. the
input only, the whole loop on the model's device, and the fused ops of :mod:`advcam.ops`. Speed options (off
by default; measured in benchmarks/gpu_notes.md): ``precision`` tf32 / bf16, ``channels_last``,
``fold_batchnorm`` (:func:`prepare_model`) and ``cuda_graph`` (captured steps cached per model;
:func:`clear_graphs` frees them).

Deviations (options, all off by default): ``sign_steps`` (``xi * sign(g)`` instead of max-abs
normalisation), ``cumulative_mask`` (``M_t = M_{t-1} OR 1(A/max A > tau)``), ``suppress_image_classes_only``
(the ``sum_{k != c}`` runs over the image's classes only).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from advcam.attribution.cam import class_map_net, resize_image
from advcam.attribution.graphs import ClimbBuffers, StepGraphs, cached_graphs, clear_graphs, store_graphs, tf32_mode
from advcam.attribution.inputs import check_image_and_classes, check_scalars
from advcam.ops import ascent_step_, masked_l1
from advcam.utils import param
from advcam.utils.device import evaluating, frozen
from advcam.utils.errors import AdvcamError

DEFAULTS: dict[str, Any] = {"steps": 27, "xi": 0.08, "lam": 7.0, "tau": 0.5, "half_steps_at_half_scale": True,
                            "sign_steps": False, "cumulative_mask": False, "suppress_image_classes_only": False,
                            "backend": "auto", "precision": "fp32", "channels_last": False, "cuda_graph": False,
                            "fold_batchnorm": False, "max_classes_per_climb": 0}
OPTIONS = ("flip", "sign_steps", "cumulative_mask", "suppress_image_classes_only", "backend", "callback",
           "precision", "channels_last", "cuda_graph", "image_classes")
PRECISIONS = ("fp32", "tf32", "bf16")


def gradcam_scale(cam_c: torch.Tensor, weight_c: torch.Tensor) -> torch.Tensor:
    """Per-flip scalar turning ReLU(CAM_c) into the reference's Grad-CAM: ``n_b / (K+ (n_0 + n_1) + 1e-12)``.

    ``cam_c`` (n, nf, h, w) raw maps of each climbing class, ``weight_c`` (n, K) its classifier weights;
    returns (n, nf), without gradient.
    """
    pos = (cam_c.detach() > 0).flatten(2).sum(2).to(cam_c.dtype)
    kplus = (weight_c.detach() > 0).sum(1).to(cam_c.dtype)
    return pos / (kplus[:, None] * pos.sum(1, keepdim=True) + 1e-12)


def climb(model: nn.Module, image: torch.Tensor, classes: Sequence[int], *, steps: int = 27, xi: float = 0.08,
          lam: float = 7.0, tau: float = 0.5, **options: Any) -> torch.Tensor:
    """AdvCAM maps of ``classes`` at one scale: ``sum_{t<steps} A(x_t)``, flip-merged, at feature resolution.

    ``image`` is a normalised ``(3, H, W)`` tensor (already resized to the scale) on the model's device; the model
    climbs in eval mode (a model in training mode gets its modes back after). Options: ``flip`` (True; climb the
    flip as well), ``sign_steps``, ``cumulative_mask``, ``suppress_image_classes_only`` (all False), ``backend``
    (auto|extension|fallback), ``callback``: called as ``callback(t, state)`` at every step ``t`` with detached
    copies, one row per class: ``x`` (the images x_t, ``(n * nf, 3, H, W)``), ``map`` (A(x_t), ``(n, h, w)``),
    ``score`` and ``others`` (y_c and the sum of the other classes' y, summed over the flips, ``(n,)``) and ``l1``
    (the masked L1 term, ``(n,)``); for diagnostics (``benchmarks/seed_study.py --trace``), it changes nothing.
    ``image_classes`` (:func:`climb_images`: one list per image): all of each image's classes, when ``classes``
    climbs only some of them (``cam.advcam.max_classes_per_climb``), for ``suppress_image_classes_only``.
    Speed options (off by default; they change rounding, not the method): ``precision`` (``fp32``: true float32,
    TF32 off on CUDA; ``tf32``: TF32 tensor-core convolutions on CUDA, the same as fp32 elsewhere; ``bf16``: the
    network under bf16 autocast, the maps, loss and image update in the image's dtype), ``channels_last`` (the
    network sees NHWC input), ``cuda_graph`` (CUDA only, 3 steps or more, ignored with a callback: the first
    call of a setting runs two steps eagerly and captures step 0, a middle step and the last forward as CUDA
    graphs; later calls with the same image size, class count, options and model replay them; up to
    ``graphs.GRAPH_CACHE_SIZE`` settings per model are kept, each holding one step's activations on the device).
    Returns ``(n, h, w)`` in the image's dtype, unnormalised. Raises AdvcamError on bad input and on
    non-finite maps or gradients (naming the step).
    """
    return climb_images(model, [image], [classes], steps=steps, xi=xi, lam=lam, tau=tau, **options)[0]


def climb_images(model: nn.Module, images: Sequence[torch.Tensor], classes: Sequence[Sequence[int]], *,
                 steps: int = 27, xi: float = 0.08, lam: float = 7.0, tau: float = 0.5,
                 **options: Any) -> list[torch.Tensor]:
    """:func:`climb` for several images of one size in one batch: one ``(n_k, h, w)`` map per image.

    Every climbing image is its own row of the batch (the loss is a sum over rows and the network, in eval
    mode, treats rows independently), so each image's maps are those of :func:`climb` on it alone, up to float
    rounding: a convolution may pick another algorithm for another batch size (in float64 they agree to
    1e-10). Batching images cuts the per-step launch and framework overhead, which dominates on a GPU
    (``cam.advcam.batch_images``). A model in training mode climbs in eval mode (BatchNorm's running
    statistics, no dropout) and gets its modes back, its statistics untouched."""
    with evaluating(model):
        return _climb_images(model, images, classes, steps=steps, xi=xi, lam=lam, tau=tau, **options)


def _climb_images(model: nn.Module, images: Sequence[torch.Tensor], classes: Sequence[Sequence[int]], *,
                  steps: int, xi: float, lam: float, tau: float, **options: Any) -> list[torch.Tensor]:
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise AdvcamError(f"AdvCAM: unknown option(s) {sorted(unknown)} (known: {', '.join(OPTIONS)})")
    check_scalars(steps=steps, xi=xi, lam=lam, tau=tau)
    if len(images) == 0 or len(images) != len(classes):
        raise AdvcamError(f"AdvCAM: {len(images)} images but {len(classes)} class lists")
    classes = [check_image_and_classes(model, im, cs) for im, cs in zip(images, classes)]
    image = images[0]
    if any(im.shape != image.shape for im in images):
        raise AdvcamError("AdvCAM: the images of one batch must have one size, got "
                          + ", ".join(str(tuple(im.shape)) for im in images))
    counts = [len(cs) for cs in classes]
    shown = classes[0] if len(classes) == 1 else classes  # for messages
    flip, backend = bool(options.get("flip", True)), options.get("backend")
    sign_steps = bool(options.get("sign_steps", False))
    cumulative = bool(options.get("cumulative_mask", False))
    image_only = bool(options.get("suppress_image_classes_only", False))
    callback = options.get("callback")
    precision = str(options.get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise AdvcamError(f"cam.advcam.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    channels_last = bool(options.get("channels_last", False))
    n, steps = sum(counts), int(steps)
    graph_ok = bool(options.get("cuda_graph", False)) and image.is_cuda and callback is None and steps >= 3
    net = class_map_net(model)
    if n == 0:
        with torch.no_grad():
            h, w = net.cam(image[None]).shape[-2:]
        return [image.new_zeros((0, h, w)) for _ in images]

    nf = 2 if flip else 1
    bases = [torch.stack([im, im.flip(-1)]) if flip else im[None] for im in images]
    # (n * nf, 3, H, W): one climbing image per (image, class), with its flip
    x = torch.cat([b.detach().repeat(k, 1, 1, 1) for b, k in zip(bases, counts) if k]).contiguous()
    big_c = int(net.classifier.weight.shape[0])
    cls = torch.as_tensor([c for cs in classes for c in cs], device=image.device)
    own = torch.zeros(n, big_c, dtype=image.dtype, device=image.device)
    start = 0
    whole = options.get("image_classes") or classes  # all of each image's classes, when it climbs only some
    if len(whole) != len(classes):
        raise AdvcamError(f"AdvCAM: {len(whole)} image class lists for {len(classes)} images")
    for cs, all_cs in zip(classes, whole):  # each row's own image's classes, for suppress_image_classes_only
        if cs:
            own[start:start + len(cs), torch.as_tensor([int(c) for c in all_cs], device=image.device)] = 1.0
        start += len(cs)
    graphs: StepGraphs | None = None
    if graph_ok:
        key = (tuple(x.shape), x.dtype, n, flip, float(xi), float(lam), float(tau), sign_steps, cumulative,
               image_only, str(backend), precision, channels_last,
               tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers())))
        graphs = cached_graphs(model, key)
    if graphs is not None:  # the same setting was captured before: refill its static inputs
        buf = graphs.buf
        buf.x.copy_(x)
        buf.cls.copy_(cls)
        buf.own.copy_(own)
    else:
        buf = ClimbBuffers(x, cls, own, torch.arange(n, device=image.device))
    bf16 = precision == "bf16"

    def evaluate(xx: torch.Tensor, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Class maps ``(n, nf, C, h, w)`` in the image's dtype and the flip-merged Grad-CAM ``A`` ``(n, h, w)``;
        at step 0 (``first``) A(x_0) is kept and the accumulator cleared."""
        inp = xx.contiguous(memory_format=torch.channels_last) if channels_last else xx
        with torch.autocast(device_type=xx.device.type, dtype=torch.bfloat16, enabled=bf16):
            cams = net.cam(inp)
        cams = cams.to(xx.dtype)
        cams = cams.view(n, nf, big_c, *cams.shape[-2:])
        cam_c = cams[buf.rows, :, buf.cls]  # (n, nf, h, w)
        weight_c = net.classifier.weight.reshape(big_c, -1)[buf.cls]
        a_b = F.relu(cam_c) * gradcam_scale(cam_c, weight_c)[..., None, None]
        a = a_b[:, 0] + a_b[:, 1].flip(-1) if flip else a_b[:, 0]
        if first and buf.a0 is None:
            buf.acc = torch.zeros_like(a.detach()).contiguous()
            buf.a0 = a.detach().clone()
            buf.mask = torch.zeros_like(buf.a0, dtype=torch.bool) if cumulative else None
        elif first:  # static buffers of a captured setting
            a0, acc = buf.state()
            acc.zero_()
            a0.copy_(a.detach())
            if buf.mask is not None:
                buf.mask.zero_()
        return cams, a

    def scores(t: int, xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``t`` up to the loss: (loss, finite flag of A); accumulates A into ``acc``."""
        cams, a = evaluate(xx, t == 0)
        a0, acc = buf.state()
        l1 = masked_l1(a, a0, tau, acc=acc, backend=backend, mask=buf.mask)
        ok = torch.isfinite(a.detach()).all()
        y = F.relu(cams).mean((-2, -1))  # (n, nf, C)
        y_c = y[buf.rows, :, buf.cls]  # (n, nf)
        others = (y * buf.own[:, None]).sum(-1) if image_only else y.sum(-1)  # includes y_c
        if callback is not None:
            callback(t, {"x": xx.detach().clone(), "map": a.detach(), "score": y_c.detach().sum(1),
                         "others": (others - y_c).detach().sum(1), "l1": l1.detach()})
        return ((2 * y_c - others).sum(1) - lam * l1).sum(), ok

    def step(t: int) -> torch.Tensor:
        """One climbing step on ``x`` in place (the map of x_t is accumulated); returns its finite flag."""
        xg = buf.x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, ok = scores(t, xg)
            (g,) = torch.autograd.grad(loss, xg)
        if sign_steps:
            g = g.sign()
        gmax = ascent_step_(buf.x.view(n, -1), g.reshape(n, -1), xi, backend=backend)
        return ok & torch.isfinite(gmax).all()

    def last() -> torch.Tensor:
        """The last image: its map is accumulated, no update follows."""
        with torch.no_grad():
            return scores(steps - 1, buf.x)[1]

    finite: list[torch.Tensor] = []  # one flag per step, checked once at the end (no per-step device sync)
    with frozen(model), tf32_mode(precision == "tf32" if image.is_cuda else None):  # input gradients only
        if graph_ok and graphs is None:  # first time: two eager steps, capture, replay the rest
            finite.append(step(0))  # allocates the static buffers on the current stream
            side = torch.cuda.Stream(device=image.device)  # warm-up on a side stream, as capture requires
            side.wait_stream(torch.cuda.current_stream(image.device))
            with torch.cuda.stream(side):
                finite.append(step(1))
            torch.cuda.current_stream(image.device).wait_stream(side)
            graphs = StepGraphs(buf)
            graphs.capture("first", lambda: step(0))  # captured, not run: the state is untouched
            graphs.capture("step", lambda: step(1))
            graphs.capture("last", last)
            store_graphs(model, key, graphs)
            finite += [graphs.replay("step") for _ in range(2, steps - 1)]
            finite.append(graphs.replay("last"))
        elif graphs is not None:
            finite.append(graphs.replay("first"))
            finite += [graphs.replay("step") for _ in range(1, steps - 1)]
            finite.append(graphs.replay("last"))
        else:
            finite += [step(t) for t in range(steps - 1)]
            finite.append(last())
    ok = torch.stack(finite).cpu()
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0])
        if bad == 0:  # before any ascent step: the classifier, not the step size
            raise AdvcamError(f"AdvCAM: non-finite attribution map or gradient of the unchanged image (step 0 of "
                              f"{steps}, before any climbing step; classes {shown}): the classifier overflows on "
                              "this image; check its checkpoint and training curve (a diverged training?)")
        raise AdvcamError(f"AdvCAM: non-finite attribution map or gradient at step {bad} of {steps} "
                          f"(classes {shown}, xi {xi}, lam {lam}); try a smaller cam.advcam.xi")
    acc = buf.state()[1].clone() if graphs is not None else buf.state()[1]
    parts = iter(acc.split([k for k in counts if k]))
    return [next(parts) if k else acc.new_zeros((0, *acc.shape[1:])) for k in counts]


def steps_for_scale(steps: int, scale: float, half_steps_at_half_scale: bool = True) -> int:
    """Steps used at ``scale``: the reference climbs scale 0.5 for ``steps // 2`` (``steps > 10``), 5 (6..10)
    or ``steps`` (< 6) steps, and every other scale for ``steps``."""
    if not half_steps_at_half_scale or abs(float(scale) - 0.5) > 1e-9:
        return int(steps)
    if steps > 10:
        return int(steps) // 2
    return int(steps) if steps < 6 else 5


def advcam_params(cfg_advcam: Any = None) -> dict[str, Any]:
    """Climbing parameters from ``cfg.cam.advcam`` (Config, dict or None), defaults filled in."""
    return {k: param(cfg_advcam, k, v) for k, v in DEFAULTS.items()}


def prepare_model(model: nn.Module, cfg_cam: Any = None) -> nn.Module:
    """The model AdvCAM should climb on, once per run: ``model`` itself, or with ``cam.advcam.fold_batchnorm``
    a copy with its conv -> BatchNorm pairs folded (:func:`advcam.models.resnet.fold_batchnorm`), and with
    ``cam.advcam.channels_last`` its weights in channels-last memory format (a copy as well)."""
    from advcam.models.resnet import fold_batchnorm

    p = advcam_params(param(cfg_cam, "advcam", None))
    if bool(p["fold_batchnorm"]):
        model = fold_batchnorm(model)
    if bool(p["channels_last"]):
        if not bool(p["fold_batchnorm"]):
            model = copy.deepcopy(model)
        # Module.to takes memory_format; its type stub does not list it
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def advcam_maps(model: nn.Module, image: torch.Tensor, classes: Sequence[int], cfg_cam: Any,
                image_id: str | None = None, callback: Any = None) -> list[torch.Tensor]:
    """Multi-scale AdvCAM: one :func:`climb` per scale in ``cfg_cam.scales`` -> per-scale maps ``(n, h_s, w_s)``.

    Signature of :data:`advcam.attribution.cam.METHODS` entries; ``cfg_cam`` is ``cfg.cam`` (``scales``,
    ``flip`` and the ``advcam`` sub-section; missing keys take :data:`DEFAULTS`). The maps are later summed
    by ``combine_scales`` without per-scale weights: the reference's scale-0.5 multiplier leaks to every scale
    (it is set before the loop reaches scale 1.0 and never reset), so it cancels in the max normalisation.
    ``callback`` goes to every :func:`climb` (diagnostics).
    """
    return advcam_maps_images(model, [image], [classes], cfg_cam, None if image_id is None else [image_id],
                              callback)[0]


def advcam_maps_images(model: nn.Module, images: Sequence[torch.Tensor], classes: Sequence[Sequence[int]],
                       cfg_cam: Any, image_ids: Sequence[str] | None = None, callback: Any = None,
                       on_scale: Callable[[float, int, int], None] | None = None) -> list[list[torch.Tensor]]:
    """:func:`advcam_maps` for several images of one size, climbed together (:func:`climb_images`): per image,
    its per-scale maps. ``on_scale(scale, index, count)`` is called as each scale's climb starts (progress: a
    500 x 375 image takes minutes per scale on a CPU)."""
    p = advcam_params(param(cfg_cam, "advcam", None))
    scales = [float(s) for s in param(cfg_cam, "scales", [1.0, 0.5, 1.5, 2.0])]
    flip = bool(param(cfg_cam, "flip", True))
    how = str(param(cfg_cam, "image_resize", "bicubic"))
    out: list[list[torch.Tensor]] = [[] for _ in images]
    chunks = climb_chunks(classes, int(p["max_classes_per_climb"]))
    for index, s in enumerate(scales):
        if on_scale is not None:
            on_scale(s, index, len(scales))
        resized = [resize_image(im, s, how) for im in images]
        parts: list[list[torch.Tensor]] = [[] for _ in images]
        for chunk in chunks:  # one chunk, all classes, unless max_classes_per_climb splits them
            try:
                maps = climb_images(model, [resized[k] for k, _ in chunk], [cs for _, cs in chunk],
                                    steps=steps_for_scale(p["steps"], s, p["half_steps_at_half_scale"]),
                                    xi=float(p["xi"]), lam=float(p["lam"]), tau=float(p["tau"]), flip=flip,
                                    sign_steps=bool(p["sign_steps"]), cumulative_mask=bool(p["cumulative_mask"]),
                                    suppress_image_classes_only=bool(p["suppress_image_classes_only"]),
                                    backend=str(p["backend"]), precision=str(p["precision"]),
                                    channels_last=bool(p["channels_last"]), cuda_graph=bool(p["cuda_graph"]),
                                    callback=callback, image_classes=[classes[k] for k, _ in chunk])
            except AdvcamError as err:
                if image_ids is None:
                    where = f"scale {s}"
                else:
                    where = f"image{'s' if len(image_ids) > 1 else ''} {', '.join(map(str, image_ids))}, scale {s}"
                raise AdvcamError(f"{where}: {err}") from err
            for (k, _), m in zip(chunk, maps):
                parts[k].append(m)
        for k, ms in enumerate(parts):
            out[k].append(ms[0] if len(ms) == 1 else torch.cat(ms))
    return out


def climb_chunks(classes: Sequence[Sequence[int]], limit: int) -> list[list[tuple[int, list[int]]]]:
    """The climbs of one scale: lists of ``(image index, its classes to climb)``, at most ``limit`` classes per
    climb in all (``limit`` 0: one climb with every image and class). Each image's classes stay in order, and an
    image without classes still appears once (its empty map)."""
    pairs = [(k, int(c)) for k, cs in enumerate(classes) for c in cs]
    if limit <= 0 or len(pairs) <= limit:
        return [[(k, [int(c) for c in cs]) for k, cs in enumerate(classes)]]
    chunks: list[list[tuple[int, list[int]]]] = []
    for start in range(0, len(pairs), limit):
        chunk: list[tuple[int, list[int]]] = []
        for k, c in pairs[start:start + limit]:
            if chunk and chunk[-1][0] == k:
                chunk[-1][1].append(c)
            else:
                chunk.append((k, [c]))
        chunks.append(chunk)
    empty: list[tuple[int, list[int]]] = [(k, []) for k, cs in enumerate(classes) if not cs]
    if empty:
        chunks[0] = sorted(chunks[0] + empty, key=lambda kc: kc[0])
    return chunks


__all__ = ["climb", "climb_images", "advcam_maps", "advcam_maps_images", "advcam_params", "prepare_model",
           "climb_chunks",
           "clear_graphs", "steps_for_scale", "gradcam_scale", "DEFAULTS"]
