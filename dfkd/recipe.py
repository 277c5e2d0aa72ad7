"""The loader to call: a recipe checked against the schema, then every section against its registry.

:func:`dfkd.config.read_config` reads a recipe, its bases and the command-line
overrides, and checks them against the schema: sections, keys, types, value
ranges. It knows no registry. :func:`check_recipe` then has each registry check
the section it owns, the names there and each component spec's options (filled
in with their defaults), so a component is checked where it is registered:

- ``data.name``: :func:`dfkd.data.check_dataset`
- ``student.arch``, ``teacher.arch``: :func:`dfkd.models.check_arch`
- ``loss.terms``: :func:`dfkd.losses.check_loss_terms`
- ``optim``, with its schedule: :func:`dfkd.optim.check_optim`
- ``source``, with its curriculum: :func:`dfkd.sources.check_source`
- ``weighting``: :func:`dfkd.policies.weighting.check_weighting`
- ``temperature``: :func:`dfkd.policies.temperature.check_temperature`
- ``synthesizer``: :func:`dfkd.synthesis.check_synthesizer`
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from dfkd.config import read_config

__all__ = ["load_config", "check_recipe"]


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a recipe and its bases, apply ``key=value`` overrides, and validate the result.

    Args:
        path: a YAML recipe, or ``None`` to start from the defaults.
        overrides: dotted ``key=value`` strings; values are parsed as YAML.

    Returns:
        The validated config, typed by :class:`dfkd.config.RunConfig`, with every
        component spec filled in with its defaults.

    Raises:
        ConfigError: on a missing file or base, a cycle of bases, bad YAML, an
            unknown key or name, a wrong type or a value out of range.
    """
    cfg = read_config(path, overrides)
    check_recipe(cfg)
    return cfg


def check_recipe(cfg: DictConfig) -> None:
    """Check every registry name and component spec of a schema-checked config, filling in their defaults.

    Raises:
        ConfigError: naming the first key whose name or options its registry refuses.
    """
    # The registries import torch, a second or more: only once the schema has passed, so that
    # `dfkd train` reports a misspelt key in a moment.
    from dfkd.data import check_dataset
    from dfkd.losses import check_loss_terms
    from dfkd.models import check_arch
    from dfkd.optim import check_optim
    from dfkd.policies.temperature import check_temperature
    from dfkd.policies.weighting import check_weighting
    from dfkd.sources import check_source
    from dfkd.synthesis import check_synthesizer

    check_dataset(cfg.data.name)
    for role in ("student", "teacher"):
        if cfg[role] is not None:
            check_arch(cfg[role].arch, role)
    check_loss_terms(cfg.loss.terms)
    check_optim(cfg.optim)
    cfg.source = check_source(cfg.source)
    cfg.weighting = check_weighting(cfg.weighting)
    cfg.temperature = check_temperature(cfg.temperature, cfg.loss.temperature)
    if cfg.synthesizer is not None:
        cfg.synthesizer = check_synthesizer(cfg.synthesizer)
