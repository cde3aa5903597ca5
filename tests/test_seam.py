"""SEAM: ER / PCM / ECR maths, training lowers the losses, checkpoint round-trip, attribution on a SEAM model,
and the ``advcam train-cls --set classifier.method=seam`` CLI path on a tiny synthetic dataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from advcam.models.seam import SEAMNet, build_seam, pcm_input, pcm_refine, pixel_affinity
from advcam.train.seam import ecr_loss, max_norm, max_onehot, seam_losses, seam_params, top_fraction_mean, train_seam
from advcam.utils.errors import AdvcamError
from conftest import REPO, TINY


class PixelLinear(nn.Module):
    """Stand-in SEAM model at stride 1 whose CAM is a positive per-pixel linear map of the image: exactly
    scale-equivariant under corner-aligned bilinear resizing on images that are bilinear in the coordinates."""

    def __init__(self, num_classes: int = 2, blur: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(num_classes, 3, 1, 1) + 0.1)
        self.blur = blur  # > 0: a box blur of that radius in pixels, which breaks the equivariance

    def seam_forward(self, x: torch.Tensor, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        cam = F.conv2d(x, self.weight)
        if self.blur:
            cam = F.avg_pool2d(cam, 2 * self.blur + 1, stride=1, padding=self.blur)
        return cam, pcm_input(cam)  # identity PCM


def ramp_image(size: int = 64) -> torch.Tensor:
    """A positive image bilinear in (row, column): bilinear resizing reproduces it exactly."""
    v = torch.linspace(0, 1, size)
    u, w = v[None, :].expand(size, size), v[:, None].expand(size, size)
    return torch.stack([0.5 + u, 0.2 + 2 * w, 1.0 + u * w])[None]


def toy_batch(n: int = 16, size: int = 48, num_classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k = a bright square in quadrant k (channel k % 3) on weak noise."""
    g = torch.Generator().manual_seed(seed)
    imgs, labels = [], []
    for i in range(n):
        label = (torch.rand(num_classes, generator=g) < 0.5).float()
        label[i % num_classes] = 1.0
        img = 0.1 * torch.randn(3, size, size, generator=g)
        for k in label.nonzero().flatten().tolist():
            y, x = (k // 2) * size // 2, (k % 2) * size // 2
            img[k % 3, y + 4:y + size // 2 - 4, x + 4:x + size // 2 - 4] += 2.0
        imgs.append(img)
        labels.append(label)
    return torch.stack(imgs), torch.stack(labels)


class ToyDataset(Dataset):
    def __init__(self, n: int = 16, size: int = 48) -> None:
        self.x, self.y = toy_batch(n, size)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "id": str(i)}


# ------------------------------------------------------------------------------------------------ ER
def test_er_is_zero_for_an_equivariant_model_and_positive_otherwise():
    torch.manual_seed(0)
    labels = torch.tensor([[1.0, 1.0]])
    eq = PixelLinear(2)
    with torch.no_grad():
        assert seam_losses(eq, ramp_image(), labels)["er"].item() < 1e-5
        # the same maps blurred by a fixed number of pixels (a receptive field that does not scale): not equivariant
        blurred = PixelLinear(2, blur=3)
        blurred.weight.data.copy_(eq.weight.data)
        assert seam_losses(blurred, ramp_image(), labels)["er"].item() > 1e-2
        # a real SEAM network (stride 8, padding, random weights) on the ramp: not equivariant
        net = build_seam("resnet_small", 2).eval()
        assert seam_losses(net, ramp_image(), labels)["er"].item() > 1e-3


def _minmax(p: torch.Tensor) -> torch.Tensor:
    """Per-(image, channel) min-max of ReLU(p), with the reference's 1e-5 offsets."""
    p = F.relu(p)
    lo, hi = p.amin((2, 3), keepdim=True), p.amax((2, 3), keepdim=True)
    return F.relu(p - lo - 1e-5) / (hi - lo + 1e-5)


def _reference_losses(model, x: torch.Tensor, y: torch.Tensor, s: float = 0.3) -> dict[str, torch.Tensor]:
    """The losses of ``train_SEAM.py`` written out independently, on the reference's (1 + C)-channel layout."""
    n, c = y.shape
    hs, ws = int(x.shape[2] * s), int(x.shape[3] * s)
    lab = torch.cat([torch.ones(n, 1), y], 1)[..., None, None]
    branches = []
    for img in (x, F.interpolate(x, size=(hs, ws), mode="bilinear", align_corners=True)):
        cam, rv = model.seam_forward(img, detach=True)
        cam, rv = (F.interpolate(t, size=img.shape[-2:], mode="bilinear", align_corners=True) for t in (cam, rv))
        branches.append((torch.cat([torch.zeros_like(cam[:, :1]), cam], 1), rv))  # a dummy background channel
    (cam1, rv1), (cam2, rv2) = branches
    cls = sum(F.multilabel_soft_margin_loss(cm.mean((2, 3))[:, 1:], y) for cm, _ in branches) / 2

    def low_quarter(t):  # mean ReLU of the lowest quarter of the per-pixel maximum
        k = t.shape[2] * t.shape[3] // 4
        return F.relu(t.amax(1).flatten(1).sort(1).values[:, :k]).sum() / (k * n)

    rvmin = (low_quarter((rv1 * lab)[:, 1:]) + low_quarter((rv2 * lab)[:, 1:])) / 2
    down = lambda t: F.interpolate(t, size=(hs, ws), mode="bilinear", align_corners=True)  # noqa: E731
    c1, r1, c2, r2 = down(_minmax(cam1)) * lab, down(_minmax(rv1)) * lab, _minmax(cam2) * lab, _minmax(rv2) * lab
    er = (c1[:, 1:] - c2[:, 1:]).abs().mean()
    ecr = 0
    for cam_other, rv_own in ((c2, r1), (c1, r2)):
        t = cam_other.detach().clone()
        t[:, 0] = 1 - t[:, 1:].amax(1)  # background = 1 - max of the foreground maps
        t[:, 1:] = torch.where(t[:, 1:] == t[:, 1:].amax(1, keepdim=True), t[:, 1:], torch.zeros_like(t[:, 1:]))
        k = int((1 + c) * hs * ws * 0.2)
        ecr = ecr + (t - rv_own).abs().flatten(1).sort(1, descending=True).values[:, :k].mean()
    return {"cls": cls, "rvmin": rvmin, "er": er, "ecr": ecr, "total": cls + rvmin + er + ecr}


def test_losses_match_the_reference_formulas_and_defaults():
    # the reference's train_SEAM.py defaults (lr, wt_dec; PolyOptimizer's momentum slot gets wt_dec; dropout7)
    assert seam_params(None) == {"downscale": 0.3, "ecr_top_fraction": 0.2, "er_weight": 1.0, "ecr_weight": 1.0,
                                 "pcm": True, "lr": 0.01, "weight_decay": 5e-4, "momentum": 5e-4, "dropout": 0.5,
                                 "augmentation": "reference"}
    torch.manual_seed(0)
    x, y = toy_batch(4, 48)
    model = PixelLinear(3, blur=2)
    ours, ref = seam_losses(model, x, y), _reference_losses(model, x, y)
    for name in ("cls", "rvmin", "er", "ecr", "total"):
        assert ref[name].item() > 1e-3, name  # every term is active on this input
        torch.testing.assert_close(ours[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)


def test_gradients_flow_as_in_the_reference():
    """ER and cls train the backbone and the classifier, never the PCM; ECR and rvmin train only the PCM layers
    (the reference computes the PCM input under no_grad and detaches the two stages' features)."""
    torch.manual_seed(0)
    model = build_seam("resnet_small", 3).train()
    x, y = toy_batch(2, 48)
    losses = seam_losses(model, x, y)
    pcm = {id(p) for m in (model.pcm_proj2, model.pcm_proj3, model.pcm_embed) for p in m.parameters()}

    def touched(name: str) -> tuple[bool, bool]:
        model.zero_grad(set_to_none=True)
        losses[name].backward(retain_graph=True)
        hit = [id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        return any(i in pcm for i in hit), any(i not in pcm for i in hit)

    assert touched("er") == (False, True) and touched("cls") == (False, True)
    assert touched("ecr") == (True, False) and touched("rvmin") == (True, False)


# ------------------------------------------------------------------------------------------------ PCM
def test_pcm_rows_sum_to_one_negatives_clipped_and_constant_maps_unchanged():
    torch.manual_seed(0)
    f = torch.randn(2, 16, 5, 6)
    aff = pixel_affinity(f)
    assert aff.shape == (2, 30, 30) and (aff >= 0).all()
    torch.testing.assert_close(aff.sum(-1), torch.ones(2, 30), atol=1e-4, rtol=0)
    const = torch.full((2, 3, 5, 6), 0.7)
    torch.testing.assert_close(pcm_refine(const, f), const, atol=1e-4, rtol=0)
    # two groups of pixels with opposite embeddings: no affinity across groups, averaging within a group
    e = torch.zeros(1, 4, 2, 3)
    e[0, 0, 0], e[0, 0, 1] = 1.0, -1.0
    cam = torch.zeros(1, 1, 2, 3)
    cam[0, 0, 0, 0] = 1.0
    out = pcm_refine(cam, e)
    torch.testing.assert_close(out[0, 0], torch.tensor([[1 / 3] * 3, [0.0] * 3]), atol=1e-4, rtol=0)


def test_pcm_input_background_and_non_max_suppression():
    cam = torch.tensor([[[[2.0, -1.0]], [[1.0, 3.0]]]])  # (1, 2 classes, 1, 2)
    x = pcm_input(cam)
    # class 0 normalised by 2 -> [1, 0]; class 1 by 3 -> [1/3, 1]; class 1 suppressed at pixel 0
    torch.testing.assert_close(x[0, 1:, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(x[0, 0, 0], torch.tensor([0.0, 0.0]), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ ECR
def test_ecr_keeps_exactly_the_hardest_fifth():
    g = torch.Generator().manual_seed(0)
    refined = torch.stack([torch.randperm(100, generator=g).float(),
                           torch.randperm(100, generator=g).float() * 2]).view(2, 4, 5, 5).requires_grad_(True)
    loss = ecr_loss(torch.zeros(2, 4, 5, 5), refined, 0.2)
    # top 20 of 0..99 average 89.5, of 0..198 (step 2) 179: mean 134.25 (top 19 or 21 would differ)
    assert loss.item() == pytest.approx((89.5 + 179.0) / 2)
    loss.backward()
    picked = refined.grad.flatten(1) != 0
    assert picked.sum(1).tolist() == [20, 20]
    assert (refined.detach().flatten(1)[picked].view(2, 20).min(1).values == torch.tensor([80.0, 160.0])).all()
    assert top_fraction_mean(torch.arange(10.0)[None], 0.05).item() == 9.0  # at least one entry


def test_max_onehot_keeps_background_and_the_top_class():
    x = torch.tensor([[[[0.3]], [[0.5]], [[0.7]]]])
    torch.testing.assert_close(max_onehot(x).flatten(), torch.tensor([0.3, 0.0, 0.7]))


# ------------------------------------------------------------------------------------------------ training
def test_short_training_lowers_every_loss(tmp_path: Path):
    torch.manual_seed(0)
    model = build_seam("resnet_small", 3)
    data = ToyDataset(16, 48)
    model.train()
    with torch.no_grad():
        before = {k: v.item() for k, v in seam_losses(model, data.x, data.y).items()}

    class Cfg:  # the classifier section's fields train_seam reads (SEAM's optimiser is in its own section)
        epochs, batch_size = 8, 8
        seam = {"pcm": False, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "dropout": 0.0}

    rows = train_seam(model, data, cfg=Cfg, seed=0, workers=0, resume=tmp_path / "r.pt", curves=tmp_path / "c.csv",
                      fingerprint={"t": 1})
    assert len(rows) == 16 and model.use_pcm is False
    with torch.no_grad():
        after = {k: v.item() for k, v in seam_losses(model, data.x, data.y).items()}
    for name in ("cls", "er", "ecr", "total"):
        assert after[name] < 0.7 * before[name], (name, before, after)
    # the reference's loss_cls includes rvmin (which alone needs more steps than this to fall)
    assert after["cls"] + after["rvmin"] < 0.7 * (before["cls"] + before["rvmin"]), (before, after)


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = build_seam("resnet_small", 3)
    model.dropout = 0.5
    x = torch.randn(2, 3, 48, 48)
    model.train()
    assert not torch.equal(model.seam_forward(x)[0], model.seam_forward(x)[0])
    model.eval()
    torch.testing.assert_close(model.seam_forward(x)[0], model.seam_forward(x)[0])
    model.dropout = 0.0
    model.train()
    torch.manual_seed(1)
    first = model.seam_forward(x)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(model.seam_forward(x)[0], first)


# ------------------------------------------------------------------------------------------------ checkpoint
@pytest.mark.parametrize("use_pcm", [True, False])
def test_checkpoint_round_trip_through_load_classifier(tmp_path: Path, use_pcm: bool):
    from advcam.models.classifier import classifier_header, load_classifier
    from advcam.utils.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_seam("resnet_small", 3).eval()
    model.use_pcm = use_pcm
    path = tmp_path / "seam.pt"
    save_checkpoint(path, classifier_header(model, ["a", "b", "c"], {"method": "seam"}),
                    model={k: v.cpu() for k, v in model.state_dict().items()})
    loaded = load_classifier(path, num_classes=3)
    assert isinstance(loaded, SEAMNet) and loaded.header["method"] == "seam" and loaded.use_pcm is use_pcm
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded.cam(x), model.cam(x))
        torch.testing.assert_close(loaded(x), model(x))


def test_build_seam_interface_on_both_archs():
    small = build_seam("resnet_small", 4).eval()
    assert (small.method, small.arch, small.num_classes) == ("seam", "resnet_small", 4)
    assert small.classifier.weight.shape == (4, 128, 1, 1) and small.classifier.bias is None
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        raw = F.conv2d(small.features(x), small.classifier.weight)
        assert small.cam(x).shape == raw.shape == (1, 4, 6, 6) and (small.cam(x) >= 0).all()
        small.use_pcm = False
        torch.testing.assert_close(small.cam(x), raw)
    backbone, head = small.param_groups()
    ids = {id(p) for p in head}
    assert id(small.classifier.weight) in ids and id(small.pcm_embed.weight) in ids and len(head) == 4
    assert not ids & {id(p) for p in backbone}
    big = build_seam("resnet50", 20)
    assert big.pcm_proj2.in_channels == 512 and big.pcm_proj3.in_channels == 1024
    assert not big.backbone.layer2[0].conv1.weight.requires_grad  # IRN's frozen early stages kept


# ------------------------------------------------------------------------------------------------ attribution
def test_cam_and_advcam_run_on_a_seam_model():
    from advcam.attribution.advcam import climb
    from advcam.attribution.cam import compute_maps

    torch.manual_seed(0)
    model = build_seam("resnet_small", 3).eval()
    image = torch.randn(3, 40, 36)
    maps = compute_maps(model, image, [0, 2], _cam_cfg("cam"))
    assert maps["keys"].tolist() == [0, 2] and maps["high_res"].shape == (2, 40, 36)
    assert maps["cam"].shape == (2, 10, 9) and 0.9 < maps["high_res"].max() <= 1.0
    climbed = climb(model, image, [0, 2], steps=3, xi=0.08, lam=2.0)
    assert climbed.shape == (2, 5, 5) and torch.isfinite(climbed).all() and (climbed >= 0).all()
    adv = compute_maps(model, image, [1], _cam_cfg("advcam", steps=2))
    assert adv["high_res"].shape == (1, 40, 36) and adv["high_res"].max() > 0.9
    # inference goes through the PCM: its foreground output, not the raw CAM
    with torch.no_grad():
        torch.testing.assert_close(model.cam(image[None]), model.seam_forward(image[None])[1][:, 1:])
        model.use_pcm = False
        raw = compute_maps(model, image, [0, 2], _cam_cfg("cam"))
    assert not np.allclose(raw["high_res"], maps["high_res"], atol=1e-3)


def _cam_cfg(method: str, **advcam):
    from advcam import config

    sets = [f"cam.method={method}", "cam.scales=[1.0, 0.5]"] + [f"cam.advcam.{k}={v}" for k, v in advcam.items()]
    return config.load(None, [*TINY, *sets]).cam


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_train_cls_seam_then_cams(tmp_path: Path):
    from advcam.cli import main
    from advcam.models.classifier import load_classifier
    from advcam.utils.io import read_json

    common = ["--params", str(REPO / "params.yaml"), *[a for s in TINY for a in ("--set", s)]]
    data, model = tmp_path / "data", tmp_path / "models" / "classifier.pt"
    assert main(["prepare", *common, "--out", str(data)]) == 0
    assert main(["train-cls", *common, "--set", "classifier.method=seam", "--set", "classifier.seam.pcm=false",
                 "--data", str(data), "--out", str(model), "--curves", str(tmp_path / "curves.csv")]) == 0
    loaded = load_classifier(model)
    assert isinstance(loaded, SEAMNet) and loaded.header["method"] == "seam" and loaded.use_pcm is False
    assert loaded.header["params"]["seam"]["downscale"] == 0.3
    assert main(["cams", *common, "--set", "cam.method=cam", "--data", str(data), "--model", str(model),
                 "--out", str(tmp_path / "cams"), "--metrics", str(tmp_path / "seeds.json"),
                 "--curve", str(tmp_path / "seeds.csv")]) == 0
    assert 0.0 <= read_json(tmp_path / "seeds.json")["seed_miou"] <= 1.0
    assert len(list((tmp_path / "cams").glob("*.npz"))) == 10


def test_augmentation_reference_or_shared():
    from advcam.train.seam import dataset_options

    assert dataset_options({"augmentation": "reference"}, 96) == {"resize_long": (96, 165),
                                                                   "color_jitter": (0.3, 0.3, 0.3, 0.1)}
    assert dataset_options({"augmentation": "reference"}, 448)["resize_long"] == (448, 768)  # train_SEAM.py
    assert dataset_options(None, 448)["resize_long"] == (448, 768)  # the library default is the reference's
    assert dataset_options({"augmentation": "shared"}, 96) == {}
    with pytest.raises(AdvcamError, match="classifier.seam.augmentation"):
        dataset_options({"augmentation": "irn"}, 96)


def test_max_norm_is_the_references_min_max_of_the_relu():
    """`visualization.max_norm` (4-d): ReLU, then (p - min - e) / (max - min + e) per channel, ReLU'd. A PCM
    output has a positive floor (an affinity-weighted average), so the minimum matters."""
    torch.manual_seed(0)
    p = torch.rand(2, 3, 5, 4) * 4 + 1  # every entry >= 1
    p[0, 1] -= 3  # some negative entries: ReLU first
    e = 1e-5
    r = F.relu(p)
    hi = r.flatten(2).max(-1)[0][..., None, None]
    lo = r.flatten(2).min(-1)[0][..., None, None]
    torch.testing.assert_close(max_norm(p), F.relu(r - lo - e) / (hi - lo + e))
    assert float(max_norm(p)[1].amin()) == 0.0 and float(max_norm(p)[1].amax()) > 0.99
