"""AdvCAM climbing against a slow, literal implementation of the reference's equations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advcam.attribution.advcam import advcam_maps, climb, steps_for_scale
from advcam.attribution.cam import compute_maps
from advcam.config import Config
from advcam.utils.errors import AdvcamError


class TinyCAMNet(nn.Module):
    """A small random classifier with the CAMNet interface (features / classifier / cam / forward)."""

    def __init__(self, num_classes: int = 5, width: int = 12, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, width, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(width, num_classes, 1, bias=False)
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.features(x), self.classifier.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3), keepdim=True)).flatten(1)


def literal_climb(model: TinyCAMNet, image: torch.Tensor, classes, steps=27, xi=0.08, lam=7.0, tau=0.5):
    """The reference loop, literally: one class at a time, Grad-CAM through autograd (sum-pooled score,
    weights = gradient sums / number of positive gradient entries in the batch), parameter gradients on,
    image update detached, accumulation of the Grad-CAM maps of x_0 .. x_{T-1}."""
    out = []
    for c in classes:
        x = torch.stack([image, image.flip(-1)]).detach().clone()
        acc = torch.zeros(())
        for t in range(steps):
            x.requires_grad_(True)
            fmaps = model.features(x)
            logits = F.conv2d(fmaps, model.classifier.weight)
            score = F.relu(logits).sum((2, 3))
            grads, = torch.autograd.grad(score[:, c].sum(), fmaps, retain_graph=True)
            weights = grads.sum((2, 3), keepdim=True) / ((grads > 0).sum() + 1e-12)
            gcam = F.relu((fmaps * weights).sum(1, keepdim=True))
            regions = gcam[0] + gcam[1].flip(-1)
            if t == 0:
                init = regions.detach()
            acc = acc + regions[0].detach()
            logit = F.relu(logits).mean((2, 3))
            logit_loss = -2 * logit[:, c].sum() + logit.sum()
            mask = torch.zeros(regions.shape, dtype=regions.dtype)
            mask[regions.detach() / regions.detach().max() > tau] = 1
            loss = -logit_loss - (torch.abs(regions - init) * mask).sum() * lam
            model.zero_grad()
            loss.backward()
            g = x.grad
            x = torch.clamp(x + xi * (g / (g.abs().max() + 1e-12)), x.min(), x.max()).detach()
        out.append(acc)
    return torch.stack(out)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def model64() -> TinyCAMNet:
    return TinyCAMNet().double().eval()


@pytest.fixture(scope="module")
def image64() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 27, 33, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["fallback", "auto"])
def test_climb_matches_literal_reference(model64, image64, backend):
    classes = [1, 3]
    ours = climb(model64, image64, classes, steps=6, xi=0.08, lam=7.0, tau=0.5, backend=backend)
    ref = literal_climb(model64, image64, classes, steps=6)
    assert ours.shape == ref.shape == (2, 7, 9)
    assert ours.abs().max() > 0
    assert rel_err(ours, ref) < 1e-4
    # climbing changed the maps: the accumulation is not just steps * A(x_0)
    assert rel_err(ours, 6 * literal_climb(model64, image64, classes, steps=1)) > 1e-3
    assert all(p.requires_grad for p in model64.parameters())  # restored


class HalfBlindCAMNet(TinyCAMNet):
    """Features exactly zero on the right half of the map, as over black or zero-padded regions: the CAM is 0
    there, and the reference's Grad-CAM counts only gradient entries > 0 (ReLU's gradient at 0 is 0)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        return f * (torch.arange(f.shape[-1], device=f.device) < f.shape[-1] // 2).to(f.dtype)


def test_pixels_with_a_zero_cam_are_not_counted(image64):
    model = HalfBlindCAMNet().double().eval()
    ours = climb(model, image64, [1, 3], steps=4)
    assert bool((model.cam(image64[None])[..., -4:] == 0).all())
    assert rel_err(ours, literal_climb(model, image64, [1, 3], steps=4)) < 1e-4


def test_climb_float32_close_to_literal(model64, image64):
    model32 = TinyCAMNet().float().eval()
    ours = climb(model32, image64.float(), [0, 2], steps=4)
    ref = literal_climb(model32, image64.float(), [0, 2], steps=4)
    assert ours.dtype == torch.float32 and rel_err(ours, ref) < 1e-3


def test_one_step_is_gradcam_scaled_cam(model64):
    # a mirror-symmetric image: both flips see the same image, so n_0 = n_1 and A = CAM_merged / (2 K+)
    torch.manual_seed(2)
    half = torch.randn(3, 20, 12, dtype=torch.float64)
    image = torch.cat([half, half.flip(-1)], -1)
    from advcam.attribution.cam import cam_at_scale
    classes = [0, 4]
    plain = cam_at_scale(model64, image, classes, 1.0, True).detach()
    kplus = (model64.classifier.weight.flatten(1)[classes] > 0).sum(1).double()
    one = climb(model64, image, classes, steps=1)
    assert torch.allclose(one, plain / (2 * kplus)[:, None, None], rtol=1e-10, atol=1e-12)


def test_empty_classes_and_bad_input(model64, image64):
    out = climb(model64, image64, [], steps=3)
    assert out.shape == (0, 7, 9)
    with pytest.raises(AdvcamError, match="outside"):
        climb(model64, image64, [7])
    with pytest.raises(AdvcamError, match=r"\(3, H, W\)"):
        climb(model64, image64[None], [0])
    with pytest.raises(AdvcamError, match="unknown option"):
        climb(model64, image64, [0], sign_step=True)


def test_non_finite_names_the_step(model64, image64):
    bad = TinyCAMNet().double().eval()
    with torch.no_grad():
        bad.classifier.weight[1] = float("inf")
    with pytest.raises(AdvcamError, match="image im7, scale 1.0: .*step 0") as refused:
        advcam_maps(bad, image64, [1], {"scales": [1.0], "advcam": {"steps": 2}}, image_id="im7")
    # before any climbing step the classifier is to blame, not the step size
    assert "the classifier overflows" in str(refused.value) and "xi" not in str(refused.value)


@pytest.mark.parametrize("option", [{"sign_steps": True}, {"cumulative_mask": True},
                                    {"suppress_image_classes_only": True}])
def test_options_change_the_result(model64, image64, option):
    base = climb(model64, image64, [1, 3], steps=6)
    other = climb(model64, image64, [1, 3], steps=6, **option)
    assert other.shape == base.shape and torch.isfinite(other).all()
    assert rel_err(other, base) > 1e-6


def test_half_scale_steps_follow_the_reference():
    assert steps_for_scale(27, 0.5) == 13 and steps_for_scale(27, 1.0) == 27 and steps_for_scale(27, 1.5) == 27
    assert steps_for_scale(8, 0.5) == 5 and steps_for_scale(4, 0.5) == 4
    assert [steps_for_scale(s, 0.5) for s in (5, 6, 10, 11, 12)] == [5, 5, 5, 5, 6]
    assert steps_for_scale(27, 0.5, half_steps_at_half_scale=False) == 27


def test_multiscale_driver(model64, image64):
    cfg = {"scales": [1.0, 0.5], "flip": True, "advcam": {"steps": 4, "backend": "fallback"}}
    maps = advcam_maps(model64, image64, [1, 3], cfg)
    assert [tuple(m.shape) for m in maps] == [(2, 7, 9), (2, 4, 4)]
    from advcam.attribution.cam import resize_image
    half = climb(model64, resize_image(image64, 0.5), [1, 3], steps=steps_for_scale(4, 0.5))
    assert torch.allclose(half, maps[1])  # the default cam.image_resize: bicubic, as the references
    tensor = advcam_maps(model64, image64, [1, 3], {**cfg, "image_resize": "bilinear"})[1]
    assert torch.allclose(tensor, climb(model64, resize_image(image64, 0.5, "bilinear"), [1, 3],
                                        steps=steps_for_scale(4, 0.5)))
    assert not torch.allclose(tensor, maps[1])
    unflipped = advcam_maps(model64, image64, [1, 3], {**cfg, "scales": [1.0], "flip": False})[0]
    assert torch.allclose(unflipped, climb(model64, image64, [1, 3], steps=4, flip=False))
    assert not torch.allclose(unflipped, maps[0])
    out = compute_maps(model64, image64, [1, 3], Config({**cfg, "method": "advcam"}))
    cam, high = torch.from_numpy(out["cam"]), torch.from_numpy(out["high_res"])
    assert cam.shape == (2, 7, 9) and high.shape == (2, 27, 33)
    peak = high.amax((1, 2))  # max / (max + 1e-5): below 1 by the eps only
    assert bool((peak <= 1).all()) and bool((peak > 0.99).all())


def test_callback_sees_every_step_and_changes_nothing(model64, image64):
    classes = [1, 3]
    states = []
    traced = climb(model64, image64, classes, steps=5, callback=lambda t, s: states.append((t, s)))
    assert torch.equal(traced, climb(model64, image64, classes, steps=5))
    assert [t for t, _ in states] == list(range(5))
    first, last = states[0][1], states[-1][1]
    both = torch.stack([image64, image64.flip(-1)])
    assert torch.equal(first["x"], both.repeat(2, 1, 1, 1))  # x_0: each class climbs its own copy, with the flip
    assert not torch.equal(last["x"], first["x"])  # the copies are not overwritten by later steps
    with torch.no_grad():
        pooled = F.relu(model64.cam(both)).mean((-2, -1))  # (2 flips, C)
    for k, c in enumerate(classes):
        assert first["score"][k] == pytest.approx(float(pooled[:, c].sum()), rel=1e-10)
        assert first["others"][k] == pytest.approx(float(pooled.sum() - pooled[:, c].sum()), rel=1e-10)
    assert torch.equal(first["l1"], torch.zeros(2, dtype=torch.float64))  # A(x_0) - A(x_0)
    assert (last["score"] - last["others"] > first["score"] - first["others"]).all()  # the ascent climbs
    assert torch.allclose(sum(s["map"] for _, s in states), traced)  # the returned map accumulates the maps


# ------------------------------------------------------------------------------------------- speed options
def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def test_bf16_runs_the_network_in_bf16_and_keeps_the_maps_in_float32():
    model = TinyCAMNet().float().eval()
    torch.manual_seed(3)
    image = torch.randn(3, 40, 52)
    seen = []
    hook = model.backbone[2].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        fast = climb(model, image, [0, 2], steps=1, precision="bf16")
    finally:
        hook.remove()
    assert seen == [torch.bfloat16] and fast.dtype == torch.float32
    ref = climb(model, image, [0, 2], steps=1)
    assert 0 < rel_err(fast, ref) < 2e-2  # bf16 rounding, no more
    climbed = climb(model, image, [0, 2], steps=4, precision="bf16")
    assert torch.isfinite(climbed).all() and corr(climbed, climb(model, image, [0, 2], steps=4)) > 0.99
    with pytest.raises(AdvcamError, match="precision"):
        climb(model, image, [0], steps=1, precision="fp16")


def test_channels_last_and_graph_options_keep_the_maps(model64, image64):
    from advcam.attribution.advcam import prepare_model

    ref = climb(model64, image64, [1, 3], steps=4)
    nhwc = prepare_model(model64, {"advcam": {"channels_last": True}})
    assert nhwc is not model64 and nhwc.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model64.backbone[0].weight.is_contiguous()  # the caller's model is left as it was
    assert rel_err(climb(nhwc, image64, [1, 3], steps=4, channels_last=True), ref) < 1e-10
    # cuda_graph applies to CUDA tensors only; elsewhere the eager loop runs, to the bit
    eager = climb(model64, image64, [1, 3], steps=6)
    assert torch.equal(climb(model64, image64, [1, 3], steps=6, cuda_graph=True), eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and bf16 on the GPU need a GPU (device run)")
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_cuda_graph_replays_the_eager_loop(precision):
    from advcam.attribution import advcam as adv
    from advcam.attribution import graphs

    model = TinyCAMNet().float().eval().cuda()
    torch.manual_seed(4)
    image, other = torch.randn(3, 61, 47, device="cuda"), torch.randn(3, 61, 47, device="cuda")
    eager = climb(model, image, [0, 1, 4], steps=9, precision=precision)
    captured = climb(model, image, [0, 1, 4], steps=9, precision=precision, cuda_graph=True)  # first call: capture
    assert rel_err(captured, eager) < 1e-5
    entries = graphs._CACHE[model]
    assert len(entries) == 1
    # later calls with the same size and class count replay the graphs with new images and classes
    replayed = climb(model, other, [2, 3, 0], steps=9, precision=precision, cuda_graph=True)
    assert len(entries) == 1
    assert rel_err(replayed, climb(model, other, [2, 3, 0], steps=9, precision=precision)) < 1e-5
    assert rel_err(climb(model, image, [0, 1, 4], steps=9, precision=precision, cuda_graph=True), eager) < 1e-5
    # a new class count is a new setting; a non-finite step is still named under replay (a non-finite xi is
    # refused up front, so the classifier is broken in place: the captured graphs read its weights)
    climb(model, image, [1], steps=9, precision=precision, cuda_graph=True)
    assert len(entries) == 2
    saved = model.classifier.weight.detach().clone()
    with torch.no_grad():
        model.classifier.weight[0] = float("inf")
    with pytest.raises(AdvcamError, match=r"non-finite .* \(step 0 of 9, before any climbing step"):
        climb(model, image, [0], steps=9, precision=precision, cuda_graph=True)
    assert len(entries) == 2  # replayed, not captured again
    with torch.no_grad():
        model.classifier.weight.copy_(saved)
    adv.clear_graphs(model)
    assert model not in graphs._CACHE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 flags matter on a GPU only (device run)")
def test_precision_sets_tf32_for_the_climb_only():
    model = TinyCAMNet().float().eval().cuda()
    seen = []
    hook = model.backbone[0].register_forward_hook(lambda m, i, o: seen.append(torch.backends.cudnn.allow_tf32))
    before = torch.backends.cudnn.allow_tf32
    try:
        image = torch.randn(3, 32, 32, device="cuda")
        climb(model, image, [0], steps=2, precision="fp32")
        climb(model, image, [0], steps=2, precision="tf32")
    finally:
        hook.remove()
    assert seen == [False, False, True, True] and torch.backends.cudnn.allow_tf32 == before


def test_tf32_mode_sets_both_flags_and_restores_them():
    """The switch itself runs on CPU builds too (the flags exist there), so a wrong flag name fails here, not
    only on a GPU."""
    from advcam.attribution.graphs import tf32_mode

    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    before = flags()
    for enabled in (True, False):
        with tf32_mode(enabled):
            assert flags() == (enabled, enabled)
        assert flags() == before
    with pytest.raises(RuntimeError, match="boom"), tf32_mode(not before[0]):
        raise RuntimeError("boom")
    assert flags() == before
    with tf32_mode(None):
        assert flags() == before


@pytest.mark.parametrize("option", [{}, {"suppress_image_classes_only": True}, {"flip": False}])
def test_climbing_images_together_gives_each_image_its_own_maps(model64, option):
    from advcam.attribution.advcam import climb_images

    torch.manual_seed(5)
    images = [torch.randn(3, 27, 33, dtype=torch.float64) for _ in range(3)]
    classes = [[1, 3], [], [0, 2, 4]]
    together = climb_images(model64, images, classes, steps=5, **option)
    assert [m.shape[0] for m in together] == [2, 0, 3] and together[1].shape == (0, 7, 9)
    for image, cs, maps in zip(images, classes, together):
        if cs:  # rows are independent: the maps of climbing the image alone (float64: rounding only)
            assert rel_err(maps, climb(model64, image, cs, steps=5, **option)) < 1e-10
    with pytest.raises(AdvcamError, match="one size"):
        climb_images(model64, [images[0], torch.randn(3, 20, 20, dtype=torch.float64)], [[1], [2]], steps=2)
    with pytest.raises(AdvcamError, match="2 images but 1 class lists"):
        climb_images(model64, images[:2], [[1]], steps=2)


def test_climb_chunks_split_classes_in_order_and_keep_empty_images():
    from advcam.attribution.advcam import climb_chunks

    classes = [[0, 2, 4], [1], [], [3, 5]]
    assert climb_chunks(classes, 0) == [[(0, [0, 2, 4]), (1, [1]), (2, []), (3, [3, 5])]]
    assert climb_chunks(classes, 6) == climb_chunks(classes, 0)
    assert climb_chunks(classes, 2) == [[(0, [0, 2]), (2, [])], [(0, [4]), (1, [1])], [(3, [3, 5])]]
    assert climb_chunks([[1, 2]], 1) == [[(0, [1])], [(0, [2])]]


@pytest.mark.parametrize("option", [{}, {"suppress_image_classes_only": True}])
def test_max_classes_per_climb_keeps_the_maps(model64, option):
    """Climbing fewer classes at a time (less memory) gives the maps of climbing them all together, also with
    suppress_image_classes_only, whose other classes stay the whole image's."""
    from advcam.attribution.advcam import advcam_maps_images

    torch.manual_seed(6)
    images = [torch.randn(3, 27, 33, dtype=torch.float64) for _ in range(2)]
    classes = [[1, 3, 4], [0, 2]]
    cfg = {"scales": [1.0, 0.5], "flip": True, "advcam": {"steps": 4, **option}}
    together = advcam_maps_images(model64, images, classes, cfg)
    for limit in (1, 2):
        split = advcam_maps_images(model64, images, classes, {**cfg, "advcam": {**cfg["advcam"],
                                                                              "max_classes_per_climb": limit}})
        for a, b in zip(together, split):
            assert [m.shape for m in a] == [m.shape for m in b]
            assert all(rel_err(y, x) < 1e-10 for x, y in zip(a, b))
    if option:  # the image's other classes matter: climbing a class alone without them would differ
        alone = advcam_maps_images(model64, images[:1], [[1]], cfg)[0]
        assert rel_err(alone[0], together[0][0][:1]) > 1e-6


@pytest.mark.parametrize("kwargs, words", [
    ({"steps": 2.7}, "cam.advcam.steps: must be a whole number >= 1, got 2.7"),
    ({"steps": True}, "cam.advcam.steps"),
    ({"steps": "3"}, "cam.advcam.steps"),
    ({"steps": 0}, "cam.advcam.steps"),
    ({"xi": float("nan")}, "cam.advcam.xi: must be a finite number > 0, got nan"),
    ({"xi": float("inf")}, "cam.advcam.xi"),
    ({"xi": 0.0}, "cam.advcam.xi"),
    ({"xi": -0.08}, "cam.advcam.xi"),
    ({"lam": -1.0}, "cam.advcam.lam: must be a finite number >= 0"),
    ({"tau": 2.0}, "cam.advcam.tau: must be a finite number >= 0 and <= 1, got 2.0"),
    ({"tau": float("nan")}, "cam.advcam.tau"),
])
def test_climb_refuses_values_outside_the_schema_ranges(model64, image64, kwargs, words):
    """The library takes the params' ranges too (a negative step would descend, a fractional one truncate)."""
    with pytest.raises(AdvcamError, match=words.replace(".", r"\.").replace("(", r"\(")):
        climb(model64, image64, [1], **{"steps": 2, **kwargs})


def test_climb_names_a_non_finite_image(model64, image64):
    for value in (float("nan"), float("inf")):
        image = image64.clone()
        image[0, 3, 4] = value
        with pytest.raises(AdvcamError, match="the image holds NaN or infinite values"):
            climb(model64, image, [1], steps=2)


class BNNet(TinyCAMNet):
    """TinyCAMNet with BatchNorm and dropout, whose train mode would change the maps and the statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Dropout2d(0.5), nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())


@pytest.mark.parametrize("method", ["advcam", "cam"])
def test_a_model_in_training_mode_is_used_in_eval_mode_and_given_back(image64, method):
    """climb / compute_maps on a model in training: the maps of eval mode, BatchNorm's statistics untouched,
    every submodule's mode restored (a frozen part stays in eval)."""
    model = BNNet().double()
    with torch.no_grad():
        model.backbone[1].running_mean.uniform_(-1, 1)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = {"method": method, "scales": [1.0, 0.5], "advcam": {"steps": 3}}
    expected = compute_maps(model.eval(), image64, [1, 3], cfg)
    model.train()
    model.backbone[1].eval()  # a frozen BatchNorm inside a training model keeps its own mode
    got = compute_maps(model, image64, [1, 3], cfg)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert model.training and model.backbone[3].training and not model.backbone[1].training
    assert all((got[k] == expected[k]).all() for k in ("keys", "cam", "high_res"))
    if method == "advcam":
        climb(model, image64.float().double(), [2], steps=2)
        assert model.training and all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_compute_maps_names_class_ids_out_of_range_and_takes_the_models_dtype(model64, image64):
    for method in ("cam", "advcam"):
        with pytest.raises(AdvcamError, match=r"class ids \[7\] outside 0\.\.4"):
            compute_maps(model64, image64, [1, 7], {"method": method, "scales": [1.0]})
    maps = compute_maps(model64, image64.float(), [1], {"method": "cam", "scales": [1.0]})  # float32 image
    assert maps["cam"].shape[0] == 1


def test_each_scale_is_announced_as_its_climb_starts(model64):
    """cams shows the scale being climbed (minutes each on a CPU at VOC's sizes): compute_maps_images calls
    on_scale before each scale's climb, for one image too, and not for plain CAM, which has no climb."""
    from advcam.attribution.cam import compute_maps_images

    torch.manual_seed(2)
    images = [torch.randn(3, 27, 33, dtype=torch.float64)]
    calls: list[tuple[float, int, int]] = []
    cfg = {"method": "advcam", "scales": [1.0, 0.5, 1.5], "flip": False, "advcam": {"steps": 2}}
    compute_maps_images(model64, images, [[1]], cfg, on_scale=lambda *a: calls.append(a))
    assert calls == [(1.0, 0, 3), (0.5, 1, 3), (1.5, 2, 3)]
    calls.clear()
    compute_maps_images(model64, images, [[1]], {**cfg, "method": "cam"}, on_scale=lambda *a: calls.append(a))
    assert calls == []


def test_a_note_on_a_bar_shows_once_its_interval_has_passed():
    import io

    from tqdm import tqdm

    from advcam.utils.progress import note

    out = io.StringIO()
    bar = tqdm(total=2, desc="cams", file=out, mininterval=0)
    note(bar, "scale 1.5 (3/4)")
    assert "scale 1.5 (3/4)" in out.getvalue()
    slow = io.StringIO()
    bar = tqdm(total=2, desc="cams", file=slow, mininterval=3600)  # a log file's bar, just printed
    note(bar, "scale 2 (4/4)")
    assert "scale 2" not in slow.getvalue()
    bar.update(1)  # shown with the next line the bar prints
    bar.close()
    assert "scale 2 (4/4)" in slow.getvalue()
