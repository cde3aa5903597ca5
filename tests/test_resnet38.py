"""``classifier.arch: resnet38``: PSA's and SEAM's ResNet-38, their trained weight files as ``classifier.trained``
(SEAM's ``resnet38_SEAM.pth``, PSA's ``resnet38_cls.pth``) and their ImageNet weights as ``classifier.pretrained``.

The reference side is written out here from the references' equations, on the state dict with their names
(functional, so a module or a name that differs fails): ResNet-38's forward, SEAM's PCM and ``infer_SEAM.py``."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from advcam import config
from advcam.attribution.cam import load_cam
from advcam.data import load_info
from advcam.data import transforms as T
from advcam.data.transforms import normalize
from advcam.models import resnet
from advcam.models.classifier import build_classifier, load_classifier
from advcam.models.resnet38 import ResNet38
from advcam.models.seam import build_seam
from advcam.refine import psa, psa_labels
from advcam.refine.affinity import affinity_labels
from advcam.steps import check
from advcam.utils.checkpoint import load_checkpoint
from advcam.utils.errors import AdvcamError

sys.path.insert(0, str(Path(__file__).parent))
from test_trained_classifier import assert_cam_files, cams, run, train_cls  # noqa: E402
from voc_fixture import DEFAULT_CLASSES, make_voc_fixture  # noqa: E402

EPS = 1e-5
# the reference's pre-activation blocks: (name, stride, first conv's dilation, second conv's dilation, 1x1 shortcut)
BLOCKS = [("b2", 2, 1, 1, True), ("b2_1", 1, 1, 1, False), ("b2_2", 1, 1, 1, False),
          ("b3", 2, 1, 1, True), ("b3_1", 1, 1, 1, False), ("b3_2", 1, 1, 1, False),
          ("b4", 2, 1, 1, True), *[(f"b4_{i}", 1, 1, 1, False) for i in range(1, 6)],
          ("b5", 1, 1, 2, True), ("b5_1", 1, 2, 2, False), ("b5_2", 1, 2, 2, False)]
BOTTLENECKS = ("b6", "b7")  # 1x1 to out/4, 3x3 (dilation 4) to out/2, 1x1 to out; 1x1 shortcut


def bn_relu(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.relu(F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                               sd[f"{name}.bias"], False, 0.0, EPS))


def conv(sd: dict, name: str, x: torch.Tensor, stride: int = 1, dilation: int = 1) -> torch.Tensor:
    w = sd[f"{name}.weight"]
    return F.conv2d(x, w, stride=stride, padding=dilation * (w.shape[-1] // 2), dilation=dilation)


def reference_resnet38(sd: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """resnet38d's ``forward_as_dict``: conv4 / conv5 = the BN-ReLU pre-activations of b5 / b6, conv6 = ReLU(bn7)."""
    out = {}
    x = conv(sd, "conv1a", x)
    for name, stride, first, dilation, projected in BLOCKS:
        pre = bn_relu(sd, f"{name}.bn_branch2a", x)
        if name == "b5":
            out["conv4"] = pre
        shortcut = conv(sd, f"{name}.conv_branch1", pre, stride) if projected else x
        y = bn_relu(sd, f"{name}.bn_branch2b1", conv(sd, f"{name}.conv_branch2a", pre, stride, first))
        x = shortcut + conv(sd, f"{name}.conv_branch2b1", y, 1, dilation)
    for name in BOTTLENECKS:
        pre = bn_relu(sd, f"{name}.bn_branch2a", x)
        if name == "b6":
            out["conv5"] = pre
        y = bn_relu(sd, f"{name}.bn_branch2b1", conv(sd, f"{name}.conv_branch2a", pre))
        y = bn_relu(sd, f"{name}.bn_branch2b2", conv(sd, f"{name}.conv_branch2b1", y, 1, 4))
        x = conv(sd, f"{name}.conv_branch1", pre) + conv(sd, f"{name}.conv_branch2b2", y)
    out["conv6"] = bn_relu(sd, "bn7", x)
    return out


