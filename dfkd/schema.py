"""Typed configs from user input, with errors that name the key.

Dotted ``key=value`` overrides are parsed, plain mappings are checked against
dataclass schemas and merged, and interpolations are resolved. The recipe
(:mod:`dfkd.config`) and every component spec (:mod:`dfkd.components`) are
checked this way: an unknown key names itself, the closest valid key and the
valid ones; a value of the wrong type names the key, the expected type and the
value given. Every failure is a :class:`~dfkd.errors.ConfigError` of one
paragraph, never an OmegaConf traceback. Nothing here knows a particular schema.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import yaml
from omegaconf import DictConfig, Node, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dfkd.errors import ConfigError
from dfkd.registry import close_matches

__all__ = ["check_keys", "config_error", "merge_layer", "parse_overrides", "resolve_interpolations", "unknown_key_message"]


def check_keys(data: Any, schema: type, prefix: str = "") -> None:
    """Reject keys of ``data`` that are not fields of the dataclass ``schema``, recursively, suggesting the closest.

    Args:
        data: a plain mapping (anything else is left to the type checks of the merge).
        prefix: the dotted path of ``data`` in the recipe, ending in ``.`` (empty at the top).
    """
    if not isinstance(data, Mapping):
        return
    hints = typing.get_type_hints(schema)
    fields = _field_names(schema)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(unknown_key_message(full, str(key), fields))
        sub = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(sub):
            optional = sub is not hints[key]
            if not isinstance(value, Mapping) and not (value is None and optional):
                raise ConfigError(
                    f"config key {full!r} is a section: a mapping of {', '.join(_field_names(sub))}; got {value!r}."
                )
            check_keys(value, sub, f"{full}.")


def unknown_key_message(full_key: str, key: str, valid: list[str]) -> str:
    """``unknown config key 'a.b'. Did you mean 'a.c'? Valid keys in section 'a': ...``."""
    close = close_matches(key, valid)
    parent = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
    hint = f" Did you mean {' or '.join(repr(parent + c) for c in close)}?" if close else ""
    where = f"section {parent[:-1]!r}" if parent else "a recipe"
    listing = f"Valid keys in {where}: {', '.join(sorted(valid))}." if valid else f"Section {parent[:-1]!r} takes no keys here."
    return f"unknown config key {full_key!r}.{hint} {listing}"


def merge_layer(cfg: DictConfig, layer: Any, prefix: str = "") -> DictConfig:
    """``OmegaConf.merge(cfg, layer)``, with its errors turned into a :class:`ConfigError` that names the key.

    Args:
        prefix: the dotted path of ``cfg`` in the recipe, ending in ``.`` (empty at the top).
    """
    try:
        return OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as exc:
        raise config_error(exc, prefix) from None
    except TypeError:  # OmegaConf refuses a mapping over a list, or a list over a mapping, with a bare TypeError
        clash = _container_clash(cfg, layer, prefix)
        if clash is None:
            raise
        raise ConfigError(clash) from None


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """Dotted ``key=value`` strings (values parsed as YAML) as one config; a bad item is named."""
    cli = OmegaConf.create()
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=10).")
        try:
            cli.merge_with_dotlist([item])
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({problem}); quote it to pass a string."
            ) from None
        except (OmegaConfBaseException, ValueError, TypeError) as exc:  # e.g. a key into a list an earlier override set
            raise ConfigError(f"override {item!r} cannot be applied: {str(exc).splitlines()[0]}") from None
    return cli


def resolve_interpolations(cfg: DictConfig) -> None:
    """Resolve every interpolation in place, once: a bad one fails here, named by its key."""
    for key, value in _strings(OmegaConf.to_container(cfg)):
        if "${" in value:
            try:
                OmegaConf.select(cfg, key, throw_on_resolution_failure=True, throw_on_missing=True)
            except OmegaConfBaseException as exc:
                reason = str(exc).splitlines()[0]
                raise ConfigError(f"config key {key!r}: {value!r} does not resolve: {reason}.") from None
    OmegaConf.resolve(cfg)
    for key, value in _strings(OmegaConf.to_container(cfg)):
        if "${" in value:  # an escaped interpolation resolves to one, which the saved config would read back as such
            raise ConfigError(f"config key {key!r} resolves to {value!r}; a recipe cannot hold a literal '${{'.")


def _strings(tree: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every string value of a nested plain config, with its dotted key (list items as ``key[i]``)."""
    if isinstance(tree, str):
        yield prefix, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _strings(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _strings(value, f"{prefix}[{i}]")


def config_error(exc: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    """An OmegaConf error as a one-paragraph :class:`ConfigError` naming the key (after ``prefix``)."""
    full_key = prefix + (getattr(exc, "full_key", None) or str(getattr(exc, "key", "") or "?"))
    if isinstance(exc, ConfigKeyError):
        return ConfigError(f"unknown config key {full_key!r}. {str(exc).splitlines()[0]}")
    if isinstance(exc, ValidationError):
        expected = _expected_type(exc)
        value = getattr(exc, "value", None)
        if isinstance(value, Node):  # a null assigned to a field that is not Optional
            value = value._value()
        return ConfigError(
            f"config key {full_key!r} expects {expected}, got {value!r} ({type(value).__name__})."
        )
    return ConfigError(f"invalid config at {full_key!r}: {str(exc).splitlines()[0]}")


def _container_clash(node: Any, layer: Any, prefix: str = "") -> str | None:
    """Where ``layer`` puts a mapping over a list node, or a list over a mapping node: a message naming the key.

    Nodes, not values, because a typed node that holds null (``data.mean``) still takes only its own kind.
    """
    if OmegaConf.is_dict(node) and isinstance(layer, Mapping):
        if node._is_none():  # a null mapping takes any mapping
            return None
        for key, value in layer.items():
            clash = _container_clash(node._get_node(key), value, f"{prefix}{key}.")
            if clash is not None:
                return clash
        return None
    if OmegaConf.is_dict(node) and isinstance(layer, Sequence) and not isinstance(layer, str):  # a list, plain or not
        return f"config key {prefix[:-1]!r} holds a mapping, got {layer!r}."
    if OmegaConf.is_config(node) and isinstance(node, Sequence) and isinstance(layer, Mapping):  # a list or a tuple
        return f"config key {prefix[:-1]!r} holds a list, got {layer!r}."
    return None


def _field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _expected_type(exc: ValidationError) -> str:
    obj_type = getattr(exc, "object_type", None)
    key = getattr(exc, "key", None)
    if obj_type is not None and dataclasses.is_dataclass(obj_type) and key is not None:
        hints = typing.get_type_hints(obj_type)
        if key in hints:
            return _type_name(hints[key])
    message = str(exc).splitlines()[0]
    if "is not Optional" in message:
        return "a value, not null"
    for marker in ("converted to ", "is not a subclass of ", "field of type "):  # a scalar, a list item, a dict value
        if marker in message:
            return message.split(marker)[-1].split(". value:")[0].strip("'")
    return "another type"
