"""Random-walk refinement: affinity labels and loss, the sparse walk, and the ``refine`` stage with it."""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from advcam.refine import irn
from advcam.refine.affinity import (affinity_labels, affinity_loss, batch_loss, build_affinity_net,
                                    downsample_label, offsets, pairwise_affinity)
from advcam.refine.randomwalk import random_walk, transition_matrix, walk_labels
from advcam.train import loop
from conftest import TINY


# ---------------------------------------------------------------- pairs and labels
def test_offsets_are_irn_half_disc():
    off = offsets(5)
    assert len(off) == 34 and len(set(off)) == 34  # IRN: 4 + 9 + 9 + 7 + 5 directions at radius 5
    assert all(dy * dy + dx * dx < 25 and (dy > 0 or dx > 0) for dy, dx in off)
    assert not any((-dy, -dx) in off for dy, dx in off)  # each unordered pair once
    assert offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]


def test_affinity_labels_pos_neg_ignore():
    # the labels of interest sit inside IRN's source region label[:-1, 1:-1] (radius 2); the frame is unsure
    label = torch.tensor([[[255, 0, 0, 3, 255, 255],
                           [255, 0, 3, 3, 1, 255],
                           [255, 255, 255, 255, 255, 255]]])
    bg, fg, neg = affinity_labels(label, 2)  # offsets (0,1), (1,-1), (1,0), (1,1)
    assert bg.shape == (1, 4, 3, 6)
    right, down_left, down, down_right = 0, 1, 2, 3
    assert bg[0, right, 0, 1] and not fg[0, right, 0, 1] and not neg[0, right, 0, 1]  # 0-0
    assert neg[0, right, 0, 2] and not bg[0, right, 0, 2]  # 0-3
    assert not (bg | fg | neg)[0, right, 0, 3]  # 3-255: ignored
    assert fg[0, down, 0, 3] and fg[0, down_left, 0, 3]  # 3-3 below, 3-3 below left
    assert neg[0, down_right, 0, 3]  # 3-1
    assert not (bg | fg | neg)[0, :, 0, 4].any()  # a 255 source pairs with nothing
    assert int(bg.sum()) == 3 and int(fg.sum()) == 3 and int(neg.sum()) == 7


def test_affinity_pairs_start_in_irns_source_region_only():
    """IRN's PathIndex and AffinityNet's ExtractAffinityLabelInRadius take the first pixel of a pair from
    label[:-rf, rf:-rf] (rf = radius - 1), so no pair leaves the grid and the borders start none."""
    h, w, r = 9, 11, 3
    bg, fg, neg = affinity_labels(torch.zeros(1, h, w, dtype=torch.long), r)
    starts = bg.any(1)[0]
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[: h - (r - 1), r - 1: w - (r - 1)] = True
    assert torch.equal(starts, expected)
    assert int(bg.sum()) == len(offsets(r)) * (h - 2) * (w - 4) and not fg.any() and not neg.any()


def test_downsample_label_takes_pixel_4i_plus_2():
    label = torch.arange(10 * 7).reshape(1, 10, 7) % 250
    small = downsample_label(label)
    assert small.shape == (1, 3, 2)
    assert small[0, 0, 0] == label[0, 2, 2] and small[0, 1, 1] == label[0, 6, 6]
    assert small[0, 2, 0] == 255  # pixel 10 is past the edge


def test_loss_terms_and_affinity_range():
    emb = torch.randn(2, 8, 6, 5)
    aff = pairwise_affinity(emb, 3)
    assert aff.shape == (2, len(offsets(3)), 6, 5) and aff.min() >= 0 and aff.max() <= 1
    same = pairwise_affinity(torch.zeros(1, 8, 4, 4), 3)
    assert torch.allclose(same[0, 0, :, :3], torch.ones(4, 3)) and (same[0, 0, :, 3] == 0).all()
    label = torch.zeros(1, 6, 8, dtype=torch.long)
    label[:, :, 4:] = 2
    masks = affinity_labels(label, 3)
    loss, terms = affinity_loss(pairwise_affinity(torch.zeros(1, 8, 6, 8), 3), *masks)
    assert terms["bg_pos"] < 1e-4 and terms["fg_pos"] < 1e-4 and terms["neg"] > 10  # all same: negatives cost
    assert loss.item() == pytest.approx(terms["neg"] / 2, rel=1e-3)


