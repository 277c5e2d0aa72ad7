"""ResNet-18/34 for 32×32 inputs as used by DAFL, DFAD and CMI (``shortcut`` and ``linear`` naming).

ImageNet widths (64 to 512) at CIFAR resolution: a 3×3 stem without max
pooling, four stages, and PyTorch's default initialisation, as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

from dfkd.models._registry import register_variants
from dfkd.models.resnet_base import CifarResNetBase

__all__ = ["ResNetCifar"]


class ResNetCifar(CifarResNetBase):
    """Four-stage CIFAR ResNet; stage ``i`` has ``blocks[i]`` basic blocks of width ``64·2^i``.

    ``(B, in_channels, H, W) -> (B, num_classes)``; the head ``linear`` sees a 512-d feature.
    """

    head = "linear"
    shortcut_name = "shortcut"

    def __init__(self, num_classes: int, in_channels: int = 3, *, blocks: Sequence[int]) -> None:
        super().__init__(num_classes, in_channels, widths=(64, 128, 256, 512), blocks=blocks)


register_variants(
    ResNetCifar,
    {
        "resnet18": {"blocks": (2, 2, 2, 2)},
        "resnet34": {"blocks": (3, 4, 6, 3)},
    },
)
