"""The curricula: KD (uniform), MEKD, DCD, SLKD and TC3KD (DESIGN.md section 6).

Each is registered in :data:`~dfkd.curricula.base.CURRICULA` under its recipe
name; its keyword-only parameters are its recipe options. Stage boundaries are
fractions of training, so a recipe keeps its shape when its epoch count is
scaled down. The student loss is the recipe's ``loss`` section, not part of a
curriculum: KD's ``(1-beta)·CE + beta·T²·KL`` is ``loss.terms: {ce: 1-beta, kd: beta}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor, nn

from dfkd.curricula.base import (
    CURRICULA,
    Selection,
    check_fraction,
    easiest_per_class,
    equal_stages,
    stage_at,
    window_per_class,
)
from dfkd.curricula.scoring import Scorer
from dfkd.data import stratified_indices
from dfkd.errors import ConfigError

__all__ = ["Uniform", "MEKD", "DCD", "SLKD", "TC3KD"]


class _Staged:
    """Shared state of the curricula that re-select at stage boundaries."""

    needs_teacher = True  # whether its scores need the teacher's logits

    def __init__(self) -> None:
        self.pool = torch.zeros(0, dtype=torch.long)
        self.labels = torch.zeros(0, dtype=torch.long)
        self.starts: list[float] = [0.0]  # the fraction of training at which each stage begins
        self.fractions: list[float] = [1.0]  # the share of each class each stage trains on, where that applies
        self.stage = -1  # the stage whose selection is in force; -1 before the first

    def setup(self, pool: Tensor, targets: Tensor, seed: int) -> Tensor:
        self.pool, self.labels = pool, targets[pool]
        return pool

    def _easiest_of_stage(self, epoch: int, epochs: int, difficulty: Callable[[], Tensor]) -> Selection | None:
        """For curricula whose stage ``k`` trains on the easiest ``fractions[k]`` of each class.

        Scores (by calling ``difficulty``) only when a new stage begins and it trains on part of the data.
        """
        stage = stage_at(epoch, epochs, self.starts)
        if stage == self.stage:
            return None
        self.stage = stage
        fraction = self.fractions[stage]
        if fraction >= 1.0:
            return Selection(index=self.pool, stage=stage)
        scores = difficulty()
        chosen = self.pool[easiest_per_class(scores, self.labels, fraction)]
        return Selection(index=chosen, stage=stage, difficulty=scores)

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state["stage"])


@CURRICULA.register("uniform")
class Uniform(_Staged):
    """Plain KD (Hinton et al.): every training sample, uniformly shuffled, throughout."""

    needs_teacher = False

    def select(self, epoch: int, epochs: int, scorer: Scorer, student: nn.Module) -> Selection | None:
        if self.stage == 0:
            return None
        self.stage = 0
        return Selection(index=self.pool, stage=0)


@CURRICULA.register("mekd")
class MEKD(_Staged):
    """MEKD, the predefined multi-evaluator curriculum of the DCD paper (seed 000, section V-B).

    Difficulty is ``KL(teacher ‖ student) + CE(student, y)`` with equal weights
    (teacher simulation loss and student confidence), scored with the current
    student snapshot at the start of each stage. Stage ``k`` trains on the
    easiest ``fractions[k]`` of each class: by default the easiest third, then,
    re-ranked, the easiest two thirds, then everything.

    Args:
        fractions: the share of each class trained on in each stage, increasing, ending at 1.
        starts: the fraction of training at which each stage begins (``starts[0] = 0``);
            default: equal stages.
        temperature: of the KL term in the difficulty.
    """

    def __init__(
        self, *, fractions: list[float] = (1 / 3, 2 / 3, 1.0), starts: Optional[list[float]] = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.fractions = [float(f) for f in fractions]
        self.starts = [float(s) for s in starts] if starts is not None else equal_stages(len(self.fractions))
        _check_stages("source.curriculum", self.fractions, self.starts)
        self.temperature = temperature

    def select(self, epoch: int, epochs: int, scorer: Scorer, student: nn.Module) -> Selection | None:
        def difficulty() -> Tensor:
            scores = scorer(self.pool, student)
            return scores.kl(self.temperature) + scores.student_ce()

        return self._easiest_of_stage(epoch, epochs, difficulty)


@CURRICULA.register("slkd")
class SLKD(_Staged):
    """SLKD, instance-level sequence learning (Zhao et al., seed 001, section III).

    A warm-up on all the data (plain KD), then ``phases`` phases. At the start
    of phase ``k`` (1-based) the current student is the snapshot: it ranks every
    training sample by its confidence on the true label, each class is split
    into ``phases`` equal parts by that rank, and phase ``k`` trains on the
    easiest ``k`` parts; the last phase trains on everything.

    The paper's CIFAR-10 run warms up for 40 epochs and then uses N=5 phases
    (30, 30, 30, 30 and 100 epochs); CIFAR-100 uses N=3. Here the phases after
    the warm-up are equal unless ``starts`` says otherwise.

    Args:
        warmup: fraction of training spent on all data before phase 1.
        phases: N.
        starts: optional start fraction of each phase (N values, increasing, the first ``>= warmup``).
    """

    needs_teacher = False  # the snapshot's confidence alone ranks the samples

    def __init__(self, *, warmup: float = 0.2, phases: int = 5, starts: Optional[list[float]] = None) -> None:
        super().__init__()
        check_fraction("source.curriculum.warmup", warmup, high=0.99)
        if phases < 1:
            raise ConfigError(f"source.curriculum.phases must be at least 1, got {phases}.")
        phase_starts = [float(s) for s in starts] if starts is not None else equal_stages(phases, warmup)
        if len(phase_starts) != phases:
            raise ConfigError(f"source.curriculum.starts has {len(phase_starts)} values for {phases} phases.")
        _check_starts("source.curriculum.starts", [0.0, *phase_starts] if warmup > 0 else phase_starts)
        # stage 0 is the warm-up on everything and stage k >= 1 is phase k; without a warm-up phase 1
        # also starts at 0, and stage_at picks the later of two stages that start together
        self.starts = [0.0, *phase_starts]
        self.fractions = [1.0] + [k / phases for k in range(1, phases + 1)]

    def select(self, epoch: int, epochs: int, scorer: Scorer, student: nn.Module) -> Selection | None:
        def difficulty() -> Tensor:  # the most confident is the easiest
            return -scorer(self.pool, student, teacher=False).confidence()

        return self._easiest_of_stage(epoch, epochs, difficulty)


@CURRICULA.register("tc3kd")
class TC3KD(_Staged):
    """TC3KD, teacher-student cooperative curriculum customisation (Wang et al., seed 002).

    ``stages`` stages of equal length. Stage ``k`` (1-based) weighs the two
    difficulty measures with ``alpha = 1 - (k-1)/m``,
    ``g = alpha·CE_teacher + (1-alpha)·CE_student``, ranks only the residual set
    ``D - S_{k-1}``, and adds its easiest ``N/(c·m)`` samples of each class
    ("fetch and remove in balance"): ``S_k = S_{k-1} ∪ S_top``. Class ``c``
    holds ``round(k·n_c/m)`` samples after stage ``k``, so the last stage is the
    whole set and the stages' additions are disjoint.

    The slides ablate m from 1 to 10 (Fig. 5) without naming the value used for
    Table 1; 5 is this project's default. Stage 1 has ``alpha = 1`` and needs
    no student forward pass.

    Args:
        stages: m.
        alpha: ``decreasing`` (the paper's Equ. 4), ``increasing`` (Equ. 5,
            ``alpha = k/m``) or ``fixed`` (0.5), the settings of its ablation.
    """

    def __init__(self, *, stages: int = 5, alpha: str = "decreasing") -> None:
        super().__init__()
        if stages < 1:
            raise ConfigError(f"source.curriculum.stages must be at least 1, got {stages}.")
        if alpha not in ("decreasing", "increasing", "fixed"):
            raise ConfigError(f"source.curriculum.alpha must be decreasing, increasing or fixed, got {alpha!r}.")
        self.stages, self.alpha_rule = stages, alpha
        self.starts = equal_stages(stages)
        self.selected = torch.zeros(0, dtype=torch.bool)  # [len(pool)]: in S_k

    def setup(self, pool: Tensor, targets: Tensor, seed: int) -> Tensor:
        self.selected = torch.zeros(len(pool), dtype=torch.bool)
        return super().setup(pool, targets, seed)

    def alpha(self, k: int) -> float:
        """The teacher's weight in stage ``k`` (1-based)."""
        m = self.stages
        return {"decreasing": 1.0 - (k - 1) / m, "increasing": k / m, "fixed": 0.5}[self.alpha_rule]

    def select(self, epoch: int, epochs: int, scorer: Scorer, student: nn.Module) -> Selection | None:
        stage = stage_at(epoch, epochs, self.starts)
        if stage == self.stage:
            return None
        for k in range(self.stage + 2, stage + 2):  # every stage since the last selection, in order
            difficulty = self._add_stage(k, scorer, student)
        self.stage = stage
        return Selection(
            index=self.pool[self.selected], stage=stage, difficulty=difficulty,
            scalars={"curriculum/alpha": self.alpha(stage + 1)},
        )

    def _add_stage(self, k: int, scorer: Scorer, student: nn.Module) -> Tensor:
        residual = (~self.selected).nonzero(as_tuple=True)[0]
        alpha = self.alpha(k)
        scores = scorer(self.pool[residual], student if alpha < 1.0 else None)
        difficulty = alpha * scores.teacher_ce()
        if alpha < 1.0:
            difficulty = difficulty + (1.0 - alpha) * scores.student_ce()
        labels = self.labels[residual]
        for c in labels.unique().tolist():
            in_class = self.labels == c
            target = int(torch.floor(in_class.sum().double() * k / self.stages + 0.5))
            need = target - int((self.selected & in_class).sum())
            members = (labels == c).nonzero(as_tuple=True)[0]
            easiest = members[torch.sort(difficulty[members], stable=True).indices[:need]]
            self.selected[residual[easiest]] = True
        return difficulty

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "selected": self.selected.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.selected = state["selected"].clone()


