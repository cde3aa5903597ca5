"""Segmentation recipe: augmentation alignment, balanced CE, DeepLab param groups, multi-scale + flip
inference, CRF post-processing, semi-supervised label selection, and a short training run."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import maximum_filter, minimum_filter

from advcam.data.datasets import SegmentationDataset
from advcam.data import transforms as T
from advcam.data.transforms import denormalize
from advcam.models.deeplab import build_segmenter, multiscale_logits
from advcam.train import loop
from advcam.train.segmentation import (check_gt_masks, class_weights, make_deeplab_sgd, segmentation_loss,
                                       select_gt_ids, train_segmenter, training_label_reader)
from advcam.utils.errors import AdvcamError

COLOURS = np.array([[0, 0, 0], [230, 40, 40], [40, 200, 40], [40, 40, 230]], np.uint8)
IGNORE_COLOUR = np.array([255, 255, 255], np.uint8)


def blocks(seed: int, size: tuple[int, int] = (40, 48), block: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A label map of ``block``-sized squares (classes 0..3 and 255) and the image painting each class."""
    rng = np.random.default_rng(seed)
    cells = rng.choice([0, 1, 2, 3, 255], size=(size[0] // block, size[1] // block), p=[.4, .15, .15, .15, .15])
    label = np.kron(cells, np.ones((block, block), np.int64)).astype(np.uint8)
    image = np.where((label == 255)[..., None], IGNORE_COLOUR, COLOURS[np.minimum(label, 3)])
    return image.astype(np.uint8), label


class BlockInfo:
    """The DatasetInfo interface over PNGs of :func:`blocks`; pseudo labels are written separately."""

    classes = ["red", "green", "blue"]
    num_classes = 3

    def __init__(self, folder: Path, n: int = 4, size: tuple[int, int] = (40, 48)) -> None:
        self.folder = self.root = folder
        self.ids = [f"im{i}" for i in range(n)]
        self.lists = {"infer": self.ids, "val": self.ids}
        (folder / "img").mkdir(parents=True)
        (folder / "gt").mkdir()
        for i, image_id in enumerate(self.ids):
            image, label = blocks(i, size)
            Image.fromarray(image).save(self.image_path(image_id))
            Image.fromarray(label).save(self.mask_path(image_id))

    def image_path(self, image_id: str) -> Path:
        return self.folder / "img" / f"{image_id}.png"

    def mask_path(self, image_id: str) -> Path:
        return self.folder / "gt" / f"{image_id}.png"

    def read_image(self, image_id: str) -> np.ndarray:
        return np.array(Image.open(self.image_path(image_id)).convert("RGB"))

    def read_mask(self, image_id: str) -> np.ndarray:
        return np.array(Image.open(self.mask_path(image_id)))

    def check_lists(self, ds: object, what: str) -> None:
        """Built by the test, not prepared: there are no prepared list names to compare."""


# ---------------------------------------------------------------- augmentation
def test_augmentation_keeps_image_and_label_aligned(tmp_path: Path):
    info = BlockInfo(tmp_path, n=3)
    data = SegmentationDataset(info, info.ids, info.read_mask, crop_size=32, train=True, seed=1,
                               scale_range=(0.5, 1.5))
    pads_seen = checked = 0
    for epoch in range(4):
        data.set_epoch(epoch)
        for i in range(len(data)):
            item = data[i]
            mask = item["mask"].numpy()
            assert item["image"].shape == (3, 32, 32) and mask.shape == (32, 32)
            assert set(np.unique(mask)) <= {0, 1, 2, 3, 255}
            rgb = denormalize(item["image"]).astype(np.int64)
            padding = np.all(item["image"].numpy() == 0.0, axis=0)  # normalised 0 = padding
            pads_seen += int(padding.any())
            assert np.all(mask[padding] == 255), "padding must be ignored"
            # inside a block (5x5 neighbourhood of one label, no padding) the colour names the label: an
            # image/label misalignment (scale, flip or crop) breaks this, and 255 keeps its own colour
            interior = (maximum_filter(mask, 5) == minimum_filter(mask, 5)) & ~maximum_filter(padding, 5)
            expect = np.where((mask == 255)[..., None], IGNORE_COLOUR, COLOURS[np.minimum(mask, 3)])
            close = np.abs(rgb - expect).max(axis=-1) <= 12
            assert close[interior].sum() >= 0.98 * interior.sum(), (epoch, i, close[interior].mean())
            checked += int(interior.sum())
            white = np.all(rgb > 245, axis=-1) & interior
            assert np.all(mask[white] == 255)
    assert pads_seen > 0 and checked > 1000


def test_augmentation_flip_moves_image_and_label_together(tmp_path: Path):
    info = BlockInfo(tmp_path, n=1, size=(32, 32))
    data = SegmentationDataset(info, info.ids, info.read_mask, crop_size=32, train=True, seed=0,
                               scale_range=(1.0, 1.0))
    gt, flipped_seen, plain_seen = info.read_mask("im0"), False, False
    for epoch in range(12):
        data.set_epoch(epoch)
        mask = data[0]["mask"].numpy()
        rgb = denormalize(data[0]["image"])
        if np.array_equal(mask, gt[:, ::-1]):
            flipped_seen = True
            np.testing.assert_array_equal(rgb, info.read_image("im0")[:, ::-1])
        elif np.array_equal(mask, gt):
            plain_seen = True
            np.testing.assert_array_equal(rgb, info.read_image("im0"))
    assert flipped_seen and plain_seen


def cv2_linear(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)`` of a float image, written out: per axis the
    source coordinate ``(d + 0.5) * in / out - 0.5``, clamped to the first and last pixel (checked once against
    OpenCV 5.0.0 on float32 images of 96x96, 37x50, 375x500 and 7x5 at six factors: within 4e-5 grey levels;
    advcam's float32 resize is within 0.01 of OpenCV there)."""
    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        x0 = np.floor(src).astype(int)
        frac = src - x0
        frac[x0 < 0], x0[x0 < 0] = 0.0, 0
        frac[x0 >= n_in - 1], x0[x0 >= n_in - 1] = 0.0, n_in - 1
        return x0, np.minimum(x0 + 1, n_in - 1), frac
    (r0, r1, fr), (c0, c1, fc) = axis(img.shape[0], size[0]), axis(img.shape[1], size[1])
    rows = img[r0] * (1 - fr)[:, None, None] + img[r1] * fr[:, None, None]
    return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


@pytest.mark.parametrize("factor", [0.5, 0.75, 1.25, 1.5, 1.75])
def test_deeplab_rescale_is_deeplab_pytorchs(factor):
    """deeplab-pytorch's ``_augmentation``: the size truncated (``int(h * f)``), the float image by cv2's linear
    resize, the label by PIL nearest; on the normalised image, which is the same up to float rounding."""
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (37, 50, 3)).astype(np.float32)
    mask = rng.integers(0, 4, (37, 50)).astype(np.uint8)
    arr, out_mask = T.deeplab_rescale(T.normalize_array(pixels), mask, factor)
    size = (int(37 * factor), int(50 * factor))
    assert arr.shape[:2] == out_mask.shape == size
    np.testing.assert_allclose(arr * T._STD + T._MEAN, cv2_linear(pixels.astype(np.float64), size), atol=2e-3)
    np.testing.assert_array_equal(out_mask, np.asarray(Image.fromarray(mask).resize(size[::-1], Image.NEAREST)))


def test_irn_random_scale_is_bicubic_to_the_rounded_size():
    """IRN's ``random_scale((img, label), scale_range, order=(3, 0))`` (its affinity network's rescale): a factor
    uniform in the range, ``pil_rescale``: PIL bicubic for the image, nearest for the label, rounded size."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (37, 50)).astype(np.uint8)
    img, out_mask = T.random_scale(pixels, mask, 0.5, 1.5, np.random.default_rng(7))
    factor = np.random.default_rng(7).uniform(0.5, 1.5)
    size = (int(np.round(37 * factor)), int(np.round(50 * factor)))
    np.testing.assert_array_equal(img, np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.BICUBIC)))
    np.testing.assert_array_equal(out_mask, np.asarray(Image.fromarray(mask).resize(size[::-1], Image.NEAREST)))


def test_segmenter_scale_choices_truncate_the_size_as_deeplab_pytorch(tmp_path: Path):
    """With ``scale_choices`` the 40 x 48 image at 0.7 is 28 x 33 (``int``, not ``round``: 34), padded at the
    bottom and right to the crop (ignore in the label), whatever the flip."""
    info = BlockInfo(tmp_path, n=1, size=(40, 48))
    data = SegmentationDataset(info, info.ids, info.read_mask, crop_size=64, train=True, seed=0,
                               scale_choices=[0.7], pad="bottom_right")
    for epoch in range(4):
        data.set_epoch(epoch)
        item = data[0]
        inside = ~np.all(item["image"].numpy() == 0.0, axis=0)
        assert inside.any(1).sum() == 28 and inside.any(0).sum() == 33 and inside[:28].any(1).all()
        assert np.all(item["mask"].numpy()[~inside] == 255)


# ---------------------------------------------------------------- balanced cross-entropy
def test_class_weights_are_median_frequency_balancing():
    labels = {"a": np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], np.uint8),
              "b": np.array([[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2], [255, 255, 2, 2]], np.uint8)}
    w = class_weights(labels.__getitem__, ["a", "b"], num_classes=5)
    # n = (12 + 6, 4, 8, 0, 0); P = (16 + 14, 16, 14); f = (0.6, 0.25, 8/14); median f = 8/14
    f = np.array([18 / 30, 4 / 16, 8 / 14])
    np.testing.assert_allclose(w[:3], np.median(f) / f, rtol=1e-6)
    np.testing.assert_allclose(w[3:], 1.0)
    assert w[1] > w[2] > w[0]  # the rarest class weighs most


def test_weighted_loss_is_the_weighted_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return logits + 0 * self.p

    mask = torch.randint(0, 3, (2, 4, 5))
    mask[0, 0] = 255
    batch = {"image": torch.zeros(2, 3, 4, 5), "mask": mask}
    w = torch.tensor([0.5, 2.0, 1.0])
    per_pixel = torch.nn.functional.cross_entropy(logits, mask, ignore_index=255, reduction="none")
    keep = mask != 255
    expect = (per_pixel * w[mask.clamp(max=2)])[keep].sum() / w[mask[keep]].sum()
    assert segmentation_loss(Fixed(), batch, w).item() == pytest.approx(expect.item(), rel=1e-5)
    assert segmentation_loss(Fixed(), batch, torch.ones(3)).item() == pytest.approx(
        segmentation_loss(Fixed(), batch).item(), rel=1e-6)
    assert segmentation_loss(Fixed(), {"image": batch["image"], "mask": torch.full_like(mask, 255)}, w).item() == 0


def test_multiscale_training_loss_sums_every_scale_and_their_max():
    """deeplab-pytorch's MSC training: the crop at 1.0, 0.75 and 0.5, each scale's logits and their pixel-wise
    max, one cross-entropy (mean over the labelled pixels) each, summed."""
    from advcam.train.segmentation import msc_logits

    torch.manual_seed(0)
    model = build_segmenter("deeplab_small", 3)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.randint(0, 3, (2, 32, 32))
    mask[:, :4] = 255
    batch = {"image": x, "mask": mask}
    single = msc_logits(model, x)
    assert len(single) == 1 and torch.equal(single[0], model(x))
    outs = msc_logits(model, x, (1.0, 0.75, 0.5))
    assert len(outs) == 4 and all(o.shape == (2, 3, 32, 32) for o in outs)
    half = torch.nn.functional.interpolate(model(torch.nn.functional.interpolate(
        x, scale_factor=0.5, mode="bilinear", align_corners=False)), size=(32, 32), mode="bilinear",
        align_corners=False)
    torch.testing.assert_close(outs[2], half)
    torch.testing.assert_close(outs[3], torch.maximum(torch.maximum(outs[0], outs[1]), outs[2]))
    expect = sum(torch.nn.functional.cross_entropy(o, mask, ignore_index=255) for o in outs)
    got = segmentation_loss(model, batch, scales=(1.0, 0.75, 0.5), loss_at="logits")
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    assert segmentation_loss(model, batch, loss_at="logits").item() == pytest.approx(
        torch.nn.functional.cross_entropy(outs[0], mask, ignore_index=255).item(), rel=1e-5)


def pil_resize_labels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """deeplab-pytorch's ``resize_labels``: each label map through PIL ``Image.NEAREST`` (as float, mode F)."""
    return torch.stack([torch.from_numpy(np.array(Image.fromarray(m.float().numpy()).resize(
        size[::-1], resample=Image.NEAREST))).long() for m in mask])


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 0.75, 0.5)])
def test_the_loss_at_the_logits_size_is_deeplab_pytorchs(scales):
    """deeplab-pytorch's training step written out: MSC's outputs ``[logits] + pyramid + [max]`` at their own
    sizes (the max at the 1.0 logits' size, the others upsampled bilinearly to it), the labels shrunk to each
    output by PIL nearest, one mean cross-entropy per output (255 ignored), summed."""
    torch.manual_seed(0)
    model = build_segmenter("deeplab_small", 3)
    x = torch.randn(2, 3, 45, 45)
    mask = torch.randint(0, 3, (2, 45, 45))
    mask[:, :7] = 255
    F_ = torch.nn.functional
    logits = model.logits(x)
    pyramid = [model.logits(F_.interpolate(x, scale_factor=p, mode="bilinear", align_corners=False))
               for p in scales[1:]]
    outs = [logits, *pyramid]
    if pyramid:
        outs.append(torch.stack([logits, *[F_.interpolate(o, size=logits.shape[-2:], mode="bilinear",
                                                          align_corners=False) for o in pyramid]]).amax(0))
    assert logits.shape[-2:] == (6, 6)
    expect = sum(F_.cross_entropy(o, pil_resize_labels(mask, tuple(o.shape[-2:])), ignore_index=255) for o in outs)
    got = segmentation_loss(model, {"image": x, "mask": mask}, scales=scales)
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    assert got.item() != pytest.approx(segmentation_loss(model, {"image": x, "mask": mask}, scales=scales,
                                                         loss_at="logits").item(), rel=1e-3)
    from advcam.train.segmentation import shrink_labels
    for size in [(6, 6), (3, 3), (2, 2), (7, 5), (45, 45)]:
        torch.testing.assert_close(shrink_labels(mask, size), pil_resize_labels(mask, size))


