"""The student's loss: a weighted sum of named per-sample terms.

Each term maps the student's logits (and, where it needs them, the teacher's
logits and the labels) to a per-sample loss of shape ``[B]``. The recipe's
``loss.terms`` gives each term a weight; the engine then applies the sample
weighting policy to the per-sample total and averages over the batch.

The ``kd`` term always uses the configured temperature. (The public CMI code
trains several baselines at T=1 whatever the flag says; DESIGN.md section 4.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dfkd.errors import ConfigError
from dfkd.registry import Registry
from generators.divergences import kl_div, l1_logits, upcast

__all__ = ["LossInputs", "StudentTerm", "STUDENT_LOSSES", "StudentLoss", "check_loss_terms"]


@dataclass
class LossInputs:
    """What a student loss term may read. Logits are ``[B, C]``; ``labels`` is ``[B]``."""

    student: Tensor
    teacher: Tensor | None = None
    labels: Tensor | None = None
    temperature: float | Tensor = 1.0  # a scalar, or [B, 1] for per-sample temperatures
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class StudentTerm:
    """A per-sample loss term and the inputs it needs."""

    fn: Callable[[LossInputs], Tensor]
    needs_teacher: bool
    needs_labels: bool


STUDENT_LOSSES: Registry[StudentTerm] = Registry("student losses")


def _cross_entropy(i: LossInputs) -> Tensor:
    return F.cross_entropy(upcast(i.student), i.labels, reduction="none", label_smoothing=i.label_smoothing)


def _kd(i: LossInputs) -> Tensor:
    """Hinton's ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per sample."""
    t = i.temperature
    scale = t.reshape(-1) ** 2 if isinstance(t, Tensor) else t**2
    return scale * kl_div(i.teacher, i.student, t)


def _l1(i: LossInputs) -> Tensor:
    return l1_logits(i.student, i.teacher)


STUDENT_LOSSES.register("ce", StudentTerm(_cross_entropy, needs_teacher=False, needs_labels=True))
STUDENT_LOSSES.register("kd", StudentTerm(_kd, needs_teacher=True, needs_labels=False))
STUDENT_LOSSES.register("l1", StudentTerm(_l1, needs_teacher=True, needs_labels=False))


def check_loss_terms(terms: Mapping[str, float]) -> None:
    """Check the names of a recipe's ``loss.terms`` (term -> weight) against :data:`STUDENT_LOSSES`.

    Raises:
        ConfigError: naming the first unknown term and its close matches.
    """
    for term in terms:
        if term not in STUDENT_LOSSES:
            raise ConfigError(f"loss.terms: {STUDENT_LOSSES.unknown_message(term)}")


class StudentLoss:
    """``l_i = Σ_k w_k · term_k(i)`` over the recipe's terms.

    Args:
        weights: term name → weight; names come from :data:`STUDENT_LOSSES`.
        label_smoothing: passed to the ``ce`` term.
    """

    def __init__(self, weights: Mapping[str, float], label_smoothing: float = 0.0) -> None:
        if not weights:
            raise ConfigError("loss.terms is empty: give at least one term, e.g. {ce: 1.0} or {kd: 1.0}.")
        self.weights = dict(weights)
        self.terms = {name: STUDENT_LOSSES.get(name) for name in self.weights}
        self.label_smoothing = label_smoothing

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms.values())

    @property
    def needs_labels(self) -> bool:
        return any(t.needs_labels for t in self.terms.values())

    def __call__(
        self,
        student: Tensor,
        teacher: Tensor | None = None,
        labels: Tensor | None = None,
        temperature: float | Tensor = 1.0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample total ``[B]`` and each term's raw per-sample values ``{name: [B]}``."""
        inputs = LossInputs(student, teacher, labels, temperature, self.label_smoothing)
        raw = {name: term.fn(inputs) for name, term in self.terms.items()}
        total = torch.stack([self.weights[name] * value for name, value in raw.items()]).sum(dim=0)
        return total, raw
