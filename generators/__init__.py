"""The centre of dfkd: generator networks, the losses that train them, and the synthesizers.

This package depends only on torch, kornia and einops. It never imports ``dfkd``.
"""
