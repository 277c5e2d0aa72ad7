"""The datasets the engine knows, and :func:`build_dataset`, the one way to load them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dfkd.data.datasets import ImageDataset, ImageFolderDataset, TensorImageDataset, resize_images, stratified_indices
from dfkd.data.formats import read_cifar, read_idx, read_svhn, read_tiny_imagenet_val, scan_class_folders
from dfkd.data.digits import DIGIT_CLASSES, render_digits
from dfkd.data.procedural import PROCEDURAL_CLASSES, render_procedural
from dfkd.data.safe_pickle import load_cifar_pickle
from dfkd.data.spec import DATASETS, DatasetSpec, Downloader, Expected, LoadRequest, Loader, locate
from dfkd.errors import ConfigError, DatasetNotFoundError
from dfkd.registry import close_matches

__all__ = ["DIGITS_SIZES", "IN_MEMORY_BYTES", "PROCEDURAL_SIZES", "build_dataset", "check_dataset"]

IN_MEMORY_BYTES = 1 << 30  # a split whose decoded images fit in this is decoded once and kept in memory

# Three epochs of 10,000 training images fill the quickstart's two-minute teacher
# budget on two CPU cores; more images would mean fewer passes, fewer would overfit
# the longer recipes. 2,000 test images measure accuracy to +-0.6 points (one
# standard error at 92%) and evaluate in about two seconds on a CPU.
PROCEDURAL_SIZES = {"train": 10_000, "test": 2_000}
_PROCEDURAL_SEEDS = {"train": 0, "test": 1}
# The digits: 30,000 training images keep a LeNet-5 teacher's few epochs within the quickstart's first
# minute; 5,000 test images measure agreement to +-0.3 points (one standard error at 95%).
DIGITS_SIZES = {"train": 30_000, "test": 5_000}
_DIGITS_SEEDS = {"train": 0, "test": 1}

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def build_dataset(
    name: str,
    root: str | Path,
    split: str,
    *,
    download: bool = False,
    image_size: int | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    in_memory: bool | None = None,
) -> tuple[DatasetSpec, ImageDataset]:
    """Load one split of a registered dataset.

    Args:
        name: a key of :data:`DATASETS`.
        root: the dataset's folder, a folder holding its archive, or the archive.
        split: one of the spec's ``splits``.
        download: let torchvision download missing files (where it can).
        image_size: serve images at this side instead of the spec's.
        num_samples: a class-stratified subset of this size, drawn with ``seed``
            (all items if the split is smaller). Generated datasets render
            exactly this many images instead.
        seed: the subset's seed. Dataset contents never depend on it, so runs
            with different seeds evaluate on the same test set.
        in_memory: decode every image once into a tensor; by default, when the
            decoded split takes at most :data:`IN_MEMORY_BYTES`.

    Returns:
        The spec, updated for ``image_size`` and (for generic image folders) the
        class count found, and the dataset.

    Raises:
        RegistryError: unknown ``name``.
        ConfigError: unknown ``split``, or a non-positive size.
        DatasetNotFoundError: the files are not there; the message says where
            it looked and how to get them.
    """
    spec = DATASETS.get(name)
    if split not in spec.splits:
        close = close_matches(split, spec.splits)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"dataset {name!r} has no split {split!r}.{hint} Its splits: {', '.join(spec.splits)}.")
    for key, value in (("image_size", image_size), ("num_samples", num_samples)):
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}.")
    if image_size is not None:
        spec = replace(spec, image_size=image_size)

    request = LoadRequest(Path(root).expanduser().absolute(), split, download, num_samples)
    dataset = spec.load(spec, request)
    if spec.num_classes == 0:
        spec = replace(spec, num_classes=len(dataset.classes))
    elif len(dataset.classes) != spec.num_classes:
        raise DatasetNotFoundError(
            f"{name} has {spec.num_classes} classes, but the {split} split under {request.root} has "
            f"{len(dataset.classes)}: {', '.join(dataset.classes[:12])}{' ...' if len(dataset.classes) > 12 else ''}. "
            "Is data.root pointing at another dataset?"
        )
    if num_samples is not None and num_samples < len(dataset):
        dataset = dataset.subset(stratified_indices(dataset.targets, num_samples, seed))
    if in_memory is None:
        in_memory = dataset.decoded_nbytes <= IN_MEMORY_BYTES
    if in_memory:
        dataset = dataset.in_memory()
    return spec, dataset


def check_dataset(name: str) -> None:
    """Check a recipe's ``data.name`` against the registered datasets.

    Raises:
        ConfigError: ``name`` is not registered; the message lists the close matches.
    """
    if name not in DATASETS:
        raise ConfigError(f"data.name: {DATASETS.unknown_message(name)}")


def _torchvision_download(dataset: str, split_kwarg: str) -> Downloader:
    """A downloader calling ``torchvision.datasets.<dataset>(root, download=True)`` for one split.

    ``split_kwarg`` is ``"train"`` (a bool argument) or ``"split"`` (the split name).
    """

    def download(root: Path, split: str) -> None:
        import torchvision.datasets

        root.mkdir(parents=True, exist_ok=True)
        kwargs = {"train": split == "train"} if split_kwarg == "train" else {"split": split}
        try:
            getattr(torchvision.datasets, dataset)(str(root), download=True, **kwargs)
        except (OSError, RuntimeError) as exc:
            raise DatasetNotFoundError(f"downloading {dataset} into {root} failed: {exc}") from None

    return download


def _idx_loader(folder: str, classes: tuple[str, ...]) -> Loader:
    """torchvision's MNIST layout: ``<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.

    The 28x28 digits are resized once to the spec's image size (32 for LeNet-5).
    """

    def load(spec: DatasetSpec, request: LoadRequest) -> ImageDataset:
        prefix = "train" if request.split == "train" else "t10k"
        names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
        where = locate(spec, request, Expected(names), subdirs=(f"{folder}/raw", "raw", ""))
        images = read_idx(where / names[0]).unsqueeze(1)
        return TensorImageDataset(resize_images(images, spec.image_size), read_idx(where / names[1]), classes)

    return load


def _cifar_loader(folder: str, files: dict[str, tuple[str, ...]], label_key: str, meta: tuple[str, str]) -> Loader:
    """torchvision's CIFAR layout: pickled batches in ``<root>/<folder>/``.

    Class names come from the ``meta`` file (``(file, key)``) when it is there.
    """

    def load(spec: DatasetSpec, request: LoadRequest) -> ImageDataset:
        names = files[request.split]
        where = locate(spec, request, Expected(names), subdirs=(folder, ""))
        images, targets = read_cifar([where / n for n in names], label_key)
        classes = tuple(load_cifar_pickle(where / meta[0])[meta[1]]) if (where / meta[0]).is_file() else None
        return TensorImageDataset(resize_images(images, spec.image_size), targets, classes)

    return load


def _load_svhn(spec: DatasetSpec, request: LoadRequest) -> ImageDataset:
    """torchvision's SVHN layout: ``<root>/{train,test,extra}_32x32.mat``."""
    name = f"{request.split}_32x32.mat"
    where = locate(spec, request, Expected((name,)), subdirs=("", "svhn", "SVHN"))
    images, targets = read_svhn(where / name)
    return TensorImageDataset(resize_images(images, spec.image_size), targets, _DIGITS)


