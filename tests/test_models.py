"""Models: ResNet weight names, the CAMNet interface, frozen BatchNorm, DeepLab, checkpoint headers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from advcam.models import build_classifier, build_segmenter, load_classifier, load_segmenter
from advcam.models.classifier import classifier_header
from advcam.models.deeplab import segmenter_header
from advcam.models.resnet import BasicBlock, ResNet, load_torchvision_weights, resnet50, resnet_small
from advcam.utils.checkpoint import save_checkpoint
from advcam.utils.errors import AdvcamError


@pytest.fixture(scope="module")
def r50_cls():
    torch.manual_seed(0)
    return build_classifier("resnet50", 5)


def test_resnet50_matches_torchvision_names_and_size():
    net = resnet50()
    keys = set(net.state_dict())
    for k in ("conv1.weight", "bn1.running_var", "bn1.num_batches_tracked", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.bias", "layer2.3.conv3.weight", "layer3.5.bn2.weight", "layer4.2.bn3.running_mean"):
        assert k in keys
    assert not any(k.startswith(("fc.", "avgpool")) for k in keys)
    # torchvision's resnet50 has 25,557,032 parameters, 2,049,000 of them in fc
    assert sum(p.numel() for p in net.parameters()) == 25_557_032 - 2_049_000
    assert net.out_channels == 2048 and net.output_stride == 32


def test_bottleneck_strides_its_3x3_and_dilation_starts_at_a_layers_second_block():
    """torchvision's ResNet v1.5 (IRN's resnet50 too): a bottleneck's stride sits on its 3x3 conv, not the first
    1x1; by default (torchvision's replace_stride_with_dilation convention) a layer's first block keeps the
    previous layer's dilation."""
    net = resnet50()
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)
    d = resnet50(strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4))
    assert [d.layer3[0].conv2.dilation, d.layer3[1].conv2.dilation] == [(1, 1), (2, 2)]
    assert [d.layer4[0].conv2.dilation, d.layer4[1].conv2.dilation] == [(2, 2), (4, 4)]


def test_convolutions_use_kaiming_normal_fan_out():
    """torchvision's initialisation: Kaiming normal with mode fan_out, std sqrt(2 / (out_channels * k * k))."""
    torch.manual_seed(0)
    w = resnet_small().conv1.weight.detach()  # 16 x 3 x 7 x 7: fan_out 784 (fan_in 147 would give 0.117)
    std = (2 / (16 * 49)) ** 0.5
    assert float(w.std()) == pytest.approx(std, rel=0.1)
    assert float(w.abs().max()) > 2 * std  # normal: a uniform of this std stops at sqrt(3) std


def test_camnet_interface_resnet50(r50_cls):
    model = r50_cls.eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        feats = model.features(x)
        cam = model.cam(x)
        logits = model(x)
    assert feats.shape == (2, 2048, 4, 3)  # output stride 16
    assert isinstance(model.classifier, torch.nn.Conv2d) and model.classifier.bias is None
    assert model.classifier.weight.shape == (5, 2048, 1, 1)
    assert torch.allclose(cam, F.conv2d(feats, model.classifier.weight))
    assert logits.shape == (2, 5)
    assert torch.allclose(logits, cam.mean(dim=(2, 3)), atol=1e-5)  # bias-free: GAP commutes with the 1x1 conv
    assert cam.min() < 0  # raw maps, before ReLU
    assert model.num_classes == 5 and model.arch == "resnet50"


