"""Recipes: a typed schema, YAML loading with dotted overrides, and clear errors.

A recipe is a YAML file checked against :class:`RunConfig`. Command-line
arguments of the form ``key=value`` (dotted keys, YAML values) are merged on
top. The engine owns the fixed sections (``data``, ``student``, ``teacher``,
``loss``, ``optim``, ``train``, ``eval``); pluggable parts are *component
specs*, ``{name: <registry key>, **options}``, whose options are checked
against the keyword-only parameters of the registered factory (see
:func:`component_schema`). Either way an unknown key names itself and the
closest valid key, and a value of the wrong type names the key, the expected
type and the value given.

Recipes inherit with a top-level ``base`` key: a path, or a list of paths,
each relative to the folder of the recipe that names it::

    # recipes/cifar10/cudfkd/resnet34_resnet18.yaml
    base: ../../methods/cudfkd.yaml      # the method's composition and defaults
    output_dir: runs/cifar10/cudfkd/resnet34_resnet18
    student: {arch: resnet18}

:func:`load_config` merges the layers in this order: each base (its own bases
first, recursively, and a list in its order), then the recipe itself, then the
command-line overrides. Every layer merges like an override: a section's keys
are updated one by one, and where a later layer names a different component
(a new ``name``), that component's options are replaced, not merged. ``base``
is read from recipe files only (never from the command line), never reaches
the schema, and is not written to the saved ``config.yaml``, which is the fully
resolved config. Other paths in a recipe (``data.root``, ``teacher.checkpoint``,
``teacher.recipe``) stay relative to the working directory, as before.

YAML is read with OmegaConf, which uses a safe loader: no Python objects are
ever constructed from a recipe.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from omegaconf import DictConfig, ListConfig, Node, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dfkd.errors import ConfigError
from dfkd.registry import Registry, close_matches

__all__ = [
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "RunConfig",
    "load_config",
    "merge_config",
    "save_config",
    "component_schema",
    "check_component",
]


@dataclass
class DataConfig:
    """Which dataset, where it lives on disk, and how its images are presented."""

    name: str = "procedural"
    root: str = "data"  # a folder, or an archive that is extracted once into the cache
    download: bool = False  # let torchvision download (needs network access)
    image_size: Optional[int] = None  # override the dataset's native size
    mean: Optional[list[float]] = None  # override the dataset's normalisation
    std: Optional[list[float]] = None
    augment: Optional[str] = None  # override the dataset's train augmentation ("none" disables it)
    train_samples: Optional[int] = None  # class-stratified subset of the train split
    test_samples: Optional[int] = None  # class-stratified subset of the test split
    num_workers: int = 2


@dataclass
class ModelConfig:
    """A network from the model zoo, optionally initialised from a checkpoint."""

    arch: str = "???"
    checkpoint: Optional[str] = None  # .safetensors, or a torch state dict (loaded with weights_only=True)
    # A recipe that produces `checkpoint` (as its output_dir's student.safetensors) when the file
    # does not exist yet: the run trains its own teacher first, or reuses it.
    recipe: Optional[str] = None


@dataclass
class LossConfig:
    """The student's loss: a weighted sum of named per-sample terms.

    ``terms`` maps a term of :data:`dfkd.losses.STUDENT_LOSSES` to its weight,
    e.g. ``{ce: 1.0}`` to train a teacher or ``{ce: 0.1, kd: 0.9}`` for Hinton KD.
    """

    terms: Optional[dict[str, float]] = None  # default {ce: 1.0}
    temperature: float = 4.0  # T of the kd term
    label_smoothing: float = 0.0  # of the ce term


@dataclass
class OptimConfig:
    """The student's optimiser and learning-rate schedule."""

    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam(w) only
    weight_decay: float = 5e-4
    # A schedule of dfkd.policies.schedules, evaluated in epochs (fractional) and
    # multiplied into lr: e.g. {name: cosine} (the default) or {name: multistep, milestones: [100, 150]}.
    schedule: Optional[dict[str, Any]] = None
    warmup_epochs: float = 0.0  # linear warm-up before the schedule, in epochs
    grad_clip: Optional[float] = None  # max global grad norm


