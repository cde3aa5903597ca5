"""Dense-CRF pseudo labels (IRN cam_to_ir_label semantics) and the resumable ``refine`` stage."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from advcam import config
from advcam.attribution.cam import save_cam, strided_size
from advcam.metrics import seeds_from_cams
from advcam.refine.crf import CRFParams, cam_to_label, crf_inference_label
from advcam.utils.errors import AdvcamError

H, W, EDGE = 32, 40, 16


def two_region(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Red object on the left (columns < EDGE), blue background; truth labels with class key 2 -> 3."""
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.float64)
    img[:] = (40, 40, 200)
    img[:, :EDGE] = (220, 30, 30)
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((H, W), np.uint8)
    truth[:, :EDGE] = 3
    return img, truth


def blurred_cam(edge: int, sigma: float = 4.0) -> np.ndarray:
    m = np.zeros((H, W), np.float32)
    m[:, :edge] = 1
    m = gaussian_filter(m, sigma)
    return (m / m.max())[None]


def test_labels_are_bg_keys_or_unsure():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    high = rng.random((2, H, W)).astype(np.float32)
    keys = np.array([1, 4])
    lab = cam_to_label(img, high, keys)
    assert lab.dtype == np.uint8 and lab.shape == (H, W)
    assert set(np.unique(lab)) <= {0, 2, 5, 255}
    assert (lab == 255).any()  # random maps leave pixels that only one CRF run calls background


def test_two_regions_get_the_right_labels():
    img, truth = two_region()
    img.flags.writeable = False  # images from PIL can be read-only
    lab = cam_to_label(img, blurred_cam(EDGE, sigma=1.5), np.array([2]))
    np.testing.assert_array_equal(lab, truth)


def test_crf_sharpens_a_blurred_cam_towards_the_colour_edge():
    img, truth = two_region()
    high = blurred_cam(EDGE + 6, sigma=4.0)  # the CAM spills 6 px over the edge and is blurred
    seed_err = int((seeds_from_cams(high, np.array([2]), 0.25) != truth).sum())
    lab = cam_to_label(img, high, np.array([2]))
    crf_err = int(((lab != truth) & (lab != 255)).sum())
    assert seed_err >= 4 * H and crf_err < seed_err // 4


def test_thresholds_decide_confident_regions():
    img = np.full((H, W, 3), 128, np.uint8)  # no colour edges: the CRF only smooths
    high = np.full((1, H, W), 0.25, np.float32)  # between bg 0.15 and fg 0.35
    assert (cam_to_label(img, high, np.array([0])) == 255).all()
    assert (cam_to_label(img, high * 0.2, np.array([0])) == 0).all()
    assert (cam_to_label(img, high * 2, np.array([0])) == 1).all()


def test_empty_keys_are_background_and_size_checks():
    img, _ = two_region()
    assert (cam_to_label(img, np.zeros((0, H, W), np.float32), np.zeros(0, np.int64)) == 0).all()
    with pytest.raises(ValueError, match="size"):
        cam_to_label(img[:-1], blurred_cam(EDGE), np.array([2]))


def test_params_from_config():
    p = CRFParams.from_config(config.load(None, ["refine.crf.iterations=3", "refine.crf.bilateral_srgb=13"]).refine.crf)
    assert p.iterations == 3 and p.bilateral_srgb == 13.0 and p.gt_prob == 0.7 and isinstance(p.iterations, int)
    img, truth = two_region()
    assert crf_inference_label(img, truth // 3, 2, p).shape == (H, W)


def irn_crf_inference_label(img: np.ndarray, labels: np.ndarray, t: int = 10, n_labels: int = 21,
                            gt_prob: float = 0.7, gaussian: tuple[float, float] = (3, 3),
                            bilateral: tuple[float, float, float] = (50, 5, 10)) -> np.ndarray:
    """IRN's ``misc/imutils.py crf_inference_label``, written out; IRN's constants are the defaults of
    ``gaussian`` = (sxy, compat) and ``bilateral`` = (sxy, srgb, compat)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    unary = unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1])
    d.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1], rgbim=np.ascontiguousarray(np.copy(img)),
                           compat=bilateral[2])
    q = d.inference(t)
    return np.argmax(np.array(q).reshape((n_labels, h, w)), axis=0)


@pytest.mark.parametrize("params, irn", [
    (CRFParams(), {}),
    (CRFParams(iterations=5, gt_prob=0.6, gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=30.0,
               bilateral_srgb=13.0, bilateral_compat=4.0),
     {"t": 5, "gt_prob": 0.6, "gaussian": (1, 3), "bilateral": (30, 13, 4)}),
])
def test_crf_inference_label_is_irns(params: CRFParams, irn: dict) -> None:
    """crf_inference_label = IRN's crf_inference_label (unary_from_labels with gt_prob, zero_unsure=False;
    Gaussian then bilateral kernel; argmax after ``t`` iterations), pixel for pixel: with IRN's constants (the
    defaults) and with a set where sxy != compat (Gaussian) and srgb != compat (bilateral), so a swapped
    argument shows."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (24, 30))
    want = irn_crf_inference_label(img, labels, n_labels=3, **irn)
    assert len(np.unique(want)) == 3
    np.testing.assert_array_equal(crf_inference_label(img, labels, 3, params), want)


