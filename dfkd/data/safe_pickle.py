"""Read the pickled CIFAR batches without letting a pickle run code.

A pickle names the callables that rebuild its objects, and ``pickle.load`` calls
whatever it names, so a tampered ``data_batch_1`` could run any command. The
CIFAR batches are dicts of strings, lists of ints and one uint8 numpy array, and
name only the few numpy constructors below. :class:`RestrictedUnpickler`
resolves those and refuses every other name before anything is called.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dfkd.errors import DfkdError

try:  # numpy >= 2 moved the pickling helpers from numpy.core to numpy._core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "load_cifar_pickle"]

# Every global a CIFAR batch references: the ndarray and dtype constructors, under
# numpy 1's and numpy 2's module names, and ``_codecs.encode``, which Python 3
# uses for bytes in protocol-2 pickles (a copy re-saved by Python 3).
_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class UnsafePickleError(DfkdError):
    """A pickle references something a CIFAR batch never contains."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_ALLOWED`` and refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle: the file references {module}.{name}, which a CIFAR batch never "
                "contains. It is not a CIFAR batch, or it has been tampered with."
            ) from None


def load_cifar_pickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR batch (or ``meta`` file) as a dict with ``str`` keys.

    The original files were written by Python 2, so byte strings are decoded as
    latin-1, as torchvision does.
    """
    with open(path, "rb") as f:
        try:
            obj = RestrictedUnpickler(f, encoding="latin1").load()
        except UnsafePickleError as exc:
            raise UnsafePickleError(f"{path}: {exc}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise DfkdError(f"{path} is not a readable CIFAR batch: {exc}") from None
    if not isinstance(obj, dict):
        raise DfkdError(f"{path} is not a CIFAR batch: it holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