def _folder_loader(split_dirs: dict[str, tuple[str, ...]], subdirs: tuple[str, ...] = ("",)) -> Loader:
    """``<root>/<split>/<class>/<image>``; a split is the first of its ``split_dirs`` folders present."""

    def load(spec: DatasetSpec, request: LoadRequest) -> ImageDataset:
        candidates = split_dirs[request.split]
        where = locate(spec, request, Expected(candidates, any_of=True), subdirs)
        split_dir = next(where / c for c in candidates if (where / c).is_dir())
        files, targets, classes = scan_class_folders(split_dir)
        return ImageFolderDataset(files, targets, classes, spec.image_size, spec.in_channels)

    return load


def _load_tiny_imagenet(spec: DatasetSpec, request: LoadRequest) -> ImageDataset:
    """Tiny-ImageNet-200: ``train/<wnid>/images/*.JPEG``; ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``.

    Labels follow the sorted ``wnids.txt``, which is torchvision ``ImageFolder``'s
    order on ``train/`` (so teachers trained that way keep their class indices).
    The official test images are unlabelled, so the ``test`` split is ``val``.
    """
    train = request.split == "train"
    expected = ("wnids.txt", "train") if train else ("wnids.txt", "val/val_annotations.txt", "val/images")
    where = locate(spec, request, Expected(expected), subdirs=("", "tiny-imagenet-200"))
    classes = tuple(sorted((where / "wnids.txt").read_text().split()))
    if train:
        files, targets, _ = scan_class_folders(where / "train", classes)
    else:
        files, targets = read_tiny_imagenet_val(where / "val", classes)
    return ImageFolderDataset(files, targets, classes, spec.image_size, spec.in_channels)


def _load_digits(spec: DatasetSpec, request: LoadRequest) -> ImageDataset:
    """Rendered on the fly from fonts (:mod:`dfkd.data.digits`); the root folder is not used."""
    count = request.num_samples or DIGITS_SIZES[request.split]
    images, targets = render_digits(count, spec.image_size, _DIGITS_SEEDS[request.split])
    return TensorImageDataset(images, targets, DIGIT_CLASSES)


def _load_procedural(spec: DatasetSpec, request: LoadRequest) -> ImageDataset:
    """Rendered on the fly (:mod:`dfkd.data.procedural`); the root folder is not used."""
    count = request.num_samples or PROCEDURAL_SIZES[request.split]
    images, targets = render_procedural(count, spec.image_size, _PROCEDURAL_SEEDS[request.split])
    return TensorImageDataset(images, targets, PROCEDURAL_CLASSES)


_DIGITS = tuple(str(d) for d in range(10))
_CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

