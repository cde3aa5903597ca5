"""ResNet backbones with torchvision's parameter names, plus output-stride control.

The blocks and the network read as torchvision's ``resnet.py`` (ResNet v1.5: the stride sits on the 3x3
conv of a bottleneck), so a torchvision ImageNet state dict (``resnet50-*.pth``) loads with
:func:`load_torchvision_weights`. Two differences, both from IRN's ``net/resnet50.py``:

- ``strides`` = (conv1, layer2, layer3, layer4); the max-pool always has stride 2 and layer1 stride 1,
  so strides (2, 2, 2, 1) give output stride 16 (the CAM network) and (2, 2, 1, 1) output stride 8;
- ``dilations`` = per layer (1..4), for atrous layers where a stride was removed (DeepLab); as in
  torchvision's ``replace_stride_with_dilation``, the first block of a layer keeps the previous layer's
  dilation and the other blocks use the new one; ``dilate_first_block=True`` gives every block of a layer its
  dilation, as deeplab-pytorch's ``_ResBlock`` (DeepLab-v2).

The network has no ``avgpool``/``fc``: ``forward`` returns the last feature map ``(B, out_channels, h, w)``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Mapping, Sequence, Type

import torch
from torch import nn

from advcam.utils.errors import AdvcamError
from advcam.utils.progress import log


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (= dilation), no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, dilated), 1x1 expand by 4, residual connection (ResNet-50/101)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Type[BasicBlock] | Type[Bottleneck]


class ResNet(nn.Module):
    """conv1 (7x7) - bn1 - relu - maxpool - layer1..layer4; returns the layer4 feature map."""

    def __init__(self, block: Block, layers: Sequence[int], widths: Sequence[int] = (64, 128, 256, 512),
                 strides: Sequence[int] = (2, 2, 2, 2), dilations: Sequence[int] = (1, 1, 1, 1),
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, dilate_first_block: bool = False) -> None:
        super().__init__()
        self.dilate_first_block = dilate_first_block
        if len(layers) != 4 or len(widths) != 4 or len(strides) != 4 or len(dilations) != 4:
            raise ValueError("ResNet: layers, widths, strides and dilations need 4 entries each")
        self._norm_layer = norm_layer
        self.inplanes, self.dilation = widths[0], 1
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=strides[0], padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1, dilations[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], strides[1], dilations[1])
        self.layer3 = self._make_layer(block, widths[2], layers[2], strides[2], dilations[2])
        self.layer4 = self._make_layer(block, widths[3], layers[3], strides[3], dilations[3])
        self.out_channels = widths[3] * block.expansion
        self.mid_channels = (widths[1] * block.expansion, widths[2] * block.expansion)  # layer2, layer3
        self.output_stride = strides[0] * 2 * strides[1] * strides[2] * strides[3]
        self._init_weights()

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       self._norm_layer(planes * block.expansion))
        first = dilation if self.dilate_first_block else self.dilation
        layers = [block(self.inplanes, planes, stride, downsample, first, self._norm_layer)]
        self.inplanes, self.dilation = planes * block.expansion, dilation
        layers += [block(self.inplanes, planes, 1, None, dilation, self._norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        """torchvision's initialisation: Kaiming-normal (fan_out) convs, BN weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(layer2, layer3, layer4) outputs: two mid-level stages (``mid_channels``, read by SEAM's PCM) and the
        output."""
        x2 = self.layer2(self.layer1(self.stem(x)))
        x3 = self.layer3(x2)
        return x2, x3, self.layer4(x3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(x))
        return self.layer4(self.layer3(self.layer2(x)))


def resnet50(strides: Sequence[int] = (2, 2, 2, 2), dilations: Sequence[int] = (1, 1, 1, 1),
             dilate_first_block: bool = False) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); 2048 output channels; torchvision weight names."""
    return ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), strides, dilations,
                  dilate_first_block=dilate_first_block)


def resnet_small(strides: Sequence[int] = (2, 2, 1, 1), dilations: Sequence[int] = (1, 1, 2, 4)) -> ResNet:
    """A small ResNet for training from scratch on CPU: one BasicBlock per layer, widths 16-32-64-128.

    The default strides give output stride 8 (96 px -> 12x12 maps). With one block per layer and torchvision's
    dilation convention the default dilations (1, 1, 2, 4) dilate only layer4's block, by 2 (layer3's block keeps
    layer2's 1, and 4 is never used); every result of the embedded dataset is of this network.
    """
    return ResNet(BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), strides, dilations)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every conv -> BatchNorm pair of the ResNet blocks folded.

    Each ``convN``/``bnN`` pair of a block or of the stem, and each ``downsample`` ``(conv, bn)``, becomes one
    convolution with a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``); the BatchNorm becomes an
    ``Identity``. The copy computes the same function as the eval-mode model up to float rounding, with
    one pass over each activation fewer: a speed option for inference and input-gradient loops (AdvCAM's
    ``fold_batchnorm``). Raises AdvcamError when the model is in training mode (batch statistics cannot fold).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if any(m.training for m in model.modules()):
        raise AdvcamError("fold_batchnorm: the model must be in eval mode (call model.eval() first)")
    folded = copy.deepcopy(model)
    pairs = 0
    for module in folded.modules():
        for i in range(1, 4):
            conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                setattr(module, f"bn{i}", nn.Identity())
                pairs += 1
        down = getattr(module, "downsample", None)
        if (isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[0], nn.Conv2d)
                and isinstance(down[1], nn.BatchNorm2d)):
            module.downsample = nn.Sequential(fuse_conv_bn_eval(down[0], down[1]), nn.Identity())
            pairs += 1
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    if left:  # another architecture's names: say so rather than look like a speed-up
        log.warning("fold_batchnorm: folded %d conv/BatchNorm pair(s); %d BatchNorm layer(s) left as they are (only "
                    "ResNet-style convN/bnN and downsample pairs are folded)", pairs, left)
    return folded


