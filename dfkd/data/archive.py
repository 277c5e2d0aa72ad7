"""Extract a dataset archive once into a cache folder, atomically and safely.

An archive is extracted into a fresh temporary folder next to its final place
and then renamed there in one step, so a crash mid-way leaves a temporary
folder that is never mistaken for a finished one. The final folder's name
carries a hash of the archive's absolute path, size and modification time: a
replaced archive is extracted again, an unchanged one never is.

Members that would land outside the target folder (absolute paths, ``..``,
links pointing out) are refused, never silently rewritten.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

from dfkd.errors import DfkdError

__all__ = ["ARCHIVE_SUFFIXES", "UnsafeArchiveError", "cache_dir", "extract_once", "extraction_dir", "is_archive"]

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar.gz", ".tgz", ".tar", ".zip")


class UnsafeArchiveError(DfkdError):
    """An archive is unreadable, or holds a member that would be written outside its target folder."""


def cache_dir() -> Path:
    """The cache root: ``$DFKD_CACHE_DIR``, else ``~/.cache/dfkd``."""
    return Path(os.environ.get("DFKD_CACHE_DIR") or "~/.cache/dfkd").expanduser()


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a file whose name ends in one of :data:`ARCHIVE_SUFFIXES`."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def extraction_dir(archive: Path) -> Path:
    """Where ``archive`` is (or will be) extracted: ``<cache>/extracted/<stem>-<hash of path, size, mtime>``."""
    archive = archive.resolve()  # one cache entry however the path is spelt (``..``, symlinks)
    stat = archive.stat()
    key = hashlib.sha256(f"{archive}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return cache_dir() / "extracted" / f"{stem}-{key}"


def extract_once(archive: Path) -> Path:
    """Extract ``archive`` into :func:`extraction_dir` unless already done; return that folder.

    Safe to call from several processes at once: each extracts into its own
    temporary folder, the first rename wins and the others discard their copy.
    """
    target = extraction_dir(archive)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    log.info("extracting %s into %s (once; later runs reuse it)", archive, target)
    try:
        _extract(archive, staging)
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():  # not a lost race with another process: a real failure
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _extract(archive: Path, dest: Path) -> None:
    """Extract every member of ``archive`` into ``dest``, refusing any that would escape it."""
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    _check_inside(archive, dest, name)
                zf.extractall(dest)
        else:
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    _check_inside(archive, dest, member.name)
                tf.extractall(dest, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise UnsafeArchiveError(f"cannot extract {archive}: {exc}") from None


def _check_inside(archive: Path, dest: Path, name: str) -> None:
    """Refuse a member name that is absolute or climbs out of ``dest`` (links are the tar filter's job)."""
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise UnsafeArchiveError(
            f"refusing to extract {archive}: its member {name!r} would be written outside {dest}. "
            "The archive is damaged or malicious."
        )
