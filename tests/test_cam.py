"""CAM maps (scales, flips, normalisation), the CAM file format and the resumable ``cams`` stage."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from advcam import config
from advcam.attribution import cam as cam_mod
from advcam.attribution.cam import cam_at_scale, combine_scales, compute_maps, load_cam, save_cam
from advcam.data.transforms import normalize
from advcam.utils.errors import AdvcamError

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


class ColourNet(nn.Module):
    """Stand-in classifier: features = the normalised RGB image pooled by ``stride``; class c = channel c.

    On a black background every channel is negative after normalisation, so ReLU(CAM) is exactly the
    region painted in that channel's colour. ``ramp`` multiplies the features by a left-to-right ramp
    (a network that is not flip-equivariant).
    """

    def __init__(self, stride: int = 1, ramp: bool = False, nan: bool = False) -> None:
        super().__init__()
        self.stride, self.ramp, self.nan = stride, ramp, nan
        self.output_stride = stride
        self.classifier = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.eye(3)[:, :, None, None])
        self.calls = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        f = F.avg_pool2d(x, self.stride) if self.stride > 1 else x
        if self.ramp:
            f = f * torch.linspace(0.1, 1.0, f.shape[-1])
        return f * float("nan") if self.nan else f

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.features(x), self.classifier.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3), keepdim=True)).flatten(1)


def cam_cfg(**kw):
    return config.load(None, ["cam.method=cam", "cam.scales=[1.0]", *[f"cam.{k}={v}" for k, v in kw.items()]]).cam


def test_flip_merge_on_asymmetric_model():
    torch.manual_seed(0)
    image = torch.rand(3, 8, 12) + 0.5  # positive: ReLU keeps everything
    maps = cam_at_scale(ColourNet(ramp=True), image, [2, 0], 1.0, flip=True)
    ramp = torch.linspace(0.1, 1.0, 12)
    # un-flipped pass + the flipped pass flipped back: x * ramp + x * ramp reversed
    expected = image[[2, 0]] * ramp + image[[2, 0]] * ramp.flip(0)
    assert maps.shape == (2, 8, 12)
    torch.testing.assert_close(maps, expected)
    no_flip = cam_at_scale(ColourNet(ramp=True), image, [1], 1.0, flip=False)
    torch.testing.assert_close(no_flip, image[[1]] * ramp)


def test_cam_at_scale_resizes_like_irn():
    image = torch.rand(3, 37, 50)
    assert cam_at_scale(ColourNet(), image, [0], 0.5).shape == (1, 18, 25)  # round(18.5) = 18 (half to even)
    assert cam_at_scale(ColourNet(stride=4), image, [0], 1.5).shape == (1, 14, 18)  # 56x75 / 4


def torchvision_normalize(pixels: np.ndarray) -> torch.Tensor:
    """IRN's ``TorchvisionNormalize`` (float64 arithmetic, float32 result), CHW."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(((pixels / 255. - mean) / std).astype(np.float32).transpose(2, 0, 1).copy())


@pytest.mark.parametrize("scale", [0.5, 1.5, 2.0, 0.37])
def test_each_scales_image_is_the_references_pil_bicubic_rescale(scale):
    """AdvCAM's ``VOC12ClassificationDatasetMSF`` written out: ``pil_rescale(img, s, order=3)`` (PIL bicubic of the
    8-bit image to the rounded size), then ``TorchvisionNormalize``; the identity classifier shows the image each
    scale sees. ``cam.image_resize=bilinear`` resizes the normalised tensor instead, which differs."""
    pixels = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    size = (int(np.round(37 * scale)), int(np.round(50 * scale)))
    ref = torchvision_normalize(np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.BICUBIC)))
    image = normalize(pixels)
    seen = cam_at_scale(ColourNet(), image, [0, 1, 2], scale, flip=False)
    torch.testing.assert_close(seen, F.relu(ref), rtol=0, atol=1e-5)
    maps = compute_maps(ColourNet(), image, [0, 1, 2], cam_cfg(scales=f"[{scale}]", flip="false"))["high_res"]
    expected = F.interpolate(F.relu(ref)[None], size=(37, 50), mode="bilinear", align_corners=False)[0]
    expected = expected / (expected.amax((1, 2), keepdim=True) + 1e-5)
    np.testing.assert_allclose(maps, expected.numpy(), rtol=0, atol=1e-5)
    tensor = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(cam_at_scale(ColourNet(), image, [0, 1, 2], scale, flip=False, image_resize="bilinear"),
                               F.relu(tensor))
    assert (tensor - ref).abs().max() > 0.1


