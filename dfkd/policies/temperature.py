"""Temperature policies: the temperature ``T`` of the student's ``kd`` term.

``fixed`` gives the recipe's ``loss.temperature`` (or its own ``value``) on
every step: the behaviour of every recipe that names no policy.

``ctkd_global`` and ``ctkd_instance`` are CTKD (Li et al., "Curriculum
Temperature for Knowledge Distillation", AAAI 2023; ``seeds/004``; public code
zhengli97/CTKD). A learnable module outputs ``theta`` and the temperature is

    tau = t_min + t_range · sigmoid(theta)          so  t_min < tau < t_min + t_range

(``helper/loops.py``, ``train_distill``: ``temp = opt.t_start + opt.t_end *
torch.sigmoid(temp)``, with ``--t_start 1 --t_end 20`` in
``scripts/run_cifar_distill.sh``). ``theta`` passes through a gradient reversal
layer (GRL), so the one optimiser step that moves the student down the KD loss
moves the temperature module *up* it: ``min_student max_temperature L``
(slides, "Adversarial Temperature Learning"). The GRL scales the reversed
gradient by ``lambda(e)``, the curriculum: it rises by half a cosine from
``lambda_min`` to ``lambda_max`` over ``loops`` epochs, then stays at
``lambda_max`` (slides, "Curriculum Temperature Training"; their table of
``E_loops`` and ``[lambda_min, lambda_max]`` has ``10`` and ``[0, 1]`` best).

What is reversed is the module's output ``theta``, as in the public code
(``models/temp_global.py``: ``Global_T.forward`` returns ``self.grl(self.global_T,
lambda_)`` and ``loops.py`` applies the sigmoid afterwards). Reversing the
gradient of ``theta`` reverses it for every parameter behind ``theta``, which
is what "reverse the gradient of the temperature module" asks for.

Sign convention (DESIGN.md section 9): the public ``GradientReversalFunction``
multiplies the upstream gradient by ``+lambda_`` although its docstring says
``-lambda``, and ``train_student.py`` drives it with ``CosineDecay(max_value=0,
min_value=-1, num_loops=10)``, so its ``lambda_`` runs 0 → -1. Here the GRL
multiplies by ``-lambda`` and ``lambda`` runs 0 → 1: the same gradients, with the
sign written where the name says it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dfkd.components import check_component
from dfkd.errors import ConfigError
from dfkd.policies.schedules import cosine
from dfkd.registry import Registry

__all__ = [
    "TEMPERATURES",
    "GradientReversal",
    "grad_reverse",
    "grl_lambda",
    "GlobalTemperature",
    "InstanceTemperature",
    "TemperaturePolicy",
    "check_temperature",
    "build_temperature",
]


class GradientReversal(torch.autograd.Function):
    """Identity forward; the backward multiplies the upstream gradient by ``-lambda`` (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lam * grad, None


def grad_reverse(x: Tensor, lam: float) -> Tensor:
    """``x`` in the forward pass; ``-lam ·`` the gradient in the backward pass."""
    return GradientReversal.apply(x, lam)


def grl_lambda(epoch: float, *, lambda_min: float = 0.0, lambda_max: float = 1.0, loops: float = 10.0) -> float:
    """The curriculum ``lambda(e) = lambda_min + (lambda_max - lambda_min) · (1 - cos(pi · min(e, loops) / loops)) / 2``.

    ``lambda_min`` at ``e <= 0``, ``lambda_max`` from ``e = loops`` on: the public
    ``CosineDecay.get_value`` (``train_student.py``) with the sign of the GRL
    folded in (see the module docstring). It is the ``cosine`` schedule run
    from ``lambda_min`` to ``lambda_max`` over ``loops``.
    """
    return cosine(start=lambda_min, end=lambda_max)(epoch, loops)


def _sigmoid_range(theta: Tensor, t_min: float, t_range: float) -> Tensor:
    return t_min + t_range * torch.sigmoid(theta)


class GlobalTemperature(nn.Module):
    """One learnable ``theta`` for every sample: ``tau = t_min + t_range · sigmoid(theta)``, shape ``[1]``.

    ``theta`` starts at ``theta_init`` (the public ``Global_T``: ``nn.Parameter(torch.ones(1))``),
    so with the defaults the first temperature is ``1 + 20 · sigmoid(1) = 15.62``.
    """

    def __init__(self, *, t_min: float, t_range: float, theta_init: float) -> None:
        super().__init__()
        self.t_min, self.t_range = t_min, t_range
        self.theta = nn.Parameter(torch.full((1,), float(theta_init)))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, lam: float) -> Tensor:
        """``[1]`` temperature; the logits are not read."""
        return _sigmoid_range(grad_reverse(self.theta, lam), self.t_min, self.t_range)