def test_deeplab_param_groups_and_poly_lr():
    model = build_segmenter("deeplab_small", 4)
    opt = make_deeplab_sgd(model, 0.01, 5e-4, 0.9)
    backbone, weights, biases = opt.param_groups
    assert len(weights["params"]) == len(biases["params"]) == 4
    assert all(p.dim() == 4 for p in weights["params"]) and all(p.dim() == 1 for p in biases["params"])
    assert weights["weight_decay"] == 5e-4 and biases["weight_decay"] == 0.0
    loop.set_poly_lr(opt, 0.01, 50, 100)
    base = 0.01 * 0.5 ** 0.9
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([base, 10 * base, 20 * base])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)


class PolynomialLR:
    """deeplab-pytorch's ``PolynomialLR(optimizer, step_size=10, iter_max, power=0.9)`` written out:
    ``scheduler.step(epoch=iteration)`` after the optimiser step of iteration 1, 2, ...; the rate is recomputed
    only where ``last_epoch`` is a positive multiple of ``step_size`` and held in between."""

    def __init__(self, base: float, iter_max: int, step_size: int = 10, power: float = 0.9) -> None:
        self.base, self.iter_max, self.step_size, self.power, self.lr = base, iter_max, step_size, power, base

    def step(self, epoch: int) -> None:
        if epoch != 0 and epoch % self.step_size == 0 and epoch <= self.iter_max:
            self.lr = self.base * (1 - epoch / self.iter_max) ** self.power


