"""The CIFAR ResNet trunk shared by the DAFL/CMI, RepDistiller and He et al. option-A families.

All three compute the same function: a 3×3 conv-BN-ReLU stem at full
resolution, stages of post-activation basic blocks where every stage after the
first halves the resolution, global average pooling and a linear head. They
differ only in what a released checkpoint pins down: the name of the shortcut
(``shortcut`` or ``downsample``) and of the head (``linear`` or ``fc``), the
stem width, the kind of shortcut (a 1×1 projection or option A's zero padding)
and the initialisation. Subclasses set those and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.models.layers import conv3x3, global_avg_pool

__all__ = ["BasicBlock", "CifarResNetBase", "ZeroPadShortcut", "projection_shortcut"]


def projection_shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
    """Identity where shapes agree, else a strided 1×1 conv and batch norm (He et al. option B)."""
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(planes),
    )


class ZeroPadShortcut(nn.Module):
    """He et al. option A: subsample by ``stride``, then zero-pad the new channels, half on each side.

    ``(B, in_planes, H, W) -> (B, planes, ceil(H / stride), ceil(W / stride))``; no parameters.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        extra = planes - in_planes
        self.stride = stride
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Post-activation residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``(B, in_planes, H, W) -> (B, planes, H / stride, W / stride)``. The shortcut
    is registered under ``shortcut_name`` so that state-dict keys match the
    family's released checkpoints; an identity shortcut has no keys.
    """

    def __init__(
        self, in_planes: int, planes: int, stride: int, shortcut: nn.Module, shortcut_name: str
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut_name = shortcut_name
        self.add_module(shortcut_name, shortcut)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + getattr(self, self.shortcut_name)(x))


class CifarResNetBase(nn.Module):
    """Stem ``conv1``/``bn1``, stages ``layer1..layerN`` of :class:`BasicBlock`, pooling, linear head.

    Maps ``(B, in_channels, H, W)`` to ``(B, num_classes)``; the head's input is
    the ``widths[-1]``-d pooled feature.

    Args:
        num_classes: Size of the output.
        in_channels: Channels of the input image.
        widths: Output channels of each stage.
        blocks: Number of blocks in each stage.
        stem_width: Output channels of the stem; ``widths[0]`` when omitted.
    """

    head: ClassVar[str] = "linear"
    shortcut_name: ClassVar[str] = "shortcut"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *,
        widths: Sequence[int],
        blocks: Sequence[int],
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        in_planes = widths[0] if stem_width is None else stem_width
        self.conv1 = conv3x3(in_channels, in_planes)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.stage_names = tuple(f"layer{i + 1}" for i in range(len(widths)))
        for i, (name, planes, depth) in enumerate(zip(self.stage_names, widths, blocks, strict=True)):
            self.add_module(name, self._make_stage(in_planes, planes, depth, stride=1 if i == 0 else 2))
            in_planes = planes
        self.add_module(self.head, nn.Linear(in_planes, num_classes))

    @staticmethod
    def make_shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
        """The shortcut of a block; subclasses override it to change the kind."""
        return projection_shortcut(in_planes, planes, stride)

    def _make_stage(self, in_planes: int, planes: int, depth: int, stride: int) -> nn.Sequential:
        blocks = []
        for _ in range(depth):
            shortcut = self.make_shortcut(in_planes, planes, stride)
            blocks.append(BasicBlock(in_planes, planes, stride, shortcut, self.shortcut_name))
            in_planes, stride = planes, 1
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W) -> (B, num_classes)``."""
        x = F.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return getattr(self, self.head)(global_avg_pool(x))
