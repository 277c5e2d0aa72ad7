"""Weights in and out, safely, and run checkpoints that a crash cannot corrupt.

Reading:
    :func:`load_state_dict_file` reads ``.safetensors`` files, or torch files
    with ``weights_only=True`` (so a file carrying a pickled payload is refused
    and the payload never runs). It accepts a plain state dict,
    ``{"state_dict": ...}`` or ``{"model": ...}``, and strips the ``module.``
    prefix that ``DataParallel`` adds. :func:`load_weights` loads that into a
    model and names every missing, unexpected or mis-shaped key.

Writing:
    every file is written to a temporary name, fsynced, then renamed. A run
    checkpoint is a folder ``step_XXXXXXXX`` built as ``.tmp-step_XXXXXXXX`` and
    renamed once complete; its ``manifest.json`` records each file's size and
    SHA-256, so a truncated or corrupted checkpoint is detected on resume and
    skipped in favour of the previous one.

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
import pickle
import re
import shutil
import socket
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from dfkd.errors import CheckpointError, RunLockedError

__all__ = [
    "run_lock",
    "load_state_dict_file",
    "load_weights",
    "check_fit",
    "save_model",
    "read_model_metadata",
    "atomic_write_bytes",
    "CheckpointManager",
]

_WRAPPER_KEYS = ("state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")
_MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- reading weights


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``path`` without unpickling arbitrary objects.

    Raises:
        CheckpointError: the file is missing, unreadable, holds pickled
            objects, or holds no recognisable state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (looked at {path.resolve()}).")
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {str(path)!r} as safetensors: {exc}") from None
    try:
        with warnings.catch_warnings():  # torch's own advice and warnings are not for dfkd's users
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        with open(path, "rb") as f:
            head = f.read(4)
        # A pickle (protocol 2+) or torch's zip format that the weights-only unpickler refused holds objects;
        # anything else that fails to unpickle is damaged.
        if "weights only" not in str(exc).lower() or not (head[:1] == b"\x80" or head == b"PK\x03\x04"):
            raise CheckpointError(_unreadable(path, exc)) from None
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))  # the object it refused, when torch names it
        raise CheckpointError(
            f"refused to load {str(path)!r}: besides tensors it holds pickled Python objects"
            + (f" ({found.group(1)})" if found else "")
            + ", which could run code when loaded, and dfkd never unpickles those. If you trust the file, "
            "convert it once to safetensors in a Python session of your own:\n"
            "    import torch; from safetensors.torch import save_file\n"
            f"    state = torch.load({str(path)!r}, map_location='cpu', weights_only=False)  # runs the pickle: trusted files only\n"
            "    state = state.get('state_dict', state.get('model', state))  # the weights, if they are wrapped\n"
            f"    save_file({{k: v.contiguous() for k, v in state.items()}}, {str(path.with_suffix('.safetensors'))!r})\n"
            "and point the recipe at the .safetensors file."
        ) from None
    except Exception as exc:  # torch reports a damaged file as OSError, EOFError, RuntimeError, KeyError, ...
        raise CheckpointError(_unreadable(path, exc)) from None
    return _as_state_dict(obj, path)


def _unreadable(path: Path, exc: BaseException) -> str:
    size = path.stat().st_size
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (
        f"cannot read checkpoint {str(path)!r} ({size:,} bytes): the file is truncated or is not a PyTorch "
        f"checkpoint ({type(exc).__name__}: {detail}). Copy it again, or point at the right file."
    )


def _as_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        top = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{str(path)!r} holds no state dict: expected a mapping of tensors, or one under "
            f"'state_dict' or 'model'; found {top}."
        )
    return {_strip_prefixes(k): v for k, v in obj.items()}


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def load_weights(model: nn.Module, path: str | Path, *, what: str = "checkpoint") -> None:
    """Load ``path`` into ``model`` strictly; a mismatch names the keys.

    Args:
        model: the freshly built network.
        path: the weight file.
        what: how to call the file in errors, e.g. ``"teacher checkpoint"``.

    Raises:
        CheckpointError: listing missing keys, unexpected keys and shape mismatches.
    """
    state = load_state_dict_file(path)
    check_fit(model, state, f"{what} {str(path)!r}")
    model.load_state_dict(state, strict=True)


def check_fit(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Raise a :class:`CheckpointError` naming every missing, unexpected and mis-shaped key of ``state``.

    Args:
        what: how to call the weights in the error, e.g. ``"teacher checkpoint 'a.pt'"``.
    """
    expected = model.state_dict()
    # BatchNorm fills in num_batches_tracked for checkpoints from PyTorch < 0.4.1, which lack it.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"{what} does not fit {type(model).__name__}"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{label}: {shown}")
        parts.append(_class_count_hint(expected, state, mismatched) or (
            "Check that the recipe's arch and the dataset's class count and image size match the checkpoint."
        ))
        raise CheckpointError(". ".join(parts))


def _class_count_hint(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], mismatched: list[str]) -> str | None:
    """When only the classifier's output size differs, say that the class counts differ, and by how much."""
    last = [k for k in expected if k.endswith(".weight")][-1:]  # the classifier comes last in every zoo model
    if not last or not mismatched or len(mismatched) > 2:
        return None
    head = last[0].rsplit(".", 1)[0]
    keys = [f"{head}.weight", f"{head}.bias"]
    differ = [k for k in keys if k in expected and k in state and expected[k].shape != state[k].shape]
    if len(differ) != len(mismatched) or not all(state[k].shape[1:] == expected[k].shape[1:] for k in differ):
        return None
    theirs, ours = state[differ[0]].shape[0], expected[differ[0]].shape[0]
    return (
        f"The checkpoint was trained for {theirs} classes and the model is built for {ours}, the dataset's class "
        "count: use the checkpoint with the dataset it was trained on (data.name), or a checkpoint for this one."
    )


# --------------------------------------------------------------------------- writing


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync, and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _model_bytes(model: nn.Module, metadata: Mapping[str, Any] | None = None) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return save(tensors, metadata=meta)


def save_model(model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> None:
    """Save ``model``'s weights as safetensors, atomically, with JSON-encoded ``metadata``."""
    atomic_write_bytes(Path(path), _model_bytes(model, metadata))


def read_model_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata written by :func:`save_model` (values JSON-decoded where possible)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        raw = fh.metadata() or {}
    decoded = {}
    for key, value in raw.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------- run checkpoints


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold ``<folder>/.lock`` exclusively while this process trains into ``folder``.

    An advisory ``flock``: the operating system drops it when the process ends,
    however it ends, so a crash never leaves a stale lock behind. Two runs in
    one folder would interleave their checkpoints and metrics; the second one
    is refused instead. Where ``fcntl`` does not exist (Windows), runs are not
    guarded.

    Raises:
        RunLockedError: another process holds the folder, named by its pid and host.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise RunLockedError(
                f"{owner} is training into {str(folder)!r}: one run folder takes one run at a time. Wait for it, "
                "or choose another output_dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
                    atomic_write_bytes(tmp / f"{name}.safetensors", _model_bytes(model))
                atomic_write_bytes(tmp / "state.pt", _torch_bytes(dict(state)))
                manifest = {p.name: _file_record(p) for p in sorted(tmp.iterdir())}
                atomic_write_bytes(tmp / _MANIFEST, json.dumps({"step": step, "files": manifest}, indent=1).encode())
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(self.root)
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