def test_the_segmenters_poly_rate_is_recomputed_every_ten_steps_as_deeplab_pytorch():
    model = build_segmenter("deeplab_small", 4)
    opt, ref = make_deeplab_sgd(model, 0.01, 5e-4, 0.9), PolynomialLR(0.01, 95)
    for step in range(95):  # optimiser step `step` is deeplab-pytorch's iteration step + 1
        lr = loop.set_poly_lr(opt, 0.01, step, 95, every=10)
        assert lr == pytest.approx(ref.lr, rel=1e-12), step
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([ref.lr, 10 * ref.lr, 20 * ref.lr])
        ref.step(step + 1)
    assert loop.set_poly_lr(opt, 0.01, 37, 95) == pytest.approx(0.01 * (1 - 37 / 95) ** 0.9)  # every step (IRN)


def test_train_seg_passes_lr_update_every(monkeypatch, tmp_path: Path):
    from advcam.train import segmentation as seg_training
    seen = {}
    monkeypatch.setattr(loop, "fit", lambda *a, **k: seen.update(k) or [[1, 1, 0.5, 0.1]])
    info = BlockInfo(tmp_path, n=2)
    data = SegmentationDataset(info, info.ids, info.read_mask, crop_size=32)
    for every in (10, 3):
        seg_training.train_segmenter(build_segmenter("deeplab_small", 4), data, epochs=1, batch_size=2, lr=0.01,
                                     weight_decay=0.0, momentum=0.9, seed=0, workers=0, resume=tmp_path / "r.pt",
                                     curves=tmp_path / "c.csv", fingerprint={}, lr_update_every=every)
        assert seen["lr_every"] == every


