"""From a recipe's ``synthesizer`` section to a working synthesizer and its term-weight schedules.

The section reads::

    synthesizer:
      name: generative                  # a key of generators.synthesizers.SYNTHESIZERS
      generator: {name: dcgan, nz: 256} # a key of generators.networks.GENERATORS, with options
      terms:                            # term -> weight, or {weight: ..., **term options}
        bn: 1.0
        oh: 1.0
        adv: {weight: {name: piecewise, slope: 0.5, k_begin: 0.2, k_end: 0.8}, divergence: kl, temperature: 3, mask: true}
      g_steps: 1                        # the synthesizer's own options
      lr: 1.0e-3
      lr_schedule: {name: cosine}       # optional: a factor on lr over the run, as optim.schedule is the student's

A weight is a number or a schedule of :mod:`dfkd.policies.schedules`, which
the sample source evaluates (in epochs) before every synthesis step: the
synthesizer itself knows nothing about time. So is ``lr_schedule``, for the
synthesizers that train one network at one rate (``generative``); without it
the rate stays constant, as in the CMI code's generative methods, while DFAD's
own code decays it with the student's (``lr_schedule: ${optim.schedule}``).

A term given as ``null`` is left out. That is how a recipe removes a term its
base composes (see ``base`` in :mod:`dfkd.config`): ``synthesizer: {terms: {bn:
null}}`` drops the BN-statistics term for a teacher without batch norm, where a
weight of 0 would still attach the term's hooks (and fail on such a teacher).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dfkd.components import check_component
from dfkd.data import DATASETS
from dfkd.errors import ConfigError
from dfkd.policies.schedules import SCHEDULES, Schedule, build_schedule
from generators.networks import GENERATORS
from generators.synthesizers import SYNTHESIZERS, Synthesizer
from generators.terms import TERMS, Term

__all__ = ["check_synthesizer", "check_generator_fits", "build_generator", "build_synthesizer", "BuiltSynthesizer"]

_GENERATOR_RESERVED = ("image_size", "channels", "num_classes")
_NESTED = ("generator", "terms", "lr_schedule")  # checked here, not against the synthesizer's parameters


def _plain(spec: Any) -> Any:
    return OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec


def _split_term(name: str, value: Any, path: str) -> tuple[Any, dict[str, Any]]:
    """``(weight, options)`` of one entry of ``terms``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), {}
    if isinstance(value, Mapping) and "weight" in value:
        options = {k: v for k, v in value.items() if k != "weight"}
        return value["weight"], options
    raise ConfigError(
        f"{path}.{name} must be a weight (a number or a schedule under 'weight'), e.g. {name}: 1.0 or "
        f"{name}: {{weight: {{name: linear, start: 0, end: 1}}, ...options}}; got {value!r}."
    )


