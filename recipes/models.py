"""The paper's CIFAR ResNets, plus any torchvision classifier by name.

* ``resnet{6n+2}`` (resnet20/56/110/164, ...): basic blocks, 3x3 stem, 16/32/64
  channels, as in He et al. (2016) for CIFAR; projection shortcuts (1x1 conv + BN)
  where the shape changes.
* ``resnet101`` / ``resnet152``: bottleneck blocks (64/128/256/512 x 4) with a
  3x3 stem and no max-pool, for 32x32 inputs.
* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, num_classes=N)``,
  randomly initialised.

Each name is also a function of this module returning the 10-class model
(``recipes.models:resnet110`` for ``python -m replay_opt.plan --model``).

Blocks live in ``nn.Sequential`` stages so that ``ReplayModelWrapper`` sees each
residual block as a unit it can cut between.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(inplanes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(inplanes, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(inplanes: int, planes: int, stride: int) -> nn.Module:
    if stride == 1 and inplanes == planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class CifarResNet(nn.Module):
    def __init__(self, block: type[nn.Module], blocks: list[int], widths: list[int], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        inplanes = widths[0]
        layers = []
        for i, (count, planes) in enumerate(zip(blocks, widths)):
            stage = []
            for j in range(count):
                stage.append(block(inplanes, planes, stride=2 if (i > 0 and j == 0) else 1))
                inplanes = planes * block.expansion
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


CIFAR_MODELS = "resnet20, resnet56, resnet110, resnet164 (any resnet{6n+2}), resnet101, resnet152, torchvision:NAME"


def build_model(name: str, num_classes: int) -> nn.Module:
    """A randomly initialised classifier for 32x32 RGB inputs; see the module docstring for names."""
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        try:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        except ValueError as exc:
            raise ValueError(f"unknown torchvision model {arch!r}: see torchvision.models.list_models()") from exc
    bottleneck = {"resnet101": [3, 4, 23, 3], "resnet152": [3, 8, 36, 3]}
    if name in bottleneck:
        return CifarResNet(Bottleneck, bottleneck[name], [64, 128, 256, 512], num_classes)
    match = re.fullmatch(r"resnet(\d+)", name)
    if match and (int(match.group(1)) - 2) % 6 == 0 and int(match.group(1)) >= 8:
        n = (int(match.group(1)) - 2) // 6
        return CifarResNet(BasicBlock, [n, n, n], [16, 32, 64], num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {CIFAR_MODELS}")


def __getattr__(name: str) -> Any:
    """``resnet110()`` and friends: ``build_model(name, 10)`` (for ``--model recipes.models:resnet110``)."""
    if re.fullmatch(r"resnet\d+", name):
        return functools.partial(build_model, name, 10)
    raise AttributeError(name)