def test_resnet101_backbone_has_torchvision_names():
    model = build_segmenter("deeplab_resnet101", 21)
    keys = model.backbone.state_dict().keys()
    assert "layer3.22.conv3.weight" in keys and "layer3.23.conv1.weight" not in keys
    assert model.backbone.output_stride == 8 and not any(
        p.requires_grad for n, p in model.backbone.named_parameters() if "bn" in n)



@pytest.mark.parametrize("arch", ["deeplab_resnet50", "deeplab_resnet101"])
def test_deeplab_backbones_dilate_every_block_as_deeplab_pytorch(arch):
    """deeplab-pytorch's DeepLabV2: ``_ResBlock(n, ..., stride=1, dilation=2)`` for layer4 (advcam's layer3) and
    dilation 4 for layer5 (layer4), block1 included; strides and the 3x3's padding follow."""
    backbone = build_segmenter(arch, 21).backbone
    for layer, rate in ((backbone.layer3, 2), (backbone.layer4, 4)):
        assert [b.conv2.dilation for b in layer] == [(rate, rate)] * len(layer)
        assert [b.conv2.padding for b in layer] == [(rate, rate)] * len(layer)
        assert layer[0].conv2.stride == (1, 1)
    assert {b.conv2.dilation for b in [*backbone.layer1, *backbone.layer2]} == {(1, 1)}
    assert tuple(backbone(torch.zeros(1, 3, 33, 41)).shape[-2:]) == (5, 6)


