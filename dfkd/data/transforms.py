"""Batched image transforms that run on the device after the uint8 batch arrives.

Datasets hand out uint8 images. The engine turns a batch into floats with
:func:`to_unit`, augments it with :func:`build_augmentation` and normalises it
with :class:`Normalize`, all on the device and all batched. The augmentations
are kornia modules, which draw their parameters from torch's global RNG, so a
seeded run replays the same crops and flips.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from dfkd.registry import Registry

__all__ = ["AUGMENTATIONS", "Normalize", "to_unit", "build_augmentation"]

AUGMENTATIONS: Registry[Callable[[int], nn.Module]] = Registry("augmentations")


def to_unit(images: Tensor) -> Tensor:
    """uint8 images ``[..., C, H, W]`` in ``[0, 255]`` to float32 in ``[0, 1]``, same shape and device."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_unit expects uint8 images, got {images.dtype}")
    return images.to(torch.float32).div_(255)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for float images ``[B, C, H, W]`` in ``[0, 1]``.

    ``mean`` and ``std`` are buffers, so the module follows ``.to(device)`` and
    is saved with the model that owns it.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"normalisation mean has {len(mean)} values but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"normalisation std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` in ``[0, 1]`` to normalised ``[B, C, H, W]``."""
        return (x - self.mean) / self.std

    def inverse(self, x: Tensor) -> Tensor:
        """Normalised ``x [B, C, H, W]`` back to ``[0, 1]`` (clamped), e.g. for image grids."""
        return (x * self.std + self.mean).clamp(0, 1)

    def extra_repr(self) -> str:
        mean, std = (tuple(round(v, 4) for v in t.flatten().tolist()) for t in (self.mean, self.std))
        return f"mean={mean}, std={std}"


@AUGMENTATIONS.register("none")
def _none(image_size: int) -> nn.Module:
    return nn.Identity()


@AUGMENTATIONS.register("crop")
def _crop(image_size: int) -> nn.Module:
    """Pad by 4 pixels and crop back at a random offset; no flip (digits are not mirror-symmetric)."""
    return nn.Sequential(K.RandomCrop((image_size, image_size), padding=4))


@AUGMENTATIONS.register("affine")
def _affine(image_size: int) -> nn.Module:
    """For digits: a small random rotation (±15°), shift (±10%), scale (0.85 to 1.15) and shear (±10°); no flip."""
    return nn.Sequential(K.RandomAffine(degrees=15.0, translate=(0.1, 0.1), scale=(0.85, 1.15), shear=10.0, p=1.0))


@AUGMENTATIONS.register("crop_flip")
def _crop_flip(image_size: int) -> nn.Module:
    """The CIFAR recipe: pad-4 random crop, then a horizontal flip with probability 0.5."""
    return nn.Sequential(K.RandomCrop((image_size, image_size), padding=4), K.RandomHorizontalFlip())


@AUGMENTATIONS.register("resized_crop_flip")
def _resized_crop_flip(image_size: int) -> nn.Module:
    """For larger images: a random crop of 25-100% of the area, resized back, then a horizontal flip."""
    return nn.Sequential(
        K.RandomResizedCrop((image_size, image_size), scale=(0.25, 1.0)),
        K.RandomHorizontalFlip(),
    )


def build_augmentation(kind: str, image_size: int) -> nn.Module:
    """The training augmentation ``kind`` for square images of side ``image_size``.

    The module maps float images ``[B, C, S, S]`` in ``[0, 1]`` to the same shape.
    Its randomness comes from torch's global RNG (seed it to replay a run).
    """
    return AUGMENTATIONS.get(kind)(image_size)
