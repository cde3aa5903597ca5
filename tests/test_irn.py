"""IRN's class-boundary design (``refine.randomwalk.design: irn``) against IRN's code written out: its path indices and
``edge_to_affinity`` (training at radius 10), its affinity labels and loss (``train_irn.py``), and
``propagate_to_edge`` with ``make_sem_seg_labels`` (the walk)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advcam.refine import irn
from advcam.refine.affinity import offsets
from advcam.refine.randomwalk import walk_labels
from advcam.train import loop


# ---------------------------------------------------------------- IRN written out (misc/indexing.py, train_irn.py)
def irn_dir_paths(radius: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``PathIndex.get_all_dir_paths``: the search directions' paths, grouped by path length."""
    by_length: list[list] = [[] for _ in range(radius * 4)]
    dirs = [(0, x) for x in range(1, radius)]
    dirs += [(y, x) for y in range(1, radius) for x in range(-radius + 1, radius) if x * x + y * y < radius ** 2]
    for d in dirs:
        length_sq = d[0] ** 2 + d[1] ** 2
        coords = []
        min_y, max_y = sorted((0, d[0]))
        min_x, max_x = sorted((0, d[1]))
        for y in range(min_y, max_y + 1):
            for x in range(min_x, max_x + 1):
                if (d[0] * x - d[1] * y) ** 2 / length_sq < 1:
                    coords.append([y, x])
        coords.sort(key=lambda c: -abs(c[0]) - abs(c[1]))
        by_length[len(coords)].append(coords)
    paths = [np.asarray(v) for v in by_length if v]
    return paths, np.concatenate([p[:, 0] for p in paths], axis=0)


