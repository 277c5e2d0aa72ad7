"""Name-keyed registries: one per extension point.

A registry maps a name to a factory (a class or a function). Registering a name
twice raises, and a failed lookup names the registry and the closest names, so
a typo in a recipe reads as a typo and not as a ``KeyError``.

This module lives in ``generators`` because ``generators`` may not import
``dfkd``; the engine re-exports it as ``dfkd.registry``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "RegistryError", "close_matches"]


class RegistryError(LookupError):
    """A registry lookup or registration failed; the message says why and what would work."""

    def __str__(self) -> str:  # LookupError would quote the message like a key
        return str(self.args[0]) if self.args else ""


def close_matches(word: str, candidates: list[str] | tuple[str, ...], n: int = 3) -> list[str]:
    """Return up to ``n`` candidates that look like ``word`` (case-insensitive)."""
    lowered = {c.lower(): c for c in candidates}
    return [lowered[m] for m in difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.6)]


class Registry(Generic[T]):
    """A named mapping from string keys to factories.

    Example:
        >>> MODELS = Registry("models")
        >>> @MODELS.register("tiny")
        ... def tiny(num_classes: int): ...
        >>> MODELS.get("tiny") is tiny
        True
    """

    def __init__(self, name: str, plugins: tuple[str, ...] = ()) -> None:
        """``plugins`` name modules that register more entries; they are imported at the first lookup,
        so that importing the registry (a recipe check, an error class) stays as light as the registry."""
        self.name = name
        self._entries: dict[str, T] = {}
        self._plugins = plugins

    def _load(self) -> None:
        plugins, self._plugins = self._plugins, ()
        for module in plugins:
            importlib.import_module(module)

    def register(self, name: str | None = None, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator.

        The name defaults to the object's ``__name__``.
        """
        if obj is not None:
            return self._add(name or obj.__name__, obj)  # type: ignore[attr-defined]

        def decorator(fn: T) -> T:
            return self._add(name or fn.__name__, fn)  # type: ignore[attr-defined]

        return decorator

    def _add(self, name: str, obj: T) -> T:
        if name in self._entries:
            raise RegistryError(f"{self.name} registry: the name {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def get(self, name: str) -> T:
        """Look up ``name``; an unknown name raises with the close matches."""
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        self._load()
        known = sorted(self._entries)
        close = close_matches(str(name), known)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(known) if len(known) <= 24 else f"{len(known)} names, e.g. {', '.join(known[:12])}, ..."
        return f"{self.name} registry has no entry {name!r}.{hint} Known: {listing}."

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {len(self)} entries)"
