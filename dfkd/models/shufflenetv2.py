"""RepDistiller's ShuffleNetV2 (1×) for 32×32 inputs: ``shufflenetv2``.

The stem is a 1×1 conv at full resolution (no 3×3 conv, no max pooling), three
stages each open with a stride-2 down block, and a 1×1 ``conv2`` to 1024
channels precedes pooling and the ``linear`` head. PyTorch's default
initialisation, as in the reference.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.models._registry import register_variants
from dfkd.models.layers import global_avg_pool

__all__ = ["ShuffleNetV2"]


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    """Interleave ``groups`` channel groups: ``(B, g·c, H, W) -> (B, c·g, H, W)``."""
    return einops.rearrange(x, "b (g c) h w -> b (c g) h w", g=groups)


def depthwise3x3(channels: int, stride: int) -> nn.Conv2d:
    """Bias-free depthwise 3×3 conv."""
    return nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=1, groups=channels, bias=False)


def pointwise(in_channels: int, out_channels: int) -> nn.Conv2d:
    """Bias-free 1×1 conv."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class ShuffleBlock(nn.Module):
    """Split the channels in half, transform one half (1×1, depthwise 3×3, 1×1), concatenate, shuffle.

    ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = pointwise(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = depthwise3x3(half, stride=1)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = pointwise(half, half)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        kept, transformed = x.chunk(2, dim=1)
        transformed = F.relu(self.bn1(self.conv1(transformed)))
        transformed = self.bn2(self.conv2(transformed))
        transformed = F.relu(self.bn3(self.conv3(transformed)))
        return channel_shuffle(torch.cat([kept, transformed], dim=1))


class ShuffleDownBlock(nn.Module):
    """Two stride-2 branches of ``out_channels / 2`` each, concatenated and shuffled.

    ``(B, in_channels, H, W) -> (B, out_channels, H / 2, W / 2)``. The left branch
    is depthwise 3×3 then 1×1 (``conv1``, ``conv2``); the right one is 1×1,
    depthwise 3×3, 1×1 (``conv3`` to ``conv5``).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = depthwise3x3(in_channels, stride=2)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = pointwise(in_channels, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = pointwise(in_channels, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = depthwise3x3(mid, stride=2)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = pointwise(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], dim=1))


class ShuffleNetV2(nn.Module):
    """CIFAR ShuffleNetV2: ``(B, in_channels, H, W) -> (B, num_classes)``, total stride 8.

    The head ``linear`` sees a ``last_channels``-d feature.

    Args:
        num_classes: Size of the output.
        in_channels: Channels of the input image.
        widths: Output channels of the three stages.
        blocks: Shuffle blocks after the down block of each stage.
        last_channels: Output channels of the final 1×1 conv.
    """

    head = "linear"

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        *,
        widths: tuple[int, int, int] = (116, 232, 464),
        blocks: tuple[int, int, int] = (3, 7, 3),
        last_channels: int = 1024,
    ) -> None:
        super().__init__()
        stem_channels = 24
        self.conv1 = pointwise(in_channels, stem_channels)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        channels = stem_channels
        for index, (width, depth) in enumerate(zip(widths, blocks, strict=True)):
            shuffles = (ShuffleBlock(width) for _ in range(depth))
            self.add_module(f"layer{index + 1}", nn.Sequential(ShuffleDownBlock(channels, width), *shuffles))
            channels = width
        self.conv2 = pointwise(channels, last_channels)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.linear = nn.Linear(last_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W) -> (B, num_classes)``."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(global_avg_pool(F.relu(self.bn2(self.conv2(x)))))


register_variants(ShuffleNetV2, {"shufflenetv2": {}})