def irn_path_indices(radius: int, size: tuple[int, int]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """``PathIndex.get_path_indices``: (path indices per length group, source indices, destination indices)."""
    paths, _ = irn_dir_paths(radius)
    rf = int(np.ceil(radius) - 1)
    full = np.arange(size[0] * size[1], dtype=np.int64).reshape(size)
    ch, cw = size[0] - rf, size[1] - 2 * rf
    groups = []
    for group in paths:
        groups.append(np.array([[full[dy:dy + ch, rf + dx:rf + dx + cw].reshape(-1) for dy, dx in p] for p in group]))
    src = full[:ch, rf:rf + cw].reshape(-1)
    return groups, src, np.concatenate([g[:, 0] for g in groups], axis=0)


def irn_edge_to_affinity(edge: torch.Tensor, groups: list[np.ndarray]) -> torch.Tensor:
    """``edge_to_affinity``: ``1 - max`` of the flat map over each path, ``(B, n_dirs, n_src)``."""
    flat = edge.reshape(edge.shape[0], -1)
    out = []
    for ind in groups:
        t = torch.from_numpy(ind)
        dist = flat[:, t.reshape(-1)].view(flat.shape[0], *t.shape)
        out.append(1 - dist.amax(2))
    return torch.cat(out, 1)


def irn_affinity_labels(label: np.ndarray, src: np.ndarray, dst: np.ndarray) -> list[torch.Tensor]:
    """``GetAffinityLabelFromIndices`` (21 classes: labels of 21 and above, 255 here, are not valid)."""
    flat = label.reshape(-1)
    frm, to = flat[src][None], flat[dst]
    valid = (frm < 21) & (to < 21)
    equal = frm == to
    pos = equal & valid
    return [torch.from_numpy(m.astype(np.float32)) for m in (pos & (frm == 0), pos & (frm > 0), ~equal & valid)]


def irn_loss(aff: torch.Tensor, bg: torch.Tensor, fg: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``train_irn.py``'s affinity terms: ``(bg / 2 + fg / 2 + neg) / 2``."""
    bg_l = torch.sum(-bg * torch.log(aff + 1e-5)) / (torch.sum(bg) + 1e-5)
    fg_l = torch.sum(-fg * torch.log(aff + 1e-5)) / (torch.sum(fg) + 1e-5)
    neg_l = torch.sum(-neg * torch.log(1.0 + 1e-5 - aff)) / (torch.sum(neg) + 1e-5)
    return (bg_l / 2 + fg_l / 2 + neg_l) / 2


def irn_propagate_to_edge(x: torch.Tensor, edge: torch.Tensor, radius: int, beta: float, exp_times: int
                          ) -> torch.Tensor:
    """``propagate_to_edge``: the boundary map padded with 1, path affinities, the dense symmetric matrix with its
    identity, cropped to the image, ``A ** beta`` with columns normalised, squared ``exp_times`` times; the maps
    damped by ``1 - edge`` and multiplied from the left. Float64."""
    h, w = x.shape[-2:]
    vp, hp = h + radius, w + 2 * radius
    groups, src, dst = irn_path_indices(radius, (vp, hp))
    padded = F.pad(edge.double(), (radius, radius, 0, radius), value=1.0)
    sparse = irn_edge_to_affinity(padded[None], groups).reshape(-1)
    n = vp * hp
    frm = torch.from_numpy(src).repeat(len(dst))
    to = torch.from_numpy(dst).reshape(-1)
    dense = torch.zeros(n, n, dtype=torch.float64)
    dense.index_put_((frm, to), sparse, accumulate=True)
    dense.index_put_((to, frm), sparse, accumulate=True)
    dense += torch.eye(n, dtype=torch.float64)
    dense = dense.view(vp, hp, vp, hp)[:-radius, radius:-radius, :-radius, radius:-radius].reshape(h * w, h * w)
    scaled = torch.pow(dense, beta)
    trans = scaled / scaled.sum(0, keepdim=True)
    for _ in range(exp_times):
        trans = trans @ trans
    damped = x.double().view(-1, h, w) * (1 - edge.double())
    return (damped.view(-1, h * w) @ trans).view(-1, 1, h, w)


def irn_make_sem_seg_labels(cam: torch.Tensor, keys: list[int], edge: torch.Tensor, size: tuple[int, int],
                            beta: float = 10.0, exp_times: int = 8, bg: float = 0.25) -> np.ndarray:
    """AdvCAM's ``make_sem_seg_labels``: ``cam ** 1.5`` propagated at radius 5, upsampled x4, cropped, divided by
    the global max, a background plane in front, argmax, keys padded with 0."""
    rw = irn_propagate_to_edge(torch.pow(cam.double(), 1.5), edge, 5, beta, exp_times)
    up = F.interpolate(rw, scale_factor=4, mode="bilinear", align_corners=False)[..., 0, :size[0], :size[1]]
    up = up / torch.max(up)
    pred = torch.argmax(F.pad(up, (0, 0, 0, 0, 1, 0), value=bg), dim=0).numpy()
    return np.pad(np.asarray(keys) + 1, (1, 0))[pred]


# ---------------------------------------------------------------- tests
def test_paths_are_irns():
    """Every direction's path is IRN's (the same points, far end first) for the walk's and the training's radius."""
    for radius in (5, 10):
        groups, dsts = irn_dir_paths(radius)
        theirs = {tuple(p[0]): [tuple(c) for c in p] for g in groups for p in g.tolist()}
        assert set(theirs) == set(offsets(radius)) and len(dsts) == len(offsets(radius))
        for dy, dx in offsets(radius):
            assert irn.path(dy, dx) == theirs[(dy, dx)], (dy, dx)


@pytest.mark.parametrize("radius", [5, 10])
def test_path_affinity_is_irns_edge_to_affinity(radius: int):
    """On a 23x26 grid, every pair IRN trains on (sources in its ``PathIndex`` region) has IRN's affinity."""
    g = torch.Generator().manual_seed(radius)
    edge = torch.rand(2, 23, 26, generator=g, dtype=torch.float64)
    groups, src, _ = irn_path_indices(radius, (23, 26))
    theirs = irn_edge_to_affinity(edge, groups)  # (2, dirs, sources), dirs in IRN's order
    ours = irn.path_affinity(edge, radius)
    order = [tuple(p[0]) for grp in irn_dir_paths(radius)[0] for p in grp.tolist()]
    ys, xs = src // 26, src % 26
    for j, d in enumerate(order):
        k = offsets(radius).index(d)
        torch.testing.assert_close(ours[:, k, ys, xs], theirs[:, j], rtol=0, atol=1e-12)


def test_training_loss_is_train_irns():
    """grid_loss at radius 10 = train_irn.py's affinity loss on IRN's labels of the same label map (unsure 255)."""
    g = torch.Generator().manual_seed(1)
    h, w = 24, 27
    logits = torch.randn(2, 1, h, w, generator=g, dtype=torch.float64)
    label = torch.randint(0, 3, (2, h, w), generator=g)
    label[:, 5:9, 3:20] = 255
    label[1, :, 15:] = 0
    groups, src, dst = irn_path_indices(10, (h, w))
    want = []
    for b in range(2):
        bg, fg, neg = irn_affinity_labels(label[b].numpy(), src, dst)
        aff = irn_edge_to_affinity(torch.sigmoid(logits[b:b + 1, 0]), groups)[0]
        assert bg.sum() > 0 and fg.sum() > 0 and neg.sum() > 0
        want.append((aff, bg, fg, neg))
    stacked = [torch.stack([w_[i] for w_ in want]) for i in range(4)]
    torch.testing.assert_close(irn.grid_loss(logits, label, 10), irn_loss(*stacked), rtol=1e-9, atol=1e-12)


def boundary_scene() -> tuple[torch.Tensor, torch.Tensor]:
    """(cam (2, 7, 9), boundary (7, 9)): class A peaks left, class B right (weaker), a boundary column between
    them and a weaker one inside A's half; noise everywhere."""
    g = torch.Generator().manual_seed(3)
    h, w = 7, 9
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    cam = torch.stack([torch.exp(-((ys - 2) ** 2 + (xs - 1) ** 2) / 4),
                       0.7 * torch.exp(-((ys - 4) ** 2 + (xs - 7) ** 2) / 3)])
    cam = (cam + 0.05 * torch.rand(2, h, w, generator=g)).clamp(min=0)
    edge = 0.1 * torch.rand(h, w, generator=g)
    edge[:, 5] = 0.9
    edge[:, 3] = 0.5
    return cam, edge


@pytest.mark.parametrize("exp_times", [0, 2, 8])
def test_walk_is_irns_propagate_to_edge(exp_times: int):
    """walk_labels on the path affinities with ``boundary`` = AdvCAM's make_sem_seg_labels with IRN's
    propagate_to_edge, on every pixel of a 26x35 image (not a multiple of 4); the damping by ``1 - boundary``
    matters here."""
    cam, edge = boundary_scene()
    keys, size = [2, 5], (26, 35)
    want = irn_make_sem_seg_labels(cam, keys, edge, size, exp_times=exp_times)
    got = walk_labels(cam, keys, irn.path_affinity(edge[None], 5)[0], size, exp_times=exp_times, boundary=edge)
    assert set(np.unique(want)) == {0, 3, 6}
    np.testing.assert_array_equal(got, want)
    undamped = walk_labels(cam, keys, irn.path_affinity(edge[None], 5)[0], size, exp_times=exp_times)
    assert (undamped != want).any()


def test_boundary_net_has_irns_edge_branch_on_resnet50():
    """On ResNet-50 (strides 2, 2, 2, 1): fc_edge1..5 are 1x1 convs of 64, 256, 512, 1024, 2048 channels to 32, no
    bias, GroupNorm(4, 32), upsampling x1, x1, x2, x4, x4, ReLU; fc_edge6 a 1x1 conv 160 -> 1 with bias."""
    net = irn.build_boundary_net("resnet50")
    convs = [h[0] for h in net.heads]
    assert [(c.in_channels, c.out_channels, c.bias) for c in convs] == \
        [(64, 32, None), (256, 32, None), (512, 32, None), (1024, 32, None), (2048, 32, None)]
    assert all(isinstance(h[1], nn.GroupNorm) and h[1].num_groups == 4 for h in net.heads)
    ups = [next((float(m.scale_factor) for m in h if isinstance(m, nn.Upsample)), 1.0) for h in net.heads]
    assert ups == [1.0, 1.0, 2.0, 4.0, 4.0] and all(isinstance(h[-1], nn.ReLU) for h in net.heads)
    assert (net.edge.in_channels, net.edge.out_channels, net.edge.bias is not None) == (160, 1, True)
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 3, 50, 61)).shape == (1, 1, 13, 16)


