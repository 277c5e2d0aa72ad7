"""Fixtures shared by the test files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # the real datasets and teachers, where the checkout has them (CI does)


@pytest.fixture
def persistent_cache(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A DFKD_CACHE_DIR in pytest's own cache folder, so the 60,000-file tarball is extracted on the first run only.

    The extraction is keyed by the archive's path, size and mtime, so reusing it
    across runs is exactly what the engine does; with ``-p no:cacheprovider`` it
    falls back to a fresh temporary folder.
    """
    cache = getattr(request.config, "cache", None)
    path = cache.mkdir("dfkd-cache") if cache is not None else tmp_path / "cache"
    monkeypatch.setenv("DFKD_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module of tiny forwards: on a busy 2-core runner extra OpenMP threads
    only spin against each other (a CMI run took 12.5 s on two threads, 1.1 s on one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def crash_after_checkpoint(monkeypatch: pytest.MonkeyPatch):
    """``crash(cfg, epoch)``: run ``cfg`` and kill it (KeyboardInterrupt) right after it checkpoints ``epoch``.

    The run's folder then holds exactly what a process killed at that moment
    leaves behind, for a ``train.resume=auto`` run to continue from.
    """
    from dfkd.trainer import Trainer

    original = Trainer._save_checkpoint

    def crash(cfg, epoch: int) -> None:
        def save_then_die(self):
            path = original(self)
            if self.loop.state.epoch == epoch:
                raise KeyboardInterrupt("simulated crash")
            return path

        monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
        try:
            with pytest.raises(KeyboardInterrupt):
                Trainer(cfg).fit()
        finally:
            monkeypatch.setattr(Trainer, "_save_checkpoint", original)

    return crash


@pytest.fixture(scope="session")
def resnet8_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ResNet-8 for ten classes, saved as safetensors: a teacher with the BatchNorm layers that the
    ``bn`` and ``contrastive`` terms hook, for tests where what it predicts does not matter."""
    from dfkd.weights import save_model
    from dfkd.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet8-teacher") / "resnet8.safetensors"
    save_model(create_model("resnet8", num_classes=10, in_channels=3), path, {"arch": "resnet8"})
    return path
