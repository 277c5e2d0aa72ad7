"""The curriculum contract, and the class-balanced selections every curriculum is built from.

A curriculum decides which training samples the student sees in each stage.
It never reads a batch and never touches the loss: :class:`~dfkd.sources.real.RealDataSource`
asks it for a :class:`Selection` at the start of every epoch and then draws
uniformly shuffled batches from the selected indices, so a curriculum is the
only thing that differs between KD, MEKD, DCD, SLKD and TC3KD.

Every selection keeps each class's share of the selected samples equal to its
share of the training pool (up to rounding, one sample per class): the
helpers here select by **rank within a class**, never by a global threshold.
The DCD paper notes that an unbalanced subset, or a class missing from it,
seriously hurts distillation, and SLKD and TC3KD balance their subsets too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from dfkd.curricula.scoring import Scorer
from dfkd.errors import ConfigError
from dfkd.registry import Registry

__all__ = [
    "CURRICULA",
    "Curriculum",
    "Selection",
    "class_quota",
    "easiest_per_class",
    "window_per_class",
    "stage_at",
    "equal_stages",
    "check_fraction",
]


@dataclass
class Selection:
    """What a curriculum decided at the start of an epoch.

    Attributes:
        index: int64 dataset indices to train on from now on, or ``None`` to keep the current ones.
        stage: the curriculum's stage (0-based), logged as ``curriculum/stage``.
        difficulty: the per-sample difficulty behind the decision (over the
            samples it ranked), logged as a histogram.
        scalars: anything else worth a curve (DCD's window, weights and gain).
    """

    index: Tensor | None
    stage: int
    difficulty: Tensor | None = None
    scalars: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Curriculum(Protocol):
    """Chooses the training subset stage by stage. ``state_dict`` holds what a resumed run needs."""

    needs_teacher: bool  # whether its scores need the teacher's logits

    def setup(self, pool: Tensor, targets: Tensor, seed: int) -> Tensor:
        """Called once with the training pool (int64 dataset indices) and every dataset label.

        Returns the indices the student may train on; a curriculum that needs a
        held-out split (DCD) carves it from ``pool`` here and keeps it.
        """

    def select(self, epoch: int, epochs: int, scorer: Scorer, student: Any) -> Selection | None:
        """At the start of ``epoch`` (0-based): a new selection, or ``None`` to change nothing.

        The source calls it exactly once per epoch, also across a resume (it
        checkpoints which epoch it last asked about), so a curriculum may count
        calls as epochs (DCD measures one validation gain per call).
        """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


CURRICULA: Registry[Callable[..., Curriculum]] = Registry("curricula")


def class_quota(counts: Tensor, fraction: float) -> Tensor:
    """``round(fraction · n_c)`` per class (halves up), at least 1 for a non-empty class when ``fraction > 0``.

    ``counts`` is int64 ``[C]``; so is the result.
    """
    quota = torch.floor(counts.double() * fraction + 0.5).long()
    if fraction > 0:
        quota = torch.where(counts > 0, quota.clamp_min(1), quota)
    return torch.minimum(quota, counts)


def _ranks_by_class(difficulty: Tensor, labels: Tensor) -> tuple[list[Tensor], Tensor]:
    """For each class present, its positions sorted from easiest to hardest; and the classes."""
    classes = labels.unique()
    order = []
    for c in classes.tolist():
        members = (labels == c).nonzero(as_tuple=True)[0]
        # stable sort: ties keep index order, so a selection is a pure function of the scores
        order.append(members[torch.sort(difficulty[members], stable=True).indices])
    return order, classes


def easiest_per_class(difficulty: Tensor, labels: Tensor, fraction: float) -> Tensor:
    """Positions of the easiest ``fraction`` of each class (lowest ``difficulty`` first).

    Args:
        difficulty: ``[M]`` scores, lower is easier.
        labels: int64 ``[M]`` labels of the same samples.
        fraction: in ``[0, 1]``.

    Returns:
        int64 positions into ``difficulty``, sorted.
    """
    return window_per_class(difficulty, labels, 0.0, fraction)


def window_per_class(difficulty: Tensor, labels: Tensor, low: float, high: float) -> Tensor:
    """Positions whose within-class difficulty rank lies in ``[low, high)`` (fractions of the class).

    The window is over **ranks**, not raw values: within each class, sample
    ``r`` of ``n_c`` (0 = easiest) is kept when ``round(low·n_c) <= r < round(high·n_c)``.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"window must satisfy 0 <= low <= high <= 1, got [{low}, {high}]")
    order, _ = _ranks_by_class(difficulty, labels)
    chosen = []
    for members in order:
        start = math.floor(low * len(members) + 0.5)
        stop = int(class_quota(torch.tensor([len(members)]), high)[0])
        chosen.append(members[start:stop])
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)


def stage_at(epoch: int, epochs: int, starts: Sequence[float]) -> int:
    """The stage that ``epoch`` falls in, when stage ``k`` begins at fraction ``starts[k]`` of training.

    Fractions are turned into whole epochs (``round(starts[k] · epochs)``), so a
    stage always begins at an epoch boundary; ``starts[0]`` must be 0.
    """
    boundaries = [round(s * epochs) for s in starts]
    return max(k for k, b in enumerate(boundaries) if b <= epoch)


def equal_stages(count: int, offset: float = 0.0) -> list[float]:
    """Start fractions of ``count`` equal stages after a first ``offset`` fraction."""
    return [offset + (1.0 - offset) * k / count for k in range(count)]


def check_fraction(name: str, value: float, *, low: float = 0.0, high: float = 1.0) -> None:
    """Raise a :class:`ConfigError` naming ``name`` unless ``low <= value <= high``."""
    if not (low <= value <= high) or math.isnan(value):
        raise ConfigError(f"{name} must lie in [{low}, {high}], got {value}.")