def test_resnet50_bn_and_early_stages_stay_frozen(r50_cls):
    model = r50_cls.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    b = model.backbone
    for name in ("conv1", "bn1", "layer1", "layer2"):  # IRN detaches after stage2
        assert not any(p.requires_grad for p in getattr(b, name).parameters())
        assert all(p.grad is None for p in getattr(b, name).parameters())
    assert b.layer3[0].conv1.weight.grad is not None and model.classifier.weight.grad is not None
    backbone, head = model.param_groups()
    assert len(head) == 1 and head[0] is model.classifier.weight
    assert all(p.requires_grad for p in backbone)
    assert not any(p is b.conv1.weight or p is b.layer2[0].conv1.weight for p in backbone)
    # the input gradient that climbing needs flows through the frozen stages
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    model.eval().cam(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_resnet_small_trains_bn_and_has_stride_8():
    torch.manual_seed(0)
    model = build_classifier("resnet_small", 6).train()
    assert model.features(torch.randn(2, 3, 96, 96)).shape == (2, 128, 12, 12)
    assert all(p.requires_grad for p in model.parameters())
    assert not torch.equal(model.backbone.bn1.running_mean, torch.zeros_like(model.backbone.bn1.running_mean))


def test_load_torchvision_weights(tmp_path: Path):
    torch.manual_seed(1)
    src = resnet50()
    state = dict(src.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "resnet50-0000.pth"
    torch.save(state, path)
    torch.manual_seed(2)
    model = build_classifier("resnet50", 3, pretrained=path)
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    seg = build_segmenter("deeplab_resnet50", 4, pretrained=path)
    assert torch.equal(seg.backbone.layer4[2].conv3.weight, src.layer4[2].conv3.weight)


def test_load_torchvision_weights_from_before_pytorch_0_4_1(tmp_path: Path):
    """Old torchvision files (IRN's resnet50-19c8e357.pth) have no BatchNorm num_batches_tracked buffers."""
    torch.manual_seed(3)
    src = resnet50()
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(src.state_dict())
    path = tmp_path / "resnet50-old.pth"
    torch.save(state, path)
    model = resnet50()
    load_torchvision_weights(model, path)
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k
    del state["layer1.0.bn1.running_var"]  # any other missing key is still an error
    torch.save(state, path)
    with pytest.raises(AdvcamError, match="1 missing, e.g. layer1.0.bn1.running_var"):
        load_torchvision_weights(resnet50(), path)


def test_load_torchvision_weights_errors(tmp_path: Path):
    net = resnet_small()
    with pytest.raises(AdvcamError, match="not found"):
        load_torchvision_weights(net, tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save(resnet50().state_dict(), wrong)
    with pytest.raises(AdvcamError, match=r"wrong\.pth.*keys do not match.*unexpected, e\.g\. layer1\.0\.bn3"):
        load_torchvision_weights(net, wrong)
    narrow = tmp_path / "narrow.pth"
    torch.save(ResNet(BasicBlock, (1, 1, 1, 1), (8, 16, 32, 64)).state_dict(), narrow)
    with pytest.raises(AdvcamError, match=r"narrow\.pth.*shapes do not match"):
        load_torchvision_weights(net, narrow)
    odd = tmp_path / "odd.pth"
    torch.save({"layer9.weight": torch.zeros(1)}, odd)
    with pytest.raises(AdvcamError, match=r"odd\.pth.*keys do not match.*layer9"):
        load_torchvision_weights(net, odd)
    listy = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listy)
    with pytest.raises(AdvcamError, match=r"list\.pth.*not a state dict"):
        load_torchvision_weights(net, listy)
    text = tmp_path / "text.pth"
    text.write_text("hello")
    with pytest.raises(AdvcamError, match=r"text\.pth"):
        load_torchvision_weights(net, text)


@pytest.mark.parametrize("arch,out_size", [("deeplab_small", (40, 56)), ("deeplab_resnet50", (33, 47))])
def test_deeplab_forward_shape(arch: str, out_size: tuple[int, int]):
    torch.manual_seed(0)
    model = build_segmenter(arch, 4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *out_size))
    assert out.shape == (2, 4, *out_size)
    backbone, head = model.param_groups()
    assert len(head) == 8  # four ASPP branches, weight + bias
    if arch == "deeplab_resnet50":
        assert model.backbone.out_channels == 2048
        assert not any(p.requires_grad for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                       for p in m.parameters())
        assert not any(m.training for m in model.train().modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_classifier_checkpoint_roundtrip_and_mismatches(tmp_path: Path):
    torch.manual_seed(0)
    model = build_classifier("resnet_small", 3)
    path = tmp_path / "classifier.pt"
    save_checkpoint(path, classifier_header(model, ["a", "b", "c"], {"lr": 0.1}), model=model.state_dict())
    loaded = load_classifier(path, num_classes=3)
    assert not loaded.training and loaded.classes == ["a", "b", "c"] and loaded.header["kind"] == "classifier"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x))
    with pytest.raises(AdvcamError, match=r"classifier\.pt.*3 output classes, expected 20"):
        load_classifier(path, num_classes=20)
    with pytest.raises(AdvcamError, match=r"classifier\.pt.*is a classifier checkpoint, expected a segmenter"):
        load_segmenter(path)

    seg = build_segmenter("deeplab_small", 4)
    seg_path = tmp_path / "segmenter.pt"
    save_checkpoint(seg_path, segmenter_header(seg, ["a", "b", "c"], {}), model=seg.state_dict())
    assert load_segmenter(seg_path, num_classes=4).num_classes == 4
    with pytest.raises(AdvcamError, match=r"segmenter\.pt.*is a segmenter checkpoint, expected a classifier"):
        load_classifier(seg_path)

    bad = tmp_path / "bad_arch.pt"
    save_checkpoint(bad, {**classifier_header(model, ["a", "b", "c"], {}), "arch": "vgg"}, model=model.state_dict())
    with pytest.raises(AdvcamError, match=r"bad_arch\.pt.*'vgg'"):
        load_classifier(bad)
    other = tmp_path / "other_weights.pt"
    save_checkpoint(other, classifier_header(model, ["a", "b", "c"], {}), model=seg.state_dict())
    with pytest.raises(AdvcamError, match=r"other_weights\.pt.*do not fit"):
        load_classifier(other)


def test_unknown_arch():
    with pytest.raises(AdvcamError, match="resnet_small"):
        build_classifier("resnet18", 3)
    with pytest.raises(AdvcamError, match="deeplab_small"):
        build_segmenter("unet", 3)