def test_the_small_networks_keep_torchvisions_dilation_convention():
    """resnet_small (one block per layer): layer3's block keeps layer2's dilation 1, layer4's gets 2."""
    from advcam.models.classifier import build_classifier
    for backbone in (build_segmenter("deeplab_small", 4).backbone, build_classifier("resnet_small", 3).backbone):
        assert [backbone.layer3[0].conv2.dilation, backbone.layer4[0].conv2.dilation] == [(1, 1), (2, 2)]


# ---------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    net = build_segmenter("deeplab_small", 4)
    for conv in net.aspp.branches:  # a visible head (the DeepLab init is N(0, 0.01))
        torch.nn.init.normal_(conv.weight, std=0.3)
    return net.eval()


def test_single_scale_without_flip_is_the_plain_forward(small_net):
    x = torch.randn(3, 30, 38)
    with torch.inference_mode():
        plain = small_net(x[None])[0]
    torch.testing.assert_close(multiscale_logits(small_net, x, (1.0,), flip=False), plain)


def test_multiscale_is_max_fused_and_flip_equivariant(small_net):
    x = torch.randn(3, 30, 38)
    scales = (1.0, 0.75, 0.5, 1.25)
    fused = multiscale_logits(small_net, x, scales, flip=True)
    assert fused.shape == (4, 30, 38)
    for s in scales:  # the max is at least every single map, up to float32 rounding: the fused pass convolves the
        # image and its flip as one batch, and oneDNN may pick another algorithm for it than for one image (on a
        # 2-core AMD EPYC single maps came out up to 1.2e-6 x (1 + |logit|) higher alone, about 10 ulp; a map left
        # out of the max would be off by whole units)
        single = multiscale_logits(small_net, x, (s,), flip=False)
        assert torch.all(fused >= single - 1e-5 * (1 + single.abs()))
    mirrored = multiscale_logits(small_net, x.flip(-1), scales, flip=True)
    torch.testing.assert_close(mirrored, fused.flip(-1), atol=1e-4, rtol=1e-4)
    no_flip = multiscale_logits(small_net, x, scales, flip=False)
    assert not torch.allclose(no_flip.flip(-1), multiscale_logits(small_net, x.flip(-1), scales, flip=False))