def test_combine_scales_shapes_and_normalisation():
    torch.manual_seed(0)
    h, w = 37, 50
    maps = [torch.rand(2, 10, 13) * 5, torch.rand(2, 5, 7), torch.rand(2, 20, 26) * 3]
    cam, high = combine_scales(maps, (h, w))
    assert cam.shape == (2, 10, 13) and high.shape == (2, h, w)
    assert cam.dtype == high.dtype == torch.float32
    for m in (cam, high):
        peak = m.amax(dim=(1, 2))
        assert torch.all(peak < 1) and torch.all(peak > 1 - 1e-5)
        assert m.min() >= 0
    # high_res = resize to the stride-16 up size (48 x 64), crop to 37 x 50, sum, normalise
    up = sum(F.interpolate(m[None], size=(48, 64), mode="bilinear", align_corners=False)[0] for m in maps)
    up = up[:, :h, :w]
    torch.testing.assert_close(high, up / (up.amax(dim=(1, 2), keepdim=True) + 1e-5))
    # cam (the random walk's input) = each map resized to the stride-4 size ceil(H/4) x ceil(W/4), summed
    small = sum(F.interpolate(m[None], size=(10, 13), mode="bilinear", align_corners=False)[0] for m in maps)
    torch.testing.assert_close(cam, small / (small.amax(dim=(1, 2), keepdim=True) + 1e-5))


def seam_reference_normalisation(sum_cam: np.ndarray) -> np.ndarray:
    """SEAM's infer_SEAM.py normalisation of summed maps (n, H, W), written out as the reference does it."""
    sum_cam = sum_cam.copy()
    sum_cam[sum_cam < 0] = 0
    cam_max = np.max(sum_cam, (1, 2), keepdims=True)
    cam_min = np.min(sum_cam, (1, 2), keepdims=True)
    sum_cam[sum_cam < cam_min + 1e-5] = 0
    return (sum_cam - cam_min - 1e-5) / (cam_max - cam_min + 1e-5)


def test_min_max_normalisation_is_seams_up_to_the_clip_at_zero():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 17, 23)).astype(np.float64) * 4 + np.array([0.0, 0.7, 2.5])[:, None, None]  # floors
    maps[0, :2] = 0.0  # a class whose minimum is zero
    maps[1, 3, 4] = -0.2  # a negative pixel (clipped first)
    ref = seam_reference_normalisation(maps)
    ours = cam_mod.normalise_maps(torch.from_numpy(maps), "min_max").numpy()
    np.testing.assert_allclose(ours, np.maximum(ref, 0), rtol=0, atol=1e-12)
    assert (ref < 0).any() and ours.min() == 0 and np.allclose(ours.max((1, 2)), 1, atol=1e-5)
    # max normalisation keeps each map's floor: a class with a floor never reaches zero
    by_max = cam_mod.normalise_maps(torch.from_numpy(np.maximum(maps, 0)), "max").numpy()
    assert by_max[2].min() > 0.3 and ours[2].min() == 0
    with pytest.raises(AdvcamError, match="cam.normalise"):
        cam_mod.normalise_maps(torch.from_numpy(maps), "minmax")


def test_normalise_auto_follows_the_classifiers_reference():
    from advcam.models.classifier import build_classifier
    from advcam.models.seam import build_seam

    seam, plain = build_seam("resnet_small", 3), build_classifier("resnet_small", 3)
    assert cam_mod.resolve_normalise({"normalise": "auto"}, seam) == "min_max"
    assert cam_mod.resolve_normalise({}, seam) == "min_max"
    assert cam_mod.resolve_normalise(config.load(None, []).cam, plain) == "max"
    assert cam_mod.resolve_normalise({"normalise": "max"}, seam) == "max"
    assert cam_mod.resolve_normalise({"normalise": "min_max"}, plain) == "min_max"
    with pytest.raises(AdvcamError, match="cam.normalise"):
        cam_mod.resolve_normalise({"normalise": "peak"}, plain)