def load_torchvision_weights(model: nn.Module, path: str | Path) -> None:
    """Load a torchvision-format ImageNet state dict (e.g. ``resnet50-0676ba61.pth``) from a local file
    (checked by :func:`read_torchvision_weights`, ignoring the backbone's ``ignored_weight_prefixes``)."""
    model.load_state_dict(read_torchvision_weights(path, model.state_dict(), ignored_prefixes(model)))


def ignored_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Keys of a weight file that are not the backbone's (``fc.``, torchvision's ImageNet head, by default)."""
    return tuple(getattr(backbone, "ignored_weight_prefixes", ("fc.",)))


def _blocks(state: Mapping[str, object]) -> tuple[int, ...]:
    """Residual blocks per stage of a ResNet state dict (``layerS.B.*`` keys)."""
    return tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{s}.")}) for s in range(1, 5))


DEPTHS = {(2, 2, 2, 2): "ResNet-18", (3, 4, 6, 3): "ResNet-34 or ResNet-50", (3, 4, 23, 3): "ResNet-101",
          (3, 8, 36, 3): "ResNet-152"}


def _depth_hint(state: Mapping[str, object], own: Mapping[str, object]) -> str:
    """Where the block counts differ, name both depths (a ResNet-101 file given for a ResNet-50 arch)."""
    theirs, ours = _blocks(state), _blocks(own)
    if theirs == ours or not all(theirs):
        return ""
    name = lambda b: f"a {DEPTHS[b]}" if b in DEPTHS else "a ResNet"  # noqa: E731
    return (f"; the file holds {name(theirs)} (blocks per stage {theirs}), this arch needs {name(ours)} "
            f"({ours})")


def unwrap_state_dict(state: object) -> object:
    """A state dict saved inside ``{"state_dict": ...}`` or ``{"model": ...}`` (torchvision's training scripts), or
    from a (Distributed)DataParallel wrapper (every key ``module.*``), as a plain one; anything else as it is."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if isinstance(state, dict) and state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_torchvision_weights(path: str | Path, own: Mapping[str, torch.Tensor],
                             ignore: Sequence[str] = ("fc.",)) -> dict[str, torch.Tensor]:
    """The backbone state dict in a torchvision-format weight file, checked against ``own`` (a backbone's
    ``state_dict()``; shapes are enough, so a model on the ``meta`` device does).

    Keys starting with one of ``ignore`` (``fc.*``: the ImageNet head) are ignored, BatchNorm
    ``num_batches_tracked`` counters may be absent (files from before PyTorch 0.4.1); every other key must match
    ``own`` in name and shape. ``~`` is expanded. Loaded with ``weights_only=True`` (no code is unpickled). Raises
    :class:`AdvcamError` naming the file on a missing file, an MXNet ``.params`` file, a file that is not a state
    dict, or keys/shapes that do not match.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise AdvcamError(f"pretrained weights not found: {path}")
    if path.suffix == ".params":  # PSA's and SEAM's ImageNet ResNet-38 is distributed in MXNet's format
        raise AdvcamError(f"{path}: an MXNet parameter file; convert it to a PyTorch state dict first (PSA's and "
                          "SEAM's network/resnet38d.convert_mxnet_to_torch, then torch.save), see the README")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file can fail anywhere in the unpickler (even KeyError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdvcamError(f"{path}: not a loadable torchvision weight file ({first})") from None
    state = unwrap_state_dict(state)
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        keys = f" (its keys: {', '.join(map(str, list(state)[:5]))})" if isinstance(state, dict) else ""
        raise AdvcamError(f"{path}: not a state dict (expected a mapping of parameter names to tensors){keys}")
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore))}
    # files saved before PyTorch 0.4.1 (e.g. torchvision's resnet50-19c8e357.pth, which IRN and AdvCAM use) have no
    # BatchNorm step counters; they only matter with momentum=None, so the model's own (zero) counters stay
    hint = _depth_hint(state, own)
    state.update({k: own[k] for k in own if k.endswith(".num_batches_tracked") and k not in state})
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = [f"{len(keys)} {what}, e.g. {', '.join(keys[:3])}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise AdvcamError(f"{path}: keys do not match this backbone ({'; '.join(parts)}){hint}")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise AdvcamError(f"{path}: shapes do not match this backbone ({len(wrong)} tensors, e.g. {wrong[:2]})")
    return state
