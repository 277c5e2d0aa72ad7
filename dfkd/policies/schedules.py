"""Schedules: pure functions of training progress.

A schedule is built from a recipe spec such as ``{name: cosine, start: 0.1,
end: 0}`` and is then a plain function ``value(t, total) -> float``. It holds
no state and reads no global counter: the caller passes ``t`` and ``total``
(the engine passes epochs, fractional within an epoch). Learning-rate factors,
loss weights such as CuDFKD's alpha_adv(t) and thresholds such as lambda(t)
are all schedules.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from dfkd.components import check_component
from dfkd.errors import ConfigError
from dfkd.registry import Registry

__all__ = ["Schedule", "SCHEDULES", "affine", "constant", "cosine", "linear", "multistep", "piecewise", "build_schedule"]

Schedule = Callable[[float, float], float]
"""``value(t, total) -> float``, with ``0 <= t <= total``."""

SCHEDULES: Registry[Callable[..., Schedule]] = Registry("schedules")


def _fraction(t: float, total: float) -> float:
    return min(max(t / total, 0.0), 1.0) if total > 0 else 1.0


@SCHEDULES.register("constant")
def constant(*, value: float = 1.0) -> Schedule:
    """``value`` throughout."""
    return lambda t, total: value


@SCHEDULES.register("linear")
def linear(*, start: float = 1.0, end: float = 0.0) -> Schedule:
    """From ``start`` at ``t = 0`` to ``end`` at ``t = total``, linearly."""
    return lambda t, total: start + (end - start) * _fraction(t, total)


@SCHEDULES.register("cosine")
def cosine(*, start: float = 1.0, end: float = 0.0) -> Schedule:
    """Half a cosine from ``start`` at ``t = 0`` to ``end`` at ``t = total`` (SGDR without restarts)."""
    return lambda t, total: end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * _fraction(t, total)))


@SCHEDULES.register("multistep")
def multistep(*, milestones: list[float], gamma: float = 0.1, start: float = 1.0) -> Schedule:
    """``start · gamma^k``, where ``k`` counts the milestones already reached (``t >= milestone``).

    Milestones are in the caller's unit of ``t`` (epochs for learning rates),
    like ``torch.optim.lr_scheduler.MultiStepLR``.
    """
    points = sorted(float(m) for m in milestones)
    if any(m < 0 for m in points):
        raise ConfigError(f"multistep milestones must be non-negative, got {list(milestones)}.")
    return lambda t, total: start * gamma ** bisect.bisect_right(points, t)


@SCHEDULES.register("affine")
def affine(*, start: float = 0.0, slope: float = 0.0) -> Schedule:
    """``start + slope · t``, unbounded: CuDFKD's threshold ``lambda(t) = lambda_0 + a·t``."""
    return lambda t, total: start + slope * t


@SCHEDULES.register("piecewise")
def piecewise(*, start: float = 0.0, slope: float = 0.5, k_begin: float = 0.2, k_end: float = 0.8) -> Schedule:
    """CuDFKD's ``alpha_adv(t)``: flat, then a linear ramp, then flat at the ramp's end value.

    ``start`` up to ``k_begin · total``; then ``start + slope · (t - k_begin · total)``
    up to ``k_end · total``; then constant. With ``t`` in epochs this is what the
    public CuDFKD code does by adding ``slope`` (its ``grad_adv``) to the weight
    once per epoch inside the window. (The paper's eq. 17 writes the ramp as
    ``alpha · t``, which would jump at ``k_begin · N``; the code's continuous ramp
    is used.)
    """
    if not 0.0 <= k_begin <= k_end <= 1.0:
        raise ConfigError(f"piecewise needs 0 <= k_begin <= k_end <= 1, got k_begin={k_begin}, k_end={k_end}.")

    def value(t: float, total: float) -> float:
        ramp = min(max(t, k_begin * total), k_end * total) - k_begin * total
        return start + slope * ramp

    return value


def build_schedule(spec: float | int | dict, path: str) -> Schedule:
    """A schedule from a recipe value: a number (constant) or a ``{name: ..., **options}`` spec.

    Raises:
        ConfigError: naming ``path`` when the spec is invalid.
    """
    if isinstance(spec, bool) or not isinstance(spec, (int, float, dict, DictConfig)):
        raise ConfigError(f"{path} must be a number or a schedule {{name: ..., ...}}, got {spec!r}.")
    if isinstance(spec, (int, float)):
        return constant(value=float(spec))
    options = OmegaConf.to_container(check_component(SCHEDULES, spec, path))
    return SCHEDULES.get(options.pop("name"))(**options)
