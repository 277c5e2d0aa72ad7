"""The model registry and the factory protocol that every entry satisfies."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Protocol

from torch import nn

from dfkd.registry import Registry

__all__ = ["MODELS", "ModelFactory", "register_variants"]


class ModelFactory(Protocol):
    """Builds a classifier mapping ``(B, in_channels, H, W)`` images to ``(B, num_classes)`` logits."""

    def __call__(self, num_classes: int, in_channels: int = 3) -> nn.Module: ...


MODELS: Registry[ModelFactory] = Registry("models")


def register_variants(builder: Callable[..., nn.Module], variants: Mapping[str, Mapping[str, Any]]) -> None:
    """Register ``partial(builder, **config)`` under each name of ``variants``.

    ``builder`` takes ``(num_classes, in_channels=3, *, **config)``, so each
    registered partial satisfies :class:`ModelFactory`.
    """
    for name, config in variants.items():
        MODELS.register(name, partial(builder, **config))