def test_boundary_is_irns_edge_displacement():
    """IRN's EdgeDisplacement: the image and its flip padded with zeros to the crop (bottom, right), the logits
    cropped to the image's stride-4 grid, sigmoid of their mean (the flip's flipped back). The padding changes the
    numbers (GroupNorm's statistics); a canvas smaller than the image pads nothing."""
    torch.manual_seed(0)
    net = irn.build_boundary_net("resnet_small").eval()
    x = torch.randn(3, 30, 41)
    with torch.no_grad():
        padded = F.pad(torch.stack([x, x.flip(-1)]), (0, 64 - 41, 0, 64 - 30))
        logits = net(padded)[:, 0, :8, :11]
        want = torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)
        torch.testing.assert_close(irn.boundary(net, x, 64), want)
        bare = net(torch.stack([x, x.flip(-1)]))[:, 0]
        unpadded = torch.sigmoid((bare[0] + bare[1].flip(-1)) / 2)
        torch.testing.assert_close(irn.boundary(net, x, 16), unpadded)
        assert not torch.allclose(want, unpadded, atol=1e-4)


def test_a_frozen_backbone_stays_and_a_short_training_lowers_the_loss(tmp_path):
    """With ImageNet weights the backbone is frozen (IRN); from scratch it trains. Twelve steps on a two-region image
    lower the loss."""
    from advcam.models import resnet

    weights = tmp_path / "w.pth"
    torch.save(resnet.resnet_small((2, 2, 1, 1), (1, 1, 2, 4)).state_dict(), weights)
    frozen = irn.build_boundary_net("resnet_small", weights)
    assert not frozen.param_groups()[0] and all(not p.requires_grad for p in frozen.backbone.parameters())
    torch.manual_seed(0)
    model = irn.build_boundary_net("resnet_small")
    assert model.param_groups()[0]
    image = torch.zeros(4, 3, 48, 48)
    mask = torch.zeros(4, 48, 48, dtype=torch.long)
    image[:, 0, :, 24:] = 2.0
    mask[:, :, 24:] = 1
    mask[:, :, 20:28] = 255
    opt = loop.make_sgd(model.param_groups(), 0.1, 1e-4, 1e-4, head_mult=1.0)
    model.train()
    losses = []
    for _ in range(12):
        loss = irn.batch_loss(model, {"image": image, "mask": mask}, 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_walk_of_a_500x375_image_keeps_memory_bounded():
    """IRN's design at VOC's size: the path affinities and the damped walk of a 125x94 grid stay far below a dense
    (HW/16)^2 matrix (550 MB in float32)."""
    g = torch.Generator().manual_seed(0)
    edge, cam = torch.rand(125, 94, generator=g), torch.rand(2, 125, 94, generator=g)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        label = walk_labels(cam, [4, 7], irn.path_affinity(edge[None], 5)[0], (500, 375), exp_times=2, boundary=edge)
    largest = max(e.cpu_memory_usage for e in prof.key_averages())
    assert label.shape == (500, 375) and set(np.unique(label)) <= {0, 5, 8}
    assert 0 < largest < 64 * 2 ** 20, largest
