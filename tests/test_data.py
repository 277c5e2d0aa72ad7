"""The data layer: every on-disk format, archives, the restricted unpickler, the procedural set, transforms.

Fixtures write tiny files in the real formats (idx, pickled CIFAR batches, SVHN
``.mat``, image folders, tarballs). Tests marked ``shared`` read the real copies
in ``../shared/datasets`` and are skipped where that folder is absent.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dfkd.data.archive as archive
from dfkd.data import ImageFolderDataset, TensorImageDataset, build_dataset, stratified_indices
from dfkd.data.digits import render_digits
from dfkd.data.procedural import render_procedural
from dfkd.data.safe_pickle import UnsafePickleError
from dfkd.data.transforms import Normalize, build_augmentation, to_unit
from dfkd.errors import ConfigError, DatasetNotFoundError
from dfkd.registry import RegistryError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test extracts archives into its own cache, never into ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("DFKD_CACHE_DIR", str(path))
    return path


# -- writers for the real on-disk formats


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file: magic ``00 00 08 <ndim>``, big-endian int32 dims, then uint8 data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def labelled_pixels(labels: list[int], shape: tuple[int, ...]) -> np.ndarray:
    """uint8 images ``[N, *shape]`` whose pixels all equal ``(10 * label + index) % 256`` (so each is identifiable)."""
    return np.stack([np.full(shape, (10 * y + i) % 256, dtype=np.uint8) for i, y in enumerate(labels)])


def write_pickle(path: Path, obj: object) -> None:
    """Pickle ``obj`` as the CIFAR files are: protocol 2, numpy's reconstructor under its numpy 1 name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def cifar_data(labels: list[int]) -> np.ndarray:
    """CIFAR's ``data``: uint8 ``[N, 3072]``, channel-major; red as in :func:`labelled_pixels`, green = 1, blue = 2."""
    data = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
    data[:, 0] = labelled_pixels(labels, (32, 32))
    data[:, 1], data[:, 2] = 1, 2
    return data.reshape(len(labels), -1)


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_class_tree(split_dir: Path, classes: tuple[str, ...], per_class: int, ext: str = ".png") -> None:
    """``<split_dir>/<class>/<nnnn><ext>``; class k's images are a flat grey of 20 * k."""
    for k, name in enumerate(classes):
        for i in range(per_class):
            write_image(split_dir / name / f"{i:04d}{ext}", (20 * k,) * 3)


