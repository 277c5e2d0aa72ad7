"""The centre of dfkd: generator networks, the losses that train them, and the synthesizers.

This package depends only on torch, kornia and einops. It never imports ``dfkd``.
Importing it fills the registries: ``GENERATORS``, ``TERMS`` and ``SYNTHESIZERS``.
"""

from generators import contrastive, inversion, meta  # noqa: F401  (registers the contrastive term, inversion and fast)
from generators.networks import GENERATORS
from generators.synthesizers import SYNTHESIZERS
from generators.terms import TERMS

__all__ = ["GENERATORS", "SYNTHESIZERS", "TERMS"]
