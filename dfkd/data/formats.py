"""Readers for the on-disk formats: idx (MNIST), pickled batches (CIFAR), ``.mat`` (SVHN), image folders.

Each reader takes paths that are known to exist and returns plain tensors or
file lists; locating the files and turning them into datasets is
:mod:`dfkd.data.catalog`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dfkd.data.safe_pickle import load_cifar_pickle
from dfkd.errors import DfkdError

__all__ = [
    "IMAGE_EXTENSIONS",
    "read_idx",
    "read_cifar",
    "read_svhn",
    "scan_class_folders",
    "read_tiny_imagenet_val",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}  # idx type code -> numpy


def read_idx(path: Path) -> Tensor:
    """An idx file (``magic = 0x0000 <dtype> <ndim>``, big-endian int32 dims, data) as a tensor of its shape."""
    raw = path.read_bytes()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise DfkdError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)) * dtype.itemsize:
        raise DfkdError(f"{path} is truncated: its header says {shape}, but {len(raw) - offset} data bytes follow")
    array = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def read_cifar(files: Sequence[Path], label_key: str) -> tuple[Tensor, Tensor]:
    """Concatenate pickled CIFAR batches (read with the restricted unpickler).

    Args:
        files: batch files, e.g. ``data_batch_1`` ... ``data_batch_5``.
        label_key: ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100).

    Returns:
        images: uint8 ``[N, 3, 32, 32]``; targets: int64 ``[N]``.
    """
    images, targets = [], []
    for file in files:
        batch = load_cifar_pickle(file)
        data = batch.get("data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DfkdError(f"{file} has no uint8 'data' array of shape [N, 3072]")
        if label_key not in batch or len(batch[label_key]) != len(data):
            raise DfkdError(f"{file} has no {label_key!r} list with one label per image")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        targets.append(torch.as_tensor(batch[label_key], dtype=torch.long))
    return torch.cat(images), torch.cat(targets)


def read_svhn(path: Path) -> tuple[Tensor, Tensor]:
    """An SVHN ``*_32x32.mat`` file: ``X`` is ``[32, 32, 3, N]``, ``y`` is ``[N, 1]`` with 10 meaning digit 0.

    Returns:
        images: uint8 ``[N, 3, 32, 32]``; targets: int64 ``[N]`` in ``[0, 10)``.
    """
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DfkdError("reading SVHN's .mat files needs scipy: pip install scipy") from None
    mat = loadmat(str(path), variable_names=("X", "y"))
    if "X" not in mat or "y" not in mat:
        raise DfkdError(f"{path} has no 'X' and 'y' arrays; is it an SVHN *_32x32.mat file?")
    images = torch.from_numpy(np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1), dtype=np.uint8))
    targets = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1)) % 10
    return images, targets


def scan_class_folders(
    split_dir: Path, classes: Sequence[str] | None = None
) -> tuple[list[Path], Tensor, tuple[str, ...]]:
    """List the images of a ``<split_dir>/<class>/**/<image>`` tree.

    Args:
        split_dir: the folder holding one subfolder per class.
        classes: the class folders in label order; by default every subfolder,
            sorted by name (torchvision's ``ImageFolder`` order).

    Returns:
        files (sorted within each class), int64 targets ``[N]``, class names.
    """
    if classes is None:
        classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            raise DfkdError(f"class folder {folder} is missing")
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        files += found
        labels += [label] * len(found)
    if not files:
        raise DfkdError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under {split_dir}")
    return files, torch.tensor(labels, dtype=torch.long), tuple(classes)


def read_tiny_imagenet_val(val_dir: Path, classes: Sequence[str]) -> tuple[list[Path], Tensor]:
    """Tiny-ImageNet's ``val/``: flat ``images/*.JPEG`` labelled by ``val_annotations.txt``.

    Each annotation line is ``<file> <wnid> <x0> <y0> <x1> <y1>``, tab-separated.

    Returns:
        files (sorted by name) and int64 targets ``[N]`` indexing ``classes``.
    """
    index = {wnid: k for k, wnid in enumerate(classes)}
    annotations = val_dir / "val_annotations.txt"
    labelled: dict[str, int] = {}
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise DfkdError(
                f"{annotations} line {number}: expected '<file>\\t<wnid>\\t...' with a wnid of wnids.txt, got {line!r}"
            )
        labelled[fields[0]] = index[fields[1]]
    names = sorted(labelled)
    missing = [n for n in names if not (val_dir / "images" / n).is_file()]
    if missing:
        raise DfkdError(f"{len(missing)} images listed in {annotations} are missing, e.g. {missing[0]}")
    return [val_dir / "images" / n for n in names], torch.tensor([labelled[n] for n in names], dtype=torch.long)
