"""What a dataset is (:class:`DatasetSpec`) and where its files are (:func:`locate`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dfkd.data.archive import ARCHIVE_SUFFIXES, extract_once, is_archive
from dfkd.data.transforms import AUGMENTATIONS
from dfkd.errors import DatasetNotFoundError
from dfkd.registry import Registry

if TYPE_CHECKING:
    from dfkd.data.datasets import ImageDataset

__all__ = ["DATASETS", "DatasetSpec", "Expected", "LoadRequest", "locate"]


@dataclass(frozen=True)
class LoadRequest:
    """One call's arguments to a dataset loader.

    Attributes:
        root: the folder (or archive) the recipe names, made absolute.
        split: one of the spec's splits.
        download: whether the loader may download missing files.
        num_samples: how many images a generated dataset renders; real datasets
            ignore it (:func:`dfkd.data.build_dataset` subsets them afterwards).
    """

    root: Path
    split: str
    download: bool = False
    num_samples: int | None = None


Loader = Callable[["DatasetSpec", LoadRequest], "ImageDataset"]
Downloader = Callable[[Path, str], None]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the engine needs to know about a dataset besides its images.

    Attributes:
        name: the registry key.
        num_classes: label count; 0 in a registry entry means "one per class
            folder", filled in by :func:`dfkd.data.build_dataset`.
        in_channels: 1 or 3.
        image_size: side of the square images the dataset yields.
        mean, std: per-channel normalisation of images in ``[0, 1]``.
        augment: training augmentation, a key of :data:`dfkd.data.transforms.AUGMENTATIONS`.
        splits: the split names :func:`dfkd.data.build_dataset` accepts.
        how_to_get: one or two sentences telling a user where to get the files.
        load: builds the dataset for one split (see :class:`LoadRequest`).
        archives: archive names that, found in the root folder, are extracted
            once into the cache and searched.
        download: fetches missing files into a root folder, where possible.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    splits: tuple[str, ...]
    how_to_get: str
    load: Loader = field(repr=False, compare=False)
    archives: tuple[str, ...] = ()
    download: Downloader | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"{self.name}: {AUGMENTATIONS.unknown_message(self.augment)}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"{self.name}: mean and std need {self.in_channels} values each")


DATASETS: Registry[DatasetSpec] = Registry("datasets")


@dataclass(frozen=True)
class Expected:
    """Paths a dataset folder must hold, relative to it: all of ``paths``, or one of them with ``any_of``."""

    paths: tuple[str, ...]
    any_of: bool = False

    def found_in(self, folder: Path) -> bool:
        present = ((folder / p).exists() for p in self.paths)
        return any(present) if self.any_of else all(present)

    def describe(self) -> str:
        return (" or " if self.any_of else ", ").join(self.paths)


def locate(spec: DatasetSpec, request: LoadRequest, expected: Expected, subdirs: Sequence[str] = ("",)) -> Path:
    """The folder holding ``expected``, found under ``request.root``.

    Looks in ``root/<subdir>`` for each of ``subdirs`` (``""`` is the root
    itself). If ``root`` is an archive, or a folder holding one of
    ``spec.archives``, the archive is extracted once into the cache and searched
    the same way (and its single top-level folder, if it has one). Then, with
    ``request.download`` and a downloader, the files are downloaded into root.

    Raises:
        DatasetNotFoundError: naming every folder looked in, the files expected
            there and how to get them.
    """
    root = request.root
    looked: list[Path] = []

    def search(base: Path) -> Path | None:
        bases = [base]
        children = [c for c in base.iterdir() if not c.name.startswith(".")] if base.is_dir() else []
        if len(children) == 1 and children[0].is_dir():
            bases.append(children[0])
        for folder in (b / sub if sub else b for b in bases for sub in subdirs):
            looked.append(folder)
            if folder.is_dir() and expected.found_in(folder):
                return folder
        return None

    if root.is_file():
        if not is_archive(root):
            raise DatasetNotFoundError(
                f"{spec.name}: {root} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)}). "
                "Point data.root at the dataset's folder or archive."
            )
        found = search(extract_once(root))
    else:
        found = search(root)
        for name in spec.archives:
            if found is None and is_archive(root / name):
                found = search(extract_once(root / name))
    if found is None and request.download and spec.download is not None:
        spec.download(root, request.split)
        found = search(root)
    if found is not None:
        return found

    places = "\n".join(f"  {p}" for p in dict.fromkeys(looked or [root]))
    archives = f" (or {' or '.join(spec.archives)} in {root})" if spec.archives and not root.is_file() else ""
    if spec.download is None:
        fetch = ""
    elif request.download:
        fetch = " The download did not produce them."
    else:
        fetch = " Or set data.download=true to let torchvision download it (needs network access)."
    raise DatasetNotFoundError(
        f"{spec.name} ({request.split} split) not found. Looked in:\n{places}\n"
        f"for {expected.describe()}{archives}. {spec.how_to_get}{fetch}"
    )