@dataclass
class TrainConfig:
    """Length of the run, and how often it evaluates, logs and checkpoints."""

    epochs: int = 200
    steps_per_epoch: Optional[int] = None  # default: one pass of the sample source
    eval_every: int = 1  # epochs
    checkpoint_every: int = 1  # epochs
    keep_checkpoints: int = 2  # the last K complete checkpoints are kept
    resume: Optional[str] = None  # "auto", or the path of a checkpoint folder
    mixed_precision: str = "no"  # no | bf16 | fp16
    channels_last: bool = True  # NHWC memory format for the networks: faster convolutions on CPUs and GPUs
    # torch.compile the student and the generator (in place, Module.compile) before the first step; the
    # first steps then pay the compilation. The teacher stays eager: the synthesizer's terms hook it.
    compile: bool = False
    log_every: int = 50  # steps between scalar logs (each one syncs with the device)
    progress_bar: bool = True
    # On a NaN or infinite loss term (checked at every log): "error" stops the run naming the term;
    # "reload" goes back to the last good checkpoint and continues with fresh randomness, at most
    # max_reloads times over the run.
    nonfinite: str = "error"
    max_reloads: int = 3
    # Stop when the training time (synthesis included, evaluation excluded) reaches this many seconds,
    # with a last evaluation and checkpoint there: the time-to-accuracy benchmark gives every method
    # the same budget. None: run every epoch.
    time_budget_s: Optional[float] = None


@dataclass
class EvalConfig:
    """Evaluation on the test split."""

    batch_size: int = 512
    stability_from: float = 0.32  # fraction of training after which Acc@1 mean/var are taken (CuDFKD Table V)


@dataclass
class RunConfig:
    """A complete recipe. ``student`` is always the network the loop trains (a teacher, in a teacher recipe)."""

    output_dir: Optional[str] = None  # default: runs/<recipe file name>
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: Optional[ModelConfig] = None
    source: Optional[dict[str, Any]] = None  # default {name: real}
    # What synthesizes samples for the generator and pool sources: {name, generator, terms, **options}.
    synthesizer: Optional[dict[str, Any]] = None
    loss: LossConfig = field(default_factory=LossConfig)
    # Per-sample weights of the student loss: {name: uniform} (the default) or self-paced {name: log, threshold: ...}.
    weighting: Optional[dict[str, Any]] = None
    # The kd term's temperature: {name: fixed} (the default: loss.temperature) or CTKD's learnt
    # {name: ctkd_global} / {name: ctkd_instance} (dfkd.policies.temperature).
    temperature: Optional[dict[str, Any]] = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- loading