class InstanceTemperature(nn.Module):
    """``tau_i = t_min + t_range · sigmoid(MLP([t_i, s_i]))`` per sample, shape ``[B, 1]``.

    The MLP is ``Linear(2C, hidden) → ReLU → Linear(hidden, 1)`` over the
    concatenated teacher and student logits, both detached: the module learns
    from its own reversed gradient only and passes none into the student
    (the KD loss still reaches the student through its logits directly).
    The public code has no instance-wise module (``train_student.py`` builds
    ``Global_T`` only and prints "mlp name wrong" otherwise), so the shape is
    this project's choice: the slides describe a module that "takes two
    predictions as input and outputs a temperature" for each instance at
    "negligible extra complexity" (41.6M → 41.7M MACs for ResNet-20 on
    CIFAR-100, which a hidden width of a few hundred matches). The MLP runs in
    float32 even under autocast, so the temperature keeps its precision.
    """

    def __init__(self, num_classes: int, *, hidden: int, t_min: float, t_range: float) -> None:
        super().__init__()
        self.t_min, self.t_range = t_min, t_range
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, lam: float) -> Tensor:
        """``[B, 1]`` temperatures from ``[B, C]`` student and teacher logits."""
        x = torch.cat([teacher_logits.detach(), student_logits.detach()], dim=1).float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            theta = self.mlp(x)
        return _sigmoid_range(grad_reverse(theta, lam), self.t_min, self.t_range)


class TemperaturePolicy:
    """The temperature of each student step, and the module that learns it (if any).

    Args:
        value: the constant temperature of a fixed policy.
        module: a learnable temperature module, called as ``module(student_logits,
            teacher_logits, lam) -> tau``; ``None`` for a fixed policy. The engine
            may replace it with its distributed wrapper (which forwards the same call).
        curriculum: ``epoch -> lambda`` of the GRL, evaluated per epoch.

    Attributes:
        module: as given, or the engine's wrapper of it.
    """

    def __init__(
        self,
        value: float | None = None,
        module: nn.Module | None = None,
        curriculum: Callable[[float], float] | None = None,
    ) -> None:
        if (module is None) == (value is None):
            raise ValueError("a temperature policy has either a fixed value or a learnable module")
        self.value = value
        self.module = module
        self.curriculum = curriculum

    def parameters(self) -> list[nn.Parameter]:
        """The learnable parameters (none for a fixed policy)."""
        return [] if self.module is None else list(self.module.parameters())

    def lambda_at(self, epoch_progress: float) -> float:
        """``lambda`` for the epoch that ``epoch_progress`` falls in, counted from 1 as the public code does.

        The public loop sets ``decay_value = gradient_decay.get_value(epoch)``
        once before each epoch, with ``epoch`` running from 1
        (``train_student.py``), so its first epoch already trains at
        ``lambda(1) = 0.0245`` and ``lambda_max`` is reached in epoch ``loops``.
        The engine counts epochs from 0, so fractional progress ``p`` uses
        ``lambda(floor(p) + 1)``: the reference's sequence, epoch for epoch. A
        per-epoch value also keeps the run's numbers those of the reference
        whatever the steps per epoch; a continuous ramp would differ from it
        by at most one epoch's step of the curve.
        """
        return self.curriculum(math.floor(epoch_progress) + 1)

    def __call__(
        self, student_logits: Tensor, teacher_logits: Tensor, epoch_progress: float, total_epochs: float
    ) -> tuple[float | Tensor, dict[str, Tensor]]:
        """``(temperature, scalars)`` for one step.

        Args:
            student_logits, teacher_logits: ``[B, C]``.
            epoch_progress: fractional epochs done (``step / steps_per_epoch``).
            total_epochs: the run's length in epochs (unused by the policies here).

        Returns:
            The fixed value as a float, or the learnt ``tau`` as a ``[1]`` (global)
            or ``[B, 1]`` (instance-wise) tensor; and, for a learnt one,
            ``temperature/tau`` (mean over the batch, a 0-dim device tensor) and
            ``temperature/grl_lambda`` (a 0-dim CPU tensor: the host knows it).
        """
        if self.module is None:
            return self.value, {}
        lam = self.lambda_at(epoch_progress)
        tau = self.module(student_logits, teacher_logits, lam)
        scalars = {
            "temperature/tau": tau.detach().mean(),
            "temperature/grl_lambda": torch.tensor(lam),  # a host value: no device copy
        }
        return tau, scalars


