"""The engine's view of the registries (defined in ``generators`` so both packages share one)."""

from generators.registry import Registry, RegistryError, close_matches

__all__ = ["Registry", "RegistryError", "close_matches"]