BASE_KEY = "base"  # the top-level recipe key naming the recipes it inherits from


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a recipe and its bases, apply ``key=value`` overrides, and validate the result.

    Args:
        path: a YAML recipe, or ``None`` to start from the defaults.
        overrides: dotted ``key=value`` strings; values are parsed as YAML.

    Returns:
        The validated config, typed by :class:`RunConfig`, with every
        component spec filled in with its defaults.

    Raises:
        ConfigError: on a missing file or base, a cycle of bases, bad YAML, an
            unknown key or a wrong type.
    """
    layers: list[Any] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist (looked at {path.resolve()}).")
        layers.extend(_recipe_layers(path, ()))
    cli = _parse_overrides(overrides)
    if BASE_KEY in cli:
        raise ConfigError(
            f"{BASE_KEY!r} cannot be set on the command line: bases are resolved when a recipe file is read. "
            f"Write a recipe with `{BASE_KEY}: <path>` instead (see dfkd.config)."
        )
    layers.append(cli)
    cfg = merge_config(*layers)
    if cfg.output_dir is None:
        stem = Path(path).stem if path is not None else "run"
        cfg.output_dir = str(Path("runs") / stem)
    return cfg


def _read_recipe(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except OmegaConfBaseException as exc:  # a grammar error, as in a bad interpolation: named by its key
        raise ConfigError(f"recipe {str(path)!r}: {_translate(exc)}") from None
    except Exception as exc:  # yaml.YAMLError
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections, got a {type(loaded).__name__}.")
    return loaded


def _recipe_layers(path: Path, chain: tuple[Path, ...]) -> list[dict[str, Any]]:
    """The layers of ``path``, bases first: ``[*layers of each base, the recipe without 'base']``.

    ``chain`` holds the recipes that led here (resolved), to report a cycle.
    """
    here = path.resolve()
    if here in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(here):], here))
        raise ConfigError(f"recipe bases form a cycle: {cycle}.")
    recipe = OmegaConf.to_container(_read_recipe(path))
    bases = recipe.pop(BASE_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(
            f"recipe {str(path)!r}: {BASE_KEY!r} must be a path or a list of paths (relative to the recipe's "
            f"folder), got {bases!r}."
        )
    layers: list[dict[str, Any]] = []
    for base in bases:
        base_path = Path(os.path.normpath(path.parent / base))
        if not base_path.is_file():
            raise ConfigError(
                f"base recipe {base!r} named by {str(path)!r} does not exist (looked at {base_path.resolve()})."
            )
        layers.extend(_recipe_layers(base_path, (*chain, here)))
    layers.append(recipe)
    return layers


def merge_config(*layers: Any) -> DictConfig:
    """Merge plain dicts or DictConfigs onto the :class:`RunConfig` schema, validating each key."""
    cfg = OmegaConf.structured(RunConfig)
    for layer in layers:
        container = OmegaConf.to_container(layer) if isinstance(layer, (DictConfig, ListConfig)) else layer
        if isinstance(container, Mapping) and BASE_KEY in container:
            raise ConfigError(
                f"{BASE_KEY!r} names recipes to inherit from and is resolved only when load_config reads a "
                "recipe file; it cannot be merged as a config section."
            )
        _check_keys(container, RunConfig, "")
        try:
            _drop_renamed_components(cfg, container)
        except OmegaConfBaseException as exc:
            raise _translate(exc) from None
        cfg = _merge(cfg, container)
    _resolve(cfg)
    _check_components(cfg)
    return cfg


def _merge(cfg: DictConfig, layer: Any, prefix: str = "") -> DictConfig:
    """``OmegaConf.merge(cfg, layer)``, with its errors turned into a :class:`ConfigError` that names the key."""
    try:
        return OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as exc:
        raise _translate(exc, prefix) from None
    except TypeError:  # OmegaConf refuses a mapping over a list, or a list over a mapping, with a bare TypeError
        clash = _container_clash(cfg, layer, prefix)
        if clash is None:
            raise
        raise ConfigError(clash) from None


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


def _resolve(cfg: DictConfig) -> None:
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


def _drop_renamed_components(cfg: DictConfig, layer: Mapping[str, Any]) -> None:
    """Where ``layer`` names a different component than ``cfg`` holds, clear the old spec first.

    A component's options belong to that component: ``weighting.name=uniform``
    over a recipe's ``{name: log, threshold: ...}`` must replace the spec, not
    merge into it and leave ``threshold`` behind.
    """
    for key, value in layer.items():
        if not isinstance(value, Mapping) or not isinstance(cfg.get(key), DictConfig):
            continue
        current = cfg[key]
        is_component = OmegaConf.get_type(current) is dict  # typed sections (data, optim, ...) are never replaced
        if is_component and "name" in value and "name" in current and value["name"] != current["name"]:
            cfg[key] = None
        else:
            _drop_renamed_components(current, value)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the fully resolved config as YAML."""
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
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


# --------------------------------------------------------------------------- validation


def _schema_fields(schema: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema)}


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _check_keys(data: Any, schema: type, prefix: str) -> None:
    """Reject keys that are not fields of ``schema``, recursively, suggesting the closest."""
    if not isinstance(data, Mapping):
        return
    hints = typing.get_type_hints(schema)
    fields = _schema_fields(schema)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(_unknown_key_message(full, str(key), list(fields)))
        sub = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(sub):
            optional = sub is not hints[key]
            if not isinstance(value, Mapping) and not (value is None and optional):
                raise ConfigError(
                    f"config key {full!r} is a section: a mapping of {', '.join(_schema_fields(sub))}; got {value!r}."
                )
            _check_keys(value, sub, f"{full}.")


def _unknown_key_message(full_key: str, key: str, valid: list[str]) -> str:
    close = close_matches(key, valid)
    parent = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
    hint = f" Did you mean {' or '.join(repr(parent + c) for c in close)}?" if close else ""
    where = f"section {parent[:-1]!r}" if parent else "a recipe"
    listing = f"Valid keys in {where}: {', '.join(sorted(valid))}." if valid else f"Section {parent[:-1]!r} takes no keys here."
    return f"unknown config key {full_key!r}.{hint} {listing}"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _translate(exc: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    """Turn an OmegaConf error into a one-paragraph :class:`ConfigError`."""
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


# --------------------------------------------------------------------------- component specs


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
                _unknown_key_message(f"{path}.{key}", key, valid) + f" ({registry.name} {name!r})"
                + (f" Also unknown: {', '.join(also)}." if also else "")
            )
    merged = _merge(OmegaConf.structured(schema), options, prefix=f"{path}.")
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


