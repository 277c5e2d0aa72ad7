"""An exponential moving average of the student's weights: the student a run evaluates and ships.

An adversarial generator (DFAD, ZSKT, DFQ) keeps seeking what the student gets
wrong now, so the student's accuracy swings from one evaluation to the next
(DFAD's LeNet-5-half on MNIST moves by 1 to 2 points between epochs). An
average of its recent weights smooths the swings away without any data to
pick a checkpoint with: Polyak averaging, as timm's ``ModelEma`` and
TensorFlow's ``ExponentialMovingAverage`` keep it.

``train.ema_decay`` turns it on. The bookkeeping is torch's
:class:`~torch.optim.swa_utils.AveragedModel` (the copy, the first update
that copies, the count, buffers averaged too); this module gives it the
update, with the decay warmed up as TensorFlow's ``num_updates`` does: the
n-th update (n = 1, 2, ...) averages with

    decay_n = min(decay, (1 + n) / (10 + n)),

so the early evaluations are not dominated by the first steps' weights.
Integer buffers (batch norm's ``num_batches_tracked``) are counters, not
weights: they are copied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["build_student_ema", "warmed_decay"]


def warmed_decay(decay: float, num_averaged: Tensor) -> Tensor:
    """The decay of the update after ``num_averaged`` models were averaged: ``min(decay, (1 + n) / (10 + n))``.

    A tensor on ``num_averaged``'s device, so that updating never waits for the device.
    """
    n = num_averaged.float()
    return torch.clamp((1 + n) / (10 + n), max=decay)


def _ema_update(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """``AveragedModel``'s ``multi_avg_fn``: one group of averaged tensors (one device, one dtype) moved in place."""

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        floating = averaged[0].is_floating_point()
        weight = 1 - warmed_decay(decay, num_averaged).to(averaged[0].dtype) if floating else None
        for average, value in zip(averaged, current, strict=True):
            if floating:
                average.lerp_(value, weight)
            else:
                average.copy_(value)

    return update


def build_student_ema(student: nn.Module, decay: float) -> AveragedModel:
    """A moving average of ``student`` (unwrapped: a plain module), its parameters and buffers.

    Call ``ema.update_parameters(student)`` after every optimiser step; ``ema.module``
    is the averaged network. The first update copies the student.
    """
    return AveragedModel(student, multi_avg_fn=_ema_update(decay), use_buffers=True)
