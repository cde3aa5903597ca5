"""The ``evaluate`` stage: metrics JSON, confusion matrix and gallery PNGs (stand-in segmenter)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from advcam import config
from advcam.attribution.cam import compute_maps, save_cam
from advcam.utils.errors import AdvcamError
from advcam.utils.io import save_png
from test_cam import ColourNet, FakeInfo, normalize  # noqa: E402  (tests/ is on sys.path under pytest)


class ColourSegmenter(nn.Module):
    """Stand-in segmenter: background logit 0, class c+1 logit = normalised colour channel c."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:, :1]), x], dim=1)


@pytest.fixture
def stage(tmp_path, monkeypatch):
    from advcam.steps import evaluate

    info = FakeInfo(tmp_path / "data", n=3)
    monkeypatch.setattr(evaluate, "load_info", lambda folder: info)
    monkeypatch.setattr(evaluate, "normalize", normalize)
    monkeypatch.setattr(evaluate, "load_segmenter", lambda path, map_location="cpu", num_classes=None: ColourSegmenter())
    cams, pseudo = tmp_path / "cams", tmp_path / "pseudo"
    cfg_cam = config.load(None, ["cam.method=cam", "cam.scales=[1.0]"]).cam
    for image_id in info.lists["infer"][:2]:
        image = normalize(info.read_image(image_id))
        save_cam(cams / f"{image_id}.npz", compute_maps(ColourNet(stride=4), image, info.labels[image_id], cfg_cam))
    save_png(pseudo / "img0.png", info.read_mask("img0"))
    paths = dict(data=tmp_path / "data", model=tmp_path / "seg.pt", cams=cams, pseudo=pseudo,
                 metrics=tmp_path / "metrics" / "segmentation.json", plots=tmp_path / "plots")
    return evaluate, paths, info


def run(evaluate, paths, gallery_size=2, extra=()):
    cfg = config.load(None, ["device=cpu", f"evaluation.gallery_size={gallery_size}", *extra])
    evaluate.run(cfg, **paths)
    return json.loads(paths["metrics"].read_text())


def test_evaluate_writes_metrics_and_plots(stage):
    evaluate, paths, info = stage
    m = run(evaluate, paths)
    assert m["num_images"] == 3
    assert m["val_miou"] == pytest.approx(1.0) and m["val_pixel_accuracy"] == pytest.approx(1.0)
    assert m["val_iou_red"] == pytest.approx(1.0) and m["val_iou_background"] == pytest.approx(1.0)
    assert 0 < m["val_miou_all_background"] < 0.5
    with Image.open(paths["plots"] / "confusion.png") as im:
        assert im.format == "PNG" and min(im.size) > 100
    with Image.open(paths["plots"] / "gallery.png") as im:
        small = im.size
        assert im.format == "PNG" and small[0] > small[1]  # 2 rows x 5 columns
    run(evaluate, paths, gallery_size=5)  # 2 infer images with CAMs + 1 val id (all the fixture has)
    with Image.open(paths["plots"] / "gallery.png") as im:
        assert im.size[1] > 1.3 * small[1] and abs(im.size[0] - small[0]) < 0.2 * small[0]
    assert not list(paths["plots"].glob(".tmp-*"))


def test_evaluate_without_gallery_still_writes_the_png(stage):
    evaluate, paths, info = stage
    run(evaluate, paths, gallery_size=0)
    assert Image.open(paths["plots"] / "gallery.png").size[0] > 0


def test_predict_is_full_resolution_uint8(stage):
    evaluate, paths, info = stage
    pred = evaluate.predict(ColourSegmenter(), info.read_image("img1"), torch.device("cpu"))
    assert pred.dtype == np.uint8 and pred.shape == (20, 28)
    np.testing.assert_array_equal(pred, np.where(info.read_mask("img1") == 255, 0, info.read_mask("img1")))


def test_val_image_without_mask_is_an_error(stage):
    evaluate, paths, info = stage
    info.mask_path("img2").unlink()
    with pytest.raises(AdvcamError, match="img2"):
        run(evaluate, paths)


def test_evaluate_reports_miou_with_and_without_crf(stage):
    evaluate, paths, info = stage
    m = run(evaluate, paths, extra=["evaluation.scales=[1.0, 0.5]", "evaluation.flip=true"])
    assert m["val_miou"] == pytest.approx(1.0)
    assert 0.0 <= m["val_miou_crf"] <= 1.0 and 0.0 <= m["val_pixel_accuracy_crf"] <= 1.0
    assert {f"val_iou_crf_{c}" for c in ("background", "red", "green", "blue")} <= set(m)
    with Image.open(paths["plots"] / "gallery.png") as im:
        with_crf = im.size
    m = run(evaluate, paths, extra=["evaluation.crf.enabled=false"])
    assert "val_miou_crf" not in m and not any(k.startswith("val_iou_crf_") for k in m)
    with Image.open(paths["plots"] / "gallery.png") as im:
        assert im.size[0] < with_crf[0]  # one column fewer


