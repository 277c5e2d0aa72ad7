"""RepDistiller's CIFAR ResNets: resnet8 to resnet110 and the 4×-wide resnet8x4/resnet32x4.

Three stages of ``(depth - 2) / 6`` basic blocks with projection shortcuts named
``downsample`` and a head named ``fc``; He-normal (fan-out) initialisation.
"""

from __future__ import annotations

from dfkd.models._registry import register_variants
from dfkd.models.layers import kaiming_fan_out_
from dfkd.models.resnet_base import CifarResNetBase

__all__ = ["ResNet"]


class ResNet(CifarResNetBase):
    """RepDistiller ResNet of ``depth = 6n + 2`` layers.

    ``(B, in_channels, H, W) -> (B, num_classes)``; the head ``fc`` sees a ``widths[-1]``-d feature.

    Args:
        num_classes: Size of the output.
        in_channels: Channels of the input image.
        depth: Total number of weighted layers, ``6n + 2``.
        widths: Stem width, then the width of each of the three stages.
    """

    head = "fc"
    shortcut_name = "downsample"

    def __init__(
        self, num_classes: int, in_channels: int = 3, *, depth: int, widths: tuple[int, int, int, int]
    ) -> None:
        if (depth - 2) % 6 != 0:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (8, 14, 20, 32, ...), got {depth}")
        stem_width, *stage_widths = widths
        blocks = [(depth - 2) // 6] * 3
        super().__init__(num_classes, in_channels, widths=stage_widths, blocks=blocks, stem_width=stem_width)
        kaiming_fan_out_(self)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)

register_variants(
    ResNet,
    {
        **{f"resnet{depth}": {"depth": depth, "widths": _NARROW} for depth in (8, 14, 20, 32, 44, 56, 110)},
        "resnet8x4": {"depth": 8, "widths": _WIDE},
        "resnet32x4": {"depth": 32, "widths": _WIDE},
    },
)
