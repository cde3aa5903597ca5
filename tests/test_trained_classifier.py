"""``classifier.trained``: a classifier trained elsewhere (IRN's / AdvCAM's ``res50_cam.pth``, or an advcam
checkpoint) is taken instead of training one, so that the later stages (AdvCAM first) run on it."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from advcam import config
from advcam.attribution.cam import load_cam
from advcam.cli import main as cli_main
from advcam.data import load_info
from advcam.models import resnet
from advcam.models.classifier import build_classifier, classifier_header, load_classifier
from advcam.steps import check
from advcam.utils.checkpoint import save_checkpoint
from advcam.utils.errors import AdvcamError

sys.path.insert(0, str(Path(__file__).parent))
from voc_fixture import DEFAULT_CLASSES, make_voc_fixture  # noqa: E402


class IRNLayout(nn.Module):
    """The module layout of IRN's ``net/resnet50_cam.py`` (the layout, not its code): a torchvision-named ResNet-50
    under ``resnet50``, registered again inside ``stage1``..``stage4`` and the ``backbone`` list, and the bias-free
    classifier again inside ``newly_added``; so its state dict holds each tensor under several names, as IRN's."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        r = resnet.resnet50(strides=(2, 2, 2, 1))
        self.resnet50 = r
        self.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
        self.stage2, self.stage3, self.stage4 = nn.Sequential(r.layer2), nn.Sequential(r.layer3), nn.Sequential(r.layer4)
        self.classifier = nn.Conv2d(2048, num_classes, 1, bias=False)
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4])
        self.newly_added = nn.ModuleList([self.classifier])

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """The class maps as IRN's CAM network computes them (before its ReLU and flip merge)."""
        for stage in (self.stage1, self.stage2, self.stage3, self.stage4):
            x = stage(x)
        return F.conv2d(x, self.classifier.weight)


def irn_file(path: Path, num_classes: int, seed: int = 0) -> IRNLayout:
    """Save an IRN-layout network with random weights and BatchNorm statistics as ``path``; return it."""
    torch.manual_seed(seed)
    net = IRNLayout(num_classes).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), path)
    return net


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    root = make_voc_fixture(tmp / "VOC", n_train=3, n_val=2)
    net = irn_file(tmp / "res50_cam.pth", len(DEFAULT_CLASSES))
    sets = ["device=cpu", "dataset.kind=voc", f"dataset.root={root}", "dataset.train_list=train",
            f"dataset.classes={list(DEFAULT_CLASSES)}", "classifier.arch=resnet50", "cam.method=cam",
            "cam.scales=[1.0]"]
    assert run(tmp, sets, "prepare", "--out", tmp / "data") == 0
    return tmp, sets, net


def run(tmp: Path, sets: list[str], *args: object) -> int:
    return cli_main([str(args[0]), "--params-json", "{}", *[a for s in sets for a in ("--set", s)],
                     *map(str, args[1:])])


def cams(tmp: Path, sets: list[str], model: Path, out: str) -> Path:
    """Run the cams stage with ``sets`` on the classifier ``model`` into ``tmp / out``; returns that folder."""
    assert run(tmp, sets, "cams", "--data", tmp / "data", "--model", model, "--out", tmp / out,
               "--metrics", tmp / f"{out}.json", "--curve", tmp / f"{out}.csv") == 0
    return tmp / out


def assert_cam_files(tmp: Path, folder: Path, reference: Callable[[np.ndarray, list[int]], dict], atol: float) -> None:
    """Every CAM file in ``folder`` (the infer list's) holds its image's classes, and its arrays equal those of
    ``reference(pixels, classes)`` (a dict: ``cam`` and / or ``high_res``) to ``atol``."""
    info = load_info(tmp / "data")
    for image_id in info.lists["infer"]:
        ours = load_cam(folder / f"{image_id}.npz")
        classes = [int(c) for c in ours["keys"]]
        assert classes == info.labels[image_id] and classes
        for key, ref in reference(info.read_image(image_id), classes).items():
            np.testing.assert_allclose(ours[key], ref, rtol=0, atol=atol, err_msg=f"{image_id} {key}")


def train_cls(tmp: Path, sets: list[str], trained: Path, out: str = "cls.pt", *more: str) -> int:
    return run(tmp, [*sets, f"classifier.trained={trained}", *more], "train-cls", "--data", tmp / "data", "--out",
               tmp / out, "--curves", tmp / f"{out}.csv")


