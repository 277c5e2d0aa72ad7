"""RepDistiller's VGG-BN for CIFAR: ``vgg8_bn`` to ``vgg19_bn``, without the fully connected layers.

Five conv-BN-ReLU blocks ``block0..4`` (conv biases kept), 2×2 max pooling after
the first three, global average pooling and a single ``classifier``. The pool
between ``block3`` and ``block4`` is applied only to 64×64 inputs, so a 32×32
image reaches ``block4`` at 4×4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.models._registry import register_variants
from dfkd.models.layers import global_avg_pool, kaiming_fan_out_

__all__ = ["VGG"]


def conv_bn_relu_stack(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """``len(widths)`` of 3×3 conv (with bias), batch norm, ReLU, at constant resolution."""
    layers: list[nn.Module] = []
    for width in widths:
        conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG with batch norm: ``(B, in_channels, H, W) -> (B, num_classes)``.

    The head ``classifier`` sees a 512-d feature. Convs use He-normal (fan-out)
    initialisation and the classifier N(0, 0.01²) with zero bias, as in the reference.

    Args:
        num_classes: Size of the output.
        in_channels: Channels of the input image.
        blocks: Conv widths of each of the five blocks.
    """

    head = "classifier"

    def __init__(self, num_classes: int, in_channels: int = 3, *, blocks: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if len(blocks) != 5:
            raise ValueError(f"VGG has five blocks, got {len(blocks)}")
        for i, widths in enumerate(blocks):
            self.add_module(f"block{i}", conv_bn_relu_stack(in_channels, widths))
            in_channels = widths[-1]
        self.classifier = nn.Linear(in_channels, num_classes)
        kaiming_fan_out_(self)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W) -> (B, num_classes)``."""
        pool_before_last = x.shape[-2] == 64
        x = F.max_pool2d(self.block0(x), 2)
        x = F.max_pool2d(self.block1(x), 2)
        x = F.max_pool2d(self.block2(x), 2)
        x = self.block3(x)
        if pool_before_last:
            x = F.max_pool2d(x, 2)
        return self.classifier(global_avg_pool(self.block4(x)))


register_variants(
    VGG,
    {
        "vgg8_bn": {"blocks": ((64,), (128,), (256,), (512,), (512,))},
        "vgg11_bn": {"blocks": ((64,), (128,), (256,) * 2, (512,) * 2, (512,) * 2)},
        "vgg13_bn": {"blocks": ((64,) * 2, (128,) * 2, (256,) * 2, (512,) * 2, (512,) * 2)},
        "vgg16_bn": {"blocks": ((64,) * 2, (128,) * 2, (256,) * 3, (512,) * 3, (512,) * 3)},
        "vgg19_bn": {"blocks": ((64,) * 2, (128,) * 2, (256,) * 4, (512,) * 4, (512,) * 4)},
    },
)
