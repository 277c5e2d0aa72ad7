"""Sample sources: what feeds the student. See :mod:`dfkd.sources.base` for the contract."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from dfkd.components import check_component
from dfkd.curricula import CURRICULA
from dfkd.sources.base import SOURCES, Batch, Context, SampleSource, SourceEnv
from dfkd.sources.generator import GeneratorSource
from dfkd.sources.pool import PoolSource
from dfkd.sources.real import RealDataSource

__all__ = [
    "SOURCES", "Batch", "Context", "SampleSource", "SourceEnv", "GeneratorSource", "PoolSource", "RealDataSource",
    "check_source",
]


def check_source(spec: Any) -> DictConfig:
    """Check a recipe's ``source`` spec, its curriculum included; return it with every default filled in.

    Raises:
        ConfigError: naming the key the sources' registry, or the curricula's, refuses.
    """
    checked = check_component(SOURCES, spec, "source")
    if checked.get("curriculum") is not None:
        checked.curriculum = check_component(CURRICULA, checked.curriculum, "source.curriculum")
    return checked
