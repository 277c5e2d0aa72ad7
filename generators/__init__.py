"""The centre of dfkd: generator networks, the losses that train them, and the synthesizers.

This package depends only on torch, kornia and einops. It never imports ``dfkd``.
Its registries, ``GENERATORS``, ``TERMS`` and ``SYNTHESIZERS``, are attributes
loaded on first use, so that importing ``generators.registry`` (as the engine's
error classes do) does not import torch.
"""

import importlib

__all__ = ["GENERATORS", "SYNTHESIZERS", "TERMS"]

_HOMES = {"GENERATORS": "generators.networks", "SYNTHESIZERS": "generators.synthesizers", "TERMS": "generators.terms"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'generators' has no attribute {name!r}")
