"""EADER: erasing, the attention map (= the reference's Grad-CAM), phase isolation, the adversarial gradient,
training, checkpoints, resume, and ``advcam train-cls --set classifier.method=eader`` end to end."""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from advcam import config
from advcam.models.classifier import classifier_header, load_classifier
from advcam.models.eader import EADERNet, attention_maps, build_eader, erase, soft_mask
from advcam.train import loop
from advcam.train.eader import (_optimisers, lr_at, ADVERSARY, LOCALISER, eader_losses, eader_params, phase_at, train_eader,
                                train_step)
from advcam.utils.checkpoint import save_checkpoint
from advcam.utils.errors import AdvcamError

TERMS = {"alpha": 0.05, "beta": 1e-5, "omega": 100.0, "sigma": 0.5}


class Squares(Dataset):
    """Class k = a bright square in quadrant k (3 classes, 32 px); small noise from the global torch RNG, so
    resuming must restore RNG states. ``crash_epoch``: raise KeyboardInterrupt while loading that epoch."""

    def __init__(self, n: int = 16, size: int = 32, crash_epoch: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.items, self.epoch, self.crash_epoch = [], 0, crash_epoch
        for i in range(n):
            label = (torch.rand(3, generator=g) < 0.4).float()
            label[i % 3] = 1.0
            img = 0.1 * torch.randn(3, size, size, generator=g)
            for k in torch.nonzero(label).flatten().tolist():
                y, x = (k // 2) * size // 2, (k % 2) * size // 2
                img[k, y + 3:y + 13, x + 3:x + 13] += 2.0
            self.items.append((img, label))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        if self.epoch == self.crash_epoch:
            raise KeyboardInterrupt
        img, label = self.items[i]
        return {"image": img + 0.01 * torch.randn_like(img), "label": label, "id": str(i)}


def _cfg(epochs: int = 2, **eader):
    eader = {"lr": 0.05, **eader}  # a few dozen steps: a higher lr than the reference's 0.01
    over = ["classifier.batch_size=8", f"classifier.epochs={epochs}"]
    over += [f"classifier.eader.{k}={v}" for k, v in eader.items()]
    return config.load(None, over).classifier


def _params(net) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def _changed(before: dict, net) -> bool:
    return any(not torch.equal(before[k], v) for k, v in net.named_parameters())


def _batch(n: int = 8) -> dict:
    data = Squares(n)
    return {"image": torch.stack([data[i]["image"] for i in range(n)]),
            "label": torch.stack([data[i]["label"] for i in range(n)])}


def test_erased_image_and_soft_mask():
    x = torch.randn(2, 3, 8, 8)
    mask = torch.zeros(2, 8, 8)
    mask[:, 2:5, 3:7] = 1.0
    out = erase(x, mask)
    assert torch.equal(out[..., mask[0] == 0], x[..., mask[0] == 0])
    assert torch.all(out[..., mask[0] == 1] == 0)
    t = soft_mask(torch.tensor([0.0, 0.3, 0.5, 0.7, 1.0])).double().tolist()
    assert t[0] < 1e-8 and t[1] < 1e-8 and t[2] == pytest.approx(0.5) and t[3] > 1 - 1e-6 and t[4] == 1.0


def test_attention_map_is_the_references_gradcam():
    torch.manual_seed(0)
    net = build_eader("resnet_small", 3).localiser.eval()
    x = torch.randn(2, 3, 32, 32)
    rows, classes = torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1])
    feats = net.features(x)
    ours = attention_maps(feats, net.classifier.weight, rows, classes, (32, 32))
    # Reference: gradient of the logit w.r.t. the last feature map, spatially averaged, as channel weights.
    logits = net.classifier(feats.mean((2, 3), keepdim=True)).flatten(1)
    for p, (b, c) in enumerate(zip(rows.tolist(), classes.tolist())):
        (g,) = torch.autograd.grad(logits[b, c], feats, retain_graph=True)
        gcam = F.relu((feats[b] * g[b].mean((1, 2))[:, None, None]).sum(0))
        gcam = F.interpolate(gcam[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
        gcam = (gcam - gcam.min()) / (gcam - gcam.min()).max()
        torch.testing.assert_close(ours[p], gcam, atol=1e-5, rtol=1e-4)
    assert ours.amin() == 0 and torch.allclose(ours.flatten(1).amax(1), torch.ones(3))


def test_losses_follow_the_reference_formulas_and_defaults():
    # the reference's train.py / load_optimizer: SGD lr 0.01 constant, momentum 0.9, weight decay 1e-4
    assert eader_params({}) == {"alpha": 0.05, "beta": 1e-5, "omega": 100.0, "sigma": 0.5, "phase_steps": 200,
                                "share_weights": False, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
                                "lr_schedule": "constant", "head_lr_mult": 1.0, "augmentation": "reference"}
    torch.manual_seed(0)
    model = build_eader("resnet_small", 3).eval()
    batch = _batch(4)
    x, y = batch["image"], batch["label"]
    terms = {"alpha": 0.7, "beta": 0.3, "omega": 10.0, "sigma": 0.3}  # every term visible
    loc = model.localiser
    with torch.no_grad():
        feats = loc.features(x)
        bce = F.binary_cross_entropy(torch.sigmoid(loc(x)), y)
        rows, classes = y.nonzero(as_tuple=True)
        att = attention_maps(feats, loc.classifier.weight, rows, classes, (32, 32))
        erased = x[rows] * (1 - torch.sigmoid(10.0 * (att - 0.3)))[:, None]
        probs = torch.sigmoid(model.adversary(erased))
        want_loc = bce + 0.3 * att.mean() + 0.7 * probs[torch.arange(len(rows)), classes].mean()
        want_adv = F.binary_cross_entropy(probs, y[rows])  # the image's classes, on its erased copies
        got_loc = eader_losses(model, x, y, LOCALISER, **terms)
        got_adv = eader_losses(model, x, y, ADVERSARY, **terms)
    assert len(rows) > len(x)  # some image has two classes: one erased copy per (image, class)
    torch.testing.assert_close(got_loc["loss"], want_loc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_adv["loss"], want_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_loc["adversary"], want_adv, atol=1e-5, rtol=1e-5)
    # --share_weights: the localiser classifies the erased images; its term is the raw logit (reference's
    # shared branch: localizer(masked_image, compute_gradcam=False) returns logits), not a probability
    model.drop_adversary()
    with torch.no_grad():
        logits = loc(erased)[torch.arange(len(rows)), classes]
        got_shared = eader_losses(model, x, y, LOCALISER, **terms)
    torch.testing.assert_close(got_shared["loss"], bce + 0.3 * att.mean() + 0.7 * logits.mean(), atol=1e-5,
                               rtol=1e-5)


def test_phases_alternate_and_update_one_network_only():
    assert [phase_at(s, 2) for s in range(6)] == [LOCALISER, LOCALISER, ADVERSARY, ADVERSARY, LOCALISER, LOCALISER]
    assert phase_at(3, 2, has_adversary=False) == LOCALISER
    torch.manual_seed(0)
    model = build_eader("resnet_small", 3).train()
    opt_loc = loop.make_sgd(model.localiser.param_groups(), 0.1, 1e-4, 0.9)
    opt_adv = loop.make_sgd(model.adversary.param_groups(), 0.1, 1e-4, 0.9)
    batch = _batch()
    for phase, opt, moving, resting in ((LOCALISER, opt_loc, model.localiser, model.adversary),
                                        (ADVERSARY, opt_adv, model.adversary, model.localiser)):
        before_moving, before_resting = _params(moving), _params(resting)
        model.zero_grad(set_to_none=True)
        out = train_step(model, opt, batch, phase, TERMS)
        assert _changed(before_moving, moving), phase
        assert not _changed(before_resting, resting), phase
        assert all(p.grad is None for p in resting.parameters()), phase
        assert out["loss"] is not None and torch.isfinite(out["loss"])
    assert all(p.requires_grad for p in model.parameters())  # the resting network is unfrozen again


def test_adversarial_term_reaches_attention_maps_and_localiser():
    torch.manual_seed(0)
    model = build_eader("resnet_small", 3).train()
    batch = _batch()
    loc = model.localiser
    feats = loc.features(batch["image"])
    rows, classes = batch["label"].nonzero(as_tuple=True)
    att = attention_maps(feats, loc.classifier.weight, rows, classes, (32, 32))
    att.retain_grad()
    erased = erase(batch["image"][rows], soft_mask(att))
    prob = torch.sigmoid(model.adversary(erased)).gather(1, classes[:, None]).mean()
    prob.backward()
    assert att.grad is not None and att.grad.abs().sum() > 0
    assert loc.backbone.conv1.weight.grad.abs().sum() > 0
    assert loc.classifier.weight.grad is None  # Grad-CAM weights are constants, as in the reference

    grads = []
    for alpha in (0.0, 1.0):
        model.zero_grad(set_to_none=True)
        eader_losses(model, batch["image"], batch["label"], LOCALISER, **{**TERMS, "alpha": alpha})["loss"].backward()
        grads.append(loc.backbone.layer4[0].conv1.weight.grad.clone())
        assert all(p.grad is None for p in model.adversary.parameters())
    assert not torch.allclose(grads[0], grads[1])


def test_short_training_lowers_localiser_loss(tmp_path: Path):
    torch.manual_seed(0)
    model = build_eader("resnet_small", 3)
    rows = train_eader(model, Squares(32), cfg=_cfg(epochs=6, phase_steps=4), seed=0, workers=0, resume=tmp_path / "m.resume.pt", curves=tmp_path / "c.csv",
                       fingerprint={"t": 1})
    assert len(rows) == 24 and (tmp_path / "c.csv").is_file()
    loss = [r[2] for r in rows]
    assert np.mean(loss[16:20]) < 0.8 * np.mean(loss[:4])  # third localiser phase vs the first


def test_alpha_zero_is_the_baseline_without_adversary(tmp_path: Path):
    """The reference's baseline (no adversarial model): the localiser alone, trained on every step, and no
    erased-image pass (its adversarial term would be multiplied by 0)."""
    torch.manual_seed(0)
    model = build_eader("resnet_small", 3)
    before = _params(model.localiser)
    rows = train_eader(model, Squares(16), cfg=_cfg(epochs=2, phase_steps=1, alpha=0.0), seed=0, workers=0,
                       resume=tmp_path / "m.resume.pt", curves=tmp_path / "c.csv", fingerprint={"t": 1})
    assert model.adversary is None and _changed(before, model.localiser)
    assert len(rows) == 4 and all(np.isfinite(r[2]) for r in rows)  # 4 localiser steps: none went to an adversary
    # the reference's loader keeps the last partial batch: 12 images in batches of 8 are 2 steps per epoch
    rows = train_eader(build_eader("resnet_small", 3), Squares(12), cfg=_cfg(epochs=2, phase_steps=1, alpha=0.0),
                       seed=0, workers=0, resume=tmp_path / "p.resume.pt", curves=tmp_path / "p.csv",
                       fingerprint={"t": 2})
    assert len(rows) == 4
    out = eader_losses(model, _batch()["image"], _batch()["label"], LOCALISER, **{**TERMS, "alpha": 0.0})
    assert "adversary" not in out and float(out["erased_prob"]) == 0.0
    assert torch.allclose(out["localiser"], out["bce"] + TERMS["beta"] * out["area"])


def test_augmentation_reference_or_shared():
    from advcam.train.eader import dataset_options

    assert dataset_options(_cfg(), 96) == {"resized_crop": (0.08, 1.0)}  # load_data.py's RandomResizedCrop
    assert dataset_options(_cfg(augmentation="shared"), 96) == {}
    with pytest.raises(AdvcamError, match="classifier.eader.augmentation"):
        dataset_options({"eader": {"augmentation": "psa"}}, 96)


def test_checkpoint_roundtrip_and_inference_interface(tmp_path: Path):
    from advcam.attribution.advcam import climb
    from advcam.attribution.cam import compute_maps

    torch.manual_seed(0)
    model = build_eader("resnet_small", 3)
    for i, p in enumerate(model.adversary.parameters()):  # make the two networks distinguishable
        p.data.add_(0.01 * (i + 1))
    save_checkpoint(tmp_path / "m.pt", classifier_header(model, ["a", "b", "c"], {"method": "eader"}),
                    model=model.state_dict())
    loaded = load_classifier(tmp_path / "m.pt", num_classes=3)
    assert isinstance(loaded, EADERNet) and loaded.method == "eader" and not loaded.training
    assert loaded.header["method"] == "eader" and loaded.arch == "resnet_small" and loaded.num_classes == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.randn(3, 32, 32)
    model.eval()
    torch.testing.assert_close(loaded.cam(x[None]), model.localiser.cam(x[None]))
    assert loaded.classifier is loaded.localiser.classifier and loaded.output_stride == 8
    maps = compute_maps(loaded, x, [0, 2], config.load(None, ["cam.method=cam", "cam.scales=[1.0]"]).cam)
    assert maps["high_res"].shape == (2, 32, 32) and maps["cam"].shape == (2, 8, 8)
    assert climb(loaded, x, [1], steps=2).shape == (1, 4, 4)

    shared = build_eader("resnet_small", 3)
    shared.drop_adversary()
    save_checkpoint(tmp_path / "s.pt", classifier_header(shared, ["a", "b", "c"], {}), model=shared.state_dict())
    again = load_classifier(tmp_path / "s.pt")
    assert again.adversary is None and again.shares_weights


def _run(tmp: Path, crash_epoch: int | None = None):
    torch.manual_seed(0)
    model = build_eader("resnet_small", 3)
    rows = train_eader(model, Squares(16, crash_epoch=crash_epoch), cfg=_cfg(phase_steps=1), seed=1, workers=0,
                       resume=tmp / "m.pt.resume.pt", curves=tmp / "c.csv", fingerprint={"t": 1})
    return model, rows


def test_resume_after_interruption_equals_straight_run(tmp_path: Path, caplog):
    straight, straight_rows = _run(tmp_path / "a")  # 2 epochs x 2 steps, phases of 1: L A | L A
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", crash_epoch=1)
    assert (tmp_path / "b" / "m.pt.resume.pt").is_file()
    torch.manual_seed(123), random.seed(5), np.random.seed(7)
    with caplog.at_level(logging.INFO, logger="advcam"):
        resumed, resumed_rows = _run(tmp_path / "b")
    assert "resuming" in caplog.text and resumed_rows == straight_rows
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_train_cls_cli_with_eader(tiny_overrides, tmp_path: Path):
    from advcam.cli import main

    sets = [a for o in tiny_overrides for a in ("--set", o)]
    data = tmp_path / "data"
    assert main(["prepare", "--params-json", "{}", *sets, "--out", str(data)]) == 0
    out = tmp_path / "models" / "classifier.pt"
    code = main(["train-cls", "--params-json", "{}", *sets, "--set", "classifier.method=eader", "--set",
                 "classifier.eader.phase_steps=2", "--set", "classifier.epochs=2", "--data", str(data),
                 "--out", str(out), "--curves", str(tmp_path / "curves.csv")])
    assert code == 0 and out.is_file() and not loop.resume_path_for(out).exists()
    model = load_classifier(out, num_classes=3)
    assert isinstance(model, EADERNet) and model.adversary is not None
    assert model.header["params"]["eader"]["phase_steps"] == 2
    assert main(["cams", "--params-json", "{}", *sets, "--set", "cam.method=cam", "--data", str(data),
                 "--model", str(out), "--out", str(tmp_path / "cams"), "--metrics", str(tmp_path / "seeds.json"),
                 "--curve", str(tmp_path / "seeds.csv")]) == 0
    assert (tmp_path / "seeds.json").is_file()


def test_optimisers_follow_the_reference_and_poly_is_an_option():
    model = build_eader("resnet_small", 3)
    hp = eader_params({})
    for opt in _optimisers(model, hp):
        assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
        assert all(g["momentum"] == 0.9 and g["weight_decay"] == 1e-4 for g in opt.param_groups)
    assert lr_at(hp, 0, 100) == lr_at(hp, 99, 100) == 0.01
    poly = {**hp, "lr_schedule": "poly"}
    assert lr_at(poly, 0, 100) == 0.01 and 0 < lr_at(poly, 50, 100) < 0.01
    with pytest.raises(AdvcamError, match="lr_schedule"):
        lr_at({**hp, "lr_schedule": "cosine"}, 0, 100)


def test_a_diverging_localiser_is_reported_once(tmp_path: Path, caplog):
    """EADER's own loop warns like loop.fit when the localiser's loss grows far above its first step's."""
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="advcam"):
        cfg = _cfg(epochs=4, phase_steps=1, alpha=0.0, lr=500.0)
        rows = train_eader(build_eader("resnet_small", 3), Squares(16), cfg=cfg, seed=0, workers=0,
                           resume=tmp_path / "m.resume.pt", curves=tmp_path / "c.csv", fingerprint={"t": 1})
    assert loop.epoch_mean_loss(rows, 2) > 10 * rows[0][2] and np.isfinite(rows[-1][2])
    warned = [r.getMessage() for r in caplog.records if "diverged" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("train-cls (eader) localiser: the mean loss of epoch 2 ")


def _psa_frozen(key: str) -> bool:
    """A ResNet-38 tensor that PSA and SEAM never train: conv1a, b2, b2_1, b2_2, every BatchNorm (bn*)."""
    return re.search(r"\.backbone\.(conv1a|b2|b2_1|b2_2)\.|\.bn", key) is not None


def test_eader_on_resnet38_steps_both_phases_and_keeps_psas_frozen_layers():
    """EADER with PSA's / SEAM's ResNet-38 (``classifier.arch: resnet38``): each phase steps its own network only; in
    both networks what PSA and SEAM never train (``conv1a``, ``b2*``, every BatchNorm's affine parameters and
    statistics) stays as it was and stays frozen; the maps come at stride 8."""
    torch.manual_seed(0)
    model = build_eader("resnet38", 3).train()
    opt_loc, opt_adv = _optimisers(model, {"lr": 0.01, "weight_decay": 1e-4, "momentum": 0.9, "head_lr_mult": 1.0})
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert any(k.startswith("localiser.backbone.conv1a") for k, _ in model.named_parameters())
    assert len(trainable) == 72 and not any(_psa_frozen(k) for k in trainable)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"image": torch.randn(2, 3, 64, 64), "label": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])}
    for phase, opt, moving, resting in ((LOCALISER, opt_loc, "localiser.", "adversary."),
                                        (ADVERSARY, opt_adv, "adversary.", "localiser.")):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = train_step(model, opt, batch, phase, TERMS)
        assert torch.isfinite(out["loss"]), phase
        now = model.state_dict()
        changed = {k for k in now if not torch.equal(now[k], before[k])}
        assert changed and all(k.startswith(moving) for k in changed), (phase, sorted(changed)[:3])
        assert changed <= trainable, phase
    frozen = [k for k in state if _psa_frozen(k)]
    assert len(frozen) > 200 and all(torch.equal(model.state_dict()[k], state[k]) for k in frozen)
    assert {k for k, p in model.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        assert model.eval().cam(torch.randn(1, 3, 64, 64)).shape == (1, 3, 8, 8)