def test_irns_res50_cam_is_taken_as_the_classifier(voc):
    """IRN's trained CAM network (res50_cam.pth) becomes the classifier, weights and BatchNorm statistics
    included: its class maps are IRN's, nothing is trained, and the same file gives the same bytes."""
    tmp, sets, net = voc
    assert train_cls(tmp, sets, tmp / "res50_cam.pth") == 0
    model = load_classifier(tmp / "cls.pt", num_classes=len(DEFAULT_CLASSES), classes=list(DEFAULT_CLASSES))
    assert (model.arch, model.method) == ("resnet50", "cam")
    assert model.header["params"] == {"trained": str(tmp / "res50_cam.pth"), "format": "irn"}
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.cam(x), net.cam(x), rtol=0, atol=0)
    assert (tmp / "cls.pt.csv").read_text() == "epoch,step,loss,lr\n"
    first = (tmp / "cls.pt").read_bytes()
    assert train_cls(tmp, sets, tmp / "res50_cam.pth", "cls.pt", "classifier.epochs=3") == 0  # training params unused
    assert (tmp / "cls.pt").read_bytes() == first  # (the cams stage on it: the next test)


def small_checkpoint(path: Path) -> nn.Module:
    """An advcam checkpoint of a resnet_small classifier (random weights) at ``path``."""
    torch.manual_seed(1)
    small = build_classifier("resnet_small", len(DEFAULT_CLASSES)).eval()
    save_checkpoint(path, classifier_header(small, list(DEFAULT_CLASSES), {"epochs": 9}), model=small.state_dict())
    return small


def irn_make_cam(net: IRNLayout, pixels: np.ndarray, classes: list[int], scales: tuple[float, ...]) -> dict:
    """IRN's ``make_cam`` step written out for one image (the references' CAM files, which AdvCAM's seeds start
    from): per scale, the 8-bit image resized by PIL bicubic to the rounded size, normalised with ImageNet's
    statistics, stacked with its flip; the CAM network's ReLU maps, flip-merged; summed over scales at stride 4
    (``cam``) and at the stride-16 multiple above the image, cropped (``high_res``); the labelled classes, each
    divided by its maximum + 1e-5."""
    h, w = pixels.shape[:2]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    strided, up = ((h + 3) // 4, (w + 3) // 4), ((h + 15) // 16 * 16, (w + 15) // 16 * 16)
    low, high = [], []
    for s in scales:
        size = (int(np.round(h * s)), int(np.round(w * s)))
        img = pixels if s == 1 else np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.BICUBIC))
        x = torch.from_numpy(((img / 255. - mean) / std).astype(np.float32).transpose(2, 0, 1).copy())
        with torch.no_grad():
            maps = F.relu(net.cam(torch.stack([x, x.flip(-1)])))
        o = maps[0] + maps[1].flip(-1)
        low.append(F.interpolate(o[None], strided, mode="bilinear", align_corners=False)[0])
        high.append(F.interpolate(o[:, None], up, mode="bilinear", align_corners=False)[:, 0, :h, :w])
    out = {}
    for name, parts in (("cam", low), ("high_res", high)):
        m = torch.stack(parts).sum(0)[classes]
        out[name] = (m / (m.amax((1, 2), keepdim=True) + 1e-5)).numpy()
    return out


def test_cams_of_irns_classifier_are_irns_make_cam(voc):
    """On IRN's classifier, advcam's CAM files (cam.method cam, two scales) are what IRN's make_cam writes."""
    tmp, sets, net = voc
    sets = [*sets, "cam.scales=[1.0, 0.5]"]
    assert train_cls(tmp, sets, tmp / "res50_cam.pth", "irn.pt") == 0
    assert_cam_files(tmp, cams(tmp, sets, tmp / "irn.pt", "cams2"),
                     lambda pixels, classes: irn_make_cam(net, pixels, classes, (1.0, 0.5)), atol=1e-5)


class IRNFeatures(nn.Module):
    """The IRN-layout network seen as test_advcam's literal reference loop expects it (``features``,
    ``classifier``)."""

    def __init__(self, net: IRNLayout) -> None:
        super().__init__()
        self.net, self.classifier = net, net.classifier

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in (self.net.stage1, self.net.stage2, self.net.stage3, self.net.stage4):
            x = stage(x)
        return x