def check_synthesizer(spec: Any, path: str = "synthesizer") -> DictConfig:
    """Validate the section without building anything heavy; return it with every default filled in."""
    spec = _plain(spec)
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"{path} must be a mapping with a 'name' from the synthesizers registry, got {spec!r}.")
    options = {k: v for k, v in spec.items() if k not in _NESTED}
    checked = OmegaConf.to_container(check_component(SYNTHESIZERS, options, path))
    cls = SYNTHESIZERS.get(spec["name"])
    generator_param = _positional_parameters(cls).get("generator")
    needs_generator = generator_param is not None and generator_param.default is inspect.Parameter.empty
    if needs_generator and "generator" not in spec:
        raise ConfigError(f"{path}: the {spec['name']!r} synthesizer needs a generator, e.g. generator: {{name: dcgan}}.")
    if "generator" in spec:
        if generator_param is None:
            raise ConfigError(f"{path}: the {spec['name']!r} synthesizer takes no generator; remove {path}.generator.")
        checked["generator"] = OmegaConf.to_container(
            check_component(GENERATORS, spec["generator"], f"{path}.generator", reserved=_GENERATOR_RESERVED)
        )
        if checked["generator"].get("conditional"):
            _check_conditional(cls, checked, path)
    if spec.get("lr_schedule") is not None:
        checked["lr_schedule"] = _check_lr_schedule(cls, spec, path)
    terms = spec.get("terms") or {}
    if isinstance(terms, Mapping):
        for name in terms:  # before nulls are dropped: a null under a misspelt name would remove nothing, silently
            if name not in TERMS:
                raise ConfigError(f"{path}.terms.{name}: {TERMS.unknown_message(name)}")
        terms = {name: value for name, value in terms.items() if value is not None}  # null removes a term
    if not isinstance(terms, Mapping) or not terms:
        raise ConfigError(f"{path}.terms must map at least one term of {TERMS.names()} to its weight.")
    checked["terms"] = {}
    for name, value in terms.items():
        weight, term_options = _split_term(name, value, f"{path}.terms")
        build_schedule(weight, f"{path}.terms.{name}.weight")
        full = OmegaConf.to_container(check_component(TERMS, {"name": name, **term_options}, f"{path}.terms.{name}"))
        full.pop("name")
        checked["terms"][name] = {"weight": weight, **full}
    return OmegaConf.create(checked)


def _able(capability: str) -> str:
    """The registered synthesizers that declare ``capability`` (a ClassVar of :class:`Synthesizer`), for messages."""
    names = [repr(name) for name in SYNTHESIZERS.names() if getattr(SYNTHESIZERS.get(name), capability)]
    return f"the {' or '.join(names)} synthesizer" if names else "no registered synthesizer"