def test_crf_postprocess_keeps_a_confident_prediction():
    from advcam.steps.evaluate import crf_postprocess

    image = np.zeros((16, 20, 3), np.uint8)
    image[:, 10:] = 255
    label = np.zeros((16, 20), np.int64)
    label[:, 10:] = 2
    prob = np.full((3, 16, 20), 0.01, np.float32)
    np.put_along_axis(prob, label[None], 0.98, axis=0)
    np.testing.assert_array_equal(crf_postprocess(image, prob), label)
    with pytest.raises(ValueError, match="does not match"):
        crf_postprocess(image[:8], prob)


@pytest.mark.parametrize("method, title", [("advcam", "AdvCAM"), ("cam", "CAM")])
def test_gallery_names_the_attribution_method_of_the_maps(stage, monkeypatch, method, title):
    """cams/ holds the maps of cam.method: the gallery's column says which (it said "CAM" for AdvCAM's maps)."""
    evaluate, paths, info = stage
    seen = {}
    monkeypatch.setattr(evaluate, "plot_gallery", lambda rows, out, columns, title: seen.update(
        columns=columns, keys=[set(r) for r in rows]))
    run(evaluate, paths, extra=[f"cam.method={method}"])
    other = "CAM" if title == "AdvCAM" else "AdvCAM"
    assert title in seen["columns"] and other not in seen["columns"]
    assert all(title in keys for keys in seen["keys"])


class DeeplabPytorchDenseCRF:
    """deeplab-pytorch's ``libs/utils/crf.py`` DenseCRF, written out (the probabilities Q ``(C, H, W)``)."""

    def __init__(self, iter_max: int, pos_w: float, pos_xy_std: float, bi_w: float, bi_xy_std: float,
                 bi_rgb_std: float) -> None:
        self.iter_max = iter_max
        self.pos_w = pos_w
        self.pos_xy_std = pos_xy_std
        self.bi_w = bi_w
        self.bi_xy_std = bi_xy_std
        self.bi_rgb_std = bi_rgb_std

    def __call__(self, image: np.ndarray, probmap: np.ndarray) -> np.ndarray:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as utils

        C, H, W = probmap.shape
        U = utils.unary_from_softmax(probmap)
        U = np.ascontiguousarray(U)
        image = np.ascontiguousarray(image)
        d = dcrf.DenseCRF2D(W, H, C)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(sxy=self.pos_xy_std, compat=self.pos_w)
        d.addPairwiseBilateral(sxy=self.bi_xy_std, srgb=self.bi_rgb_std, rgbim=image, compat=self.bi_w)
        Q = d.inference(self.iter_max)
        return np.array(Q).reshape((C, H, W))


# deeplab-pytorch configs/voc12.yaml (CRF section; cocostuff*.yaml the same): ITER_MAX 10, POS_W 3, POS_XY_STD 1,
# BI_W 4, BI_XY_STD 67, BI_RGB_STD 3
DEEPLAB_PYTORCH_VOC12_CRF = {"iter_max": 10, "pos_w": 3, "pos_xy_std": 1, "bi_w": 4, "bi_xy_std": 67, "bi_rgb_std": 3}


def test_deeplab_crf_is_deeplab_pytorchs_config():
    """DEEPLAB_CRF holds configs/voc12.yaml's CRF numbers, and the schema's evaluation.crf defaults are it."""
    from advcam.steps.evaluate import DEEPLAB_CRF, inference_params

    ref = DEEPLAB_PYTORCH_VOC12_CRF
    assert (DEEPLAB_CRF.iterations, DEEPLAB_CRF.gaussian_compat, DEEPLAB_CRF.gaussian_sxy, DEEPLAB_CRF.bilateral_compat,
            DEEPLAB_CRF.bilateral_sxy, DEEPLAB_CRF.bilateral_srgb) == (
        ref["iter_max"], ref["pos_w"], ref["pos_xy_std"], ref["bi_w"], ref["bi_xy_std"], ref["bi_rgb_std"])
    assert inference_params(config.load(None, []).evaluation)[2] == DEEPLAB_CRF


def test_crf_postprocess_is_deeplab_pytorchs_dense_crf():
    """crf_postprocess = argmax of deeplab-pytorch's DenseCRF (unary -log p from unary_from_softmax, Gaussian
    then bilateral kernel, voc12.yaml's numbers) on unsure softmax maps and a random image, pixel for pixel."""
    from advcam.steps.evaluate import crf_postprocess

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    logits = 0.5 * rng.standard_normal((4, 24, 30))
    prob = (np.exp(logits) / np.exp(logits).sum(0, keepdims=True)).astype(np.float32)
    q = DeeplabPytorchDenseCRF(**DEEPLAB_PYTORCH_VOC12_CRF)(image, prob)
    want = q.argmax(axis=0)
    assert len(np.unique(want)) == 4 and (want != prob.argmax(axis=0)).mean() > 0.1  # the CRF does change labels
    got = crf_postprocess(image, prob)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
