"""He et al.'s CIFAR ResNets with option-A shortcuts, in akamaster/pytorch_resnet_cifar10's naming.

Names ``resnet20_a`` to ``resnet110_a``. Where a stage widens, the shortcut
subsamples by two and zero-pads the new channels, so the network has no
parameters beyond its convolutions, batch norms and ``linear`` head, and the
released ``resnet{20,32,44,56}-*.th`` checkpoints load unchanged (after
stripping DataParallel's ``module.`` prefix).
"""

from __future__ import annotations

from torch import nn

from dfkd.models._registry import register_variants
from dfkd.models.resnet_base import CifarResNetBase, ZeroPadShortcut

__all__ = ["ResNetA"]


class ResNetA(CifarResNetBase):
    """Option-A CIFAR ResNet of ``depth = 6n + 2`` layers and stage widths 16, 32, 64.

    ``(B, in_channels, H, W) -> (B, num_classes)``; the head ``linear`` sees a 64-d feature.
    Conv and linear weights use He-normal (fan-in) initialisation, as in the reference.
    """

    head = "linear"
    shortcut_name = "shortcut"

    def __init__(self, num_classes: int, in_channels: int = 3, *, depth: int) -> None:
        if (depth - 2) % 6 != 0:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, ...), got {depth}")
        super().__init__(num_classes, in_channels, widths=(16, 32, 64), blocks=[(depth - 2) // 6] * 3)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def make_shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
        if stride == 1 and in_planes == planes:
            return nn.Identity()
        return ZeroPadShortcut(in_planes, planes, stride)


register_variants(ResNetA, {f"resnet{depth}_a": {"depth": depth} for depth in (20, 32, 44, 56, 110)})