def make_tarball(path: Path, source: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for item in sorted(source.iterdir()):
            tf.add(item, arcname=item.name)
    return path


# -- MNIST family, CIFAR, SVHN


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_datasets_load_in_torchvision_layout_and_resize_to_32(tmp_path: Path, name: str, folder: str) -> None:
    labels = [3, 1, 4, 1, 5, 9, 2, 6]
    raw = tmp_path / folder / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", labelled_pixels(labels, (28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.asarray(labels))

    spec, ds = build_dataset(name, tmp_path, "test")
    assert (spec.image_size, spec.in_channels, spec.num_classes) == (32, 1, 10)
    assert ds.images.shape == (8, 1, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.targets.tolist() == labels
    # a flat image stays flat through the bilinear resize: pixel = 10 * label + index
    assert [int(ds[i][0][0, 16, 16]) for i in range(8)] == [10 * y + i for i, y in enumerate(labels)]

    _, native = build_dataset(name, tmp_path, "test", image_size=28)
    assert torch.equal(native.images[:, 0], torch.from_numpy(labelled_pixels(labels, (28, 28))))


def test_mnist_resize_is_bilinear_antialiased_not_nearest(tmp_path: Path) -> None:
    stripes = np.zeros((1, 28, 28), dtype=np.uint8)
    stripes[:, :, ::2] = 255
    write_idx(tmp_path / "MNIST/raw/t10k-images-idx3-ubyte", stripes)
    write_idx(tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte", np.zeros(1))
    _, ds = build_dataset("mnist", tmp_path, "test")
    inner = ds.images[0, 0, 16, 1:-1].int()  # the edge columns are clamped
    assert (inner > 0).all() and (inner < 255).all(), "interpolated values between the stripes"


def test_cifar10_batches_load_channel_major_with_meta_class_names(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    train_labels = [[k % 10, (k + 3) % 10] for k in range(5)]
    for i, labels in enumerate(train_labels, start=1):
        batch = {"batch_label": f"batch {i}", "labels": labels, "data": cifar_data(labels), "filenames": ["a", "b"]}
        write_pickle(folder / f"data_batch_{i}", batch)
    write_pickle(folder / "test_batch", {"batch_label": "t", "labels": [7], "data": cifar_data([7]), "filenames": []})
    write_pickle(folder / "batches.meta", {"label_names": list(CIFAR10_CLASSES), "num_vis": 3072})

    spec, train = build_dataset("cifar10", tmp_path, "train")
    assert len(train) == 10 and train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    assert train.targets.tolist() == sum(train_labels, [])
    image, label = train[3]
    assert label == train_labels[1][1]
    assert image[0].unique().tolist() == [10 * label + 1] and image[1].unique().tolist() == [1]
    assert train.classes == CIFAR10_CLASSES and spec.mean == (0.4914, 0.4822, 0.4465)

    _, test = build_dataset("cifar10", tmp_path, "test")
    assert test.targets.tolist() == [7]


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    fine = [99, 0, 42]
    batch = {"filenames": ["x"] * 3, "batch_label": "train", "fine_labels": fine, "coarse_labels": [1, 2, 3]}
    write_pickle(folder / "train", {**batch, "data": cifar_data(fine)})
    spec, ds = build_dataset("cifar100", tmp_path, "train")
    assert spec.num_classes == 100
    assert ds.targets.tolist() == fine
    assert ds.classes == tuple(str(k) for k in range(100)), "numbered names without a meta file"


def test_svhn_mat_maps_label_10_to_digit_0(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io", reason="SVHN's .mat files need scipy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(32, 32, 3, 4), dtype=np.uint8)
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [9], [10]], dtype=np.uint8)})
    spec, ds = build_dataset("svhn", tmp_path, "test")
    assert spec.augment == "crop"
    assert ds.targets.tolist() == [0, 1, 9, 0]
    assert torch.equal(ds[2][0], torch.from_numpy(x[:, :, :, 2].transpose(2, 0, 1).copy()))


# -- image folders


def test_generic_imagefolder_sorts_classes_infers_count_and_falls_back_to_val(tmp_path: Path) -> None:
    for name, colour in (("zebra", (200, 0, 0)), ("ant", (0, 200, 0)), ("moth", (0, 0, 200))):
        write_image(tmp_path / "train" / name / "0.png", colour, size=(40, 30))  # not square
        write_image(tmp_path / "val" / name / "0.jpg", colour)

    spec, train = build_dataset("imagefolder", tmp_path, "train", image_size=16, in_memory=False)
    assert isinstance(train, ImageFolderDataset)
    assert spec.num_classes == 3 and spec.image_size == 16
    assert train.classes == ("ant", "moth", "zebra") and train.targets.tolist() == [0, 1, 2]
    image, label = train[2]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert image[0].float().mean() > 190 and image[1:].max() < 10, "zebra is red"

    _, test = build_dataset("imagefolder", tmp_path, "test")  # no test/: the val/ folder
    assert isinstance(test, TensorImageDataset) and test.images.shape == (3, 3, 32, 32)


def test_lazy_and_in_memory_folders_agree_and_auto_policy_follows_the_size_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_class_tree(tmp_path / "train", ("a", "b"), per_class=3)
    _, lazy = build_dataset("imagefolder", tmp_path, "train", in_memory=False)
    decoded = lazy.in_memory(num_workers=2)  # the parallel path
    assert torch.equal(decoded.images, torch.stack([lazy[i][0] for i in range(len(lazy))]))
    assert torch.equal(decoded.targets, lazy.targets)

    _, auto = build_dataset("imagefolder", tmp_path, "train")
    assert isinstance(auto, TensorImageDataset)
    monkeypatch.setattr("dfkd.data.catalog.IN_MEMORY_BYTES", lazy.decoded_nbytes - 1)
    _, too_big = build_dataset("imagefolder", tmp_path, "train")
    assert isinstance(too_big, ImageFolderDataset)


def test_cinic10_reads_its_three_splits_and_checks_the_class_count(tmp_path: Path) -> None:
    for split in ("train", "valid", "test"):
        write_class_tree(tmp_path / split, CIFAR10_CLASSES, per_class=1)
    spec, valid = build_dataset("cinic10", tmp_path, "valid")
    assert spec.num_classes == 10 and valid.classes == CIFAR10_CLASSES
    assert [int(valid[k][0][0, 0, 0]) for k in range(10)] == [20 * k for k in range(10)]

    write_class_tree(tmp_path / "wrong" / "test", CIFAR10_CLASSES[:4], per_class=1)
    with pytest.raises(DatasetNotFoundError, match="has 10 classes, but the test split .* has 4"):
        build_dataset("cinic10", tmp_path / "wrong", "test")


def test_tiny_imagenet_val_annotations_and_sorted_wnids(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    wnids = [f"n{(k * 37) % 200:08d}" for k in range(200)]  # wnids.txt is not sorted; labels follow the sorted order
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        write_image(root / "train" / wnid / "images" / f"{wnid}_0.JPEG", (int(wnid[1:]),) * 3, size=(64, 64))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    annotations = [("val_0.JPEG", "n00000002"), ("val_1.JPEG", "n00000199"), ("val_2.JPEG", "n00000000")]
    for file, _ in annotations:
        write_image(root / "val" / "images" / file, (0, 0, 0), size=(64, 64))
    (root / "val" / "val_annotations.txt").write_text("".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in annotations))

    spec, train = build_dataset("tiny_imagenet", tmp_path, "train")
    assert spec.num_classes == 200 and spec.image_size == 64
    assert train.classes == tuple(sorted(wnids))
    assert train.images.shape == (200, 3, 64, 64) and train.targets.tolist() == list(range(200))
    grey = train.images[:, 0, 32, 32].long()
    assert (grey - train.targets).abs().max() <= 2, "class k's image is grey level k, up to JPEG error"

    for split in ("val", "test"):
        _, val = build_dataset("tiny_imagenet", tmp_path, split)
        assert val.targets.tolist() == [2, 199, 0]


# -- archives


def cifar10_jpeg_tarball(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    for split in ("train", "test"):
        write_class_tree(source / split, CIFAR10_CLASSES, per_class=2, ext=".jpg")
    shared = tmp_path / "shared"
    shared.mkdir()
    return make_tarball(shared / "cifar10-jpeg.tar.gz", source)


def test_cifar10_jpeg_extracts_its_archive_once(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = cifar10_jpeg_tarball(tmp_path)
    calls = []
    real_extract = archive._extract
    monkeypatch.setattr(archive, "_extract", lambda a, d: (calls.append(a), real_extract(a, d)))

    spec, test = build_dataset("cifar10_jpeg", tarball.parent, "test")  # a folder holding the archive
    assert test.classes == CIFAR10_CLASSES and len(test) == 20 and test.images.shape[1:] == (3, 32, 32)
    assert test.targets.tolist() == [k for k in range(10) for _ in range(2)]
    extracted = archive.extraction_dir(tarball)
    assert extracted.parent.parent == cache_dir and calls == [tarball]
    stamp = extracted.stat().st_mtime_ns

    build_dataset("cifar10_jpeg", tarball, "train")  # the archive itself
    assert calls == [tarball], "the second call reuses the extraction"
    assert extracted.stat().st_mtime_ns == stamp

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tarball.parent, target_is_directory=True)
    for spelt in (tmp_path / "elsewhere" / ".." / tarball.relative_to(tmp_path), tmp_path / "link" / tarball.name):
        assert archive.extraction_dir(spelt) == extracted, spelt
        build_dataset("cifar10_jpeg", spelt, "test")
    assert calls == [tarball], "another spelling of the same archive reuses the extraction"


def test_half_extracted_folder_is_never_used(tmp_path: Path, cache_dir: Path) -> None:
    tarball = cifar10_jpeg_tarball(tmp_path)
    target = archive.extraction_dir(tarball)
    crashed = target.parent / f".{target.name}.partial-crashed"  # what a killed extraction leaves
    (crashed / "test" / "airplane").mkdir(parents=True)

    assert archive.extract_once(tarball) == target
    assert len(list((target / "test").rglob("*.jpg"))) == 20

    tarball.write_bytes(tarball.read_bytes() + b"\0" * 1024)  # a changed archive gets a fresh extraction
    assert archive.extraction_dir(tarball) != target


def test_zipped_image_folder_is_found_inside_its_single_top_level_folder(tmp_path: Path) -> None:
    zipped = tmp_path / "pets.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for name, colour in (("dog", (0, 0, 255)), ("cat", (255, 0, 0))):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
            zf.writestr(f"pets/train/{name}/0.png", buffer.getvalue())
    spec, ds = build_dataset("imagefolder", zipped, "train", image_size=8)
    assert spec.num_classes == 2 and ds.classes == ("cat", "dog")
    assert ds.images[:, :, 0, 0].tolist() == [[255, 0, 0], [0, 0, 255]]


def _escaping_tar(path: Path, member: tarfile.TarInfo) -> None:
    with tarfile.open(path, "w:gz") as tf:
        tf.addfile(member, io.BytesIO(b"pwned") if member.isfile() else None)


def _file_member(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 5
    return info


def _link_member(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize("kind", ["tar_dotdot", "tar_absolute", "tar_symlink", "zip_dotdot"])
def test_archive_members_escaping_the_target_are_refused(tmp_path: Path, cache_dir: Path, kind: str) -> None:
    outside = tmp_path / "escaped.txt"
    evil = tmp_path / ("evil.zip" if kind.startswith("zip") else "evil.tar.gz")
    if kind == "zip_dotdot":
        with zipfile.ZipFile(evil, "w") as zf:
            zf.writestr("train/a/0.png", b"x")
            zf.writestr("../../escaped.txt", b"pwned")
    elif kind == "tar_dotdot":
        _escaping_tar(evil, _file_member("../../escaped.txt"))
    elif kind == "tar_absolute":
        _escaping_tar(evil, _file_member(str(outside)))
    else:
        _escaping_tar(evil, _link_member("train/escaped.txt", str(outside)))

    with pytest.raises(archive.UnsafeArchiveError, match="escaped.txt"):
        build_dataset("imagefolder", evil, "train")
    assert not outside.exists() and not (tmp_path.parent / "escaped.txt").exists()
    assert not list((cache_dir / "extracted").iterdir()), "no final folder and no staging folder left behind"


# -- the restricted unpickler


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_a_batch_that_would_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle(folder / "test_batch", {"labels": [0], "data": cifar_data([0]), "filenames": _RunsCommand(marker)})
    assert b"system" in (folder / "test_batch").read_bytes()

    with pytest.raises(UnsafePickleError, match=r"system.*never contains"):
        build_dataset("cifar10", tmp_path, "test")
    assert not marker.exists(), "the payload must never run"


# -- the procedural dataset


def _rendered_deterministic_and_balanced(render, num_images: int, channels: int, seed: int) -> torch.Tensor:
    """``render(n, 32, seed)`` twice with one seed is the same uint8 split, another seed differs, classes balance."""
    a_images, a_targets = render(num_images, 32, seed=seed)
    b_images, b_targets = render(num_images, 32, seed=seed)
    assert a_images.dtype == torch.uint8 and a_images.shape == (num_images, channels, 32, 32)
    assert torch.equal(a_images, b_images) and torch.equal(a_targets, b_targets)
    assert not torch.equal(render(num_images, 32, seed=seed + 1)[0], a_images)
    assert a_targets.bincount(minlength=10).tolist() == [num_images // 10] * 10
    return a_images


def test_procedural_is_deterministic_balanced_and_split_dependent() -> None:
    _rendered_deterministic_and_balanced(render_procedural, 300, channels=3, seed=5)

    spec, train = build_dataset("procedural", "unused", "train", num_samples=200)
    _, train_again = build_dataset("procedural", "unused", "train", num_samples=200, seed=123)
    _, test = build_dataset("procedural", "unused", "test", num_samples=200)
    assert (spec.num_classes, spec.in_channels, spec.image_size) == (10, 3, 32)
    assert torch.equal(train.images, train_again.images), "the run seed does not change the data"
    assert not torch.equal(train.images, test.images)
    assert (train.images.float().std(dim=(1, 2, 3)) > 10).all(), "no blank images"

    _, large = build_dataset("procedural", "unused", "test", num_samples=20, image_size=48)
    assert large.images.shape == (20, 3, 48, 48)


def test_procedural_default_test_split_size() -> None:
    _, test = build_dataset("procedural", "unused", "test")
    assert len(test) == 2000
    assert test.targets.bincount(minlength=10).tolist() == [200] * 10


# -- the digits dataset


def test_digits_are_deterministic_balanced_white_on_black_and_split_dependent(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may be written: the folder must stay empty
    a_images = _rendered_deterministic_and_balanced(render_digits, 200, channels=1, seed=3)
    border = torch.cat([a_images[..., :2, :].flatten(1), a_images[..., -2:, :].flatten(1)], dim=1).float()
    centre = a_images[..., 10:22, 10:22].flatten(1).float()
    assert border.mean() < 30 and centre.mean() > 2 * border.mean(), "light strokes in the middle of a dark frame"

    spec, train = build_dataset("digits", "unused", "train", num_samples=100)
    _, test = build_dataset("digits", "unused", "test", num_samples=100)
    assert (spec.num_classes, spec.in_channels, spec.image_size, spec.augment) == (10, 1, 32, "affine")
    assert train.classes == tuple("0123456789") and not torch.equal(train.images, test.images)
    assert list(tmp_path.iterdir()) == []


def test_the_same_glyph_under_the_same_draw_is_the_same_image_and_every_font_draws_every_digit() -> None:
    from dfkd.data.digits import DIGIT_FONTS, _templates

    templates, box = _templates()
    assert templates.shape[:2] == (3 * len(DIGIT_FONTS), 10)
    assert (templates.flatten(2).amax(dim=2) > 0.9).all(), "every glyph has ink"
    assert ((box > 0.2) & (box < 0.95)).all(), "and fits its template"
    ones, eights = templates[:, 1].sum(dim=(1, 2)), templates[:, 8].sum(dim=(1, 2))
    assert (eights > ones).all(), "an 8 has more ink than a 1 in every font and stroke"


# -- subsets


def test_stratified_subset_keeps_class_shares_and_is_seeded() -> None:
    targets = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    picked = stratified_indices(targets, 50, seed=1)
    assert targets[picked].bincount().tolist() == [30, 15, 5]
    assert picked.unique().numel() == 50 and torch.equal(picked, picked.sort().values)
    assert torch.equal(picked, stratified_indices(targets, 50, seed=1))
    assert not torch.equal(picked, stratified_indices(targets, 50, seed=2))


def test_num_samples_subsets_a_real_split(tmp_path: Path) -> None:
    labels = [k % 5 for k in range(40)]
    indexed = np.broadcast_to(np.arange(40, dtype=np.uint8)[:, None, None], (40, 28, 28))  # pixel = item index
    write_idx(tmp_path / "MNIST/raw/train-images-idx3-ubyte", indexed)
    write_idx(tmp_path / "MNIST/raw/train-labels-idx1-ubyte", np.asarray(labels))
    _, ds = build_dataset("mnist", tmp_path, "train", num_samples=10, seed=3)
    assert ds.targets.bincount().tolist() == [2] * 5
    original = ds.images[:, 0, 16, 16].tolist()
    assert [labels[i] for i in original] == ds.targets.tolist(), "images and labels stay paired"
    assert original == sorted(original)
    _, same = build_dataset("mnist", tmp_path, "train", num_samples=10, seed=3)
    assert torch.equal(ds.images, same.images)


# -- errors


def test_missing_dataset_names_the_paths_and_how_to_get_it(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("cifar10", root, "train")
    message = str(info.value)
    assert str(root / "cifar-10-batches-py") in message and "data_batch_5" in message
    assert "cifar-10-python.tar.gz" in message and "data.download=true" in message

    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("tiny_imagenet", root, "val")
    assert str(root / "tiny-imagenet-200") in str(info.value) and "val_annotations.txt" in str(info.value)
    assert "data.download" not in str(info.value), "torchvision cannot download Tiny-ImageNet"


def test_download_runs_only_when_asked_and_only_when_files_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    calls = []

    def fake_mnist(root: str, *, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        write_idx(Path(root) / "MNIST/raw/t10k-images-idx3-ubyte", labelled_pixels([4, 2], (28, 28)))
        write_idx(Path(root) / "MNIST/raw/t10k-labels-idx1-ubyte", np.asarray([4, 2]))

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist)
    with pytest.raises(DatasetNotFoundError):
        build_dataset("mnist", tmp_path, "test")
    assert calls == []

    _, ds = build_dataset("mnist", tmp_path, "test", download=True)
    assert calls == [(str(tmp_path), False, True)] and ds.targets.tolist() == [4, 2]
    build_dataset("mnist", tmp_path, "test", download=True)
    assert len(calls) == 1, "files already there: no second download"


def test_a_root_file_that_is_not_an_archive_is_named(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a dataset")
    with pytest.raises(DatasetNotFoundError, match=r"notes\.txt is a file but not an archive"):
        build_dataset("cifar10_jpeg", notes, "test")


def test_unknown_split_and_dataset_suggest_close_matches() -> None:
    with pytest.raises(ConfigError, match="no split 'tset'.*'test'"):
        build_dataset("procedural", "unused", "tset")
    with pytest.raises(RegistryError, match="'cifar10'"):
        build_dataset("cifar01", "unused", "train")


# -- transforms


def test_normalize_inverts_and_to_unit_scales() -> None:
    x = to_unit(torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8))
    assert torch.allclose(x, torch.tensor([[[[0.0, 1.0]], [[0.2, 0.4]]]]))
    norm = Normalize((0.5, 0.25), (0.5, 0.1))
    y = norm(x)
    assert torch.allclose(y[0, 1], (x[0, 1] - 0.25) / 0.1)
    assert torch.allclose(norm.inverse(y), x, atol=1e-6)
    assert set(dict(norm.named_buffers())) == {"mean", "std"}


@pytest.mark.parametrize("kind", ["crop", "crop_flip", "resized_crop_flip", "affine"])
def test_augmentation_is_seeded_and_keeps_the_shape(kind: str) -> None:
    x = torch.rand(8, 3, 32, 32)
    augment = build_augmentation(kind, 32)
    torch.manual_seed(0)
    first = augment(x)
    torch.manual_seed(0)
    assert torch.equal(first, augment(x))
    assert first.shape == x.shape and not torch.equal(first, x)


def test_affine_moves_a_digit_a_little_and_never_mirrors_it() -> None:
    """The digits' augmentation: a stroke left of the centre stays left of it (a flip would move it right)."""
    x = torch.zeros(64, 1, 32, 32)
    x[:, :, 12:20, 4:8] = 1.0  # columns 4-7: about 10 pixels left of the centre
    torch.manual_seed(0)
    y = build_augmentation("affine", 32)(x)
    assert not torch.equal(y, x)
    assert y[..., 16:].sum() == 0 and (y[..., :16].sum(dim=(1, 2, 3)) > 0).all()


def test_augmentation_none_is_identity_and_unknown_kind_is_named() -> None:
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(build_augmentation("none", 32)(x), x)
    with pytest.raises(RegistryError, match="'crop_flip'"):
        build_augmentation("crop_flips", 32)


# -- the real copies in ../shared


needs_shared = pytest.mark.skipif(
    not (SHARED / "datasets").is_dir(), reason=f"no shared datasets at {SHARED.resolve()}"
)


@pytest.mark.shared
@needs_shared
def test_shared_mnist_test_split() -> None:
    spec, ds = build_dataset("mnist", SHARED / "datasets", "test")
    assert ds.images.shape == (10_000, 1, 32, 32) and spec.image_size == 32
    counts = ds.targets.bincount(minlength=10)
    assert ((counts > 850) & (counts < 1150)).all()


@pytest.mark.shared
@needs_shared
def test_shared_cifar10_jpeg_test_split_from_the_tarball(persistent_cache: Path) -> None:
    _, ds = build_dataset("cifar10_jpeg", SHARED / "datasets", "test", in_memory=False)
    assert len(ds) == 10_000 and ds.classes == CIFAR10_CLASSES
    assert ds.targets.bincount().tolist() == [1000] * 10
    image, label = ds[9_999]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 9
