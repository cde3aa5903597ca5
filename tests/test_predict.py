"""The ``predict`` stage: masks for a list of images without ground truth (VOC's test list, for the evaluation
server), predicted as ``evaluate`` scores the val images; resumable; bad input refused with one line."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advcam import config
from advcam.cli import main as cli_main
from advcam.models.deeplab import build_segmenter, segmenter_header
from advcam.steps import check, evaluate, prepare
from advcam.utils.checkpoint import save_checkpoint
from advcam.utils.errors import AdvcamError

sys.path.insert(0, str(Path(__file__).parent))
from voc_fixture import DEFAULT_CLASSES, make_voc_fixture, voc_palette  # noqa: E402

TEST_SIZES = {"2012_000001": (40, 48), "2012_000002": (37, 29), "2012_000003": (1, 3)}  # (H, W), odd ones too


def base_sets(root: Path) -> list[str]:
    return ["device=cpu", "dataset.kind=voc", f"dataset.root={root}", "dataset.train_list=train",
            f"dataset.classes={list(DEFAULT_CLASSES)}", "evaluation.scales=[1.0, 0.5]"]


@pytest.fixture
def project(tmp_path):
    """A prepared VOC-layout folder with a ``test`` list of images that have no mask and no annotation, and a
    segmenter checkpoint (random weights, 3 classes)."""
    root = make_voc_fixture(tmp_path / "VOC", n_train=3, n_val=2)
    rng = np.random.default_rng(0)
    for image_id, (h, w) in TEST_SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
    (root / "ImageSets/Segmentation/test.txt").write_text("".join(f"{i}\n" for i in TEST_SIZES))
    prepare.run(config.load(None, base_sets(root)), tmp_path / "data")
    torch.manual_seed(0)
    seg = build_segmenter("deeplab_small", len(DEFAULT_CLASSES) + 1)
    save_checkpoint(tmp_path / "seg.pt", segmenter_header(seg, list(DEFAULT_CLASSES), {}), model=seg.state_dict())
    return tmp_path, root, seg.eval()


def predict(tmp_path: Path, root: Path, *sets: str, out: str = "pred") -> int:
    args = ["predict", "--params-json", "{}", "--data", str(tmp_path / "data"), "--model", str(tmp_path / "seg.pt"),
            "--out", str(tmp_path / out)]
    return cli_main([*args, *[a for s in [*base_sets(root), *sets] for a in ("--set", s)]])


def expected(seg: torch.nn.Module, root: Path, image_id: str, *sets: str) -> np.ndarray:
    """evaluate's prediction of one image (with its CRF post-processing where enabled)."""
    cfg = config.load(None, [*base_sets(root), *sets])
    scales, flip, crf = evaluate.inference_params(cfg.evaluation)
    image = np.array(Image.open(root / "JPEGImages" / f"{image_id}.jpg").convert("RGB"))
    prob = evaluate.predict_probabilities(seg, image, torch.device("cpu"), scales, flip)
    return evaluate.crf_postprocess(image, prob, crf) if crf is not None else prob.argmax(0).astype(np.uint8)


def masks(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(folder.glob("*.png")):
        with Image.open(p) as im:
            assert im.mode == "P" and im.getpalette()[:768] == voc_palette(), p
            out[p.stem] = np.array(im)
    return out


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}


@pytest.mark.parametrize("crf", ["true", "false"])
def test_masks_are_what_evaluate_predicts(project, crf):
    """One index PNG with VOC's palette per image of the list, at the image's size (images of 37x29 and 1x3
    too), equal to evaluate's prediction: multi-scale, max-fused, CRF post-processed when enabled."""
    tmp_path, root, seg = project
    assert predict(tmp_path, root, "predict.list=test", f"evaluation.crf.enabled={crf}") == 0
    got = masks(tmp_path / "pred")
    assert sorted(got) == sorted(TEST_SIZES)
    for image_id, size in TEST_SIZES.items():
        assert got[image_id].shape == size
        np.testing.assert_array_equal(got[image_id], expected(seg, root, image_id, f"evaluation.crf.enabled={crf}"))
        assert got[image_id].max() <= len(DEFAULT_CLASSES)


def test_a_rerun_keeps_finished_masks_and_other_params_recompute_them(project, caplog):
    tmp_path, root, seg = project
    assert predict(tmp_path, root, "predict.list=test") == 0
    first = mtimes(tmp_path / "pred")
    broken = tmp_path / "pred" / "2012_000002.png"
    broken.write_bytes(broken.read_bytes()[:20])  # a mask cut short (not written by advcam: its writes are atomic)
    assert predict(tmp_path, root, "predict.list=test") == 0
    again = mtimes(tmp_path / "pred")
    assert {k: v for k, v in again.items() if k != broken.name} == {k: v for k, v in first.items() if k != broken.name}
    np.testing.assert_array_equal(masks(tmp_path / "pred")["2012_000002"], expected(seg, root, "2012_000002"))
    assert predict(tmp_path, root, "predict.list=test", "evaluation.flip=true") == 0  # other params: all again
    flipped = mtimes(tmp_path / "pred")
    assert all(flipped[k] != again[k] for k in again)
    for image_id in TEST_SIZES:
        np.testing.assert_array_equal(masks(tmp_path / "pred")[image_id],
                                      expected(seg, root, image_id, "evaluation.flip=true"))


def test_bad_input_is_one_line_and_writes_nothing(project, capsys):
    tmp_path, root, _ = project

    def refused(*sets: str, out: str = "pred") -> str:
        capsys.readouterr()
        assert predict(tmp_path, root, *sets, out=out) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("[advcam ")]
        assert len(err) == 1 and err[0].startswith("advcam predict: error: "), err
        assert not (tmp_path / out).exists() or (tmp_path / out).is_file()
        return err[0]

    assert "predict.list is not set" in refused()
    line = refused("predict.list=tset")
    assert f"list file not found: {root / 'ImageSets/Segmentation/tset.txt'}" in line and "test" in line
    (root / "JPEGImages/2012_000002.jpg").rename(root / "2012_000002.jpg")
    line = refused("predict.list=test")
    assert "1 image(s) of" in line and str(root / "JPEGImages/2012_000002.jpg") in line
    (root / "2012_000002.jpg").rename(root / "JPEGImages/2012_000002.jpg")
    (tmp_path / "a-file").write_text("")
    assert "an existing file, but --out is a folder" in refused("predict.list=test", out="a-file")


def test_check_params_refuses_a_list_the_dataset_does_not_have(project):
    tmp_path, root, _ = project
    check.predict_list_exists(config.load(None, [*base_sets(root), "predict.list=test"]))
    check.predict_list_exists(config.load(None, base_sets(root)))  # unset: nothing to check
    with pytest.raises(AdvcamError, match="list file not found: .*tset.txt"):
        check.predict_list_exists(config.load(None, [*base_sets(root), "predict.list=tset"]))
    check.predict_list_exists(config.load(None, ["predict.list=val"]))  # synthetic: a list it writes
    with pytest.raises(AdvcamError, match="predict.list: the synthetic dataset has no list 'test'"):
        check.predict_list_exists(config.load(None, ["predict.list=test"]))
