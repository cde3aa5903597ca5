"""Random-walk networks trained elsewhere (``refine.randomwalk.trained``): IRN's ``res50_irn.pth`` in the module layout
of IRN's ``net/resnet50_irn.py``, and an earlier run's ``.affinity.pt``; the refine stage, check_params and the
refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from advcam import cli, config
from advcam.data.transforms import normalize
from advcam.models import resnet
from advcam.refine import irn
from advcam.refine import trained as taken
from advcam.refine.randomwalk import walk_labels
from advcam.steps import check, figures
from advcam.utils.checkpoint import load_checkpoint, save_checkpoint
from advcam.config import ConfigError
from advcam.utils.errors import AdvcamError
from conftest import TINY

RW = TINY + ["refine.method=randomwalk", "refine.randomwalk.epochs=2", "refine.randomwalk.batch_size=4",
             "refine.randomwalk.crop_size=36", "refine.randomwalk.exp_times=4", "refine.randomwalk.train_radius=3"]


def _edge(cin: int, up: int) -> nn.Sequential:
    layers = [nn.Conv2d(cin, 32, 1, bias=False), nn.GroupNorm(4, 32)]
    if up > 1:
        layers.append(nn.Upsample(scale_factor=up, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


def _dp(cin: int, cout: int, groups: int, up: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(groups, cout)]
    if up:
        layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


class IRNLayout(nn.Module):
    """The module layout of IRN's ``AffinityDisplacementLoss`` (``net/resnet50_irn.py``; the layout, not its code),
    whose state dict ``train_irn.py`` saves as ``res50_irn.pth``: a torchvision-named ResNet-50 (strides 2, 2, 2, 1)
    under ``resnet50`` and again in ``stage1``..``stage5`` and the ``backbone`` list; the boundary branch
    ``fc_edge1``..``6`` (again in ``edge_layers``), the displacement branch ``fc_dp1``..``7`` with ``mean_shift``
    (again in ``dp_layers``), and the path-index buffers."""

    def __init__(self) -> None:
        super().__init__()
        r = resnet.resnet50(strides=(2, 2, 2, 1))
        self.resnet50 = r
        self.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.stage2, self.stage3 = nn.Sequential(r.layer1), nn.Sequential(r.layer2)
        self.stage4, self.stage5 = nn.Sequential(r.layer3), nn.Sequential(r.layer4)
        self.mean_shift = nn.Module()
        self.mean_shift.register_buffer("running_mean", torch.zeros(2))
        self.fc_edge1, self.fc_edge2, self.fc_edge3 = _edge(64, 1), _edge(256, 1), _edge(512, 2)
        self.fc_edge4, self.fc_edge5 = _edge(1024, 4), _edge(2048, 4)
        self.fc_edge6 = nn.Conv2d(160, 1, 1, bias=True)
        self.fc_dp1, self.fc_dp2 = _dp(64, 64, 8, False), _dp(256, 128, 16, False)
        self.fc_dp3, self.fc_dp4 = _dp(512, 256, 16, False), _dp(1024, 256, 16, True)
        self.fc_dp5, self.fc_dp6 = _dp(2048, 256, 16, True), _dp(768, 256, 16, True)
        self.fc_dp7 = nn.Sequential(nn.Conv2d(448, 256, 1, bias=False), nn.GroupNorm(16, 256), nn.ReLU(inplace=True),
                                    nn.Conv2d(256, 2, 1, bias=False), self.mean_shift)
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4, self.stage5])
        self.edge_layers = nn.ModuleList([getattr(self, f"fc_edge{n}") for n in range(1, 7)])
        self.dp_layers = nn.ModuleList([getattr(self, f"fc_dp{n}") for n in range(1, 8)])
        for n in range(3):  # PathIndex's indices, one buffer per path length, and the displacement targets
            self.register_buffer(f"path_indices{n}", torch.randint(0, 100, (4, n + 1, 9)))
        self.register_buffer("disp_target", torch.randn(1, 2, 34, 1))

    def edge_displacement(self, image: torch.Tensor, crop: int) -> torch.Tensor:
        """IRN's ``EdgeDisplacement`` on the image and its flip padded to the crop: the boundary branch's logits,
        cropped to the stride-4 grid, sigmoid of their mean (the flip's flipped back)."""
        h, w = image.shape[-2:]
        x = F.pad(torch.stack([image, image.flip(-1)]), [0, crop - w, 0, crop - h])
        x1 = self.stage1(x)
        x2 = self.stage2(x1)
        x3 = self.stage3(x2)
        x4 = self.stage4(x3)
        x5 = self.stage5(x4)
        e1, e2 = self.fc_edge1(x1), self.fc_edge2(x2)
        size = e2.shape[-2:]
        e3, e4, e5 = (self.fc_edge3(x3)[..., :size[0], :size[1]], self.fc_edge4(x4)[..., :size[0], :size[1]],
                      self.fc_edge5(x5)[..., :size[0], :size[1]])
        out = self.fc_edge6(torch.cat([e1, e2, e3, e4, e5], 1))[..., : (h - 1) // 4 + 1, : (w - 1) // 4 + 1]
        return torch.sigmoid(out[0, 0] / 2 + out[1, 0].flip(-1) / 2)


def irn_layout(seed: int) -> IRNLayout:
    """An IRN-layout network with random weights, BatchNorm statistics and GroupNorm affines, in eval mode."""
    torch.manual_seed(seed)
    net = IRNLayout().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        net.fc_edge6.weight.normal_(0, 0.5)
        net.fc_edge6.bias.fill_(-0.5)
    return net


@pytest.fixture(scope="module")
def irn_file(tmp_path_factory) -> tuple[Path, IRNLayout]:
    path = tmp_path_factory.mktemp("irn") / "res50_irn.pth"
    net = irn_layout(0)
    torch.save(net.state_dict(), path)
    return path, net


def test_irns_res50_irn_is_the_boundary_network_of_edge_displacement(irn_file, tmp_path):
    """The boundary map of IRN's file through advcam equals IRN's EdgeDisplacement of the same weights (image padded
    to IRN's crop); files saved from DataParallel, and from IRN's first release (``ind_from``/``ind_to`` parameters,
    no BatchNorm counters), read too."""
    path, net = irn_file
    ours = taken.load_walk_network(path, "irn")
    assert isinstance(ours, irn.BoundaryNet) and ours.arch == "resnet50" and not ours.training
    image = torch.randn(3, 50, 61)
    with torch.no_grad():
        want = net.edge_displacement(image, 64)
        torch.testing.assert_close(irn.boundary(ours, image, 64), want, rtol=1e-5, atol=1e-6)
    assert want.shape == (13, 16) and 0.05 < float(want.std())  # not a flat map
    old = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked") and k != "disp_target"}
    old.update(ind_from=torch.arange(5), ind_to=torch.arange(5))
    for name, state in (("dp.pth", {f"module.{k}": v for k, v in net.state_dict().items()}), ("old.pth", old)):
        torch.save(state, tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(irn.boundary(taken.load_walk_network(tmp_path / name, "irn"), image, 64), want,
                                       rtol=1e-5, atol=1e-6)


def test_files_that_are_not_the_designs_network_are_refused_naming_them(irn_file, tmp_path):
    path, net = irn_file
    state = net.state_dict()
    small = irn.build_boundary_net("resnet_small")
    save_checkpoint(tmp_path / "boundary.pt", {"kind": "boundary", "arch": "resnet_small"}, model=small.state_dict())
    save_checkpoint(tmp_path / "cls.pt", {"kind": "classifier", "arch": "resnet50"}, model={})
    files = {"cam.pth": {"resnet50.conv1.weight": torch.zeros(1), "classifier.weight": torch.zeros(3, 2048, 1, 1)},
             "imagenet.pth": {k[len("resnet50."):]: v for k, v in state.items() if k.startswith("resnet50.")},
             "no_edge3.pth": {k: v for k, v in state.items() if not k.startswith(("fc_edge3.", "edge_layers.2."))},
             "wide.pth": {**state, "fc_edge6.weight": torch.zeros(2, 160, 1, 1), "fc_edge6.bias": torch.zeros(2)},
             "extra.pth": {**state, "fc_cls.weight": torch.zeros(3)}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    (tmp_path / "text.pth").write_text("weights\n")
    cases = [("none.pth", "irn", "none.pth: file not found"),
             ("text.pth", "irn", "text.pth: not a weight file (expected IRN's trained boundary network"),
             ("cam.pth", "irn", "it looks like IRN's CAM network, res50_cam.pth (give it as classifier.trained)"),
             ("imagenet.pth", "irn", "ImageNet weights (give them as refine.randomwalk.pretrained)"),
             ("no_edge3.pth", "irn", "(3 missing, e.g. heads.2.0.weight, heads.2.1.bias, heads.2.1.weight)"),
             ("wide.pth", "irn", "shapes do not match IRN's trained boundary network"),
             ("extra.pth", "irn", "(1 unexpected, e.g. fc_cls.weight)"),
             (path, "affinitynet", "not an advcam affinity network (pseudo/.affinity.pt): it looks like IRN's trained "
                                   "boundary network, res50_irn.pth (design irn takes it)"),
             ("boundary.pt", "affinitynet", "an advcam checkpoint of a boundary network (design irn); design "
                                            "affinitynet takes an affinity network"),
             ("cls.pt", "irn", "an advcam checkpoint of no affinity network (kind 'classifier')"),
             (path, "psa", "design psa takes no trained file here (design psa: refine.randomwalk.psa.trained)")]
    for name, design, message in cases:
        with pytest.raises(AdvcamError) as refused:
            taken.load_walk_network(tmp_path / name, design)
        assert message in str(refused.value), (name, str(refused.value))
    assert isinstance(taken.load_walk_network(tmp_path / "boundary.pt", "irn"), irn.BoundaryNet)
    with pytest.raises(ConfigError, match="design psa takes its trained AffinityNet as refine.randomwalk.psa.trained"):
        config.load(None, [*RW, "refine.randomwalk.design=psa", f"refine.randomwalk.trained={path}"])
    with pytest.raises(AdvcamError, match="holds a network on resnet50; set refine.randomwalk.arch to it or to null"):
        taken.load_trained(config.load(None, [*RW, f"refine.randomwalk.trained={path}",
                                              "refine.randomwalk.arch=resnet_small"]).refine.randomwalk)


def refine(root: Path, out: Path, *sets: str) -> int:
    args = ["refine", "--params-json", "{}", "--data", str(root / "data"), "--cams", str(root / "cams"), "--out",
            str(out), "--metrics", str(out.with_suffix(".json"))]
    return cli.main(args + [a for o in [*RW, *sets] for a in ("--set", o)])


def labels(folder: Path, ids: list[str]) -> dict[str, np.ndarray]:
    return {i: np.asarray(Image.open(folder / f"{i}.png")) for i in ids}


def test_an_earlier_runs_network_in_the_workflows_refine_output_is_refused(tiny_data, tmp_path, monkeypatch):
    """check_params refuses ``pseudo/.affinity.pt`` (the workflow's refine output: DVC deletes it before the refine
    stage runs) and takes a copy of it elsewhere."""
    root, _ = tiny_data
    monkeypatch.chdir(tmp_path)
    assert refine(root, tmp_path / "pseudo") == 0
    cfg = config.load(None, [*RW, "refine.randomwalk.trained=pseudo/.affinity.pt"])
    with pytest.raises(AdvcamError, match=r"^refine.randomwalk.trained: pseudo/.affinity.pt lies in pseudo/, the "
                                          r"refine stage's output folder, which Snakemake and DVC delete"):
        check.run(cfg, None, tmp_path / "checked")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "boundary.pt").write_bytes((tmp_path / "pseudo" / ".affinity.pt").read_bytes())
    check.run(config.load(None, [*RW, "refine.randomwalk.trained=weights/boundary.pt"]), None, tmp_path / "checked")
    assert (tmp_path / "checked").is_file()


def test_an_earlier_runs_network_walks_to_the_same_labels_without_training(tiny_data, tmp_path):
    """A design irn run trains its boundary network; a second run given its ``.affinity.pt`` trains nothing and writes
    the same labels and scores. A new file at the same path reruns the walk, not the CRF labels."""
    root, info = tiny_data
    ids = info.lists["infer"]
    assert refine(root, tmp_path / "first") == 0
    saved = tmp_path / "boundary.pt"
    saved.write_bytes((tmp_path / "first" / ".affinity.pt").read_bytes())
    assert refine(root, tmp_path / "second", f"refine.randomwalk.trained={saved}") == 0
    first, second = labels(tmp_path / "first", ids), labels(tmp_path / "second", ids)
    assert all((first[i] == second[i]).all() for i in ids)
    assert len({len(np.unique(v)) for v in second.values()} - {1}) > 0  # some image gets more than one label
    assert json.loads((tmp_path / "second.json").read_text()) == json.loads((tmp_path / "first.json").read_text())
    assert not list((tmp_path / "second").glob(".affinity.*"))  # taken, not trained
    stamps = {p: p.stat().st_mtime_ns for p in [*(tmp_path / "second").glob("*.png"),
                                                 *(tmp_path / "second").glob(".crf/*.png")]}
    header, state = load_checkpoint(saved)
    state["model"] = {k: v * 0.5 if k == "edge.weight" else v for k, v in state["model"].items()}
    save_checkpoint(saved, header, **state)
    assert refine(root, tmp_path / "second", f"refine.randomwalk.trained={saved}") == 0
    changed = {p for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert changed == {tmp_path / "second" / f"{i}.png" for i in ids}


def test_refine_walks_on_irns_boundary_network(tiny_data, irn_file, tmp_path, capsys):
    """``refine.randomwalk.trained`` = IRN's file: every pseudo label is the walk over IRN's EdgeDisplacement of the
    image (on a crop_size square), damped by it; the gallery row shows that boundary map. A file that does not fit is
    refused by check_params and the stage with the same line, nothing written."""
    root, info = tiny_data
    path, net = irn_file
    bad = tmp_path / "cam.pth"
    torch.save({"resnet50.conv1.weight": torch.zeros(1), "classifier.weight": torch.zeros(3, 2048, 1, 1)}, bad)
    for file in (tmp_path / "none.pth", bad):
        with pytest.raises(AdvcamError) as refused:
            check.run(config.load(None, [*RW, f"refine.randomwalk.trained={file}"]), None, tmp_path / "checked")
        assert str(refused.value).startswith(f"refine.randomwalk.trained: {file}: ")
        assert not (tmp_path / "checked").exists()
        capsys.readouterr()
        assert refine(root, tmp_path / "refused", f"refine.randomwalk.trained={file}") == 2
        assert capsys.readouterr().err.strip() == f"advcam refine: error: {refused.value}"
        assert not (tmp_path / "refused.json").exists() and not list((tmp_path / "refused").rglob("*.png"))
    sets = [f"refine.randomwalk.trained={path}", "refine.randomwalk.crop_size=40"]
    cfg = config.load(None, [*RW, *sets])
    check.run(cfg, None, tmp_path / "checked")
    # the file brings its own ResNet-50: a ResNet-38 classifier's walk (SEAM's, say) needs no refine.randomwalk.arch
    check.run(config.load(None, [*RW, *sets, "classifier.arch=resnet38"]), None, tmp_path / "checked38")
    assert refine(root, tmp_path / "pseudo", *sets) == 0
    rw = cfg.refine.randomwalk
    from advcam.attribution.cam import load_cam

    for image_id in info.lists["infer"]:
        pixels = info.read_image(image_id)
        maps = load_cam(root / "cams" / f"{image_id}.npz")
        with torch.no_grad():
            edge = net.edge_displacement(normalize(pixels), 40)
        want = walk_labels(torch.from_numpy(maps["cam"]), maps["keys"], irn.path_affinity(edge[None], 5)[0],
                           pixels.shape[:2], radius=5, beta=float(rw.beta), exp_times=int(rw.exp_times),
                           cam_power=float(rw.cam_power), bg_threshold=float(rw.bg_threshold), boundary=edge)
        assert (labels(tmp_path / "pseudo", [image_id])[image_id] == want).all(), image_id
    columns = figures.visualize(cfg, root / "data", info.lists["infer"][0], tmp_path / "row.png",
                                pseudo=tmp_path / "pseudo")
    assert "boundary" in columns and not (tmp_path / "pseudo" / ".affinity.pt").exists()