@CURRICULA.register("dcd")
class DCD(_Staged):
    """DCD, dynamic curriculum distillation (Li et al., seed 000, sections IV-B and IV-C).

    **Difficulty** (eq. 8 to 10): ``phi = w_CE·CE(student, y) + w_KD·KL(teacher ‖ student)``
    with ``w_CE = max(0, Val_s - 1/k)`` and ``w_KD = max(0, Val_t - Val_s)``,
    where ``Val`` is accuracy on a held-out split of ``val_fraction`` of the
    training pool, stratified by class and never trained on (never the test
    set). If both weights are 0, ``phi`` falls back to the KL alone.

    **Scheduler.** One distillation step is one epoch (as in the paper). At the
    start of epoch ``j`` the student's gain is ``c_j = max(Val_s^j - Val_s^{j-1}, 0)``
    (eq. 11). The paper's eq. 12 and 13, which move the window, are garbled;
    this is the rule implemented, following Algorithm 1 and the text around it:

    - Each class's window covers the difficulty **ranks** ``[0, high)`` of that
      class. The paper writes the edges as ``mu - d`` and ``mu + d`` with
      ``mu`` and ``d`` "updated by the same amplitude simultaneously"; starting
      from ``mu = d`` (the easiest samples) the lower edge therefore stays at the
      easiest sample and only the upper edge moves, towards harder samples.
    - While ``c_j >= s`` training stays on the current subset.
    - The first epoch with ``c_j < s``: the student has converged on the
      subset, so ``phi`` is re-scored with the new snapshot and the subset is
      re-selected with the **same** window (``lambda_{j-1}`` in Algorithm 1).
    - Each further epoch with ``c_j < s`` (``c_{j-1} < s`` too): re-scored, and
      the window moves: ``high += step · s / (s + c_j)``. The smaller the gain,
      the larger the move (from ``step/2`` at ``c_j`` just under ``s`` to
      ``step`` at no gain), in the spirit of the paper's ``s·alpha/C_j``,
      which diverges at ``C_j = 0``.
    - The window ends covering everything: ``high`` never falls below
      ``start + (1 - start)·progress/full_by`` (progress = epoch/epochs), so it
      reaches 1 by ``full_by`` of training even if the gain never drops below ``s``.
      This floor is this project's addition; the paper trains until convergence.

    Args:
        s: the gain threshold (0.01 in the paper).
        start: the initial window, the easiest ``start`` of each class (the paper gives none; 1/3 as MEKD).
        step: the largest move of the window's upper edge, as a fraction of each class.
        val_fraction: the held-out share of the training pool.
        full_by: fraction of training by which the window covers everything; ``None`` drops that floor.
        temperature: of the KL term in the difficulty.
    """

    def __init__(
        self, *, s: float = 0.01, start: float = 1 / 3, step: float = 0.2, val_fraction: float = 0.1,
        full_by: Optional[float] = 0.8, temperature: float = 1.0,
    ) -> None:
        super().__init__()
        check_fraction("source.curriculum.start", start)
        check_fraction("source.curriculum.step", step)
        check_fraction("source.curriculum.val_fraction", val_fraction, high=0.5)
        if full_by is not None:
            check_fraction("source.curriculum.full_by", full_by)
        if val_fraction <= 0:
            raise ConfigError("source.curriculum.val_fraction must be positive: DCD measures Val on a held-out split.")
        if s <= 0:
            raise ConfigError(f"source.curriculum.s must be positive, got {s}.")
        self.s, self.start, self.step, self.val_fraction = s, start, step, val_fraction
        self.full_by, self.temperature = full_by, temperature
        self.val = torch.zeros(0, dtype=torch.long)
        self.num_classes = 0
        self.high = start
        self.val_t: float | None = None
        self.val_s: float | None = None  # Val_s of the previous epoch
        self.below = False  # whether the previous epoch's gain was below s

    def setup(self, pool: Tensor, targets: Tensor, seed: int) -> Tensor:
        size = max(1, round(self.val_fraction * len(pool)))
        held = stratified_indices(targets[pool], size, seed)  # positions into pool
        keep = torch.ones(len(pool), dtype=torch.bool)
        keep[held] = False
        self.val = pool[held]
        self.num_classes = int(targets.max()) + 1
        return super().setup(pool[keep], targets, seed)

    def select(self, epoch: int, epochs: int, scorer: Scorer, student: nn.Module) -> Selection | None:
        val = scorer(self.val, student)
        if self.val_t is None:
            self.val_t = val.teacher_accuracy()
        val_s = val.student_accuracy()
        gain = float("inf") if self.val_s is None else max(val_s - self.val_s, 0.0)
        below = gain < self.s
        move = below and self.below
        self.val_s, self.below = val_s, below

        high = self.high + self.step * self.s / (self.s + gain) if move else self.high
        if self.full_by is not None:
            floor = self.start + (1.0 - self.start) * min(1.0, epoch / epochs / max(self.full_by, 1e-12))
            high = max(high, floor)
        high = min(1.0, high)
        rescore = self.stage < 0 or below or high != self.high
        self.high = high
        stage = self.stage + 1 if rescore else self.stage
        k = self.num_classes
        w_ce, w_kd = max(0.0, val_s - 1.0 / k), max(0.0, self.val_t - val_s)
        scalars = {
            "curriculum/val_student": val_s, "curriculum/val_teacher": self.val_t,
            "curriculum/gain": gain if gain != float("inf") else 0.0,
            "curriculum/window_low": 0.0, "curriculum/window_high": high, "curriculum/w_ce": w_ce, "curriculum/w_kd": w_kd,
        }
        if not rescore:
            return Selection(index=None, stage=stage, scalars=scalars)
        self.stage = stage
        if high >= 1.0:
            return Selection(index=self.pool, stage=stage, scalars=scalars)
        scores = scorer(self.pool, student)
        if w_ce + w_kd == 0.0:
            w_kd = 1.0
        difficulty = w_ce * scores.student_ce() + w_kd * scores.kl(self.temperature)
        chosen = self.pool[window_per_class(difficulty, self.labels, 0.0, high)]
        return Selection(index=chosen, stage=stage, difficulty=difficulty, scalars=scalars)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(), "high": self.high, "val_t": self.val_t, "val_s": self.val_s,
            "below": self.below,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.high, self.val_t, self.val_s = float(state["high"]), state["val_t"], state["val_s"]
        self.below = bool(state["below"])


def _check_starts(path: str, starts: list[float]) -> None:
    if not starts or starts[0] != 0.0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= 1.0:
        raise ConfigError(f"{path}: stage starts must begin at 0 and increase within [0, 1), got {starts}.")


def _check_stages(path: str, fractions: list[float], starts: list[float]) -> None:
    if len(fractions) != len(starts):
        raise ConfigError(f"{path}: {len(fractions)} stage fractions but {len(starts)} stage starts.")
    _check_starts(f"{path}.starts", starts)
    if any(not 0.0 < f <= 1.0 for f in fractions) or any(b < a for a, b in zip(fractions, fractions[1:])):
        raise ConfigError(f"{path}: stage fractions must lie in (0, 1] and not decrease, got {fractions}.")
    if fractions[-1] != 1.0:
        raise ConfigError(f"{path}: the last stage must train on everything (fraction 1), got {fractions[-1]}.")
