"""Optimisers and learning-rate schedules built from a recipe's ``optim`` section, and its check."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dfkd.components import check_component
from dfkd.errors import ConfigError
from dfkd.policies.schedules import SCHEDULES, Schedule
from dfkd.registry import Registry

__all__ = ["OPTIMIZERS", "check_optim", "build_optimizer", "build_lr_scheduler", "lr_factor"]

OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry("optimizers")
OPTIMIZERS.register("sgd", torch.optim.SGD)
OPTIMIZERS.register("adam", torch.optim.Adam)
OPTIMIZERS.register("adamw", torch.optim.AdamW)


def check_optim(section: DictConfig) -> None:
    """Check a recipe's ``optim`` section: the optimiser's name, and its schedule, whose defaults it fills in.

    Raises:
        ConfigError: an unknown optimiser, or a schedule its registry refuses.
    """
    if section.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name: {OPTIMIZERS.unknown_message(section.name)}")
    section.schedule = check_component(SCHEDULES, section.schedule, "optim.schedule")


def build_optimizer(params: Iterable[nn.Parameter], cfg: DictConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.name`` over ``params``, with the options that apply to it."""
    cls = OPTIMIZERS.get(cfg.name)
    if cls is torch.optim.SGD:
        return cls(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_factor(schedule: Schedule, warmup_epochs: float, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The factor on the base learning rate for optimizer step ``step`` (0-based).

    ``schedule`` is evaluated at the fractional epoch ``step / steps_per_epoch``;
    during the first ``warmup_epochs`` it is scaled by a linear ramp that reaches
    1 at the end of the warm-up and is never 0.
    """
    epoch = step / steps_per_epoch
    factor = schedule(epoch, epochs)
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        factor *= (step + 1) / warmup_steps
    return factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: DictConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` that evaluates ``cfg.schedule`` in fractional epochs."""
    spec = OmegaConf.to_container(cfg.schedule)
    schedule = SCHEDULES.get(spec.pop("name"))(**spec)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(schedule, cfg.warmup_epochs, step, steps_per_epoch, epochs)
    )