def test_crf_postprocessing_pulls_a_noisy_prediction_to_the_image_edges():
    from advcam.steps.evaluate import DEEPLAB_CRF, crf_postprocess

    h, w = 40, 48
    image = np.zeros((h, w, 3), np.uint8)
    image[:, 20:] = (200, 60, 60)  # the object starts at column 20
    truth = np.zeros((h, w), np.int64)
    truth[:, 20:] = 1
    rng = np.random.default_rng(0)
    pred = np.zeros((h, w), np.int64)
    pred[:, 24:] = 1  # boundary 4 px off ...
    flip = rng.random((h, w)) < 0.15  # ... and 15 % salt-and-pepper
    pred[flip] = 1 - pred[flip]
    prob = np.where(pred == 1, 0.65, 0.35).astype(np.float32)
    prob = np.stack([1 - prob, prob])
    before = (pred == truth).mean()
    after = (crf_postprocess(image, prob, DEEPLAB_CRF) == truth).mean()
    assert before < 0.8 and after > 0.97, (before, after)


# ---------------------------------------------------------------- semi-supervised mode
def test_select_gt_ids_is_deterministic_and_validated():
    ids = [f"x{i}" for i in range(20)]
    assert select_gt_ids(ids) == []
    a = select_gt_ids(ids, gt_fraction=0.1, seed=3)
    assert len(a) == 2 and a == select_gt_ids(list(reversed(ids)), gt_fraction=0.1, seed=3)[::-1]
    assert a != select_gt_ids(ids, gt_fraction=0.1, seed=4) or a != select_gt_ids(ids, gt_fraction=0.1, seed=5)
    assert set(select_gt_ids(ids, ["x7"], 0.1, 3)) == set(a) | {"x7"}
    assert select_gt_ids(ids, gt_fraction=1.0) == ids
    assert len(select_gt_ids(ids, gt_fraction=0.29)) == 6  # round(5.8), as the schema says: not int()
    with pytest.raises(AdvcamError, match="segmentation.gt_ids.*nope"):
        select_gt_ids(ids, ["nope"])
    with pytest.raises(AdvcamError,
                       match=r"not in the segmenter's training list \(train_aug\.txt, dataset\.seg_list\)"):
        select_gt_ids(ids, ["nope"], list_name="train_aug")



def test_gt_fraction_draws_from_the_images_with_a_mask():
    """Images labelled by their annotations have no mask: the draw takes only images with one, and it is the
    same draw as before when every image has one."""
    ids = [f"x{i}" for i in range(20)]
    assert select_gt_ids(ids, gt_fraction=0.2, seed=3, has_mask=lambda i: True) == select_gt_ids(ids, [], 0.2, 3)
    odd = lambda i: int(i[1:]) % 2 == 1  # noqa: E731
    drawn = select_gt_ids(ids, gt_fraction=0.25, seed=3, has_mask=odd)
    assert len(drawn) == 5 and all(odd(i) for i in drawn)
    assert select_gt_ids(ids, gt_fraction=0.5, seed=0, has_mask=odd) == [i for i in ids if odd(i)]
    with pytest.raises(AdvcamError, match=r"asks for the masks of 11 images of seg.txt .* only 10 of its 20"):
        select_gt_ids(ids, gt_fraction=0.55, has_mask=odd)


def test_gt_ids_read_ground_truth_and_the_rest_pseudo_labels(tmp_path: Path):
    info = BlockInfo(tmp_path / "data", n=3)
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    for image_id in info.ids:  # pseudo labels that differ from the ground truth everywhere it is labelled
        gt = info.read_mask(image_id)
        Image.fromarray(np.where(gt == 255, 0, 255).astype(np.uint8)).save(pseudo / f"{image_id}.png")
    read = training_label_reader(info, pseudo, ["im1"])
    np.testing.assert_array_equal(read("im1"), info.read_mask("im1"))
    for other in ("im0", "im2"):
        np.testing.assert_array_equal(read(other), np.array(Image.open(pseudo / f"{other}.png")))
        assert not np.array_equal(read(other), info.read_mask(other))
    check_gt_masks(info, ["im1"])
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(info.mask_path("im2"))
    with pytest.raises(AdvcamError, match=r"im2\.png: ground-truth mask is 6x5 but image im2 is 48x40"):
        check_gt_masks(info, ["im2"])
    info.mask_path("im2").unlink()
    with pytest.raises(AdvcamError, match="image im2: semi-supervised mode needs its ground-truth mask"):
        training_label_reader(info, pseudo, ["im2"])("im2")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from advcam import config
    from advcam.steps import prepare

    cfg = config.load(None, ["device=cpu", "synthetic.image_size=32", "synthetic.num_train_aug=10",
                             "synthetic.num_train=10", "synthetic.num_val=2", "synthetic.num_classes=3",
                             "segmentation.epochs=1", "segmentation.batch_size=5", "segmentation.crop_size=32"])
    out = tmp_path_factory.mktemp("prepared") / "synthetic"
    prepare.run(cfg, out)
    return cfg, out


