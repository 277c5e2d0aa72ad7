"""Recipes: a typed schema, YAML loading with dotted overrides, and clear errors.

A recipe is a YAML file checked against :class:`RunConfig`. Command-line
arguments of the form ``key=value`` (dotted keys, YAML values) are merged on
top. The engine owns the fixed sections (``data``, ``student``, ``teacher``,
``loss``, ``optim``, ``train``, ``eval``); pluggable parts are *component
specs*, ``{name: <registry key>, **options}`` (:mod:`dfkd.components`). Either
way an unknown key names itself and the closest valid key, and a value of the
wrong type names the key, the expected type and the value given
(:mod:`dfkd.schema`).

This module knows the schema only, never a registry: :func:`read_config`
checks sections, keys, types and value ranges, and names the default
components. Which names the registries hold, and each component's options, are
checked by :func:`dfkd.recipe.load_config`, the loader to call.

Recipes inherit with a top-level ``base`` key: a path, or a list of paths,
each relative to the folder of the recipe that names it::

    # recipes/cifar10/cudfkd/resnet34_resnet18.yaml
    base: ../../methods/cudfkd.yaml      # the method's composition and defaults
    output_dir: runs/cifar10/cudfkd/resnet34_resnet18
    student: {arch: resnet18}

:func:`read_config` merges the layers in this order: each base (its own bases
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

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dfkd.components import drop_renamed_components
from dfkd.errors import ConfigError
from dfkd.schema import check_keys, config_error, merge_layer, parse_overrides, resolve_interpolations

__all__ = [
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "RunConfig",
    "read_config",
    "merge_config",
    "save_config",
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
    # Keep an exponential moving average of the student's weights with this decay per step (warmed up:
    # min(decay, (1 + n) / (10 + n)) at the n-th step; dfkd.averaging). The average is what the run
    # evaluates and saves as student.safetensors; the trained student is logged as online_* and saved
    # as student_online.safetensors. None: no average.
    ema_decay: Optional[float] = None


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


def read_config(path: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Read a recipe and its bases, apply ``key=value`` overrides, and check the result against the schema.

    Args:
        path: a YAML recipe, or ``None`` to start from the defaults.
        overrides: dotted ``key=value`` strings; values are parsed as YAML.

    Returns:
        The config, typed by :class:`RunConfig`, with the default components
        named. Registry names and component options are not checked here:
        :func:`dfkd.recipe.load_config` reads a recipe with this, then checks those.

    Raises:
        ConfigError: on a missing file or base, a cycle of bases, bad YAML, an
            unknown key, a wrong type or a value out of range.
    """
    layers: list[Any] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist (looked at {path.resolve()}).")
        layers.extend(_recipe_layers(path, ()))
    cli = parse_overrides(overrides)
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
        raise ConfigError(f"recipe {str(path)!r}: {config_error(exc)}") from None
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
    """Merge plain dicts or DictConfigs onto the :class:`RunConfig` schema, validating each key and value.

    Like :func:`read_config`, this checks the schema only; :func:`dfkd.recipe.check_recipe`
    checks the result against the registries.
    """
    cfg = OmegaConf.structured(RunConfig)
    for layer in layers:
        container = OmegaConf.to_container(layer) if isinstance(layer, (DictConfig, ListConfig)) else layer
        if isinstance(container, Mapping) and BASE_KEY in container:
            raise ConfigError(
                f"{BASE_KEY!r} names recipes to inherit from and is resolved only when load_config reads a "
                "recipe file; it cannot be merged as a config section."
            )
        check_keys(container, RunConfig)
        try:
            drop_renamed_components(cfg, container)
        except OmegaConfBaseException as exc:
            raise config_error(exc) from None
        cfg = merge_layer(cfg, container)
    resolve_interpolations(cfg)
    _complete(cfg)
    _check_values(cfg)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the fully resolved config as YAML."""
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))


# --------------------------------------------------------------------------- required keys, defaults and ranges

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


def _complete(cfg: DictConfig) -> None:
    """Fail on a required key left unset; name the default component of each spec the recipe leaves out."""
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


def _check_values(cfg: DictConfig) -> None:
    """Check the ranges of the engine's own settings."""
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
    if cfg.train.ema_decay is not None and not 0 < cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in (0, 1) (e.g. 0.999), or null for no average; got {cfg.train.ema_decay}.")