def two_colour_batch(n: int = 4, size: int = 32) -> dict:
    rng = np.random.default_rng(0)
    image = torch.zeros(n, 3, size, size)
    mask = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        edge = int(rng.integers(8, size - 8))
        image[i, 0, :, :edge] = 1.5
        image[i, 2, :, edge:] = 1.5
        mask[i, :, :edge] = 1 + i % 2
        mask[i, :, edge - 1: edge + 1] = 255
    return {"image": image + 0.1 * torch.randn_like(image), "mask": mask}


def test_short_affinity_training_lowers_the_loss():
    torch.manual_seed(0)
    model = build_affinity_net("resnet_small")
    batch = two_colour_batch()
    opt = loop.make_sgd(model.param_groups(), 0.1, 1e-4, 1e-4, head_mult=1.0)
    model.train()
    losses = []
    for _ in range(12):
        loss = batch_loss(model, batch, 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


# ---------------------------------------------------------------- the walk
def test_transition_rows_sum_to_one_and_stay_sparse():
    aff = torch.rand(len(offsets(4)), 7, 9)
    p = transition_matrix(aff, 4, 10.0)
    n = 7 * 9
    dense = p.to_dense()
    assert torch.allclose(dense.sum(1), torch.ones(n), atol=1e-5) and (dense >= 0).all()
    assert p._nnz() <= n * (2 * len(offsets(4)) + 1)
    assert torch.equal(dense > 0, (dense > 0).t())  # symmetric neighbourhood
    assert (dense.diagonal() > 0).all()  # self-loops (IRN adds affinity 1 on the diagonal)


def test_walk_matches_dense_irn_formula():
    torch.manual_seed(1)
    h, w, r, beta, times = 6, 5, 3, 4.0, 3
    aff = torch.rand(len(offsets(r)), h, w)
    a = torch.eye(h * w)
    for k, (dy, dx) in enumerate(offsets(r)):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    i, j = y * w + x, (y + dy) * w + x + dx
                    a[i, j] = a[j, i] = aff[k, y, x]
    a = a ** beta
    trans = a / a.sum(0, keepdim=True)  # IRN: columns normalised, x @ T^(2^times)
    for _ in range(times):
        trans = trans @ trans
    x = torch.rand(2, h, w)
    want = (x.reshape(2, -1) @ trans).reshape(2, h, w)
    got = random_walk(x, transition_matrix(aff, r, beta), 2 ** times)
    assert torch.allclose(got, want, atol=1e-5)


def test_uniform_map_stays_uniform_and_edges_hold():
    aff = torch.rand(len(offsets(5)), 12, 10)
    x = torch.full((2, 12, 10), 0.7)
    assert torch.allclose(random_walk(x, transition_matrix(aff, 5, 10.0), 64), x, atol=1e-5)
    # affinity 0 across the column 5 | 6 boundary: mass on the left never crosses it
    aff = torch.ones(len(offsets(5)), 12, 10)
    for k, (dy, dx) in enumerate(offsets(5)):
        cols = torch.arange(10)
        aff[k, :, ((cols <= 5) & (cols + dx > 5)) | ((cols > 5) & (cols + dx <= 5))] = 0
    left = torch.zeros(1, 12, 10)
    left[0, 3, 1] = 1.0
    walked = random_walk(left, transition_matrix(aff, 5, 10.0), 256)
    assert walked[0, :, 6:].abs().max() < 1e-6 and walked[0, :, :6].min() > 0


def test_walk_on_a_500x375_image_keeps_memory_bounded():
    h, w = 125, 94  # stride-4 grid of 500x375
    n, k = h * w, len(offsets(5))
    aff, cam = torch.rand(k, h, w), torch.rand(2, h, w)
    p = transition_matrix(aff, 5, 10.0)
    assert p._nnz() <= n * (2 * k + 1) < n * n // 100
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        label = walk_labels(cam, [4, 7], aff, (500, 375), exp_times=2)
    largest = max(e.cpu_memory_usage for e in prof.key_averages())
    assert label.shape == (500, 375) and set(np.unique(label)) <= {0, 5, 8}
    assert 0 < largest < 64 * 2 ** 20, largest  # a dense (HW/16)^2 float32 matrix would be 550 MB


def test_walk_labels_background_and_keys():
    aff = torch.zeros(len(offsets(5)), 4, 5)  # no affinities: only the self-loops, the walk keeps the maps
    cam = torch.zeros(1, 4, 5)
    cam[0, :, :2] = 1.0
    lab = walk_labels(cam, [2], aff, (16, 20), exp_times=0, bg_threshold=0.25)
    assert lab.dtype == np.uint8 and (lab[:, :4] == 3).all() and (lab[:, -4:] == 0).all()
    assert (walk_labels(cam[:0], [], aff, (16, 20)) == 0).all()
    with pytest.raises(ValueError, match="do not fit"):
        walk_labels(cam, [2], aff, (20, 20))


def irn_make_sem_seg_labels(cam: torch.Tensor, keys: list[int], aff: torch.Tensor, size: tuple[int, int],
                            radius: int = 5, beta: float = 10.0, exp_times: int = 8, cam_power: float = 1.5,
                            bg_threshold: float = 0.25) -> np.ndarray:
    """IRN's ``step/make_sem_seg_labels.py`` with ``propagate_to_edge``'s dense walk, written out literally.

    ``affinity_sparse2dense``: A = eye + the pair affinities, both directions; ``to_transition_matrix``:
    A ** beta, columns normalised, squared ``exp_times`` times; ``rw = x @ T`` with AdvCAM's
    ``x = cam ** 1.5`` (``cam_power``); upsampled x4 (bilinear, align_corners=False), cropped to the image,
    divided by the global max, a ``bg_threshold`` plane in front, argmax, ``keys`` padded with 0 in front.
    Float64, slow (dense (hw)^2), for the tests only."""
    n, h, w = cam.shape
    a = torch.eye(h * w, dtype=torch.float64)
    for k, (dy, dx) in enumerate(offsets(radius)):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    i, j = y * w + x, (y + dy) * w + x + dx
                    a[i, j] = a[j, i] = float(aff[k, y, x])
    scaled = torch.pow(a, beta)
    trans_mat = scaled / torch.sum(scaled, dim=0, keepdim=True)
    for _ in range(exp_times):
        trans_mat = torch.matmul(trans_mat, trans_mat)
    cams = torch.pow(cam.double().clamp(min=0), cam_power)
    rw = torch.matmul(cams.view(-1, h * w), trans_mat).view(n, 1, h, w)
    rw_up = F.interpolate(rw, scale_factor=4, mode="bilinear", align_corners=False)[..., 0, :size[0], :size[1]]
    rw_up = rw_up / torch.max(rw_up)
    rw_up_bg = F.pad(rw_up, (0, 0, 0, 0, 1, 0), value=bg_threshold)
    rw_pred = torch.argmax(rw_up_bg, dim=0).numpy()
    return np.pad(np.asarray(keys) + 1, (1, 0), mode="constant")[rw_pred]


WALK_KEYS, WALK_SIZE = [3, 6], (23, 25)  # a 6x7 CAM grid; 23x25 is not a multiple of 4: the crop matters


def two_class_scene(leak: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cam (2, 6, 7), affinities (34, 6, 7)): three column blocks (class 3 | background | class 6) whose
    affinities are ``rand ** 0.1`` inside a block and ``leak`` times that across blocks. Class 3 peaks at 1 and
    class 6 at 0.6, so the global and the per-class maxima differ; a little noise, slightly negative in places."""
    g = torch.Generator().manual_seed(0)
    h, w = 6, 7
    block = [0, 0, 0, 1, 1, 2, 2]
    aff = torch.rand(len(offsets(5)), h, w, generator=g) ** 0.1
    for k, (dy, dx) in enumerate(offsets(5)):
        for x in range(w):
            if 0 <= x + dx < w and block[x] != block[x + dx]:
                aff[k, :, x] *= leak
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    cam = torch.stack([torch.exp(-((ys - 1) ** 2 + (xs - 1) ** 2) / 3),
                       0.6 * torch.exp(-((ys - 4) ** 2 + (xs - 5.5) ** 2) / 3)])
    return cam + 0.1 * torch.rand(2, h, w, generator=g) - 0.03, aff


@pytest.mark.parametrize("kwargs", [{"exp_times": 0}, {"exp_times": 2}, {"exp_times": 3},
                                    {"exp_times": 1, "beta": 4.0, "cam_power": 2.0, "bg_threshold": 0.4}])
def test_walk_labels_match_dense_irn_make_sem_seg_labels(kwargs: dict) -> None:
    """walk_labels = IRN's make_sem_seg_labels (dense propagate_to_edge, 2^exp_times steps, AdvCAM's cam**1.5,
    x4 upsampling then crop, global max, background plane) on every pixel."""
    cam, aff = two_class_scene(leak=0.6)
    want = irn_make_sem_seg_labels(cam, WALK_KEYS, aff, WALK_SIZE, **kwargs)
    got = walk_labels(cam, WALK_KEYS, aff, WALK_SIZE, **kwargs)
    assert set(np.unique(want)) == {0, 4, 7}  # a scene where every label occurs
    np.testing.assert_array_equal(got, want)


def test_walk_labels_defaults_are_the_schema_defaults_and_irns():
    """walk_labels' keyword defaults are params.schema.yaml's refine.randomwalk defaults (IRN/AdvCAM: radius 5,
    beta 10, exp_times 8, cam_power 1.5, bg 0.25), and with them it labels as IRN does."""
    from advcam import config

    rw = config.load(None, []).refine.randomwalk
    names = ("radius", "beta", "exp_times", "cam_power", "bg_threshold")
    defaults = {k: inspect.signature(walk_labels).parameters[k].default for k in names}
    assert defaults == {k: rw[k] for k in names} == {"radius": 5, "beta": 10.0, "exp_times": 8, "cam_power": 1.5,
                                                     "bg_threshold": 0.25}
    cam, aff = two_class_scene(leak=0.3)  # blocks nearly apart: 256 steps still leave three regions
    want = irn_make_sem_seg_labels(cam, WALK_KEYS, aff, WALK_SIZE, **{k: rw[k] for k in names})
    assert set(np.unique(want)) == {0, 4, 7}
    np.testing.assert_array_equal(walk_labels(cam, WALK_KEYS, aff, WALK_SIZE), want)


def test_affinity_fingerprint_changes_with_every_training_param(tmp_path):
    """The remembered affinity network is trained again for other training params, another seed or another
    backbone; the walk's own params (beta, exp_times, ...) are not in it."""
    from advcam import config
    from advcam.steps import refine_walk

    (tmp_path / "a.png").write_bytes(b"x")
    training = ["refine.randomwalk.epochs=2", "refine.randomwalk.lr=0.05", "refine.randomwalk.batch_size=8",
                "refine.randomwalk.crop_size=80", "refine.randomwalk.weight_decay=0.001", "seed=1",
                "classifier.arch=resnet50"]
    # design irn trains its boundaries at train_radius and walks at radius; affinitynet trains and walks at radius
    for design, trains, walks in [("irn", "train_radius=7", "radius=4"), ("affinitynet", "radius=4", "train_radius=7")]:
        fix = [f"refine.randomwalk.design={design}"]

        def fingerprint(*overrides: str) -> dict:
            return refine_walk.affinity_fingerprint(config.load(None, fix + list(overrides)), tmp_path, ["a"])

        base = fingerprint()
        assert fingerprint("refine.randomwalk.beta=8") == fingerprint(f"refine.randomwalk.{walks}") == base
        for override in training + [f"refine.randomwalk.{trains}"]:
            assert fingerprint(override) != base, (design, override)
        (tmp_path / "a.png").write_bytes(b"y")
        assert fingerprint() != base
        (tmp_path / "a.png").write_bytes(b"x")
    assert fingerprint() != refine_walk.affinity_fingerprint(config.load(None, []), tmp_path, ["a"])  # irn's