@pytest.mark.parametrize("arch", ["resnet_small", "resnet50"])
def test_fold_batchnorm_keeps_the_function(arch: str):
    from advcam.models import fold_batchnorm

    torch.manual_seed(0)
    model = build_classifier(arch, 4)
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(2, 3, 64, 48)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy: the model is untouched
    with torch.no_grad():
        ref, out = model.cam(x), folded.cam(x)
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    with pytest.raises(AdvcamError, match="eval mode"):
        fold_batchnorm(model.train())


def test_weight_files_in_wrappers_and_depth_hint(tmp_path: Path, monkeypatch):
    """torchvision training checkpoints ({"model": ...}), DDP-saved files ("module." keys) and ``~`` paths load;
    a file of another depth names both depths."""
    net = resnet_small()
    state = {k: v + 1 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, payload in (("train.pth", {"model": state, "epoch": 3}),
                          ("ddp.pth", {f"module.{k}": v for k, v in state.items()})):
        torch.save(payload, tmp_path / name)
        fresh = resnet_small()
        load_torchvision_weights(fresh, f"~/{name}")
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items()), name
    deeper = {f"layer{s}.{b}.conv1.weight": torch.zeros(1) for s, n in zip(range(1, 5), (3, 4, 23, 3))
              for b in range(n)}
    torch.save(deeper, tmp_path / "r101.pth")
    with pytest.raises(AdvcamError, match=r"r101\.pth: keys do not match.*holds a ResNet-101 \(blocks per stage "
                                          r"\(3, 4, 23, 3\)\), this arch needs a ResNet-34 or ResNet-50"):
        load_torchvision_weights(resnet50(), tmp_path / "r101.pth")
    torch.save({"epoch": 3, "args": [1]}, tmp_path / "meta.pth")
    with pytest.raises(AdvcamError, match=r"not a state dict .*its keys: epoch, args"):
        load_torchvision_weights(net, tmp_path / "meta.pth")


def test_fold_batchnorm_says_what_it_left(caplog):
    """Only ResNet-style pairs fold; a model with other names gets a warning instead of a silent no-op."""
    from torch import nn

    from advcam.models.resnet import fold_batchnorm

    with caplog.at_level("WARNING", logger="advcam"):
        fold_batchnorm(resnet_small().eval())
        assert not caplog.records
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
    assert "folded 0 conv/BatchNorm pair(s); 1 BatchNorm layer(s) left" in caplog.text


def test_resnet38_cam_network_is_psas_resnet38_cls(monkeypatch):
    """PSA's ``resnet38_cls.Net`` written out: ``fc8`` initialised by ``xavier_uniform_``; in training its logits are
    ``fc8(avg_pool(Dropout2d(0.5)(features)))`` (the same dropout draw), in eval mode and in ``cam()`` no dropout.
    The CAM trainer sets the rate from ``classifier.dropout`` (null: 0.5 on resnet38, none on resnet50 and
    resnet_small)."""
    from advcam import config
    from advcam.models.classifier import reference_dropout
    from advcam.train import classifier as cam_training
    from advcam.train import loop

    torch.manual_seed(0)
    model = build_classifier("resnet38", 3)
    bound = (6 / (4096 + 3)) ** 0.5  # xavier_uniform_'s bound for a (3, 4096, 1, 1) weight
    w = model.classifier.weight.detach()
    assert bound >= float(w.abs().max()) > 0.95 * bound
    other = build_classifier("resnet_small", 3).classifier.weight.detach()  # PyTorch's default: bound 1 / sqrt(fan_in)
    assert float(other.abs().max()) <= 128 ** -0.5 < (6 / (128 + 3)) ** 0.5
    seen = []
    monkeypatch.setattr(loop, "fit", lambda m, *a, **k: seen.append(m.dropout) or [])
    for arch, sets, rate in (("resnet38", [], 0.5), ("resnet38", ["classifier.dropout=0"], 0.0),
                             ("resnet_small", [], 0.0), ("resnet_small", ["classifier.dropout=0.3"], 0.3)):
        cfg = config.load(None, sets).classifier
        assert reference_dropout(arch, cfg.dropout) == rate
        net = model if arch == "resnet38" else build_classifier(arch, 3)
        cam_training.train_cam(net, None, cfg=cfg, seed=0, workers=0, resume=Path("r"), curves=Path("c"),
                               fingerprint={})
        assert seen[-1] == rate, (arch, sets)
    model.dropout = 0.5
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        model.train()
        torch.manual_seed(1)
        ours = model(x)
        torch.manual_seed(1)
        feats = model.features(x)  # the same draws of the backbone's own dropout (b6, b7) as in ours
        ref = torch.nn.functional.conv2d(F.avg_pool2d(torch.nn.Dropout2d(0.5)(feats), feats.shape[-2:]), w).flatten(1)
        torch.testing.assert_close(ours, ref)
        assert not torch.allclose(ours, model.classifier(feats.mean((2, 3), keepdim=True)).flatten(1))
        torch.manual_seed(2)
        cam = model.cam(x)
        torch.manual_seed(2)
        torch.testing.assert_close(cam, torch.nn.functional.conv2d(model.features(x), w))  # no dropout7 in the maps
        model.eval()
        feats = model.features(x)
        torch.testing.assert_close(model(x), model.classifier(feats.mean((2, 3), keepdim=True)).flatten(1))
