"""RepDistiller's Wide ResNets for 32×32 inputs: ``wrn_{depth}_{widen}``.

Pre-activation blocks (BN-ReLU before each conv); where a block changes width,
the shortcut ``convShortcut`` is a 1×1 conv applied to the *activated* input,
and otherwise the shortcut is the raw input. Stages are ``block1..3.layer``,
followed by a final ``bn1``-ReLU, global average pooling and ``fc``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.models._registry import register_variants
from dfkd.models.layers import conv3x3, global_avg_pool, kaiming_fan_out_

__all__ = ["WideResNet"]


class WideBlock(nn.Module):
    """Pre-activation residual block: ``(B, in_planes, H, W) -> (B, planes, H / stride, W / stride)``."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.convShortcut = (
            None if in_planes == planes else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class WideStage(nn.Module):
    """``depth`` wide blocks held as ``layer``, the first one strided.

    ``(B, in_planes, H, W) -> (B, planes, H / stride, W / stride)``.
    """

    def __init__(self, in_planes: int, planes: int, depth: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            WideBlock(in_planes, planes, stride), *(WideBlock(planes, planes, 1) for _ in range(depth - 1))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: ``(B, in_channels, H, W) -> (B, num_classes)``.

    The head ``fc`` sees a ``64·widen``-d feature. Convs use He-normal (fan-out)
    initialisation and the head's bias starts at zero, as in the reference.

    Args:
        num_classes: Size of the output.
        in_channels: Channels of the input image.
        depth: ``6n + 4``, with ``n`` blocks per stage.
        widen: Width multiplier of the three stages (16, 32, 64 channels at 1).
    """

    head = "fc"

    def __init__(self, num_classes: int, in_channels: int = 3, *, depth: int, widen: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"a Wide ResNet has depth 6n + 4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = conv3x3(in_channels, 16)
        self.block1 = WideStage(16, widths[0], n, stride=1)
        self.block2 = WideStage(widths[0], widths[1], n, stride=2)
        self.block3 = WideStage(widths[1], widths[2], n, stride=2)
        self.bn1 = nn.BatchNorm2d(widths[2])
        self.fc = nn.Linear(widths[2], num_classes)
        kaiming_fan_out_(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W) -> (B, num_classes)``."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(global_avg_pool(F.relu(self.bn1(x))))


register_variants(
    WideResNet,
    {f"wrn_{depth}_{widen}": {"depth": depth, "widen": widen} for depth in (16, 40) for widen in (1, 2)},
)