def _check_lr_schedule(cls: type, spec: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The ``lr_schedule`` spec with its defaults filled in, for a synthesizer that can follow one."""
    if not cls.schedules_lr:
        raise ConfigError(
            f"{path}.lr_schedule: the {spec['name']!r} synthesizer has no single learning rate to schedule "
            f"(only {_able('schedules_lr')} has); remove {path}.lr_schedule."
        )
    if not isinstance(spec["lr_schedule"], Mapping):
        raise ConfigError(
            f"{path}.lr_schedule must be a schedule {{name: ..., ...}} (e.g. {{name: cosine}}) or null for a "
            f"constant rate, got {spec['lr_schedule']!r}."
        )
    return OmegaConf.to_container(check_component(SCHEDULES, spec["lr_schedule"], f"{path}.lr_schedule"))


def _check_conditional(cls: type, checked: Mapping[str, Any], path: str) -> None:
    """A class-conditional generator is asked for a class per image: only a synthesizer that draws
    those classes (``targets: random``) and passes them to the generator can drive it."""
    if not cls.conditions_generator:
        raise ConfigError(
            f"{path}.generator.conditional: the {checked['name']!r} synthesizer cannot drive a class-conditional "
            f"generator (it gives the generator no class labels); use {_able('conditions_generator')} or remove "
            f"{path}.generator.conditional."
        )
    if checked.get("targets") != "random":
        raise ConfigError(
            f"{path}.targets must be 'random' with a conditional generator (each image is asked for a class "
            f"drawn uniformly, and the oh term trains the generator to make it); got {checked.get('targets')!r}."
        )


def _positional_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """What the engine injects into ``cls`` (not recipe options): its positional-or-keyword parameters.

    A ``generator`` parameter without a default makes the recipe's ``generator``
    section mandatory; with a default (``None``) it is optional.
    """
    return {
        p.name: p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name != "self"
    }


@dataclass
class BuiltSynthesizer:
    """A synthesizer, the schedule of each of its term weights, and of its learning rate (``None``: constant)."""

    synthesizer: Synthesizer
    schedules: dict[str, Schedule]
    generator: nn.Module | None
    lr_schedule: Schedule | None = None

    def weights(self, t: float, total: float) -> dict[str, float]:
        """Every term's weight at progress ``t`` of ``total`` (epochs)."""
        return {name: schedule(t, total) for name, schedule in self.schedules.items()}


def build_generator(spec: Mapping[str, Any], *, image_size: int, channels: int, num_classes: int) -> nn.Module:
    """The generator of a ``synthesizer.generator`` section, making the dataset's image size
    (and, when ``conditional``, conditioned on its ``num_classes`` classes).

    Raises:
        ConfigError: the generator cannot make ``channels × image_size × image_size`` images.
    """
    options = dict(spec)
    name = options.pop("name")
    try:
        return GENERATORS.get(name)(image_size=image_size, channels=channels, num_classes=num_classes, **options)
    except ValueError as exc:
        raise ConfigError(
            f"synthesizer.generator {name!r} cannot make {channels}x{image_size}x{image_size} images, the "
            f"dataset's size: {exc}. The generator always synthesises at the dataset's image size; choose a "
            "data.image_size it supports, or another generator (`dfkd list generators`)."
        ) from None


def check_generator_fits(cfg: DictConfig) -> None:
    """Fail before anything runs (a teacher's training included) when the recipe's generator cannot make
    the dataset's images. Built on the meta device: no memory, no initialisation cost."""
    if cfg.synthesizer is None or cfg.synthesizer.get("generator") is None:
        return
    spec = DATASETS.get(cfg.data.name)
    with torch.device("meta"):
        build_generator(
            OmegaConf.to_container(cfg.synthesizer.generator),
            image_size=cfg.data.image_size or spec.image_size,
            channels=spec.in_channels,
            num_classes=spec.num_classes or 2,  # a folder dataset's count is known once it is read; any fits here
        )


def build_synthesizer(
    spec: Any,
    *,
    image_size: int,
    channels: int,
    num_classes: int,
    normalize: Callable,
    denormalize: Callable,
    teacher: nn.Module,
    feature_module: nn.Module | None,
    device: Any,
    batch_size: int,
) -> BuiltSynthesizer:
    """Build the section ``spec`` (validated by :func:`check_synthesizer`) and attach it to ``teacher``.

    Args:
        batch_size: this process's synthesis batch (the caller derives it from the
            spec's global ``batch_size``, or the source's, and the process count).
    """
    spec = OmegaConf.to_container(check_synthesizer(spec))
    name = spec.pop("name")
    generator = None
    if "generator" in spec:
        generator = build_generator(
            spec.pop("generator"), image_size=image_size, channels=channels, num_classes=num_classes
        ).to(device)
    lr_schedule = spec.pop("lr_schedule", None)
    if lr_schedule is not None:
        lr_schedule = build_schedule(lr_schedule, "synthesizer.lr_schedule")
    terms: dict[str, Term] = {}
    schedules: dict[str, Schedule] = {}
    for term_name, options in spec.pop("terms").items():
        schedules[term_name] = build_schedule(options.pop("weight"), f"synthesizer.terms.{term_name}.weight")
        terms[term_name] = TERMS.get(term_name)(**options).to(device)
    spec["batch_size"] = batch_size
    kwargs: dict[str, Any] = dict(terms=terms, normalize=normalize, denormalize=denormalize, num_classes=num_classes)
    if generator is not None:
        kwargs["generator"] = generator
    cls = SYNTHESIZERS.get(name)
    if "image_shape" in _positional_parameters(cls):  # synthesizers that optimise pixels need their shape
        kwargs["image_shape"] = (channels, image_size, image_size)
    try:
        synthesizer = cls(**kwargs, **spec)
    except ValueError as exc:
        raise ConfigError(f"synthesizer: {exc}") from None
    synthesizer.to(device)
    try:
        synthesizer.attach(teacher, feature_module=feature_module)
    except ValueError as exc:  # a term that cannot read this teacher (bn without batch norm)
        raise ConfigError(f"synthesizer.terms: {exc}.") from None
    return BuiltSynthesizer(synthesizer, schedules, generator, lr_schedule)