def test_default_params_are_the_schema_defaults_and_irns():
    """CRFParams() (the defaults of crf_inference_label and cam_to_label) = the stage's params built from
    params.schema.yaml's refine.crf defaults = IRN's constants (t 10, gt_prob 0.7, Gaussian 3/3,
    bilateral 50/5/10)."""
    irn = CRFParams(iterations=10, gt_prob=0.7, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=50.0,
                    bilateral_srgb=5.0, bilateral_compat=10.0)
    assert CRFParams() == CRFParams.from_config(config.load(None, []).refine.crf) == irn


def test_cam_to_label_combines_the_two_runs_as_irn(monkeypatch):
    """IRN's cam_to_ir_label: ``conf = fg_conf; conf[fg_conf == 0] = 255; conf[bg_conf + fg_conf == 0] = 0``:
    the fg-threshold run's foreground is kept whatever the bg-threshold run says, background needs both runs,
    and the rest is 255. The per-threshold CRF is replaced by fixed answers."""
    from advcam.refine import crf

    fg_conf = np.array([[2, 0, 0, 2, 5, 0]])  # the run with the background plane at fg_threshold
    bg_conf = np.array([[0, 0, 3, 2, 2, 5]])  # the run at bg_threshold
    answers = {0.5: fg_conf, 0.1: bg_conf}
    seen = []

    def fixed(image: np.ndarray, high_res: np.ndarray, keys: np.ndarray, bg: float, params: CRFParams) -> np.ndarray:
        seen.append(bg)
        return answers[bg].copy()

    monkeypatch.setattr(crf, "_crf_with_background", fixed)
    conf = fg_conf.copy()  # IRN, literally
    conf[fg_conf == 0] = 255
    conf[bg_conf + fg_conf == 0] = 0
    assert conf.tolist() == [[2, 0, 255, 2, 5, 255]]
    got = cam_to_label(np.zeros((1, 6, 3), np.uint8), np.zeros((2, 1, 6), np.float32), np.array([1, 4]),
                       fg_threshold=0.5, bg_threshold=0.1)
    assert sorted(seen) == [0.1, 0.5] and got.dtype == np.uint8
    np.testing.assert_array_equal(got, conf)


# ---------------------------------------------------------------- the stage
class FakeInfo:
    """DatasetInfo interface: ``n`` two-region images (object class 2), masks with a 255 ring."""

    classes = ["a", "b", "c"]
    num_classes = 3

    def __init__(self, folder: Path, n: int = 2):
        self.folder = self.root = folder
        self.lists = {"infer": [f"im{i}" for i in range(n)]}
        self.labels = {i: [2] for i in self.lists["infer"]}
        folder.mkdir(parents=True)
        for k, image_id in enumerate(self.lists["infer"]):
            img, truth = two_region(k)
            truth[:, EDGE] = 255
            Image.fromarray(img).save(self.image_path(image_id))
            Image.fromarray(truth).save(self.mask_path(image_id))

    def image_path(self, image_id):
        return self.folder / f"{image_id}.jpg.png"

    def mask_path(self, image_id):
        return self.folder / f"{image_id}.mask.png"

    def read_image(self, image_id):
        return np.array(Image.open(self.image_path(image_id)))

    def read_mask(self, image_id):
        return np.array(Image.open(self.mask_path(image_id)))

    def check_lists(self, ds: object, what: str) -> None:
        """Built by the test, not prepared: there are no prepared list names to compare."""


@pytest.fixture
def stage(tmp_path, monkeypatch):
    from advcam.steps import refine

    info = FakeInfo(tmp_path / "data")
    monkeypatch.setattr(refine, "load_info", lambda folder: info)
    cams = tmp_path / "cams"
    high = blurred_cam(EDGE + 3, sigma=2.0)
    for image_id in info.lists["infer"]:
        save_cam(cams / f"{image_id}.npz", {"keys": np.array([2]), "high_res": high,
                                            "cam": np.zeros((1, *strided_size((H, W), 4)), np.float32)})
    paths = dict(data=tmp_path / "data", cams=cams, out=tmp_path / "pseudo", metrics=tmp_path / "pseudo.json")
    return refine, config.load(None, ["device=cpu"]), paths, info


