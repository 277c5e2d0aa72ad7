"""Sample weighting: how much each sample's loss counts in the student step.

``uniform`` weighs every sample 1. The self-paced policies of CuDFKD (seed
003, section IV-B) give sample ``i`` the weight ``v_i = v*(l_i, lambda)`` of its
own detached loss against a threshold ``lambda(t)`` that grows during training,
so easy samples count first and harder ones join as ``lambda`` rises:

- hard: ``v = 1[l < lambda]``
- soft: ``v = 1[l < lambda] · (1 - l / lambda)``
- log:  ``v = (1 + e^{-lambda}) / (1 + e^{l - lambda})``

The weights are computed **per sample**. The public CuDFKD code reduces the loss
to a scalar before weighting, so one weight gates the whole batch; this follows
the paper instead (DESIGN.md section 9). The comparison is strict (``l < lambda``)
as in that code. The SP-regulariser ``g(lambda, v)`` of the paper's objective is
constant in the student's parameters (``v`` is detached), so it changes no
gradient and is not added to the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from dfkd.components import check_component
from dfkd.policies.schedules import build_schedule
from dfkd.registry import Registry

__all__ = ["WEIGHTINGS", "SampleWeighting", "check_weighting", "build_weighting", "spl_hard", "spl_soft", "spl_log"]


def spl_hard(loss: Tensor, lam: float) -> Tensor:
    """``1[l < lambda]`` per sample; ``loss`` is ``[B]``."""
    return (loss < lam).to(loss.dtype)


def spl_soft(loss: Tensor, lam: float) -> Tensor:
    """``1[l < lambda] · (1 - l / lambda)`` per sample (linear self-paced regulariser).

    For ``lambda > 0`` that is ``max(0, 1 - l / lambda)``.
    """
    return (1.0 - loss / lam).clamp_min(0.0)


def spl_log(loss: Tensor, lam: float) -> Tensor:
    """``(1 + e^{-lambda}) / (1 + e^{l - lambda})`` per sample (logarithmic regulariser); 1 at ``l = 0``.

    Written as ``(1 + e^{-lambda}) · sigmoid(lambda - l)``, which cannot overflow.
    """
    return (1.0 + math.exp(-lam)) * torch.sigmoid(lam - loss)


class SampleWeighting:
    """Maps detached per-sample losses ``[B]`` and progress to weights ``[B]`` and the scalars to log.

    Args:
        rule: ``(loss, lambda) -> v``, or ``None`` for uniform weights.
        threshold: ``lambda(t, total)``; unused when ``rule`` is ``None``.
    """

    def __init__(self, rule: Callable[[Tensor, float], Tensor] | None, threshold: Callable[[float, float], float]) -> None:
        self.rule = rule
        self.threshold = threshold

    @property
    def uniform(self) -> bool:
        return self.rule is None

    def __call__(self, loss: Tensor, t: float, total: float) -> tuple[Tensor | None, dict[str, Tensor]]:
        """``(v, scalars)``; ``v`` is ``None`` for uniform weighting (every sample counts 1)."""
        if self.rule is None:
            return None, {}
        lam = self.threshold(t, total)
        v = self.rule(loss.detach().float(), lam)
        scalars = {
            "weighting/lambda": torch.tensor(lam),  # known on the host: logged without a device copy
            "weighting/v_mean": v.mean(),
            "weighting/v_above_half": (v > 0.5).float().mean(),
        }
        return v, scalars


WEIGHTINGS: Registry[Callable[..., SampleWeighting]] = Registry("sample weightings")


@WEIGHTINGS.register("uniform")
def uniform() -> SampleWeighting:
    """Every sample weighs 1."""
    return SampleWeighting(None, lambda t, total: 0.0)


def _self_paced(rule: Callable[[Tensor, float], Tensor]) -> Callable[..., SampleWeighting]:
    def factory(*, threshold: dict = {"name": "affine", "start": 2.0, "slope": 0.0}) -> SampleWeighting:  # noqa: B006
        return SampleWeighting(rule, build_schedule(threshold, "weighting.threshold"))

    factory.__doc__ = f"Self-paced weights ``{rule.__name__}`` against ``threshold``, a schedule evaluated in epochs."
    return factory


WEIGHTINGS.register("hard", _self_paced(spl_hard))
WEIGHTINGS.register("soft", _self_paced(spl_soft))
WEIGHTINGS.register("log", _self_paced(spl_log))


def check_weighting(spec: Any) -> DictConfig:
    """Check a recipe's ``weighting`` spec, its threshold schedule included; return it with its defaults filled in.

    Raises:
        ConfigError: naming the key its registry, or the threshold's, refuses.
    """
    checked = check_component(WEIGHTINGS, spec, "weighting")
    build_weighting(checked)  # checks the nested threshold schedule
    return checked


def build_weighting(spec: Mapping[str, Any]) -> SampleWeighting:
    """The weighting of a recipe's ``weighting`` spec (checked by :func:`check_weighting`)."""
    options = {k: v for k, v in (OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec).items()}
    return WEIGHTINGS.get(options.pop("name"))(**options)
