"""Sample sources: what feeds the student. See :mod:`dfkd.sources.base` for the contract."""

from dfkd.sources.base import SOURCES, Batch, Context, SampleSource, SourceEnv
from dfkd.sources.generator import GeneratorSource
from dfkd.sources.pool import PoolSource
from dfkd.sources.real import RealDataSource

__all__ = ["SOURCES", "Batch", "Context", "SampleSource", "SourceEnv", "GeneratorSource", "PoolSource", "RealDataSource"]
