"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest

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
