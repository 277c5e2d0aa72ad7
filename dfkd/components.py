"""Component specs: the pluggable parts of a recipe, each ``{name: <registry key>, **options}``.

A spec's ``name`` picks a factory from a registry; its options are checked
against the factory's keyword-only parameters (see :func:`component_schema`),
with the errors of :mod:`dfkd.schema`. This module knows no registry: each
registry checks its own section with :func:`check_component`, and
:func:`dfkd.recipe.load_config` runs those checks.

A component's options belong to that component: where a later recipe layer
names another component, the earlier spec is replaced, not merged
(:func:`drop_renamed_components`).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dfkd.errors import ConfigError
from dfkd.registry import Registry
from dfkd.schema import merge_layer, unknown_key_message

__all__ = ["component_schema", "check_component", "drop_renamed_components"]


def component_schema(factory: Callable[..., Any], reserved: Sequence[str] = ()) -> type:
    """A dataclass of ``factory``'s keyword-only parameters: the options a recipe may set.

    Positional parameters are what the engine injects (a dataset, a model);
    keyword-only parameters, with their annotations and defaults, are the
    component's recipe options, except the ``reserved`` ones the engine sets
    itself (a generator's image size, say).
    """
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = typing.get_type_hints(target)
    specs = []
    for param in inspect.signature(target).parameters.values():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY or param.name in reserved:
            continue
        tp = hints.get(param.name, Any)
        default = param.default
        if default is inspect.Parameter.empty:
            specs.append((param.name, tp))
        elif isinstance(default, (list, dict, tuple)):
            specs.append((param.name, tp, field(default_factory=lambda d=default: list(d) if isinstance(d, tuple) else d.copy())))
        else:
            specs.append((param.name, tp, field(default=default)))
    name = getattr(factory, "__name__", "component")
    return dataclasses.make_dataclass(f"{name}_options", specs)


def check_component(registry: Registry, spec: Any, path: str, reserved: Sequence[str] = ()) -> DictConfig:
    """Validate a ``{name: ..., **options}`` spec against ``registry``; return it with defaults filled in.

    ``reserved`` options are set by the engine and may not appear in the spec. A
    component that defines ``check_options(options)`` has its values checked too:
    it raises a ``ValueError`` whose message starts with the option's name
    (``"kd_steps must be at least 1, got 0"``), reported under ``path``.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"{path!r} must be a mapping with a 'name' key from the {registry.name} registry, got {spec!r}.")
    options = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    if not isinstance(name, str) or name not in registry:
        raise ConfigError(f"{path}.name: {registry.unknown_message(name)}")
    schema = component_schema(registry.get(name), reserved)
    valid = [f.name for f in dataclasses.fields(schema)]
    for key in options:
        if key in reserved:
            raise ConfigError(
                f"{path}.{key} is not a recipe option of {registry.name} {name!r}: the engine sets it from the "
                "dataset. Remove it (to synthesise at another image size, set data.image_size)."
            )
        if key not in valid:  # every unknown key is named: with `name` misspelt, the default component rejects them all
            also = [repr(f"{path}.{k}") for k in options if k not in valid and k not in reserved and k != key]
            raise ConfigError(
                unknown_key_message(f"{path}.{key}", key, valid) + f" ({registry.name} {name!r})"
                + (f" Also unknown: {', '.join(also)}." if also else "")
            )
    merged = merge_layer(OmegaConf.structured(schema), options, prefix=f"{path}.")
    missing = OmegaConf.missing_keys(merged)
    if missing:
        raise ConfigError(f"{path}: {registry.name} {name!r} needs {', '.join(sorted(missing))}.")
    checked = OmegaConf.to_container(merged)
    check_options = getattr(registry.get(name), "check_options", None)
    if check_options is not None:  # value ranges, checked before anything is built (a teacher trained)
        try:
            check_options(checked)
        except ValueError as exc:
            raise ConfigError(f"{path}.{exc}.") from None
    return OmegaConf.create({"name": name, **checked})


def drop_renamed_components(cfg: DictConfig, layer: Mapping[str, Any]) -> None:
    """Where ``layer`` names a different component than ``cfg`` holds, clear the old spec first.

    ``weighting.name=uniform`` over a recipe's ``{name: log, threshold: ...}``
    must replace the spec, not merge into it and leave ``threshold`` behind.
    Typed sections (``data``, ``optim``, ...) are never replaced.
    """
    for key, value in layer.items():
        if not isinstance(value, Mapping) or not isinstance(cfg.get(key), DictConfig):
            continue
        current = cfg[key]
        is_component = OmegaConf.get_type(current) is dict
        if is_component and "name" in value and "name" in current and value["name"] != current["name"]:
            cfg[key] = None
        else:
            drop_renamed_components(current, value)
