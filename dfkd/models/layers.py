"""Small pieces shared by several families of the zoo."""

from __future__ import annotations

import einops
from torch import Tensor, nn

__all__ = ["conv3x3", "global_avg_pool", "kaiming_fan_out_"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3×3 convolution without bias, padded so that only ``stride`` changes the resolution."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def global_avg_pool(x: Tensor) -> Tensor:
    """Average over space: ``(B, C, H, W) -> (B, C)``."""
    return einops.reduce(x, "b c h w -> b c", "mean")


def kaiming_fan_out_(model: nn.Module) -> None:
    """RepDistiller's initialisation of the convolutions and batch norms of ``model``, in place.

    Conv weights are drawn from N(0, 2 / (k·k·out_channels)) (He normal, fan-out
    mode), conv biases are zeroed, and batch norms start as the identity. Linear
    layers are left alone: each family initialises its own head.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