def test_compute_maps_of_a_seam_classifier_are_min_max_normalised():
    from advcam.models.seam import build_seam

    torch.manual_seed(0)
    model = build_seam("resnet_small", 3).eval()
    image = torch.randn(3, 40, 52)
    cfg = config.load(None, ["cam.method=cam", "cam.scales=[1.0, 0.5]"]).cam
    auto = compute_maps(model, image, [0, 2], cfg)
    by_max = compute_maps(model, image, [0, 2], config.load(None, ["cam.method=cam", "cam.scales=[1.0, 0.5]",
                                                                     "cam.normalise=max"]).cam)
    for key in ("cam", "high_res"):
        peak = auto[key].max((1, 2))  # (max - min - 1e-5) / (max - min + 1e-5): just under 1
        assert np.all(auto[key].min((1, 2)) == 0) and np.all((peak > 0.99) & (peak <= 1))
        assert by_max[key].min() > 0  # the PCM's maps have a floor that max normalisation keeps
        expected = cam_mod.normalise_maps(torch.from_numpy(by_max[key]).double(), "min_max").numpy()
        assert np.corrcoef(expected.ravel(), auto[key].ravel())[0, 1] > 0.999


def seam_normalize(pixels: np.ndarray) -> torch.Tensor:
    """SEAM's ``Normalize``: per channel ``(x / 255. - mean) / std`` in float64, stored as float32; CHW."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = np.empty(pixels.shape, np.float32)
    for c in range(3):
        out[..., c] = (pixels[..., c] / 255. - mean[c]) / std[c]
    return torch.from_numpy(out.transpose(2, 0, 1).copy())


def infer_seam_reference(model: nn.Module, pixels: np.ndarray, classes: list[int], scales: list[float]) -> np.ndarray:
    """SEAM's ``infer_SEAM.py`` written out, one pass per scale and flip: the 8-bit image resized by PIL
    ``CUBIC`` to ``(round(W * s), round(H * s))`` and normalised (``VOC12ClsDatasetMSF``); the network's PCM
    output resized to the scaled input with ``align_corners=True`` (``resnet38_SEAM.Net.forward``), then to the
    image with ``align_corners=False``, flipped back, summed, min-max normalised."""
    h, w = pixels.shape[:2]
    total = torch.zeros(len(classes), h, w, dtype=torch.float64)
    with torch.no_grad():
        for s in scales:
            size = (int(round(h * s)), int(round(w * s)))
            x = seam_normalize(np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.BICUBIC)))[None]
            for flip in (False, True):
                rv = model.seam_forward(x.flip(-1) if flip else x)[1][:, 1:]
                rv = F.interpolate(rv, size=size, mode="bilinear", align_corners=True)
                rv = F.interpolate(rv, size=(h, w), mode="bilinear", align_corners=False)[0, classes]
                total += (rv.flip(-1) if flip else rv).double()
    return seam_reference_normalisation(total.numpy())


def test_a_seam_classifiers_maps_are_resized_as_infer_seam_does():
    from advcam.models.seam import build_seam

    torch.manual_seed(1)
    model = build_seam("resnet_small", 4).eval()
    pixels = np.random.default_rng(1).integers(0, 256, (45, 38, 3), dtype=np.uint8)
    image, classes, scales = normalize(pixels), [0, 3], [1.0, 0.5, 1.5]
    ref = infer_seam_reference(model, pixels, classes, scales)
    args = ["cam.method=cam", f"cam.scales={scales}"]
    auto = compute_maps(model, image, classes, config.load(None, args).cam)["high_res"]
    np.testing.assert_allclose(auto, np.maximum(ref, 0), rtol=0, atol=2e-5)
    irn = compute_maps(model, image, classes, config.load(None, [*args, "cam.resize=irn"]).cam)["high_res"]
    assert np.abs(irn - np.maximum(ref, 0)).max() > 0.02  # IRN's resize (to the stride multiple, cropped) differs
    assert cam_mod.resolve_resize({}, model) == "seam" and cam_mod.resolve_resize({}, ColourNet()) == "irn"
    assert cam_mod.resolve_resize({"resize": "seam"}, ColourNet()) == "seam"
    with pytest.raises(AdvcamError, match="cam.resize"):
        cam_mod.resolve_resize({"resize": "nearest"}, model)


def test_model_stride_sets_the_up_size():
    assert cam_mod.model_stride(ColourNet(stride=4)) == 4
    holder = nn.Module()
    holder.backbone = nn.Module()
    holder.backbone.output_stride = 8
    assert cam_mod.model_stride(holder) == 8 and cam_mod.model_stride(nn.Linear(1, 1)) == 16
    # a stride-8 map of a 20-px side covers 24 px: stretched to 24 and cropped, not to IRN's 32
    m = torch.arange(3.0).repeat(3, 1)[None]  # (1, 3, 3), columns 0, 1, 2
    _, high = combine_scales([m], (20, 20), stride=8)
    ref = F.interpolate(m[None], size=(24, 24), mode="bilinear", align_corners=False)[0, :, :20, :20]
    torch.testing.assert_close(high, ref / (ref.amax() + 1e-5))


def test_compute_maps_format_and_empty_keys():
    image = torch.zeros(3, 21, 30)
    model = ColourNet(stride=4)
    out = compute_maps(model, image, [2, 0], cam_cfg())
    assert out["keys"].dtype == np.int64 and out["keys"].tolist() == [0, 2]
    assert out["cam"].shape == (2, 6, 8) and out["high_res"].shape == (2, 21, 30)
    empty = compute_maps(model, image, [], cam_cfg())
    assert empty["keys"].shape == (0,) and empty["keys"].dtype == np.int64
    assert empty["cam"].shape == (0, 6, 8) and empty["high_res"].shape == (0, 21, 30)
    assert empty["high_res"].dtype == np.float32


def test_compute_maps_unknown_method_and_plugin(monkeypatch):
    cfg = cam_cfg()
    monkeypatch.setitem(cam_mod.METHODS, "fake", lambda m, x, cls, c: [torch.ones(len(cls), 3, 3)])
    fake = config.Config({**cfg.to_dict(), "method": "fake"})
    out = compute_maps(ColourNet(), torch.zeros(3, 12, 12), [1], fake)
    assert out["high_res"].shape == (1, 12, 12) and np.allclose(out["high_res"], 1 / (1 + 1e-5))
    with pytest.raises(AdvcamError, match="nope"):
        compute_maps(ColourNet(), torch.zeros(3, 12, 12), [1], config.Config({**cfg.to_dict(), "method": "nope"}))


def test_cam_file_round_trip_no_pickle(tmp_path):
    maps = compute_maps(ColourNet(stride=4), torch.rand(3, 17, 9), [1], cam_cfg())
    save_cam(tmp_path / "a.npz", maps)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["cam", "high_res", "keys"]
        assert z["keys"].dtype == np.int64 and z["cam"].dtype == np.float32 and z["high_res"].dtype == np.float32
        assert z["cam"].shape == (1, 5, 3) and z["high_res"].shape == (1, 17, 9)
    assert load_cam(tmp_path / "a.npz", (17, 9))["keys"].tolist() == [1]
    with pytest.raises(AdvcamError, match="a.npz.*does not match"):
        load_cam(tmp_path / "a.npz", (18, 9))


# ---------------------------------------------------------------- the stage, on a stand-in dataset
class FakeInfo:
    """The DatasetInfo interface over a folder of PNGs: black images with coloured squares."""

    classes = ["red", "green", "blue"]
    num_classes = 3

    def __init__(self, folder: Path, n: int = 3, size: tuple[int, int] = (20, 28), mask_missing: int = -1):
        self.folder = self.root = folder
        self.mask_dir = "masks"
        ids = [f"img{i}" for i in range(n)]
        self.lists = {"infer": ids, "train": ids, "val": ids}
        self.labels = {}
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        for i, image_id in enumerate(ids):
            img, mask = np.zeros((*size, 3), np.uint8), np.zeros(size, np.uint8)
            c = i % 3
            img[4:12, 5 + i:15 + i, c] = 255
            mask[4:12, 5 + i:15 + i] = c + 1
            mask[3, 5:15] = 255
            self.labels[image_id] = [c]
            Image.fromarray(img).save(self.image_path(image_id))
            if i != mask_missing:
                Image.fromarray(mask).save(self.mask_path(image_id))

    def image_path(self, image_id: str) -> Path:
        return self.folder / "images" / f"{image_id}.png"

    def mask_path(self, image_id: str) -> Path:
        return self.folder / "masks" / f"{image_id}.png"

    def read_image(self, image_id: str) -> np.ndarray:
        return np.array(Image.open(self.image_path(image_id)).convert("RGB"))

    def read_mask(self, image_id: str) -> np.ndarray:
        return np.array(Image.open(self.mask_path(image_id)))

    def check_lists(self, ds: object, what: str) -> None:
        """Built by the test, not prepared: there are no prepared list names to compare."""


def stage_normalize(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((img / 255.0 - MEAN) / STD).astype(np.float32)).permute(2, 0, 1).contiguous()


@pytest.fixture
def stage(tmp_path, monkeypatch):
    from advcam.steps import cams

    info = FakeInfo(tmp_path / "data")
    model = ColourNet()
    monkeypatch.setattr(cams, "load_info", lambda folder: info)
    monkeypatch.setattr(cams, "normalize", stage_normalize)
    loads = []

    def load(path, map_location="cpu", num_classes=None, classes=None):
        loads.append(path)
        return model

    monkeypatch.setattr(cams, "load_classifier", load)
    cfg = config.load(None, ["device=cpu", "cam.method=cam", "cam.scales=[1.0]", "cam.thresholds=[0.1, 0.5, 0.99]",
                             "cam.eval_threshold=0.5"])
    (tmp_path / "cls.pt").write_bytes(b"stand-in")
    paths = dict(data=tmp_path / "data", model=tmp_path / "cls.pt", out=tmp_path / "cams",
                 metrics=tmp_path / "m" / "seeds.json", curve=tmp_path / "m" / "curve.csv")
    return cams, cfg, paths, model, loads, info


def test_cams_stage_writes_files_and_perfect_seeds(stage):
    cams, cfg, paths, model, loads, info = stage
    cams.run(cfg, **paths)
    files = sorted(p.name for p in paths["out"].glob("*.npz"))
    assert files == ["img0.npz", "img1.npz", "img2.npz"]
    m = json.loads(paths["metrics"].read_text())
    assert m["num_images"] == 3
    assert m["seed_miou"] == pytest.approx(1.0) and m["seed_miou_fixed"] == pytest.approx(1.0)
    assert m["seed_best_threshold"] == 0.1
    assert m["seed_iou_background"] == pytest.approx(1.0) and m["seed_iou_red"] == pytest.approx(1.0)
    lines = paths["curve"].read_text().splitlines()
    assert lines[0] == "threshold,miou" and len(lines) == 4 and lines[1].startswith("0.1,1.0")
    assert "seed_miou_reference_range" not in m  # no swept threshold within 0.15..0.34


def test_seed_metrics_also_report_the_papers_threshold_range(stage):
    cams, cfg, paths, model, loads, info = stage
    cfg = config.load(None, ["device=cpu", "cam.method=cam", "cam.scales=[1.0]",
                             "cam.thresholds=[0.1, 0.2, 0.3, 0.5]", "cam.eval_threshold=0.5"])
    cams.run(cfg, **paths)
    m = json.loads(paths["metrics"].read_text())
    assert m["seed_best_threshold"] == 0.1  # ties: the first best of the whole sweep
    assert m["seed_best_threshold_reference_range"] == 0.2  # the first best within 0.15..0.34
    assert m["seed_miou_reference_range"] == pytest.approx(1.0)


def test_papers_range_includes_both_ends_and_per_class_ious_are_at_the_best_threshold(stage):
    """0.15 and 0.34 are inside the papers' range, 0.14 and 0.35 outside; the per-class seed IoUs are those of
    the best threshold, not of the sweep's last one (1.0 labels nothing: max-normalised maps stay below 1)."""
    cams, cfg, paths, model, loads, info = stage
    cams.run(cfg, **paths)  # perfect seeds at every threshold below 1: ties go to the first in sweep order
    ids = ["img0", "img1", "img2"]

    def scored(thresholds: str) -> dict:
        cfg = config.load(None, ["device=cpu", "cam.method=cam", f"cam.thresholds={thresholds}",
                                 "cam.eval_threshold=0.5"])
        return cams.evaluate_seeds(cfg, info, ids, paths["out"])[0]

    assert scored("[0.1, 0.35, 0.34]")["seed_best_threshold_reference_range"] == 0.34
    assert scored("[0.1, 0.34]")["seed_best_threshold_reference_range"] == 0.34
    assert scored("[0.14, 0.15]")["seed_best_threshold_reference_range"] == 0.15
    assert "seed_miou_reference_range" not in scored("[0.14, 0.35]")
    m = scored("[0.1, 0.5, 1.0]")
    assert m["seed_best_threshold"] == 0.1 and m["seed_miou"] == pytest.approx(1.0)
    ious = {k: v for k, v in m.items() if k.startswith("seed_iou_")}
    assert len(ious) == info.num_classes + 1 and all(v == pytest.approx(1.0) for v in ious.values()), ious