TemperatureFactory = Callable[..., TemperaturePolicy]
TEMPERATURES: Registry[TemperatureFactory] = Registry("temperature policies")


@TEMPERATURES.register("fixed")
def fixed(loss_temperature: float, num_classes: int, *, value: Optional[float] = None) -> TemperaturePolicy:
    """A constant temperature: ``value``, or ``loss.temperature`` when ``value`` is unset."""
    return TemperaturePolicy(value=float(loss_temperature if value is None else value))


def _check_ctkd(t_min: float, t_range: float, loops: float) -> None:
    if t_min <= 0:
        raise ConfigError(f"temperature.t_min must be positive (tau >= t_min divides the logits), got {t_min}.")
    if t_range < 0:
        raise ConfigError(f"temperature.t_range must be non-negative, got {t_range}.")
    if loops <= 0:
        raise ConfigError(f"temperature.loops must be positive (epochs of the lambda curriculum), got {loops}.")


def _ctkd(module: nn.Module, lambda_min: float, lambda_max: float, loops: float) -> TemperaturePolicy:
    """A learnt temperature behind the GRL, with the cosine lambda curriculum.

    The two CTKD factories repeat their keyword-only options because those are
    their recipe schemas (see :func:`dfkd.components.component_schema`).
    """
    curriculum = partial(grl_lambda, lambda_min=lambda_min, lambda_max=lambda_max, loops=loops)
    return TemperaturePolicy(module=module, curriculum=curriculum)


@TEMPERATURES.register("ctkd_global")
def ctkd_global(
    loss_temperature: float,
    num_classes: int,
    *,
    t_min: float = 1.0,
    t_range: float = 20.0,
    theta_init: float = 1.0,
    lambda_min: float = 0.0,
    lambda_max: float = 1.0,
    loops: float = 10.0,
) -> TemperaturePolicy:
    """CTKD with one learnt temperature, ``1 + 20 · sigmoid(theta)`` from ``theta = 1`` (first tau 15.62).

    ``loss.temperature`` is not used. Defaults: ``--t_start 1 --t_end 20 --decay_max 0
    --decay_min -1 --decay_loops 10`` (``scripts/run_cifar_distill.sh``), ``theta = 1``
    (``Global_T``).
    """
    _check_ctkd(t_min, t_range, loops)
    return _ctkd(GlobalTemperature(t_min=t_min, t_range=t_range, theta_init=theta_init), lambda_min, lambda_max, loops)


@TEMPERATURES.register("ctkd_instance")
def ctkd_instance(
    loss_temperature: float,
    num_classes: int,
    *,
    hidden: int = 256,
    t_min: float = 1.0,
    t_range: float = 20.0,
    lambda_min: float = 0.0,
    lambda_max: float = 1.0,
    loops: float = 10.0,
) -> TemperaturePolicy:
    """CTKD with a temperature per sample from an MLP over the two logits (see :class:`InstanceTemperature`).

    ``loss.temperature`` is not used. The range and the curriculum are those of ``ctkd_global``.
    """
    _check_ctkd(t_min, t_range, loops)
    if hidden < 1:
        raise ConfigError(f"temperature.hidden must be at least 1, got {hidden}.")
    return _ctkd(InstanceTemperature(num_classes, hidden=hidden, t_min=t_min, t_range=t_range), lambda_min, lambda_max, loops)


def check_temperature(spec: Any, loss_temperature: float) -> DictConfig:
    """Check a recipe's ``temperature`` spec, its value ranges included; return it with its defaults filled in.

    Raises:
        ConfigError: naming the key its registry refuses, or an option out of range.
    """
    checked = check_component(TEMPERATURES, spec, "temperature")
    build_temperature(checked, loss_temperature, num_classes=2)  # checks the ranges
    return checked


def build_temperature(spec: Mapping[str, Any], loss_temperature: float, num_classes: int) -> TemperaturePolicy:
    """The policy of a recipe's ``temperature`` spec (checked by :func:`check_temperature`)."""
    options = dict(OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec)
    return TEMPERATURES.get(options.pop("name"))(loss_temperature, num_classes, **options)
