"""Run checkpoints that a crash cannot corrupt.

A run checkpoint is a folder ``step_XXXXXXXX`` built as ``.tmp-step_XXXXXXXX``
and renamed once complete, every file in it written atomically
(:mod:`dfkd.files`). Its ``manifest.json`` records each file's size and
SHA-256, so a truncated or corrupted checkpoint is detected on resume and
skipped in favour of the previous one. Models are stored as safetensors
(:mod:`dfkd.weights`), everything else with ``torch.save`` and read back with
``weights_only=True``.

accelerate's own ``save_state``/``load_state`` is not used: its loader
unpickles registered custom objects with ``weights_only=False``
(accelerate 1.15, ``checkpointing.py``), which would break the rule that no
file is ever unpickled unsafely.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from dfkd.errors import CheckpointError
from dfkd.files import atomic_write_bytes, fsync_dir
from dfkd.weights import model_bytes

__all__ = ["CheckpointManager", "verify_checkpoint"]

_MANIFEST = "manifest.json"


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class CheckpointManager:
    """Complete, verifiable run checkpoints under ``root``, keeping the newest ``keep``.

    A checkpoint folder holds ``<name>.safetensors`` per model, ``state.pt``
    (what all processes share: optimiser, scheduler, policies, run counters),
    ``process_<rank>.pt`` per process (what is each process's own: its random
    streams and its shard of the sample source, such as its part of a pool),
    both loaded with ``weights_only=True``, and ``manifest.json`` listing every
    file's size and SHA-256.

    In a multi-process run every process calls :meth:`save`; the main process
    writes the shared files and publishes the folder once all are in.
    """

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def save(
        self,
        step: int,
        models: Mapping[str, nn.Module],
        state: Mapping[str, Any],
        local: Mapping[str, Any],
        *,
        rank: int = 0,
        is_main: bool = True,
        barrier: Any = None,
    ) -> Path:
        """Write a checkpoint for ``step``; return the published folder.

        Raises:
            CheckpointError: the files could not be written (a full disk, say). The
                partial folder is removed and the published checkpoints are untouched.
        """
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        wait = barrier or (lambda: None)
        try:
            if is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            wait()
            atomic_write_bytes(tmp / f"process_{rank}.pt", _torch_bytes(dict(local)))
            wait()
            if is_main:
                for name, model in models.items():
                    atomic_write_bytes(tmp / f"{name}.safetensors", model_bytes(model))
                atomic_write_bytes(tmp / "state.pt", _torch_bytes(dict(state)))
                manifest = {p.name: _file_record(p) for p in sorted(tmp.iterdir())}
                atomic_write_bytes(tmp / _MANIFEST, json.dumps({"step": step, "files": manifest}, indent=1).encode())
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_dir(self.root)
                self._prune()
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            published = self.complete()
            raise CheckpointError(
                f"could not write the checkpoint of step {step} under {str(self.root)!r}: "
                f"{exc.strerror or exc}. The last complete checkpoint is "
                f"{str(published[-1]) if published else 'none'}; make room, then resume with train.resume=auto."
            ) from exc
        wait()
        return final

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Published checkpoint folders, oldest first (not verified)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if p.is_dir())

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; corrupt ones are skipped with a warning."""
        for folder in reversed(self.complete()):
            problem = verify_checkpoint(folder)
            if problem is None:
                return folder
            warnings.warn(f"skipping checkpoint {folder}: {problem}", stacklevel=2)
        return None

    @staticmethod
    def load(folder: str | Path, rank: int = 0) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any], dict[str, Any]]:
        """Read a checkpoint: ``(model state dicts by name, shared state, this process's own state)``.

        A run resumed on more processes than it was saved from gives the extra
        processes rank 0's own state, with a warning: it continues, but not exactly.
        """
        folder = Path(folder)
        problem = verify_checkpoint(folder)
        if problem is not None:
            raise CheckpointError(f"checkpoint {str(folder)!r} is not usable: {problem}")
        models = {p.stem: load_file(p, device="cpu") for p in folder.glob("*.safetensors")}
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        local_file = folder / f"process_{rank}.pt"
        if not local_file.exists():
            warnings.warn(
                f"{folder} was saved by fewer processes than this run has; process {rank} starts from process 0's "
                "random streams and source state, so the resumed run is not an exact continuation.", stacklevel=2,
            )
            local_file = folder / "process_0.pt"
        local = torch.load(local_file, map_location="cpu", weights_only=True)
        return models, state, local


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(folder: Path) -> str | None:
    """``None`` if every file in the manifest is present and intact, else what is wrong."""
    manifest_path = folder / _MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the write never completed)"
    try:
        manifest = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"manifest.json is unreadable ({exc})"
    for name, record in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {record['bytes']} (truncated?)"
        if _sha256(path) != record["sha256"]:
            return f"{name} does not match its SHA-256 (corrupted)"
    return None