def test_advcam_files_of_irns_classifier_are_the_references(voc):
    """On IRN's classifier, advcam's AdvCAM files are the reference's (AdvCAM's obtain_CAM_masking written out):
    per scale, IRN's resized and normalised image climbed by the literal loop of test_advcam (one class at a time,
    Grad-CAM through autograd), the accumulated maps summed over the scales as make_cam sums the CAMs."""
    from test_advcam import literal_climb

    tmp, sets, net = voc
    sets = [*sets, "cam.method=advcam", "cam.scales=[1.0, 0.5]", "cam.advcam.steps=3"]
    assert train_cls(tmp, sets, tmp / "res50_cam.pth", "irn.pt") == 0
    cams(tmp, sets, tmp / "irn.pt", "adv")
    info = load_info(tmp / "data")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    reference = IRNFeatures(net)
    infer = info.lists["infer"]
    for image_id in [next((i for i in infer if len(info.labels[i]) > 1), infer[0])]:  # two classes where there are
        ours = load_cam(tmp / "adv" / f"{image_id}.npz")
        classes = [int(c) for c in ours["keys"]]
        pixels = info.read_image(image_id)
        h, w = pixels.shape[:2]
        strided, up = ((h + 3) // 4, (w + 3) // 4), ((h + 15) // 16 * 16, (w + 15) // 16 * 16)
        low, high = [], []
        for s in (1.0, 0.5):  # T = 3 climbs 3 steps at scale 0.5 too (the reference halves only T > 10)
            size = (int(np.round(h * s)), int(np.round(w * s)))
            img = pixels if s == 1 else np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.BICUBIC))
            x = torch.from_numpy(((img / 255. - mean) / std).astype(np.float32).transpose(2, 0, 1).copy())
            o = literal_climb(reference, x, classes, steps=3)
            low.append(F.interpolate(o[None], strided, mode="bilinear", align_corners=False)[0])
            high.append(F.interpolate(o[:, None], up, mode="bilinear", align_corners=False)[:, 0, :h, :w])
        for key, parts in (("cam", low), ("high_res", high)):
            m = torch.stack(parts).sum(0)
            ref = (m / (m.amax((1, 2), keepdim=True) + 1e-5)).numpy()
            np.testing.assert_allclose(ours[key], ref, rtol=0, atol=1e-4, err_msg=f"{image_id} {key}")


def test_an_advcam_checkpoint_is_taken_as_it_is(voc):
    tmp, sets, _ = voc
    small = small_checkpoint(tmp / "small.pt")
    assert train_cls(tmp, [*sets, "classifier.arch=resnet_small"], tmp / "small.pt", "small-copy.pt") == 0
    model = load_classifier(tmp / "small-copy.pt")
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.cam(x), small.cam(x), rtol=0, atol=0)
    assert model.header["params"] == {"trained": str(tmp / "small.pt"), "format": "advcam"}


def test_a_classifier_that_does_not_fit_is_refused_naming_the_file(voc, capsys):
    """One line, exit 2, no checkpoint written; check_params says the same before any stage runs."""
    tmp, sets, _ = voc
    irn20 = tmp / "res50_cam_voc.pth"  # IRN's network for VOC's 20 classes: its classifier has 20 rows
    state = torch.load(tmp / "res50_cam.pth", weights_only=True)
    state["classifier.weight"] = state["newly_added.0.weight"] = torch.randn(20, 2048, 1, 1)
    torch.save(state, irn20)
    small_checkpoint(tmp / "small.pt")
    (tmp / "notes.txt").write_text("not a checkpoint")
    torch.save({**state, "fc_edge6.weight": torch.zeros(1, 160, 1, 1)}, tmp / "res50_irn.pth")  # IRN's boundary net
    cases = [(tmp / "missing.pth", (), "classifier.trained: file not found"),
             (tmp / "res50_irn.pth", (), "IRN's trained boundary network (res50_irn.pth), not a classifier; give it "
                                         "as refine.randomwalk.trained"),
             (irn20, (), "classifier has 20 output classes, expected 3"),
             (tmp / "res50_cam.pth", ("classifier.arch=resnet_small",),
              "is IRN's ResNet-50 CAM network; set classifier.method=cam and classifier.arch=resnet50"),
             (tmp / "notes.txt", (), "classifier.trained: "),
             (tmp / "small.pt", (), "set classifier.method=cam and classifier.arch=resnet_small")]
    for path, more, message in cases:
        capsys.readouterr()
        assert train_cls(tmp, sets, path, "refused.pt", *more) == 2, path
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("advcam train-cls: error: ") and message in err[0], err
        assert not (tmp / "refused.pt").exists()
        with pytest.raises(AdvcamError) as refused:  # check_params: the same check, the same message
            check.trained_fits(config.load(None, [*sets, f"classifier.trained={path}", *more]))
        assert err[0] == f"advcam train-cls: error: {refused.value}"
    check.trained_fits(config.load(None, [*sets, f"classifier.trained={tmp / 'res50_cam.pth'}"]))
