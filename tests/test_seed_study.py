"""benchmarks/seed_study.py: its CAM row agrees with the cams stage, and it splits accuracy by region."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from advcam import config
from advcam.data import load_info
from advcam.data.transforms import normalize
from advcam.models import load_classifier
from advcam.models.classifier import build_classifier, classifier_header
from advcam.steps import cams, prepare
from advcam.utils.checkpoint import save_checkpoint
from conftest import REPO, TINY


def load_study():
    spec = importlib.util.spec_from_file_location("seed_study", REPO / "benchmarks" / "seed_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def prepared(tmp_path):
    cfg = config.load(None, TINY)
    info = prepare.run(cfg, tmp_path / "data")
    torch.manual_seed(0)
    model = build_classifier("resnet_small", info.num_classes)
    path = tmp_path / "classifier.pt"
    save_checkpoint(path, classifier_header(model, list(info.classes), {}), model=model.state_dict())
    return cfg, tmp_path / "data", path


def test_cam_row_matches_the_cams_stage_and_regions_partition_the_objects(prepared, tmp_path):
    cfg, data, model = prepared
    info = load_info(data)
    ids = info.lists["infer"]
    cams.run(config.load(None, [*TINY, "cam.method=cam"]), data, model, tmp_path / "cams",
             tmp_path / "seeds.json", tmp_path / "curve.csv")
    stage = json.loads((tmp_path / "seeds.json").read_text())
    out = tmp_path / "study.json"
    study = load_study()
    sets = [arg for item in TINY for arg in ("--set", item)]
    assert study.main(["--data", str(data), "--model", str(model), "--params", str(tmp_path / "none.yaml"),
                       "--images", str(len(ids)), *sets, "--variant", "cam=cam.method=cam",
                       "--variant", "advcam=cam.method=advcam;cam.advcam.steps=2", "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["cam"]["seed_miou"] == pytest.approx(stage["seed_miou"], abs=1e-9)
    assert rows["cam"]["best_threshold"] == pytest.approx(stage["seed_best_threshold"])
    for row in rows.values():
        assert all(0.0 <= row["accuracy"][r] <= 1.0 for r in ("background", "body", "part")), row
    # the regions are the generator's: every object pixel not on the ignore ring is body or part
    first = ids[0]
    gt = info.read_mask(first)
    regions = study.region_masks(info.root, first, gt)
    assert not (regions["body"] & regions["part"]).any()
    assert ((regions["body"] | regions["part"]) == ((gt > 0) & (gt != 255))).all()
    assert (regions["background"] == (gt == 0)).all()


def test_trace_averages_one_climb_per_image_and_class(prepared):
    cfg, data, model_path = prepared
    info = load_info(data)
    ids = info.lists["infer"][:3]
    model = load_classifier(model_path).eval()
    tr = load_study().trace(model, info, ids, config.load(None, [*TINY, "cam.advcam.steps=3"]).cam)
    assert tr["pairs"] == sum(len(info.labels[i]) for i in ids)
    scores = []  # y_c of the clean image (pooled ReLU map, both flips), per (image, class)
    for image_id in ids:
        x = normalize(info.read_image(image_id))
        with torch.no_grad():
            pooled = torch.relu(model.cam(torch.stack([x, x.flip(-1)]))).mean((-2, -1))
        scores += [float(pooled[:, c].sum()) for c in info.labels[image_id]]
    assert tr["score"]["first"] == pytest.approx(sum(scores) / len(scores), rel=1e-5)
    assert tr["others"]["first"] >= 0 and tr["dx"]["max"] > 0
    for region in ("part", "body", "background"):
        assert set(tr["relative_map"][region]) == {"first", "last", "accumulated"}
        assert all(0.0 <= v <= 1.0 for v in tr["relative_map"][region].values())


def test_bad_variant_is_named():
    with pytest.raises(SystemExit, match="--variant 'oops'"):
        load_study().parse_variant("oops")


def test_compare_reports_how_speed_options_move_the_maps(prepared, tmp_path):
    cfg, data, model = prepared
    info = load_info(data)
    out = tmp_path / "compare.json"
    sets = [arg for item in [*TINY, "cam.advcam.steps=3"] for arg in ("--set", item)]
    fast = "cam.advcam.fold_batchnorm=true;cam.advcam.channels_last=true;cam.advcam.precision=tf32"
    assert load_study().main(["--data", str(data), "--model", str(model), "--params", str(tmp_path / "none.yaml"),
                              "--images", "4", "--compare", "--device", "cpu", *sets,
                              "--variant", "fp32=cam.method=advcam", "--variant", f"fast=cam.method=advcam;{fast}",
                              "--variant", "cam=cam.method=cam", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert "maps_vs_first" not in rows["fp32"] and result["device"]
    # folding BatchNorm and NHWC change float rounding only; plain CAM is a different map
    assert rows["fast"]["maps_vs_first"]["pooled"] > 0.999
    assert 0 < rows["fast"]["maps_vs_first"]["max_abs_diff"] < 0.05  # the options took effect, within rounding
    assert rows["cam"]["maps_vs_first"]["pooled"] < rows["fast"]["maps_vs_first"]["pooled"]
    assert len(info.lists["infer"]) >= 4


def test_map_agreement_is_pearson_over_pixels():
    study = load_study()
    rng = np.random.default_rng(0)
    a = {"i": {"high_res": rng.random((2, 5, 6)).astype(np.float32)}}
    same = study.map_agreement(a, {"i": {"high_res": a["i"]["high_res"] * 2 + 1}})  # affine: r = 1
    assert same["pooled"] == pytest.approx(1.0) and same["min_image"] == pytest.approx(1.0)
    flipped = study.map_agreement(a, {"i": {"high_res": 1 - a["i"]["high_res"]}})
    assert flipped["pooled"] == pytest.approx(-1.0) and flipped["max_abs_diff"] > 0


def test_cams_stage_batching_images_writes_the_same_files(prepared, tmp_path):
    cfg, data, model = prepared
    files = {}
    for batch in (1, 4):
        out = tmp_path / f"cams{batch}"
        run_cfg = config.load(None, [*TINY, "cam.method=advcam", "cam.advcam.steps=3",
                                     f"cam.advcam.batch_images={batch}"])
        cams.run(run_cfg, data, model, out, tmp_path / f"seeds{batch}.json", tmp_path / f"curve{batch}.csv")
        files[batch] = {p.name: np.load(p) for p in sorted(out.glob("*.npz"))}
    assert files[1].keys() == files[4].keys() and len(files[1]) == len(load_info(data).lists["infer"])
    for name, single in files[1].items():  # the same maps; a batch of 4 may round differently (conv algorithm)
        assert np.array_equal(single["keys"], files[4][name]["keys"])
        for key in ("cam", "high_res"):
            assert single[key].shape == files[4][name][key].shape
            assert np.abs(single[key] - files[4][name][key]).max() < 1e-3, (name, key)
    seeds = [json.loads((tmp_path / f"seeds{b}.json").read_text())["seed_miou"] for b in (1, 4)]
    assert seeds[0] == pytest.approx(seeds[1], abs=5e-3)


def test_scales_reports_each_scale_and_its_sum_is_the_variants_row(prepared, tmp_path):
    cfg, data, model = prepared
    out = tmp_path / "scales.json"
    sets = [arg for item in [*TINY, "cam.advcam.steps=2"] for arg in ("--set", item)]
    assert load_study().main(["--data", str(data), "--model", str(model), "--params", str(tmp_path / "none.yaml"),
                              "--images", "6", "--scales", *sets, "--variant", "cam=cam.method=cam",
                              "--variant", "advcam=cam.method=advcam",
                              "--variant", "one=cam.method=cam;cam.scales=[0.5]", "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("cam", "advcam"):  # the same maps merged as the stage merges them: the variant's own row
        sc = rows[name]["scales"]
        assert set(sc) == {"scale 1", "scale 0.5", "sum", "sum_max_normalised", "mean_max"}
        assert sc["sum"]["seed_miou"] == pytest.approx(rows[name]["seed_miou"], abs=1e-6)
        assert sc["sum"]["best_threshold"] == pytest.approx(rows[name]["best_threshold"])
        assert set(sc["mean_max"]) == {"1", "0.5"} and all(v > 0 for v in sc["mean_max"].values())
    one = rows["one"]["scales"]  # one scale: alone and summed are the same seeds; dividing by the max first
    assert one["scale 0.5"] == one["sum"]  # moves only pixels within float rounding of a threshold
    assert one["sum_max_normalised"]["seed_miou"] == pytest.approx(one["sum"]["seed_miou"], abs=1e-3)
    assert one["sum"]["seed_miou"] == pytest.approx(rows["one"]["seed_miou"], abs=1e-9)
    assert one["scale 0.5"]["seed_miou"] == pytest.approx(rows["cam"]["scales"]["scale 0.5"]["seed_miou"], abs=1e-9)
