"""Weight files in and out, safely.

Reading:
    :func:`load_state_dict_file` reads ``.safetensors`` files, or torch files
    with ``weights_only=True`` (so a file carrying a pickled payload is refused
    and the payload never runs). It accepts a plain state dict,
    ``{"state_dict": ...}`` or ``{"model": ...}``, and strips the ``module.``
    prefix that ``DataParallel`` adds. :func:`load_weights` loads that into a
    model and names every missing, unexpected or mis-shaped key.

Writing:
    :func:`save_model` writes safetensors through :func:`dfkd.files.atomic_write_bytes`:
    a temporary name, fsynced, then renamed.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from dfkd.errors import CheckpointError
from dfkd.files import atomic_write_bytes

__all__ = ["load_state_dict_file", "load_weights", "check_fit", "model_bytes", "save_model", "read_model_metadata"]

_WRAPPER_KEYS = ("state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------- reading


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


def model_bytes(model: nn.Module, metadata: Mapping[str, Any] | None = None) -> bytes:
    """``model``'s weights as the bytes of a safetensors file, with JSON-encoded ``metadata``."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return save(tensors, metadata=meta)


def save_model(model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> None:
    """Save ``model``'s weights as safetensors, atomically, with JSON-encoded ``metadata``."""
    atomic_write_bytes(Path(path), model_bytes(model, metadata))


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