for _spec in (
    DatasetSpec(
        name="procedural", num_classes=10, in_channels=3, image_size=32,
        mean=(0.3272, 0.3267, 0.3259), std=(0.2400, 0.2392, 0.2397), augment="crop_flip", splits=("train", "test"),
        how_to_get="It is generated from a fixed seed and needs no files.", load=_load_procedural,
    ),
    DatasetSpec(
        name="digits", num_classes=10, in_channels=1, image_size=32, mean=(0.2026,), std=(0.3276,), augment="affine",
        splits=("train", "test"), load=_load_digits,
        how_to_get="It is rendered from a fixed seed with the fonts that ship with matplotlib and Pillow; no files.",
    ),
    DatasetSpec(
        name="mnist", num_classes=10, in_channels=1, image_size=32, mean=(0.1307,), std=(0.3081,), augment="none",
        splits=("train", "test"), load=_idx_loader("MNIST", _DIGITS),
        how_to_get="Copy torchvision's MNIST folder (MNIST/raw/*-ubyte) under data.root.",
        download=_torchvision_download("MNIST", "train"),
    ),
    DatasetSpec(
        name="fashion_mnist", num_classes=10, in_channels=1, image_size=32, mean=(0.2860,), std=(0.3530,),
        augment="none", splits=("train", "test"), load=_idx_loader("FashionMNIST", _FASHION_CLASSES),
        how_to_get="Copy torchvision's FashionMNIST folder (FashionMNIST/raw/*-ubyte) under data.root.",
        download=_torchvision_download("FashionMNIST", "train"),
    ),
    DatasetSpec(
        name="cifar10", num_classes=10, in_channels=3, image_size=32, mean=_CIFAR10_MEAN, std=_CIFAR10_STD,
        augment="crop_flip", splits=("train", "test"), archives=("cifar-10-python.tar.gz",),
        load=_cifar_loader("cifar-10-batches-py", _CIFAR10_FILES, "labels", ("batches.meta", "label_names")),
        how_to_get="Get https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz; point data.root at it or its folder.",
        download=_torchvision_download("CIFAR10", "train"),
    ),
    DatasetSpec(
        name="cifar100", num_classes=100, in_channels=3, image_size=32,
        mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761), augment="crop_flip", splits=("train", "test"),
        archives=("cifar-100-python.tar.gz",),
        load=_cifar_loader(
            "cifar-100-python", {"train": ("train",), "test": ("test",)}, "fine_labels", ("meta", "fine_label_names")
        ),
        how_to_get="Get https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz; point data.root at it or its folder.",
        download=_torchvision_download("CIFAR100", "train"),
    ),
    DatasetSpec(
        name="svhn", num_classes=10, in_channels=3, image_size=32,
        mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), augment="crop", splits=("train", "test", "extra"),
        load=_load_svhn, download=_torchvision_download("SVHN", "split"),
        how_to_get="Get {train,test,extra}_32x32.mat from http://ufldl.stanford.edu/housenumbers/ into data.root.",
    ),
    DatasetSpec(
        name="imagefolder", num_classes=0, in_channels=3, image_size=32, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
        augment="crop_flip", splits=("train", "val", "test"),
        load=_folder_loader({"train": ("train",), "val": ("val", "valid"), "test": ("test", "val", "valid")}),
        how_to_get="Arrange the images as <root>/<split>/<class>/<image>; sorted class folders give the label order.",
    ),
    DatasetSpec(
        name="cinic10", num_classes=10, in_channels=3, image_size=32,
        mean=(0.4789, 0.4723, 0.4305), std=(0.2421, 0.2383, 0.2587), augment="crop_flip",
        splits=("train", "valid", "test"), archives=("CINIC-10.tar.gz",),
        load=_folder_loader({s: (s,) for s in ("train", "valid", "test")}, subdirs=("", "CINIC-10", "cinic-10")),
        how_to_get="Get CINIC-10.tar.gz from https://datashare.ed.ac.uk/handle/10283/3192; "
        "point data.root at it or its folder.",
    ),
    DatasetSpec(
        name="tiny_imagenet", num_classes=200, in_channels=3, image_size=64,
        mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262), augment="resized_crop_flip",
        splits=("train", "val", "test"), archives=("tiny-imagenet-200.zip",), load=_load_tiny_imagenet,
        how_to_get="Get http://cs231n.stanford.edu/tiny-imagenet-200.zip and point data.root at it or at its folder.",
    ),
    DatasetSpec(
        name="cifar10_jpeg", num_classes=10, in_channels=3, image_size=32, mean=_CIFAR10_MEAN, std=_CIFAR10_STD,
        augment="crop_flip", splits=("train", "test"), archives=("cifar10-jpeg.tar.gz",),
        load=_folder_loader({"train": ("train",), "test": ("test",)}, subdirs=("", "cifar10-jpeg")),
        how_to_get="cifar10-jpeg.tar.gz (CIFAR-10 as JPEG, q75) is in the project's ../shared/datasets; "
        "point data.root at that folder or the archive.",
    ),
):
    DATASETS.register(_spec.name, _spec)
del _spec