# ---------------------------------------------------------------- the stage, on the TINY synthetic dataset
RW = TINY + ["refine.method=randomwalk", "refine.randomwalk.epochs=2", "refine.randomwalk.batch_size=4",
             "refine.randomwalk.crop_size=36", "refine.randomwalk.exp_times=4", "refine.randomwalk.train_radius=3"]


@pytest.mark.parametrize("design", ["irn", "affinitynet"])
def test_refine_stage_randomwalk_end_to_end(tiny_data, tmp_path, design):
    from advcam import cli, config
    from advcam.steps import figures
    from advcam.utils.checkpoint import load_checkpoint

    root, info = tiny_data
    out, metrics = tmp_path / "pseudo", tmp_path / "pseudo.json"
    args = ["refine", "--params-json", "{}", "--data", str(root / "data"), "--cams", str(root / "cams"),
            "--out", str(out), "--metrics", str(metrics), "--set", f"refine.randomwalk.design={design}"]
    assert cli.main(args + [a for o in RW for a in ("--set", o)]) == 0
    header, state = load_checkpoint(out / ".affinity.pt")
    assert header["kind"] == {"irn": "boundary", "affinitynet": "affinity"}[design]
    assert any(k.startswith("edge.") for k in state["model"]) == (design == "irn")
    # the gallery row (advcam visualize, the report's gallery) shows the boundary map IRN's walk ran on
    cfg = config.load(None, [*RW, f"refine.randomwalk.design={design}"])
    image_id = info.lists["infer"][0]
    columns = figures.visualize(cfg, root / "data", image_id, tmp_path / "row.png", pseudo=out)
    assert ("boundary" in columns) == (design == "irn") and "pseudo label" in columns
    assert Image.open(tmp_path / "row.png").size[0] > 0
    ids = info.lists["infer"]
    for image_id in ids:
        with Image.open(out / f"{image_id}.png") as im:
            label = np.array(im)
            assert im.mode == "P" and im.size == Image.open(info.image_path(image_id)).size
        assert set(np.unique(label)) <= {0, *[c + 1 for c in info.labels[image_id]]}  # walk labels every pixel
        assert (out / ".crf" / f"{image_id}.png").is_file()
    m = json.loads(metrics.read_text())
    assert m["num_images"] == len(ids) and m["pseudo_labelled_fraction"] == 1.0
    assert 0 < m["pseudo_miou"] <= 1 and 0 < m["pseudo_miou_crf"] <= 1 and m["pseudo_labelled_fraction_crf"] < 1
    assert (out / ".affinity.pt").is_file() and not (out / ".affinity.pt.resume.pt").exists()
    assert len((out / ".affinity.csv").read_text().splitlines()) == 1 + 2 * (len(ids) // 4)

    stamps = {p: p.stat().st_mtime_ns for p in [out / ".affinity.pt", *out.glob("*.png"), *out.glob(".crf/*.png")]}
    assert cli.main(args + [a for o in RW + ["refine.randomwalk.beta=8"] for a in ("--set", o)]) == 0
    changed = {p for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert changed == {out / f"{i}.png" for i in ids}  # walk redone; CRF labels and affinity network kept
    assert json.loads(metrics.read_text())["pseudo_miou_crf"] == m["pseudo_miou_crf"]


def test_crf_method_reports_crf_keys(tiny_data, tmp_path):
    from advcam import config
    from advcam.steps import refine

    root, _ = tiny_data
    refine.run(config.load(None, TINY), root / "data", root / "cams", tmp_path / "p", tmp_path / "m.json")
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["pseudo_miou_crf"] == m["pseudo_miou"] and not (tmp_path / "p" / ".crf").exists()
    assert not (tmp_path / "p" / ".affinity.pt").exists()


def test_refine_stage_passes_every_walk_param_to_walk_labels(tiny_data, tmp_path, monkeypatch):
    """The stage hands refine.randomwalk's radius, beta, exp_times, cam_power and bg_threshold to walk_labels
    (the affinities at that radius); none falls back to walk_labels' own default."""
    from advcam import config
    from advcam.steps import refine, refine_walk

    root, info = tiny_data
    calls: list[dict] = []

    def record(cam: torch.Tensor, keys: np.ndarray, aff: torch.Tensor, size: tuple[int, int], *,
               boundary: torch.Tensor, **kwargs) -> np.ndarray:
        assert boundary.shape == cam.shape[-2:] == aff.shape[-2:]  # design irn: IRN's damping
        calls.append({**kwargs, "offsets": aff.shape[0]})
        return np.zeros(size, np.uint8)

    monkeypatch.setattr(refine_walk, "walk_labels", record)
    monkeypatch.setattr(refine_walk, "affinity_model", lambda *a: irn.build_boundary_net("resnet_small").eval())
    chosen = {"radius": 3, "beta": 7.5, "exp_times": 3, "cam_power": 2.5, "bg_threshold": 0.4}
    overrides = [f"refine.randomwalk.{k}={v}" for k, v in chosen.items()]
    cfg = config.load(None, TINY + ["refine.method=randomwalk", *overrides])
    refine.run(cfg, root / "data", root / "cams", tmp_path / "p", tmp_path / "m.json")
    assert len(calls) == len(list((tmp_path / "p").glob("*.png"))) >= len(info.lists["infer"]) > 0
    assert all(c == {**chosen, "offsets": len(offsets(3))} for c in calls), calls[0]
    assert all(type(c[k]) is type(v) for c in calls for k, v in chosen.items())