# Component specs are replaced, not merged, by a recipe: their defaults are filled in only where
# the merged config leaves them unset (a schema default would otherwise merge into the recipe's
# spec and leak options of another component into it).
_COMPONENT_DEFAULTS = {
    "source": {"name": "real"},
    "loss.terms": {"ce": 1.0},
    "optim.schedule": {"name": "cosine"},
    "weighting": {"name": "uniform"},
    "temperature": {"name": "fixed"},
}


def _check_components(cfg: DictConfig) -> None:
    """Check every registry name and component spec, so a typo fails before any work starts."""
    missing = sorted(OmegaConf.missing_keys(cfg))  # '???': the schema's student.arch, or a value a recipe left to set
    if missing:
        if missing[0].endswith(".arch"):
            raise ConfigError(f"{missing[0]} is required: a name from the model zoo (see `dfkd list models`).")
        raise ConfigError(f"{missing[0]} is required: set it in the recipe or on the command line.")
    for key, default in _COMPONENT_DEFAULTS.items():
        current = OmegaConf.select(cfg, key)
        if current is None:
            OmegaConf.update(cfg, key, default, merge=False)
        elif "name" in default and isinstance(current, DictConfig) and "name" not in current:
            OmegaConf.update(cfg, key, {**default, **OmegaConf.to_container(current)}, merge=False)
    from dfkd.data import DATASETS
    from dfkd.losses import STUDENT_LOSSES
    from dfkd.models import list_models
    from dfkd.optim import OPTIMIZERS
    from dfkd.policies.schedules import SCHEDULES
    from dfkd.policies.temperature import TEMPERATURES, build_temperature
    from dfkd.policies.weighting import WEIGHTINGS, build_weighting
    from dfkd.sources import SOURCES
    from dfkd.synthesis import check_synthesizer

    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name: {DATASETS.unknown_message(cfg.data.name)}")
    for role in ("student", "teacher"):
        model = cfg[role]
        if model is None:
            continue
        names = list_models()
        if model.arch not in names:
            close = close_matches(model.arch, names)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"{role}.arch: the model zoo has no {model.arch!r}.{hint} See `dfkd list models`.")
    for term in cfg.loss.terms:
        if term not in STUDENT_LOSSES:
            raise ConfigError(f"loss.terms: {STUDENT_LOSSES.unknown_message(term)}")
    if cfg.optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name: {OPTIMIZERS.unknown_message(cfg.optim.name)}")
    if cfg.train.mixed_precision == "False":  # YAML reads a bare `no` (train.mixed_precision=no) as false
        cfg.train.mixed_precision = "no"
    if cfg.train.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(
            f"train.mixed_precision must be one of 'no', 'bf16', 'fp16', got {cfg.train.mixed_precision!r}."
        )
    if cfg.train.nonfinite not in ("error", "reload"):
        raise ConfigError(f"train.nonfinite must be 'error' or 'reload', got {cfg.train.nonfinite!r}.")
    for key, low in (("train.epochs", 1), ("train.eval_every", 1), ("train.checkpoint_every", 1), ("train.max_reloads", 0),
                     ("train.keep_checkpoints", 1), ("train.log_every", 1), ("eval.batch_size", 1)):
        if OmegaConf.select(cfg, key) < low:
            raise ConfigError(f"{key} must be at least {low}, got {OmegaConf.select(cfg, key)}.")
    if cfg.train.time_budget_s is not None and cfg.train.time_budget_s <= 0:
        raise ConfigError(f"train.time_budget_s must be positive (seconds), or null; got {cfg.train.time_budget_s}.")
    cfg.optim.schedule = check_component(SCHEDULES, cfg.optim.schedule, "optim.schedule")
    cfg.source = check_component(SOURCES, cfg.source, "source")
    if cfg.source.get("curriculum") is not None:
        from dfkd.curricula import CURRICULA

        cfg.source.curriculum = check_component(CURRICULA, cfg.source.curriculum, "source.curriculum")
    cfg.weighting = check_component(WEIGHTINGS, cfg.weighting, "weighting")
    build_weighting(cfg.weighting)  # also checks the nested threshold schedule
    cfg.temperature = check_component(TEMPERATURES, cfg.temperature, "temperature")
    build_temperature(cfg.temperature, cfg.loss.temperature, num_classes=2)  # also checks its ranges
    if cfg.synthesizer is not None:
        cfg.synthesizer = check_synthesizer(cfg.synthesizer)
