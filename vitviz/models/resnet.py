"""ResNet (He et al., 2016) with basic and bottleneck blocks, from scratch.

Names follow timm/torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample.0``, ``fc``), so
their ResNet-18/34/50 weights load unchanged. Strides sit on the 3x3 conv of bottlenecks ("v1.5").
"""

from __future__ import annotations

import torch
from torch import nn

from vitviz.config import ResNetConfig
from vitviz.models.layers import DropPath


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, width, stride)
        self.drop_path = DropPath(drop_path)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(self.drop_path(x) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection (ResNet-50+)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)
        self.drop_path = DropPath(drop_path)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)


class ResNet(nn.Module):
    """ResNet with an ImageNet stem (7x7/2 + max-pool) or a small-image stem (3x3/1, no pool).

    ``features_only=True`` builds the stem and stages without pooling or classifier: ``forward``
    then returns the last feature map, which is how the hybrid uses it as a tokeniser.
    """

    family = "resnet"

    def __init__(self, config: ResNetConfig, features_only: bool = False) -> None:
        super().__init__()
        self.config = config
        c = config
        self.features_only = features_only
        if c.stem == "imagenet":
            self.conv1 = nn.Conv2d(c.in_chans, c.width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(c.in_chans, c.width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(c.width)
        self.act1 = nn.ReLU(inplace=True)
        block_cls = BasicBlock if c.block == "basic" else Bottleneck
        total = sum(c.layers)
        rates = torch.linspace(0, c.drop_path, total).tolist()
        cin, index = c.width, 0
        self.stage_names: list[str] = []
        for i, n in enumerate(c.layers):
            width = c.width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block_cls(cin, width, stride=2 if (i > 0 and j == 0) else 1, drop_path=rates[index]))
                cin, index = width * block_cls.expansion, index + 1
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.num_features = cin
        if not features_only:
            self.global_pool = nn.AdaptiveAvgPool2d(1)
            self.drop = nn.Dropout(c.dropout)
            self.fc = nn.Linear(cin, c.num_classes) if c.num_classes else nn.Identity()
        self._init_weights()

    @property
    def reduction(self) -> int:
        """Stride of the last feature map relative to the input."""
        return self.config.reduction

    @property
    def num_classes(self) -> int:
        return 0 if self.features_only else self.config.num_classes

    @property
    def gradcam_layer(self) -> nn.Module:
        """The last convolutional stage: Grad-CAM reads its output and gradient."""
        return getattr(self, self.stage_names[-1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map, (B, C, H/r, W/r)."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x).flatten(1))  # (B, C)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return x if self.features_only else self.forward_head(x)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        # Zero the last BN of each residual branch: every block starts as the identity (Goyal et al.).
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.last_bn().weight)