def test_train_seg_stage_uses_ground_truth_for_gt_ids(prepared, tmp_path: Path, monkeypatch, caplog):
    from advcam import config
    from advcam.data import load_info
    from advcam.steps import train_seg

    cfg, data = prepared
    info = load_info(data)
    ids = info.lists["infer"]
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    gt_ids = ids[:3]
    for image_id in ids[3:]:  # all-background pseudo labels; the GT images have none at all
        Image.fromarray(np.zeros(info.read_mask(image_id).shape, np.uint8)).save(pseudo / f"{image_id}.png")
    seen = {}

    def spy(model, dataset, **kw):
        seen["labels"] = {i: dataset.label_fn(i) for i in ids}
        seen["fingerprint"] = kw["fingerprint"]
        seen["weight"] = kw["class_weight"]
        seen["lr_update_every"] = kw["lr_update_every"]
        return []

    monkeypatch.setattr(train_seg, "train_segmenter", spy)
    semi = config.load(None, [*_overrides(cfg), f"segmentation.gt_ids={list(gt_ids)}".replace("'", '"'),
                              "segmentation.balanced_ce=true", "segmentation.lr_update_every=7"])
    with caplog.at_level(logging.INFO, logger="advcam"):
        train_seg.run(semi, data, pseudo, tmp_path / "seg.pt", tmp_path / "seg.csv")
    assert "7 with pseudo labels" in caplog.text and "3 with ground truth" in caplog.text
    assert seen["lr_update_every"] == 7
    for image_id in gt_ids:
        np.testing.assert_array_equal(seen["labels"][image_id], info.read_mask(image_id))
        assert seen["labels"][image_id].max() > 0
    for image_id in ids[3:]:
        assert seen["labels"][image_id].max() == 0
    assert seen["weight"] is not None and seen["weight"].shape == (4,)
    semi_fp = seen["fingerprint"]
    frac = config.load(None, [*_overrides(cfg), "segmentation.gt_fraction=0.3"])
    for image_id in ids[:3]:
        Image.fromarray(np.zeros(info.read_mask(image_id).shape, np.uint8)).save(pseudo / f"{image_id}.png")
    train_seg.run(frac, data, pseudo, tmp_path / "seg.pt", tmp_path / "seg.csv")
    assert sum(int(seen["labels"][i].max() > 0) for i in ids) >= 1 and seen["weight"] is None
    assert seen["fingerprint"]["gt_ids"] != semi_fp["gt_ids"] or seen["fingerprint"]["params"] != semi_fp["params"]

    victim = ids[5]  # a pseudo label of the wrong size stops the stage, naming it
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(pseudo / f"{victim}.png")
    with pytest.raises(AdvcamError, match=rf"{victim}\.png: pseudo label is 12x10 but image {victim} is 32x32"):
        train_seg.run(semi, data, pseudo, tmp_path / "seg.pt", tmp_path / "seg.csv")


def test_train_seg_draws_the_gt_fraction_with_the_run_seed(prepared, tmp_path: Path, monkeypatch):
    """gt_fraction's images are select_gt_ids(..., seed) with the run's seed, so another seed trains on other
    ground-truth images."""
    from advcam import config
    from advcam.data import load_info
    from advcam.steps import train_seg

    cfg, data = prepared
    info = load_info(data)
    ids = info.lists["seg"]
    seed = next(s for s in range(1, 50) if select_gt_ids(ids, [], 0.3, s) != select_gt_ids(ids, [], 0.3, 0))
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    for image_id in ids:
        Image.fromarray(np.zeros(info.read_mask(image_id).shape, np.uint8)).save(pseudo / f"{image_id}.png")
    chosen = []
    real = train_seg.training_label_reader
    monkeypatch.setattr(train_seg, "training_label_reader",
                        lambda info, pseudo, gt_ids=(): chosen.append(list(gt_ids)) or real(info, pseudo, gt_ids))
    monkeypatch.setattr(train_seg, "train_segmenter", lambda *a, **k: [])
    run_cfg = config.load(None, [*_overrides(cfg), f"seed={seed}", "segmentation.gt_fraction=0.3"])
    train_seg.run(run_cfg, data, pseudo, tmp_path / "seg.pt", tmp_path / "seg.csv")
    assert chosen == [select_gt_ids(ids, [], 0.3, seed)]


