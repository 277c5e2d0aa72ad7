"""RepDistiller's MobileNetV2 for 32×32 inputs: ``mobilenetv2`` (width 1) and ``mobilenetv2_half``.

``mobilenetv2_half`` is RepDistiller's ``mobile_half`` (width 0.5).

Differences from the ImageNet network, kept because released checkpoints
depend on them: ReLU instead of ReLU6, an expansion 1×1 conv even in the first
block (expansion 1), stride 1 in the second stage so that a 32×32 image ends at
2×2, and a head ``classifier`` that is a one-layer ``nn.Sequential``.
"""

from __future__ import annotations

from torch import Tensor, nn

from dfkd.models._registry import register_variants
from dfkd.models.layers import global_avg_pool, kaiming_fan_out_

__all__ = ["MobileNetV2"]

# (output channels at width 1, blocks, stride of the first block); the first stage has expansion 1.
_STAGES = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    """A bias-free conv, batch norm and ReLU, padded so that only ``stride`` changes the resolution."""
    padding = kernel_size // 2
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class InvertedResidual(nn.Module):
    """Expand (1×1), depthwise 3×3, project (1×1, linear), held as ``conv``.

    ``(B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)``, with
    a residual connection where the shapes agree.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            *conv_bn_relu(in_channels, hidden, 1),
            *conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2: ``(B, in_channels, H, W) -> (B, num_classes)``, total stride 16.

    The head ``classifier`` sees a 1280-d feature (``1280·width`` above width 1).
    Convs use He-normal (fan-out) initialisation and the classifier N(0, 0.01²)
    with zero bias, as in the reference.

    Args:
        num_classes: Size of the output.
        in_channels: Channels of the input image.
        width: Channel multiplier of the stem and the inverted-residual stages.
        expansion: Expansion factor of every stage but the first.
    """

    head = "classifier"

    def __init__(
        self, num_classes: int, in_channels: int = 3, *, width: float = 1.0, expansion: int = 6
    ) -> None:
        super().__init__()
        channels = int(32 * width)
        self.conv1 = nn.Sequential(*conv_bn_relu(in_channels, channels, 3, stride=2))
        self.blocks = nn.ModuleList()
        for index, (base_channels, depth, stride) in enumerate(_STAGES):
            out_channels = int(base_channels * width)
            stage_expansion = 1 if index == 0 else expansion
            stage: list[nn.Module] = []
            for i in range(depth):
                block = InvertedResidual(channels, out_channels, stride if i == 0 else 1, stage_expansion)
                stage.append(block)
                channels = out_channels
            self.blocks.append(nn.Sequential(*stage))
        last_channels = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(*conv_bn_relu(channels, last_channels, 1))
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        kaiming_fan_out_(self)
        nn.init.normal_(self.classifier[0].weight, std=0.01)
        nn.init.zeros_(self.classifier[0].bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W) -> (B, num_classes)``."""
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(global_avg_pool(self.conv2(x)))


register_variants(
    MobileNetV2,
    {
        "mobilenetv2": {"width": 1.0},
        "mobilenetv2_half": {"width": 0.5},
    },
)
