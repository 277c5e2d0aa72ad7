"""Datasets of uint8 images: in memory (:class:`TensorImageDataset`) or decoded per item (:class:`ImageFolderDataset`).

Every dataset yields ``(image, label)`` with ``image`` a uint8 tensor
``[C, H, W]`` at the dataset's image size, and exposes ``targets`` (int64
``[N]``) and ``classes`` so that curricula can select class-balanced subsets
without touching the images. Conversion to float, augmentation and
normalisation happen later, batched on the device (:mod:`dfkd.data.transforms`).
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dfkd.errors import DfkdError

__all__ = [
    "ImageDataset",
    "TensorImageDataset",
    "ImageFolderDataset",
    "resize_images",
    "stratified_indices",
]

_DECODE_BATCH = 256
_PARALLEL_DECODE_MIN = 2048  # below this many images, worker start-up costs more than it saves


class ImageDataset(Dataset[tuple[Tensor, int]], ABC):
    """A labelled image dataset: ``dataset[i] -> (uint8 [C, H, W], int label)``.

    Attributes:
        targets: int64 ``[N]``, the label of every item.
        classes: class names; label ``k`` is ``classes[k]``.
    """

    targets: Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.targets)

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[Tensor, int]: ...

    @property
    @abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""

    @abstractmethod
    def subset(self, indices: Tensor) -> ImageDataset:
        """The items at ``indices`` (int64 ``[M]``), in that order."""

    @abstractmethod
    def in_memory(self) -> TensorImageDataset:
        """This dataset with every image decoded into one tensor (itself if already in memory)."""

    @property
    def decoded_nbytes(self) -> int:
        """Bytes the images take once decoded: ``N * C * H * W``."""
        return len(self) * math.prod(self.image_shape)


class TensorImageDataset(ImageDataset):
    """Images held in memory as one uint8 tensor.

    Args:
        images: uint8 ``[N, C, H, W]``.
        targets: integer labels ``[N]``.
        classes: class names; defaults to ``"0", "1", ...`` up to the largest label.
    """

    def __init__(self, images: Tensor, targets: Tensor, classes: Sequence[str] | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        targets = torch.as_tensor(targets, dtype=torch.long)
        if targets.shape != (len(images),):
            raise ValueError(f"targets must be [N] = [{len(images)}], got {list(targets.shape)}")
        self.images = images
        self.targets = targets
        self.classes = tuple(classes) if classes is not None else _numbered(targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.targets[index])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Tensor) -> TensorImageDataset:
        return TensorImageDataset(self.images[indices], self.targets[indices], self.classes)

    def in_memory(self) -> TensorImageDataset:
        return self


class ImageFolderDataset(ImageDataset):
    """Image files decoded on access, converted to ``in_channels`` and fitted to ``image_size``.

    A file whose size differs is resized (bilinear, antialiased) after a centre
    crop to a square, so non-square images are not distorted.

    Args:
        files: one path per item.
        targets: integer labels ``[N]``.
        classes: class names, label order.
        image_size: side ``S`` of the square images returned.
        in_channels: 1 (greyscale) or 3 (RGB).
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        targets: Tensor,
        classes: Sequence[str],
        image_size: int,
        in_channels: int = 3,
    ) -> None:
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        self.files = [str(f) for f in files]
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        if self.targets.shape != (len(self.files),):
            raise ValueError(f"targets must be [N] = [{len(self.files)}], got {list(self.targets.shape)}")
        self.classes = tuple(classes)
        self.image_size = image_size
        self.in_channels = in_channels

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.decode(self.files[index]), int(self.targets[index])

    def decode(self, file: str) -> Tensor:
        """One image file as uint8 ``[C, S, S]``."""
        try:
            with Image.open(file) as img:
                img = img.convert("L" if self.in_channels == 1 else "RGB")
                if img.size != (self.image_size, self.image_size):
                    img = ImageOps.fit(img, (self.image_size, self.image_size), Image.Resampling.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
        except OSError as exc:
            raise DfkdError(f"cannot decode image {file}: {exc}") from None
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    def subset(self, indices: Tensor) -> ImageFolderDataset:
        files = [self.files[i] for i in indices.tolist()]
        return ImageFolderDataset(files, self.targets[indices], self.classes, self.image_size, self.in_channels)

    def in_memory(self, num_workers: int | None = None) -> TensorImageDataset:
        """Decode every file once, in parallel loader processes for larger datasets.

        Args:
            num_workers: decoding processes; by default up to 4 when there are at
                least ``_PARALLEL_DECODE_MIN`` files, else decode in this process.
        """
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1) if len(self) >= _PARALLEL_DECODE_MIN else 0
        images = torch.empty((len(self), *self.image_shape), dtype=torch.uint8)
        loader = DataLoader(self, batch_size=_DECODE_BATCH, num_workers=num_workers)
        for start, (batch, _) in zip(range(0, len(self), _DECODE_BATCH), loader):
            images[start : start + len(batch)] = batch
        return TensorImageDataset(images, self.targets, self.classes)


def resize_images(images: Tensor, size: int) -> Tensor:
    """Resize uint8 ``[N, C, H, W]`` to ``[N, C, size, size]`` (bilinear, antialiased, rounded).

    Returns ``images`` itself when it already has that size.
    """
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, len(images), 4096):  # bounds the float copy's memory
        chunk = images[start : start + 4096].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + len(chunk)] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def stratified_indices(targets: Tensor, num_samples: int, seed: int) -> Tensor:
    """A seeded subset of ``num_samples`` indices that keeps every class's share.

    Each class gets ``num_samples * n_c / N`` items rounded by largest remainder
    (ties to the lower label), drawn uniformly without replacement.

    Args:
        targets: int64 labels ``[N]``.
        num_samples: subset size, at most ``N``.
        seed: the draw's seed; the global RNG is not touched.

    Returns:
        int64 ``[num_samples]`` indices in increasing order.
    """
    if not 0 < num_samples <= len(targets):
        raise ValueError(f"num_samples must be in [1, {len(targets)}], got {num_samples}")
    labels, counts = torch.unique(targets, return_counts=True)
    exact = counts.double() * num_samples / len(targets)
    quota = exact.floor().long()
    short = num_samples - int(quota.sum())
    by_remainder = sorted(range(len(labels)), key=lambda c: (-float(exact[c] - quota[c]), c))
    quota[by_remainder[:short]] += 1
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for label, k in zip(labels.tolist(), quota.tolist()):
        members = (targets == label).nonzero(as_tuple=True)[0]
        chosen.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.cat(chosen).sort().values


def _numbered(targets: Tensor) -> tuple[str, ...]:
    return tuple(str(k) for k in range(int(targets.max()) + 1 if len(targets) else 0))