def test_cams_stage_resumes(stage):
    cams, cfg, paths, model, loads, info = stage
    cams.run(cfg, **paths)
    calls = model.calls
    mtime = (paths["out"] / "img0.npz").stat().st_mtime_ns
    cams.run(cfg, **paths)
    assert model.calls == calls and len(loads) == 1  # nothing recomputed, model not even loaded
    assert (paths["out"] / "img0.npz").stat().st_mtime_ns == mtime
    # a truncated file is recomputed, a stale temp file removed
    data = (paths["out"] / "img1.npz").read_bytes()
    (paths["out"] / "img1.npz").write_bytes(data[: len(data) // 2])
    (paths["out"] / ".tmp-img2.npz.abc.npz").write_bytes(b"junk")
    cams.run(cfg, **paths)
    assert model.calls == calls + 1
    assert not list(paths["out"].glob(".tmp-*"))
    assert load_cam(paths["out"] / "img1.npz", (20, 28))["keys"].tolist() == [1]


def test_cams_stage_recomputes_when_params_or_model_change(stage):
    cams, cfg, paths, model, loads, info = stage
    cams.run(cfg, **paths)
    calls = model.calls
    sweep = config.load(None, ["device=cpu", "cam.method=cam", "cam.scales=[1.0]", "cam.thresholds=[0.2]", "cam.eval_threshold=0.2"])
    cams.run(sweep, **paths)  # seed thresholds do not change the maps
    assert model.calls == calls
    cams.run(config.load(None, ["device=cpu", "cam.method=cam", "cam.scales=[1.0]", "cam.flip=false"]), **paths)
    assert model.calls == calls + 3
    paths["model"].write_bytes(b"retrained classifier")
    cams.run(config.load(None, ["device=cpu", "cam.method=cam", "cam.scales=[1.0]", "cam.flip=false"]), **paths)
    assert model.calls == calls + 6


def test_cams_stage_recomputes_an_image_whose_labels_changed(stage):
    """Corrected image-level labels (labels.json) recompute that image's maps, for its new classes, and keep the
    other images' files."""
    cams, cfg, paths, model, loads, info = stage
    cams.run(cfg, **paths)
    calls = model.calls
    info.labels["img0"] = [1]
    cams.run(cfg, **paths)
    assert model.calls == calls + 1 and load_cam(paths["out"] / "img0.npz")["keys"].tolist() == [1]


def test_the_cams_record_holds_every_map_param_and_not_the_seed_thresholds(tmp_path):
    """The record that keys the CAM files (and their work folder) changes with every param the maps depend on
    and with the classifier's bytes; the seed thresholds are only scored, so they keep the files."""
    from advcam.steps import cams, shards

    model = tmp_path / "classifier.pt"
    model.write_bytes(b"weights")
    base = cams.record_for(config.load(None, []), model)
    assert cams.record_for(config.load(None, ["cam.thresholds=[0.3]", "cam.eval_threshold=0.3"]), model) == base
    for override in ["cam.scales=[1.0, 0.5]", "cam.flip=false", "cam.normalise=max", "cam.resize=irn",
                     "cam.image_resize=bilinear", "cam.method=cam", "cam.advcam.steps=5", "cam.advcam.xi=0.1",
                     "cam.advcam.lam=1.0", "cam.advcam.tau=0.4", "cam.advcam.half_steps_at_half_scale=false",
                     "cam.advcam.sign_steps=true", "cam.advcam.cumulative_mask=true",
                     "cam.advcam.suppress_image_classes_only=true", "cam.advcam.max_classes_per_climb=2"]:
        other = cams.record_for(config.load(None, [override]), model)
        assert shards.work_key(other) != shards.work_key(base), override
    model.write_bytes(b"retrained")
    assert shards.work_key(cams.record_for(config.load(None, []), model)) != shards.work_key(base)


def test_cams_stage_non_finite_names_image(stage):
    cams, cfg, paths, model, loads, info = stage
    model.nan = True
    with pytest.raises(AdvcamError, match="img0.*non-finite"):
        cams.run(cfg, **paths)


def test_corrupt_npz_is_an_error_naming_it(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(AdvcamError, match="x.npz"):
        load_cam(tmp_path / "x.npz")
    with zipfile.ZipFile(tmp_path / "y.npz", "w") as z:
        z.writestr("keys.npy", b"")
    with pytest.raises(AdvcamError, match="y.npz"):
        load_cam(tmp_path / "y.npz")


def test_bf16_without_bf16_hardware_is_named_in_a_warning(stage, monkeypatch, caplog):
    import logging

    cams, _, paths, model, loads, info = stage
    cfg = config.load(None, ["device=cpu", "cam.method=advcam", "cam.scales=[1.0]", "cam.advcam.steps=1",
                             "cam.advcam.precision=bf16", "cam.thresholds=[0.5]", "cam.eval_threshold=0.5"])
    monkeypatch.setattr(cams, "native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="advcam"):
        cams.run(cfg, **paths)
    assert "no bf16 hardware" in caplog.text and len(list(paths["out"].glob("*.npz"))) == 3
    monkeypatch.setattr(cams, "native_bf16", lambda device: True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="advcam"):
        cams.run(config.load(None, ["device=cpu", "cam.method=advcam", "cam.scales=[1.0]", "cam.advcam.steps=2",
                                    "cam.advcam.precision=bf16"]), **paths)
    assert "no bf16 hardware" not in caplog.text


def test_native_bf16_reads_the_cpu_flags():
    from advcam.utils.device import native_bf16

    cpu = torch.device("cpu")
    assert native_bf16(cpu, "flags\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n") is True
    assert native_bf16(cpu, "flags\t: fpu sse2 avx2 avx512f avx512_bf16\n") is True
    assert native_bf16(cpu, "flags\t: fpu sse2 avx2 avx512f avx512bw\n") is False
    assert native_bf16(cpu) in (True, False, None)  # this machine's own answer


def test_seeds_warn_about_labelled_classes_whose_map_is_zero_everywhere(stage, caplog):
    """A classifier without positive evidence for a labelled class gives it a zero map and all-background seeds:
    the seed evaluation says so, naming an image and class, and does not warn when every map has evidence."""
    import logging

    cams, cfg, paths, model, loads, info = stage
    with caplog.at_level(logging.WARNING, logger="advcam"):
        cams.run(cfg, **paths)
    assert "zero everywhere" not in caplog.text
    maps = load_cam(paths["out"] / "img1.npz")
    save_cam(paths["out"] / "img1.npz", {"keys": maps["keys"], "cam": np.zeros_like(maps["cam"]),
                                         "high_res": np.zeros_like(maps["high_res"])})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="advcam"):
        m = cams.evaluate_seeds(cfg, info, ["img0", "img1", "img2"], paths["out"])[0]
    assert "1 of 3 class maps" in caplog.text and "image img1, class 'green'" in caplog.text, caplog.text
    assert m["seed_iou_green"] == pytest.approx(0.0) and m["seed_iou_red"] == pytest.approx(1.0)
