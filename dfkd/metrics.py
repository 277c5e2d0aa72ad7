"""Evaluation metrics of the CuDFKD paper (eq. 14 to 16, Table V), computed in torch.

Per sample, on the real test set:

- Acc@k: ``1[y in top-k(s)]``.
- Agree@1: ``1[argmax s = argmax t]``.
- loyalty: ``1 - sqrt(JS_2(p_t ‖ p_s))``, JS in log base 2, so it lies in
  ``[0, 1]`` and identical predictions give 1.
- loyalty_ref: ``1 - JS_nat^(1/4)``. The public CuDFKD code computes
  ``1 - sqrt(scipy.spatial.distance.jensenshannon(p_t, p_s))``; scipy already
  returns the square root of JS in nats, so that code reports the fourth root.
  It is kept so the paper's tables can be compared like for like.

Per-sample values are gathered across processes with accelerate's
``gather_for_metrics`` (which drops the padding duplicates of the last batch),
then averaged, so every test sample counts exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from generators.divergences import js_div

__all__ = ["per_sample_metrics", "summarize", "stability", "histogram", "METRIC_NAMES", "HISTOGRAM_BINS"]

METRIC_NAMES = ("acc1", "acc5", "agree1", "loyalty", "loyalty_ref", "teacher_acc1")
HISTOGRAM_BINS = 50


@torch.no_grad()
def per_sample_metrics(student: Tensor, labels: Tensor, teacher: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample metric values ``{name: [B] float}`` for one batch.

    Args:
        student: ``[B, C]`` student logits.
        labels: ``[B]`` true labels.
        teacher: ``[B, C]`` teacher logits, or ``None`` for accuracy only.
    """
    k = min(5, student.shape[-1])
    top = student.topk(k, dim=-1).indices
    out = {
        "acc1": (top[:, 0] == labels).float(),
        "acc5": (top == labels[:, None]).any(dim=-1).float(),
    }
    if teacher is not None:
        out["agree1"] = (top[:, 0] == teacher.argmax(dim=-1)).float()
        out["teacher_acc1"] = (teacher.argmax(dim=-1) == labels).float()  # the T.Scratch row of the papers' tables
        js_nat = js_div(teacher.double(), student.double()).clamp_min(0.0)
        out["loyalty"] = (1.0 - (js_nat / math.log(2.0)).sqrt()).float()
        out["loyalty_ref"] = (1.0 - js_nat.pow(0.25)).float()
    return out


def summarize(values: dict[str, Tensor]) -> dict[str, float]:
    """Means of gathered per-sample values, as percentages for the accuracy-like metrics.

    Acc@1, Acc@5, Agree@1 and the teacher's Acc@1 are reported in percent (as in the papers'
    tables); loyalty and loyalty_ref stay in ``[0, 1]``.
    """
    percent = {"acc1", "acc5", "agree1", "teacher_acc1"}
    return {k: float(v.double().mean()) * (100.0 if k in percent else 1.0) for k, v in values.items()}


def stability(acc1_history: Sequence[float], epochs: Sequence[int], total_epochs: int, start: float = 0.32) -> dict[str, float]:
    """CuDFKD Table V's stability summary of Acc@1.

    Args:
        acc1_history: Acc@1 of each evaluation, in order.
        epochs: the epoch (1-based, completed) of each evaluation.
        total_epochs: the run's length in epochs.
        start: evaluations at epochs ``>= start · total_epochs`` are summarised
            (0.32 is epoch 80 of 250, the paper's choice).

    Returns:
        ``mean_acc1`` and ``var_acc1`` (population variance) over those
        evaluations, and ``best_acc1`` over all of them.
    """
    if not acc1_history:
        return {"mean_acc1": float("nan"), "var_acc1": float("nan"), "best_acc1": float("nan")}
    history = torch.tensor(list(acc1_history), dtype=torch.float64)
    window = history[torch.tensor(list(epochs)) >= start * total_epochs]
    if window.numel() == 0:
        window = history[-1:]
    return {
        "mean_acc1": float(window.mean()),
        "var_acc1": float(window.var(unbiased=False)),
        "best_acc1": float(history.max()),
    }


def histogram(values: Tensor, bins: int = HISTOGRAM_BINS) -> list[int]:
    """Counts of ``values`` in ``bins`` equal bins over ``[0, 1]`` (1.0 falls in the last bin).

    The per-sample loyalty distribution of CuDFKD's Fig. 2, small enough for summary.json.
    """
    index = (values.detach().double().clamp(0.0, 1.0) * bins).long().clamp_max(bins - 1)
    return torch.bincount(index.flatten(), minlength=bins).tolist()