def test_loader_workers_started_by_spawn_get_the_same_batches(prepared, tmp_path: Path):
    """Workers started by spawn (macOS's default; forkserver, Linux's from Python 3.14, also pickles) receive the
    dataset pickled: with the label readers as closures, `advcam train-seg` and the random walk's training failed
    there with "Can't pickle local object". They load the same batches as the main process."""
    import pickle

    from advcam.data import load_info
    from advcam.train.segmentation import pseudo_label_reader, training_label_reader

    _, data = prepared
    info = load_info(data)
    ids = info.lists["seg"][:4]
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    for image_id in ids:  # pseudo labels unlike the masks, so a mix-up between the two readers shows
        Image.fromarray((info.read_mask(image_id) == 0).astype(np.uint8)).save(pseudo / f"{image_id}.png")
    read = pickle.loads(pickle.dumps(training_label_reader(info, pseudo, ids[:1])))
    np.testing.assert_array_equal(read(ids[0]), info.read_mask(ids[0]))
    np.testing.assert_array_equal(read(ids[1]), pseudo_label_reader(info, pseudo)(ids[1]))
    assert not np.array_equal(read(ids[1]), info.read_mask(ids[1]))

    dataset = SegmentationDataset(info, ids, training_label_reader(info, pseudo, ids[:1]), 32, train=True, seed=0)
    batches = []
    for workers, context in ((0, None), (1, "spawn")):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers,
                                             multiprocessing_context=context, generator=torch.Generator().manual_seed(0))
        batches.append([(b["image"], b["mask"]) for b in loader])
    for (image, mask), (image_w, mask_w) in zip(*batches, strict=True):
        assert torch.equal(image, image_w) and torch.equal(mask, mask_w)


def _overrides(cfg) -> list[str]:
    return ["device=cpu", "segmentation.epochs=1", "segmentation.batch_size=5", "segmentation.crop_size=32",
            f"seed={cfg.seed}"]


# ---------------------------------------------------------------- a short run
def test_short_training_run_lowers_the_loss(tmp_path: Path):
    torch.manual_seed(0)
    info = BlockInfo(tmp_path / "data", n=8, size=(32, 32))
    data = SegmentationDataset(info, info.ids, info.read_mask, crop_size=32, train=True, seed=0)
    model = build_segmenter("deeplab_small", 4)
    weight = class_weights(info.read_mask, info.ids, 4)
    rows = train_segmenter(model, data, epochs=12, batch_size=4, lr=0.003, weight_decay=1e-4, momentum=0.9, seed=0,
                           workers=0, resume=tmp_path / "r.pt", curves=tmp_path / "c.csv", fingerprint={"t": 1},
                           class_weight=weight)
    losses = [r[2] for r in rows]
    assert len(rows) == 24 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4]), losses


def test_the_loss_terms_of_two_half_batches_add_up_to_the_whole_batchs():
    """What DDP relies on (``global_loss``): per term, the sums and the counts of two half batches add up to the
    whole batch's, so sum_k (s1_k + s2_k) / (c1_k + c2_k) is the one-process loss, with several terms of
    different pixel counts (MSC at the logits' sizes) and with class weights."""
    from advcam.train.segmentation import SegmentationLoss

    torch.manual_seed(0)
    model = build_segmenter("deeplab_small", 3).eval()
    x, mask = torch.randn(4, 3, 40, 40), torch.randint(0, 3, (4, 40, 40))
    mask[:2, :9], mask[3, :, :20] = 255, 255  # the halves label different numbers of pixels
    for weight in (None, torch.tensor([0.5, 2.0, 1.0])):
        loss = SegmentationLoss(weight, (1.0, 0.75, 0.5))
        with torch.no_grad():
            whole = loss(model, {"image": x, "mask": mask})
            (s1, c1), (s2, c2) = (loss.parts(model, {"image": x[h], "mask": mask[h]}) for h in (slice(0, 2), slice(2, 4)))
        assert s1.shape == c1.shape == (4,) and len(set(c1.tolist())) > 1
        assert float(((s1 + s2) / (c1 + c2)).sum()) == pytest.approx(float(whole), rel=1e-5)
        assert float((s1 / c1 + s2 / c2).sum() / 2) != pytest.approx(float(whole), rel=1e-4)  # not a mean of means