def test_refine_stage_writes_palette_pngs_and_metrics(stage):
    refine, cfg, paths, info = stage
    refine.run(cfg, **paths)
    im = Image.open(paths["out"] / "im0.png")
    assert im.mode == "P" and im.size == (W, H)
    assert im.getpalette()[3 * 3: 3 * 4] == [128, 128, 0]  # VOC colour of label 3
    m = json.loads(paths["metrics"].read_text())
    assert m["num_images"] == 2 and m["pseudo_miou"] > 0.95 and 0.9 < m["pseudo_labelled_fraction"] <= 1
    assert m["pseudo_iou_c"] > 0.95 and m["pseudo_iou_a"] is None  # class a is in neither: NaN -> null


def test_refine_stage_scores_unsure_pixels_as_background_too(stage, monkeypatch):
    """pseudo_miou leaves 255 out; pseudo_miou_unsure_as_background scores every pixel, 255 as background."""
    from advcam.metrics import confusion, mean_iou

    refine, cfg, paths, info = stage
    labels = {}
    for i in info.lists["infer"]:  # the truth, with every object pixel of the top rows unsure
        label = info.read_mask(i).copy()
        label[: H // 2][label[: H // 2] > 0] = 255
        labels[i] = label
    queue = iter(info.lists["infer"])  # label_all labels the list in order
    monkeypatch.setitem(refine.METHODS, "crf", lambda *a: labels[next(queue)].copy())
    refine.run(cfg, **paths)
    m = json.loads(paths["metrics"].read_text())
    full = sum(confusion(np.where(labels[i] == 255, 0, labels[i]), info.read_mask(i), 4) for i in labels)
    assert m["pseudo_miou"] == pytest.approx(1.0)  # every labelled pixel is right
    assert m["pseudo_miou_unsure_as_background"] == pytest.approx(mean_iou(full))
    assert m["pseudo_miou_unsure_as_background"] < 0.9
    assert m["pseudo_miou_unsure_as_background_crf"] == m["pseudo_miou_unsure_as_background"]


def test_refine_stage_resumes_and_checks_sizes(stage, monkeypatch):
    refine, cfg, paths, info = stage
    refine.run(cfg, **paths)
    calls = []
    monkeypatch.setitem(refine.METHODS, "crf", lambda *a: calls.append(a) or np.zeros((H, W), np.uint8))
    (paths["out"] / "im1.png").write_bytes(b"truncated")
    (paths["out"] / ".tmp-im0.png.x.png").write_bytes(b"junk")
    before = (paths["out"] / "im0.png").stat().st_mtime_ns
    refine.run(cfg, **paths)
    assert len(calls) == 1 and (paths["out"] / "im0.png").stat().st_mtime_ns == before
    assert not list(paths["out"].glob(".tmp-*"))
    (paths["out"] / "im1.png").unlink()
    save_cam(paths["cams"] / "im1.npz", {"keys": np.array([2]), "high_res": np.zeros((1, H, W + 1), np.float32),
                                         "cam": np.zeros((1, *strided_size((H, W + 1), 4)), np.float32)})
    with pytest.raises(AdvcamError, match="im1.npz.*does not match"):
        refine.run(cfg, **paths)


def test_refine_stage_recomputes_when_params_change(stage, monkeypatch):
    refine, cfg, paths, info = stage
    refine.run(cfg, **paths)
    calls = []
    monkeypatch.setitem(refine.METHODS, "crf", lambda *a: calls.append(a) or np.zeros((H, W), np.uint8))
    refine.run(cfg, **paths)
    assert not calls
    refine.run(config.load(None, ["device=cpu", "refine.fg_threshold=0.4"]), **paths)
    assert len(calls) == 2


def test_refine_gather_refuses_shards_computed_with_other_crf_params(stage, tmp_path):
    """The shards' record holds the CRF params: labels of another refine.crf are refused when gathered, not
    linked in."""
    refine, cfg, paths, info = stage
    shard = tmp_path / "shard1"
    refine.run(cfg, paths["data"], paths["cams"], shard, paths["metrics"], shard=(1, 1))
    other = config.load(None, ["device=cpu", "refine.crf.gt_prob=0.5"])
    with pytest.raises(AdvcamError, match="other params"):
        refine.run(other, **paths, gather=[shard])
    refine.run(cfg, **paths, gather=[shard])
    assert sorted(p.name for p in paths["out"].glob("*.png")) == [f"{i}.png" for i in info.lists["infer"]]
