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
input only, the whole loop on the model's device, and the fused ops of :mod:`advcam.ops`.

Deviations (options, all off by default): ``sign_steps`` (``xi * sign(g)`` instead of max-abs
normalisation), ``cumulative_mask`` (``M_t = M_{t-1} OR 1(A/max A > tau)``), ``suppress_image_classes_only``
(the ``sum_{k != c}`` runs over the image's classes only).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from advcam.attribution.cam import resize_image
from advcam.ops import ascent_step_, masked_l1
from advcam.utils.device import frozen
from advcam.utils.errors import AdvcamError

DEFAULTS: dict[str, Any] = {"steps": 27, "xi": 0.08, "lam": 7.0, "tau": 0.5, "half_steps_at_half_scale": True,
                            "sign_steps": False, "cumulative_mask": False, "suppress_image_classes_only": False,
                            "backend": "auto", "precision": "fp32", "channels_last": False, "cuda_graph": False,
                            "fold_batchnorm": False}
OPTIONS = ("flip", "sign_steps", "cumulative_mask", "suppress_image_classes_only", "backend", "callback",
           "precision", "channels_last", "cuda_graph")
PRECISIONS = ("fp32", "bf16")
GRAPH_WARMUP = 3  # eager steps (on a side stream) before a CUDA graph of one step is captured


def gradcam_scale(cam_c: torch.Tensor, weight_c: torch.Tensor) -> torch.Tensor:
    """Per-flip scalar turning ReLU(CAM_c) into the reference's Grad-CAM: ``n_b / (K+ (n_0 + n_1) + 1e-12)``.

    ``cam_c`` (n, nf, h, w) raw maps of each climbing class, ``weight_c`` (n, K) its classifier weights;
    returns (n, nf), without gradient.
    """
    pos = (cam_c.detach() > 0).flatten(2).sum(2).to(cam_c.dtype)
    kplus = (weight_c.detach() > 0).sum(1).to(cam_c.dtype)
    return pos / (kplus[:, None] * pos.sum(1, keepdim=True) + 1e-12)


def _check_inputs(model: nn.Module, image: torch.Tensor, classes: Sequence[int]) -> list[int]:
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise AdvcamError(f"AdvCAM: expected a normalised (3, H, W) image tensor, got {shape}")
    if not image.is_floating_point():
        raise AdvcamError(f"AdvCAM: image must be a float tensor (normalised), got {image.dtype}")
    weight = getattr(getattr(model, "classifier", None), "weight", None)
    if weight is None or not hasattr(model, "cam"):
        raise AdvcamError("AdvCAM: the model needs cam(x) and a bias-free 1x1 classifier (classifier.weight)")
    num = weight.shape[0]
    out = [int(c) for c in classes]
    bad = [c for c in out if not 0 <= c < num]
    if bad:
        raise AdvcamError(f"AdvCAM: class ids {bad} outside 0..{num - 1}")
    return out


def climb(model: nn.Module, image: torch.Tensor, classes: Sequence[int], *, steps: int = 27, xi: float = 0.08,
          lam: float = 7.0, tau: float = 0.5, **options: Any) -> torch.Tensor:
    """AdvCAM maps of ``classes`` at one scale: ``sum_{t<steps} A(x_t)``, flip-merged, at feature resolution.

    ``image`` is a normalised ``(3, H, W)`` tensor (already resized to the scale) on the model's device; the
    model should be in eval mode. Options: ``flip`` (True; climb the flip as well), ``sign_steps``,
    ``cumulative_mask``, ``suppress_image_classes_only`` (all False), ``backend`` (auto|extension|fallback),
    ``callback``: called as ``callback(t, state)`` at every step ``t`` with detached copies, one row per
    class: ``x`` (the images x_t, ``(n * nf, 3, H, W)``), ``map`` (A(x_t), ``(n, h, w)``), ``score`` and
    ``others`` (y_c and the sum of the other classes' y, summed over the flips, ``(n,)``) and ``l1`` (the
    masked L1 term, ``(n,)``); for diagnostics (``benchmarks/seed_study.py --trace``), it changes nothing.
    Speed options (off by default; they change rounding, not the method): ``precision`` (``fp32``, or
    ``bf16``: the network under bf16 autocast, the maps, loss and image update in the image's dtype),
    ``channels_last`` (the network sees NHWC input), ``cuda_graph`` (CUDA only, ignored with a callback:
    after a few eager steps, one step is captured as a CUDA graph and replayed for the rest of the loop).
    Returns ``(n, h, w)`` in the image's dtype, unnormalised. Raises AdvcamError on bad input and on
    non-finite maps or gradients (naming the step).
    """
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise AdvcamError(f"AdvCAM: unknown option(s) {sorted(unknown)} (known: {', '.join(OPTIONS)})")
    if int(steps) < 1:
        raise AdvcamError(f"cam.advcam.steps: must be >= 1, got {steps}")
    classes = _check_inputs(model, image, classes)
    flip, backend = bool(options.get("flip", True)), options.get("backend")
    sign_steps = bool(options.get("sign_steps", False))
    cumulative = bool(options.get("cumulative_mask", False))
    image_only = bool(options.get("suppress_image_classes_only", False))
    callback = options.get("callback")
    precision = str(options.get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise AdvcamError(f"cam.advcam.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    channels_last = bool(options.get("channels_last", False))
    graph_ok = (bool(options.get("cuda_graph", False)) and image.is_cuda and callback is None
                and int(steps) - 1 > GRAPH_WARMUP)
    n, steps = len(classes), int(steps)
    if n == 0:
        with torch.no_grad():
            h, w = model.cam(image[None]).shape[-2:]
        return image.new_zeros((0, h, w))

    nf = 2 if flip else 1
    base = torch.stack([image, image.flip(-1)]) if flip else image[None]
    x = base.detach().repeat(n, 1, 1, 1).contiguous()  # (n * nf, 3, H, W): one climbing image per class
    cls = torch.as_tensor(classes, device=image.device)
    rows = torch.arange(n, device=image.device)
    weight_c = model.classifier.weight.reshape(model.classifier.weight.shape[0], -1)[cls]
    own = torch.zeros(n, model.classifier.weight.shape[0], dtype=image.dtype, device=image.device)
    own[:, cls] = 1.0  # the image's classes, for suppress_image_classes_only

    bf16 = precision == "bf16"
    big_c = model.classifier.weight.shape[0]
    state: dict[str, Any] = {"acc": None, "a0": None, "mask": None}

    def evaluate(xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class maps ``(n, nf, C, h, w)`` in the image's dtype and the flip-merged Grad-CAM ``A`` ``(n, h, w)``."""
        inp = xx.contiguous(memory_format=torch.channels_last) if channels_last else xx
        with torch.autocast(device_type=xx.device.type, dtype=torch.bfloat16, enabled=bf16):
            cams = model.cam(inp)
        cams = cams.to(xx.dtype)
        cams = cams.view(n, nf, big_c, *cams.shape[-2:])
        cam_c = cams[rows, :, cls]  # (n, nf, h, w)
        a_b = F.relu(cam_c) * gradcam_scale(cam_c, weight_c)[..., None, None]
        a = a_b[:, 0] + a_b[:, 1].flip(-1) if flip else a_b[:, 0]
        if state["a0"] is None:  # step 0
            state["acc"] = torch.zeros_like(a.detach()).contiguous()
            state["a0"] = a.detach().clone()
            state["mask"] = torch.zeros_like(state["a0"], dtype=torch.bool) if cumulative else None
        return cams, a

    def scores(t: int, xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step ``t`` up to the loss: (loss, finite flag of A); accumulates A into ``acc``."""
        cams, a = evaluate(xx)
        l1 = masked_l1(a, state["a0"], tau, acc=state["acc"], backend=backend, mask=state["mask"])
        ok = torch.isfinite(a.detach()).all()
        y = F.relu(cams).mean((-2, -1))  # (n, nf, C)
        y_c = y[rows, :, cls]  # (n, nf)
        others = (y * own[:, None]).sum(-1) if image_only else y.sum(-1)  # includes y_c
        if callback is not None:
            callback(t, {"x": xx.detach().clone(), "map": a.detach(), "score": y_c.detach().sum(1),
                         "others": (others - y_c).detach().sum(1), "l1": l1.detach()})
        return ((2 * y_c - others).sum(1) - lam * l1).sum(), ok

    def step(t: int) -> torch.Tensor:
        """One climbing step on ``x`` in place (the map of x_t is accumulated); returns its finite flag."""
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, ok = scores(t, xg)
            (g,) = torch.autograd.grad(loss, xg)
        if sign_steps:
            g = g.sign()
        gmax = ascent_step_(x.view(n, -1), g.reshape(n, -1), xi, backend=backend)
        return ok & torch.isfinite(gmax).all()

    finite: list[torch.Tensor] = []  # one flag per step, checked once at the end (no per-step device sync)
    with frozen(model):  # input gradients only
        t = 0
        if graph_ok:  # eager warm-up steps (all but step 0 on a side stream), then one captured step replayed
            finite.append(step(0))  # allocates acc / a0 on the current stream
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for t in range(1, GRAPH_WARMUP):
                    finite.append(step(t))
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ok_static = step(GRAPH_WARMUP)
            for t in range(GRAPH_WARMUP, steps - 1):
                graph.replay()
                finite.append(ok_static.clone())
        else:
            for t in range(steps - 1):
                finite.append(step(t))
        with torch.no_grad():  # the last image: its map is accumulated, no update follows
            finite.append(scores(steps - 1, x)[1])
    ok = torch.stack(finite).cpu()
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0])
        raise AdvcamError(f"AdvCAM: non-finite attribution map or gradient at step {bad} of {steps} "
                          f"(classes {classes}, xi {xi}, lam {lam}); try a smaller cam.advcam.xi")
    return state["acc"]


def steps_for_scale(steps: int, scale: float, half_steps_at_half_scale: bool = True) -> int:
    """Steps used at ``scale``: the reference climbs scale 0.5 for ``steps // 2`` (``steps > 10``), 5 (6..10)
    or ``steps`` (< 6) steps, and every other scale for ``steps``."""
    if not half_steps_at_half_scale or abs(float(scale) - 0.5) > 1e-9:
        return int(steps)
    if steps > 10:
        return int(steps) // 2
    return int(steps) if steps < 6 else 5


def _get(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def advcam_params(cfg_advcam: Any = None) -> dict[str, Any]:
    """Climbing parameters from ``cfg.cam.advcam`` (Config, dict or None), defaults filled in."""
    return {k: _get(cfg_advcam, k, v) for k, v in DEFAULTS.items()}


def prepare_model(model: nn.Module, cfg_cam: Any = None) -> nn.Module:
    """The model AdvCAM should climb on, once per run: ``model`` itself, or with ``cam.advcam.fold_batchnorm``
    a copy with its conv -> BatchNorm pairs folded (:func:`advcam.models.resnet.fold_batchnorm`), and with
    ``cam.advcam.channels_last`` its weights in channels-last memory format (a copy as well)."""
    from advcam.models.resnet import fold_batchnorm

    p = advcam_params(_get(cfg_cam, "advcam", None))
    if bool(p["fold_batchnorm"]):
        model = fold_batchnorm(model)
    if bool(p["channels_last"]):
        if not bool(p["fold_batchnorm"]):
            model = copy.deepcopy(model)
        model = model.to(memory_format=torch.channels_last)
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
    p = advcam_params(_get(cfg_cam, "advcam", None))
    scales = [float(s) for s in _get(cfg_cam, "scales", [1.0, 0.5, 1.5, 2.0])]
    flip = bool(_get(cfg_cam, "flip", True))
    out = []
    for s in scales:
        try:
            out.append(climb(model, resize_image(image, s), classes,
                             steps=steps_for_scale(p["steps"], s, p["half_steps_at_half_scale"]),
                             xi=float(p["xi"]), lam=float(p["lam"]), tau=float(p["tau"]), flip=flip,
                             sign_steps=bool(p["sign_steps"]), cumulative_mask=bool(p["cumulative_mask"]),
                             suppress_image_classes_only=bool(p["suppress_image_classes_only"]),
                             backend=str(p["backend"]), precision=str(p["precision"]),
                             channels_last=bool(p["channels_last"]), cuda_graph=bool(p["cuda_graph"]),
                             callback=callback))
        except AdvcamError as err:
            where = f"image {image_id}, scale {s}" if image_id is not None else f"scale {s}"
            raise AdvcamError(f"{where}: {err}") from err
    return out


__all__ = ["climb", "advcam_maps", "advcam_params", "prepare_model", "steps_for_scale", "gradcam_scale", "DEFAULTS"]
