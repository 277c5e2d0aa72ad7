"""LeNet-5 and LeNet-5-half for 32×32 MNIST, as in DAFL, DFAD and CMI (``features`` and ``fc``)."""

from __future__ import annotations

import einops
from torch import Tensor, nn

from dfkd.models._registry import register_variants

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """Three 5×5 convs with ReLU (max pooling after the first two), then a two-layer MLP.

    ``(B, in_channels, 32, 32) -> (B, num_classes)``. The head ``fc`` sees the
    ``widths[2]``-d output of the last conv, which is 1×1 for a 32×32 input.
    PyTorch's default initialisation, as in the reference.

    Args:
        num_classes: Size of the output.
        in_channels: Channels of the input image.
        widths: Channels of the three convs, then the hidden width of the MLP.
    """

    head = "fc"

    def __init__(self, num_classes: int, in_channels: int = 3, *, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        c1, c2, c3, hidden = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(c2, c3, kernel_size=5),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Sequential(nn.Linear(c3, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, 32, 32) -> (B, num_classes)``."""
        return self.fc(einops.rearrange(self.features(x), "b c 1 1 -> b c"))


register_variants(
    LeNet5,
    {
        "lenet5": {"widths": (6, 16, 120, 84)},
        "lenet5_half": {"widths": (3, 8, 60, 42)},
    },
)