def reference_seam(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """resnet38_SEAM's ``forward`` in eval mode: the PCM output ``cam_rv`` (21 maps, background first), resized to
    the input with ``align_corners=True``."""
    f = reference_resnet38(sd, x)
    cam = F.conv2d(f["conv6"], sd["fc8.weight"])
    n, c, h, w = cam.shape
    d = F.relu(cam)
    norm = F.relu(d - EPS) / (d.view(n, c, -1).max(-1)[0].view(n, c, 1, 1) + EPS)
    top = norm[:, 1:].max(1, keepdim=True)[0]
    fg = torch.where(norm[:, 1:] < top, torch.zeros_like(top), norm[:, 1:])
    norm = torch.cat([1 - top, fg], 1)
    small = F.interpolate(x, (h, w), mode="bilinear", align_corners=True)
    feats = torch.cat([small, F.relu(F.conv2d(f["conv4"], sd["f8_3.weight"])),
                       F.relu(F.conv2d(f["conv5"], sd["f8_4.weight"]))], 1)
    e = F.conv2d(feats, sd["f9.weight"]).view(n, -1, h * w)
    e = e / (torch.norm(e, dim=1, keepdim=True) + EPS)
    aff = F.relu(torch.matmul(e.transpose(1, 2), e))
    aff = aff / (aff.sum(1, keepdim=True) + EPS)
    rv = torch.matmul(norm.view(n, -1, h * w), aff).view(n, -1, h, w)
    return F.interpolate(rv, x.shape[-2:], mode="bilinear", align_corners=True)


def summed_over_scales(pixels: np.ndarray, classes: list[int], scales: tuple[float, ...],
                       maps: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The multi-scale loop of SEAM's and PSA's inference scripts (their ``VOC12ClsDatasetMSF``) for one image: per
    scale the PIL bicubic resize to the rounded size, ImageNet normalisation, the image and its flip; ``maps(x)``
    (all classes) resized to the image (``align_corners=False``), the classes' maps flipped back and summed."""
    h, w = pixels.shape[:2]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    total = torch.zeros(len(classes), h, w)
    for s in scales:
        img = np.asarray(Image.fromarray(pixels).resize((round(w * s), round(h * s)), Image.BICUBIC))
        x = torch.from_numpy(((img / 255. - mean) / std).astype(np.float32).transpose(2, 0, 1).copy())
        for flip in (False, True):
            with torch.no_grad():
                m = F.interpolate(maps((x.flip(-1) if flip else x)[None]), (h, w), mode="bilinear",
                                  align_corners=False)[0][classes]
            total += m.flip(-1) if flip else m
    return total


def infer_seam(sd: dict, pixels: np.ndarray, classes: list[int], scales: tuple[float, ...]) -> np.ndarray:
    """``infer_SEAM.py`` for one image: the foreground PCM maps summed over scales and flips; ReLU; per class
    minimum-maximum normalisation with pixels below minimum + 1e-5 zeroed."""
    total = summed_over_scales(pixels, classes, scales, lambda x: reference_seam(sd, x)[:, 1:]).clamp_min(0)
    lo, hi = total.amin((1, 2), keepdim=True), total.amax((1, 2), keepdim=True)
    total[total < lo + EPS] = 0
    return ((total - lo - EPS) / (hi - lo + EPS)).numpy()


def infer_cls(sd: dict, pixels: np.ndarray, classes: list[int], scales: tuple[float, ...]) -> np.ndarray:
    """PSA's ``infer_cls.py`` for one image: ``forward_cam`` (ReLU of the classifier on conv6) summed over scales
    and flips; each map divided by its maximum + 1e-5."""
    cam = lambda x: F.relu(F.conv2d(reference_resnet38(sd, x)["conv6"], sd["fc8.weight"]))  # noqa: E731
    total = summed_over_scales(pixels, classes, scales, cam)
    return (total / (total.amax((1, 2), keepdim=True) + EPS)).numpy()


def reference_aff_embedding(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """resnet38_aff's embedding: ELU(f9(cat(ELU(f8_3(conv4)), ELU(f8_4(conv5)), ELU(f8_5(conv6)))))."""
    f = reference_resnet38(sd, x)
    cat = torch.cat([F.elu(F.conv2d(f[k], sd[f"{n}.weight"])) for k, n in
                     (("conv4", "f8_3"), ("conv5", "f8_4"), ("conv6", "f8_5"))], 1)
    return F.elu(F.conv2d(cat, sd["f9.weight"]))


def reference_pairs(radius: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """PSA's ``get_indices_of_pairs``: (from (P,), to (K, P)) flat indices, first pixels in ``[:-rf, rf:-rf]``."""
    dist = [(0, x) for x in range(1, radius)]
    dist += [(y, x) for y in range(1, radius) for x in range(-radius + 1, radius) if x * x + y * y < radius * radius]
    full, rf = np.arange(h * w, dtype=np.int64).reshape(h, w), radius - 1
    ch, cw = h - rf, w - 2 * rf
    to = np.stack([full[dy:dy + ch, rf + dx:rf + dx + cw].reshape(-1) for dy, dx in dist])
    return full[:-rf, rf:-rf].reshape(-1), to


def infer_aff(sd: dict, pixels: np.ndarray, high_res: np.ndarray, keys: list[int], n_classes: int, alpha: float,
              beta: float, logt: int, radius: int = 5) -> torch.Tensor:
    """PSA's / SEAM's ``infer_aff.py`` for one image: the upsampled walked scores ``(1 + C, H, W)`` (background
    first), whose argmax is the label. A dense affinity matrix from the pairs, the identity and the transposed pairs;
    raised to beta; columns normalised; squared logt times; the CAMs (background ``(1 - max) ** alpha``) padded and
    average-pooled by 8, multiplied from the left. SEAM's radius for small grids."""
    h, w = pixels.shape[:2]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    img = torch.from_numpy(((pixels / 255. - mean) / std).astype(np.float32).transpose(2, 0, 1).copy())[None]
    ph, pw = int(np.ceil(h / 8) * 8), int(np.ceil(w / 8) * 8)
    img = F.pad(img, (0, pw - w, 0, ph - h))
    with torch.no_grad():
        x = reference_aff_embedding(sd, img)
    dh, dw = x.shape[-2:]
    edge = min(dh, dw)
    radius = (edge - 1) // 2 if edge < radius * 2 + 1 else radius
    ind_from, ind_to = (torch.from_numpy(a) for a in reference_pairs(radius, dh, dw))
    x = x.view(1, x.size(1), -1)
    ff = torch.index_select(x, 2, ind_from)[:, :, None]
    ft = torch.index_select(x, 2, ind_to.reshape(-1)).view(1, x.size(1), -1, ff.size(3))
    aff = torch.exp(-torch.mean(torch.abs(ft - ff), dim=1)).view(-1)
    src = ind_from[None].expand(ind_to.size(0), -1).reshape(-1)
    area, ident = dh * dw, torch.arange(dh * dw)
    idx = torch.cat([torch.stack([src, ind_to.reshape(-1)]), torch.stack([ident, ident]),
                     torch.stack([ind_to.reshape(-1), src])], 1)
    mat = torch.sparse_coo_tensor(idx, torch.cat([aff, torch.ones(area), aff]), (area, area),
                                  check_invariants=True).to_dense()
    trans = mat ** beta
    trans = trans / trans.sum(0, keepdim=True)
    for _ in range(logt):
        trans = trans @ trans
    full = np.zeros((n_classes + 1, h, w), np.float32)
    for k, m in zip(keys, high_res):
        full[k + 1] = m
    full[0] = (1 - full[1:].max(0)) ** alpha
    full = np.pad(full, ((0, 0), (0, ph - h), (0, pw - w)))
    vec = F.avg_pool2d(torch.from_numpy(full), 8, 8).view(n_classes + 1, -1)
    rw = (vec @ trans).view(1, n_classes + 1, dh, dw)
    return F.interpolate(rw, (ph, pw), mode="bilinear", align_corners=False)[0, :, :h, :w]


def aff_state(backbone: dict, seed: int) -> dict:
    """A resnet38_aff state dict: ``backbone`` (ResNet-38 names) and random f8_3, f8_4, f8_5, f9 as PSA initialises
    them."""
    torch.manual_seed(seed)
    heads = {"f8_3": (64, 512), "f8_4": (128, 1024), "f8_5": (256, 4096), "f9": (448, 448)}
    out = dict(backbone)
    for name, (cout, cin) in heads.items():
        weight = torch.empty(cout, cin, 1, 1)
        (torch.nn.init.xavier_uniform_(weight, gain=4) if name == "f9" else torch.nn.init.kaiming_normal_(weight))
        out[f"{name}.weight"] = weight
    return out


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` in eval mode with random BatchNorm statistics and affine parameters (not the identity)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def reference_keys() -> set[str]:
    """The parameter and buffer names of resnet38d.Net, from the block table above."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1a.weight", *(f"bn7.{k}" for k in bn)}
    for name, _, _, _, projected in BLOCKS:
        keys |= {f"{name}.conv_branch2a.weight", f"{name}.conv_branch2b1.weight"}
        keys |= {f"{name}.{b}.{k}" for b in ("bn_branch2a", "bn_branch2b1") for k in bn}
        keys |= {f"{name}.conv_branch1.weight"} if projected else set()
    for name in BOTTLENECKS:
        keys |= {f"{name}.conv_branch{c}.weight" for c in ("1", "2a", "2b1", "2b2")}
        keys |= {f"{name}.{b}.{k}" for b in ("bn_branch2a", "bn_branch2b1", "bn_branch2b2") for k in bn}
    return keys


@pytest.fixture(scope="module")
def seam_file(tmp_path_factory):
    """A SEAM-format ``resnet38_SEAM.pth`` for 3 classes (fc8 with a background row first) with random weights and
    BatchNorm parameters, the state dict under the reference's names, and the VOC fixture prepared for it."""
    tmp = tmp_path_factory.mktemp("resnet38")
    torch.manual_seed(0)
    net = randomised(build_seam("resnet38", len(DEFAULT_CLASSES)), 0)
    sd = {k[len("backbone."):]: v for k, v in net.state_dict().items() if k.startswith("backbone.")}
    sd.update({"fc8.weight": torch.cat([torch.randn(1, 4096, 1, 1) * 0.02, net.classifier.weight.detach()]),
               "f8_3.weight": net.pcm_proj2.weight.detach(), "f8_4.weight": net.pcm_proj3.weight.detach(),
               "f9.weight": net.pcm_embed.weight.detach()})
    torch.save(sd, tmp / "resnet38_SEAM.pth")
    root = make_voc_fixture(tmp / "VOC", n_train=2, n_val=1, size=(36, 44))
    sets = ["device=cpu", "dataset.kind=voc", f"dataset.root={root}", "dataset.train_list=train",
            f"dataset.classes={list(DEFAULT_CLASSES)}", "classifier.arch=resnet38", "classifier.method=seam",
            "cam.method=cam", "cam.scales=[1.0, 0.5]"]
    assert run(tmp, sets, "prepare", "--out", tmp / "data") == 0
    assert train_cls(tmp, sets, tmp / "resnet38_SEAM.pth", "seam.pt") == 0  # the classifier the tests climb on
    yield tmp, sets, sd
    shutil.rmtree(tmp)  # about 2 GB of weight files


def test_resnet38_is_the_references_network():
    """Names, shapes and the forward (conv4, conv5, conv6) of resnet38d.Net; frozen as PSA and SEAM freeze it."""
    torch.manual_seed(1)
    net = randomised(ResNet38(), 1)
    sd = net.state_dict()
    assert set(sd) == reference_keys()
    x = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        ours, ref = net.forward_stages(x), reference_resnet38(sd, x)
    for got, key in zip(ours, ("conv4", "conv5", "conv6")):
        assert got.shape[-2:] == (5, 4)  # output stride 8, and the stages read by the PCM at the same grid
        torch.testing.assert_close(got, ref[key], rtol=1e-4, atol=1e-5, msg=key)
    model = build_classifier("resnet38", 4).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight"} | {f"backbone.{k}" for k in reference_keys()
                                                 if k.split(".")[0] not in ("conv1a", "b2", "b2_1", "b2_2")
                                                 and ".conv" in f".{k}"}
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_seams_trained_network_gives_infer_seams_maps(seam_file):
    """SEAM's resnet38_SEAM.pth as classifier.trained: the CAM files (two scales, flips) are infer_SEAM.py's."""
    tmp, sets, sd = seam_file
    model = load_classifier(tmp / "seam.pt")
    assert (model.arch, model.method, model.header["params"]["format"]) == ("resnet38", "seam", "seam")
    # the reference leaves its zeroed pixels at -1e-5 / (max - min): advcam clips them to 0 (cam.normalise)
    assert_cam_files(tmp, cams(tmp, sets, tmp / "seam.pt", "cams"),
                     lambda px, classes: {"high_res": infer_seam(sd, px, classes, (1.0, 0.5)).clip(0)}, atol=1e-4)


def test_advcam_climbs_on_seams_trained_network(seam_file):
    """AdvCAM on SEAM's network, as the AdvCAM paper's SEAM row (T = 8 there; 2 here): the class maps with evidence
    change. (The fused op is the same on every network: the fallback spares this test the extension's build.)"""
    tmp, sets, _ = seam_file
    adv = [*sets, "cam.method=advcam", "cam.scales=[1.0]", "cam.advcam.steps=2", "cam.advcam.lam=2.0",
           "cam.advcam.backend=fallback"]
    plain = [*sets, "cam.scales=[1.0]"]
    for name, s in (("adv", adv), ("plain", plain)):
        cams(tmp, s, tmp / "seam.pt", name)
    lit = 0
    for image_id in load_info(tmp / "data").lists["infer"]:
        a, p = (load_cam(tmp / name / f"{image_id}.npz")["high_res"] for name in ("adv", "plain"))
        assert np.isfinite(a).all() and a.shape == p.shape
        for k in range(len(p)):
            if p[k].max() > 0:  # a random network gives some classes no evidence
                lit += 1
                assert np.abs(a[k] - p[k]).max() > 1e-3, (image_id, k)
    assert lit


def test_psas_trained_network_is_a_resnet38_cam_classifier(seam_file):
    """PSA's resnet38_cls.pth (fc8 without a background row, no PCM) becomes a cam classifier on resnet38 whose
    maps are resnet38_cls's forward_cam before its ReLU, and whose CAM files are what PSA's infer_cls.py computes."""
    tmp, sets, sd = seam_file
    psa = {k: v for k, v in sd.items() if not k.startswith(("f8_", "f9."))}
    psa["fc8.weight"] = sd["fc8.weight"][1:]
    torch.save(psa, tmp / "resnet38_cls.pth")
    cam = [*sets, "classifier.method=cam"]
    assert train_cls(tmp, cam, tmp / "resnet38_cls.pth", "psa.pt") == 0
    model = load_classifier(tmp / "psa.pt")
    assert (model.arch, model.method, model.header["params"]["format"]) == ("resnet38", "cam", "psa")
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(model.cam(x), F.conv2d(reference_resnet38(psa, x)["conv6"], psa["fc8.weight"]),
                                   rtol=1e-4, atol=1e-5)
    assert_cam_files(tmp, cams(tmp, cam, tmp / "psa.pt", "psa_cams"),
                     lambda px, classes: {"high_res": infer_cls(psa, px, classes, (1.0, 0.5))}, atol=1e-4)


def test_reference_files_that_do_not_fit_are_refused(seam_file, capsys):
    """One line naming the file and the fix, exit 2, nothing written; check_params says the same."""
    tmp, sets, sd = seam_file
    head = {k: sd[k] for k in ("conv1a.weight", "f9.weight")}  # what tells SEAM's format; small files save time
    torch.save({**head, "fc8.weight": torch.randn(21, 4096, 1, 1)}, tmp / "seam_voc.pth")  # VOC's: bg + 20 rows
    torch.save({**head, "fc8.weight": sd["fc8.weight"]}, tmp / "seam_cut.pth")  # the right classes, the rest cut
    cases = [(tmp / "resnet38_SEAM.pth", ("classifier.arch=resnet50",),
              "is SEAM's ResNet-38 network; set classifier.method=seam and classifier.arch=resnet38"),
             (tmp / "seam_voc.pth", (), "classifier has 20 output classes (its fc8 has 21 rows: background first), "
                                        "expected 3"),
             (tmp / "seam_cut.pth", (), "not SEAM's ResNet-38 network (192 missing, e.g. backbone.b2.")]
    for path, more, message in cases:
        capsys.readouterr()
        assert train_cls(tmp, sets, path, "refused.pt", *more) == 2, path
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and str(path) in err[0], err
        assert not (tmp / "refused.pt").exists()
        with pytest.raises(AdvcamError) as refused:
            check.trained_fits(config.load(None, [*sets, f"classifier.trained={path}", *more]))
        assert err[0] == f"advcam train-cls: error: {refused.value}"
    with pytest.raises(AdvcamError, match="refine.method randomwalk: .* no resnet38 variant .* use refine.method crf"):
        check.run(config.load(None, [*sets, "refine.method=randomwalk"]), None, tmp / "checked")
    assert not (tmp / "checked").exists()


def test_resnet38_imagenet_weights_load_as_pretrained(seam_file):
    """classifier.pretrained for resnet38: the converted ImageNet weights (resnet38d's names), or a trained PSA /
    SEAM file whose heads are ignored; an MXNet .params file and another network's file are refused."""
    tmp, _, sd = seam_file
    backbone = {k: v for k, v in sd.items() if not k.startswith(("fc8.", "f8_", "f9."))}
    torch.save(backbone, tmp / "imagenet.pth")
    for path in (tmp / "imagenet.pth", tmp / "resnet38_SEAM.pth"):
        check.weights_fit(build_classifier, "resnet38", str(path), "classifier.pretrained")
        model = build_classifier("resnet38", 3, path)
        torch.testing.assert_close(model.backbone.state_dict(), backbone, rtol=0, atol=0)
    (tmp / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params").write_bytes(b"\x12\x01\x00\x00")
    torch.save(resnet.resnet_small().state_dict(), tmp / "resnet.pth")  # a torchvision-named ResNet
    for name, message in (("ilsvrc-cls_rna-a1_cls1000_ep-0001.params", "an MXNet parameter file; convert it"),
                          ("resnet.pth", "keys do not match this backbone")):
        with pytest.raises(AdvcamError, match="classifier.pretrained: .*" + message):
            check.weights_fit(build_classifier, "resnet38", str(tmp / name), "classifier.pretrained")


def test_random_walk_on_a_resnet38_classifier_uses_refine_randomwalk_arch(seam_file):
    """The affinity network has no ResNet-38 variant: with refine.randomwalk.arch it is built on that arch instead,
    and the random walk runs on the ResNet-38 classifier's CAMs."""
    tmp, sets, _ = seam_file
    walk = [*sets, "refine.method=randomwalk", "refine.randomwalk.arch=resnet_small", "refine.randomwalk.epochs=1",
            "refine.randomwalk.batch_size=2", "refine.randomwalk.crop_size=32",
            "refine.randomwalk.train_radius=3"]
    check.run(config.load(None, walk), None, tmp / "checked")
    torch.save(resnet.resnet_small().state_dict(), tmp / "small.pth")  # not a ResNet-50: check_params refuses it
    with pytest.raises(AdvcamError, match=r"refine.randomwalk.pretrained: .*small.pth: keys do not match"):
        check.run(config.load(None, [*walk, "refine.randomwalk.arch=resnet50",
                                     f"refine.randomwalk.pretrained={tmp / 'small.pth'}"]), None, tmp / "checked2")
    cams(tmp, walk, tmp / "seam.pt", "walk_cams")
    assert run(tmp, walk, "refine", "--data", tmp / "data", "--cams", tmp / "walk_cams", "--out", tmp / "pseudo",
               "--metrics", tmp / "pseudo.json") == 0
    header, _ = load_checkpoint(tmp / "pseudo" / ".affinity.pt")
    assert header["fingerprint"]["arch"] == "resnet_small" and header["fingerprint"]["pretrained"] is None
    info = load_info(tmp / "data")
    for image_id in info.lists["infer"]:
        label = np.asarray(Image.open(tmp / "pseudo" / f"{image_id}.png"))
        assert label.shape == info.read_image(image_id).shape[:2]


def test_psas_affinity_network_and_walk_are_infer_affs():
    """PSA's resnet38_aff (names, embedding) and the walk of ``refine.randomwalk.design: psa`` against infer_aff.py
    written out: the walked scores to 1e-4 and the labels equal, at radius 5 (a 12 x 13 grid) and on a grid too
    small for it (5 x 6: SEAM's radius 2), at PSA's and SEAM's settings."""
    torch.manual_seed(2)
    net = randomised(psa.PSAAffinityNet(), 2)
    sd = net.state_dict()
    assert set(sd) == reference_keys() | set(psa.HEADS)
    rng, distinct = np.random.default_rng(2), []
    for (h, w), (alpha, beta, logt), keys in (((92, 100), (16.0, 8.0, 8), [0, 2]), ((36, 44), (6.0, 8.0, 6), [1]),
                                              ((92, 100), (16.0, 8.0, 8), [])):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ys, xs = np.mgrid[:h, :w]  # a bump per class, somewhere in the image: background around it
        bumps = [np.exp(-((ys - rng.uniform(0, h)) ** 2 + (xs - rng.uniform(0, w)) ** 2) / (0.1 * h * w)) for _ in keys]
        high_res = np.stack(bumps).astype(np.float32) if keys else np.zeros((0, h, w), np.float32)
        with torch.no_grad():
            ours_emb = net(psa.padded_to_stride(normalize(pixels))[None])
            aff, radius = psa.affinities(net, normalize(pixels), 5)
        assert radius == (5 if h > 80 else 2)
        ref = infer_aff(sd, pixels, high_res, keys, len(DEFAULT_CLASSES), alpha, beta, logt)
        torch.testing.assert_close(ours_emb, reference_aff_embedding(sd, psa.padded_to_stride(normalize(pixels))[None]),
                                   rtol=1e-4, atol=1e-5)
        ours = psa.walk_scores(torch.from_numpy(high_res), aff, radius, alpha=alpha, beta=beta, logt=logt)
        channels = [0, *(k + 1 for k in keys)]
        torch.testing.assert_close(ours, ref[channels], rtol=1e-4, atol=1e-6)
        label = psa.walk_labels(torch.from_numpy(high_res), keys, aff, radius, alpha=alpha, beta=beta, logt=logt)
        assert (label == ref.argmax(0).numpy()).all()
        distinct.append(len(np.unique(label)))
    assert max(distinct) > 1  # not a walk that gives every pixel one label


def test_refine_walks_with_psas_trained_affinity_network(seam_file, capsys):
    """SEAM's pipeline through advcam: SEAM's classifier, its CAMs, PSA's walk on a trained resnet38_aff file
    (``refine.randomwalk.design: psa``). Every pseudo label is infer_aff.py's (SEAM's settings); a missing or wrong
    file is refused by check_params and the stage with the same line, nothing written."""
    tmp, sets, sd = seam_file
    backbone = {k: v for k, v in sd.items() if not k.startswith(("fc8.", "f8_", "f9."))}
    torch.save(aff_state(backbone, 3), tmp / "resnet38_aff_SEAM.pth")
    walk = [*sets, "refine.method=randomwalk", "refine.randomwalk.design=psa",
            "refine.randomwalk.psa.alpha=6", "refine.randomwalk.psa.logt=6"]
    folder = cams(tmp, sets, tmp / "seam.pt", "psa_cams")
    cases = [((f"refine.randomwalk.psa.trained={tmp / 'none.pth'}",), "none.pth: file not found"),
             ((f"refine.randomwalk.psa.trained={tmp / 'resnet38_SEAM.pth'}",),
              "resnet38_SEAM.pth: not PSA's or SEAM's trained AffinityNet (resnet38_aff: ResNet-38 with f8_3, f8_4, "
              "f8_5, f9): it looks like a ResNet-38 classifier (give it as classifier.trained)")]
    for more, message in cases:
        with pytest.raises(AdvcamError) as refused:
            check.run(config.load(None, [*walk, *more]), None, tmp / "psa_checked")
        assert message in str(refused.value) and not (tmp / "psa_checked").exists()
        capsys.readouterr()
        assert run(tmp, [*walk, *more], "refine", "--data", tmp / "data", "--cams", folder, "--out",
                   tmp / "refused", "--metrics", tmp / "refused.json") == 2
        assert capsys.readouterr().err.strip() == f"advcam refine: error: {refused.value}"
        assert not (tmp / "refused.json").exists() and not list((tmp / "refused").rglob("*.png"))  # nor CRF labels
    walk.append(f"refine.randomwalk.psa.trained={tmp / 'resnet38_aff_SEAM.pth'}")
    check.run(config.load(None, walk), None, tmp / "psa_checked")
    assert run(tmp, walk, "refine", "--data", tmp / "data", "--cams", folder, "--out", tmp / "psa_pseudo",
               "--metrics", tmp / "psa_pseudo.json") == 0
    info = load_info(tmp / "data")
    aff = aff_state(backbone, 3)
    for image_id in info.lists["infer"]:
        maps = load_cam(folder / f"{image_id}.npz")
        pixels = info.read_image(image_id)
        ref = infer_aff(aff, pixels, maps["high_res"], [int(k) for k in maps["keys"]], len(DEFAULT_CLASSES), 6.0,
                        8.0, 6)
        expected = np.concatenate([[0], np.arange(len(DEFAULT_CLASSES)) + 1])[ref.argmax(0).numpy()]
        label = np.asarray(Image.open(tmp / "psa_pseudo" / f"{image_id}.png"))
        assert (label == expected).all(), image_id
    assert not (tmp / "psa_pseudo" / ".affinity.pt").exists()  # taken, not trained


def reference_aff_labels(image: np.ndarray, la: np.ndarray, ha: np.ndarray, size: int, crop: tuple[int, int, int, int],
                         flip: bool, radius: int = 5) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """PSA's ``VOC12AffDataset`` item after its colour jitter, for a given ``RandomCrop`` draw and flip: the normalised
    image (C, S, S) and ``ExtractAffinityLabelInRadius``'s (bg, fg, neg) labels (K, P)."""
    label = np.concatenate([la, ha]).transpose(1, 2, 0)
    img_label = np.concatenate((image, label), axis=-1)
    h, w = image.shape[:2]
    ct, cl, it, il = crop
    ch, cw = min(size, h), min(size, w)
    box = np.zeros((size, size, img_label.shape[-1]), np.float32)
    box[ct:ct + ch, cl:cl + cw] = img_label[it:it + ch, il:il + cw]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    img = ((box[..., :3] / 255. - mean) / std).astype(np.float32)
    label = box[..., 3:]
    if flip:
        img, label = np.fliplr(img).copy(), np.fliplr(label).copy()
    label = label.reshape(size // 8, 8, size // 8, 8, -1).mean((1, 3))  # skimage's block_reduce(mean)
    no_score = np.max(label, -1) < 1e-5
    low, high = np.array_split(label, 2, axis=-1)
    low, high = np.argmax(low, -1).astype(np.uint8), np.argmax(high, -1).astype(np.uint8)
    label = low.copy()
    label[low == 0] = 255
    label[high == 0] = 0
    label[no_score] = 255
    dist = [(0, x) for x in range(1, radius)]
    dist += [(y, x) for y in range(1, radius) for x in range(-radius + 1, radius) if x * x + y * y < radius * radius]
    rf, cells = radius - 1, size // 8
    src = label[:-rf, rf:-rf].reshape(-1)
    to = np.stack([label[dy:dy + cells - rf, rf + dx:rf + dx + cells - 2 * rf].reshape(-1) for dy, dx in dist])
    valid = (to < 255) & (src < 255)[None]
    pos = src[None] == to
    return img.transpose(2, 0, 1), (pos & (src[None] == 0), pos & (src[None] != 0) & valid, ~pos & valid)


def reference_crf_with_alpha(image: np.ndarray, high_res: np.ndarray, alpha: float) -> np.ndarray:
    """PSA's ``_crf_with_alpha`` and ``crf_inference`` (pydensecrf as they call it)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax
    probs = np.concatenate([np.power(1 - np.max(high_res, axis=0, keepdims=True), alpha), high_res])
    h, w = image.shape[:2]
    d = dcrf.DenseCRF2D(w, h, probs.shape[0])
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.copy(image), compat=10)
    return np.array(d.inference(10)).reshape((probs.shape[0], h, w))


def test_psa_affinity_training_data_is_voc12affdatasets():
    """The CRF scores are infer_cls.py's la / ha CRFs; a training sample (crop in its zero container, flip,
    normalisation, 8x8 pooling, the la / ha label rule) and its affinity pairs are VOC12AffDataset's, for crops
    inside the image and larger than it; a sample's crop is within its container."""
    rng = np.random.default_rng(4)
    h, w = 100, 130
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ys, xs = np.mgrid[:h, :w]
    high_res = np.stack([np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 800.0) for cy, cx in ((30, 40), (70, 95))])
    high_res = high_res.astype(np.float32)
    la, ha = (psa_labels.crf_scores(image, high_res, a) for a in (4.0, 32.0))
    for ours, alpha in ((la, 4.0), (ha, 32.0)):
        np.testing.assert_allclose(ours, reference_crf_with_alpha(image, high_res, alpha), rtol=1e-6, atol=1e-7)
    kinds = set()
    for size, crop, flip in ((80, (0, 0, 3, 10), False), (80, (0, 0, 20, 50), True), (112, (12, 0, 0, 18), True),
                             (112, (0, 0, 0, 0), False)):
        ct, cl, it, il = crop
        box = (slice(ct, ct + min(size, h)), slice(cl, cl + min(size, w)), slice(it, it + min(size, h)),
               slice(il, il + min(size, w)))
        img, label = psa_labels.sample_at(image, la, ha, size, box, flip)
        ref_img, ref_pairs = reference_aff_labels(image, la, ha, size, crop, flip)
        np.testing.assert_allclose(img, ref_img, rtol=1e-6, atol=1e-6)
        pairs = affinity_labels(torch.from_numpy(label.astype(np.int64))[None], 5)
        cells = size // 8
        for ours, ref in zip(pairs, ref_pairs):
            assert (ours[0, :, :cells - 4, 4:cells - 4].reshape(len(ref), -1).numpy() == ref).all(), (size, crop)
        kinds |= {v for v in np.unique(label)}
    assert {0, 255} <= kinds and kinds - {0, 255}  # background, unsure and foreground cells all occur
    for _ in range(20):  # PSA's RandomCrop: a random place in the container for a short side, of the image for a long
        cr, cc, ir, ic = (s.start for s in T.crop_box((h, w), 112, rng))
        assert 0 <= cr <= 112 - h and ir == 0 and cc == 0 and 0 <= ic <= w - 112


def test_refine_trains_psas_affinity_network(seam_file):
    """``design: psa`` without a trained file: the CRF scores are written, PSA's AffinityNet is trained from the
    ResNet-38 weights (heads 10x lr, conv1a / b2* / BatchNorm frozen), and the walk labels every image; a rerun
    with the same params trains nothing and recomputes nothing."""
    tmp, sets, sd = seam_file
    backbone = {k: v for k, v in sd.items() if not k.startswith(("fc8.", "f8_", "f9."))}
    torch.save(backbone, tmp / "imagenet38.pth")
    root = make_voc_fixture(tmp / "VOC100", n_train=2, n_val=1, size=(100, 120))
    big = [s for s in sets if not s.startswith("dataset.root=")] + [f"dataset.root={root}"]
    walk = [*big, "refine.method=randomwalk", "refine.randomwalk.design=psa",
            f"refine.randomwalk.pretrained={tmp / 'imagenet38.pth'}", "refine.randomwalk.psa.epochs=1",
            "refine.randomwalk.psa.batch_size=2", "refine.randomwalk.psa.crop_size=80", "refine.randomwalk.psa.logt=4"]
    check.run(config.load(None, walk), None, tmp / "psa_train_checked")
    torch.save(resnet.resnet_small().state_dict(), tmp / "small38.pth")  # not ResNet-38 weights: refused
    with pytest.raises(AdvcamError, match=r"refine.randomwalk.pretrained: .*small38.pth: keys do not match"):
        check.run(config.load(None, [*walk, f"refine.randomwalk.pretrained={tmp / 'small38.pth'}"]), None,
                  tmp / "psa_train_refused")
    assert run(tmp, big, "prepare", "--out", tmp / "data100") == 0
    assert run(tmp, big, "cams", "--data", tmp / "data100", "--model", tmp / "seam.pt", "--out", tmp / "cams100",
               "--metrics", tmp / "cams100.json", "--curve", tmp / "cams100.csv") == 0
    args = ["refine", "--data", tmp / "data100", "--cams", tmp / "cams100", "--out", tmp / "pseudo100", "--metrics",
            tmp / "pseudo100.json"]
    assert run(tmp, walk, *args) == 0
    out = tmp / "pseudo100"
    header, state = load_checkpoint(out / ".affinity.pt")
    assert header["kind"] == "affinity-psa" and header["fingerprint"]["params"]["crop_size"] == 80
    model = psa.PSAAffinityNet()
    model.load_state_dict(state["model"])
    frozen = {k: v for k, v in model.state_dict().items() if k.startswith(("conv1a.", "b2.", "b2_1.", "b7.bn"))}
    for k, v in frozen.items():  # the frozen layers (and BatchNorm statistics) are the pretrained ones
        torch.testing.assert_close(v, backbone[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(model.b3.conv_branch2a.weight, backbone["b3.conv_branch2a.weight"])  # trained
    rows = (out / ".affinity.csv").read_text().splitlines()
    losses = [float(r.split(",")[2]) for r in rows[1:]]
    assert rows[0].split(",")[2] == "loss" and losses and all(np.isfinite(x) and x > 0 for x in losses)
    info = load_info(tmp / "data100")
    ids = sorted(set(info.lists["infer"]) | set(info.lists["seg"]))
    for image_id in ids:
        with np.load(out / ".psa_crf" / f"{image_id}.npz") as z:
            n = 1 + len(info.labels[image_id])
            assert z["la"].shape == z["ha"].shape == (n, 100, 120)
        assert np.asarray(Image.open(out / f"{image_id}.png")).shape == (100, 120)
    stamps = {p: p.stat().st_mtime_ns for p in [out / ".affinity.pt", *out.glob("*.png")]}
    assert run(tmp, walk, *args) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
