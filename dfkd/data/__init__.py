"""The data layer: dataset specs, uint8 image datasets and batched device transforms.

``build_dataset(name, root, split)`` returns a :class:`DatasetSpec` (classes,
channels, image size, normalisation, augmentation) and an :class:`ImageDataset`
whose items are ``(uint8 [C, H, W], label)``. Float conversion, augmentation and
normalisation run later on the device, batched (:mod:`dfkd.data.transforms`).

Registered datasets: ``procedural`` and ``digits`` (generated, no files), ``mnist``,
``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn``, ``imagefolder``,
``cinic10``, ``tiny_imagenet`` and ``cifar10_jpeg``.
"""

from dfkd.data.catalog import IN_MEMORY_BYTES, PROCEDURAL_SIZES, build_dataset, check_dataset
from dfkd.data.datasets import ImageDataset, ImageFolderDataset, TensorImageDataset, stratified_indices
from dfkd.data.spec import DATASETS, DatasetSpec, LoadRequest

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "IN_MEMORY_BYTES",
    "ImageDataset",
    "ImageFolderDataset",
    "LoadRequest",
    "PROCEDURAL_SIZES",
    "TensorImageDataset",
    "build_dataset",
    "check_dataset",
    "stratified_indices",
]
