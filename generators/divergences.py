"""Per-sample divergences between two classifiers' outputs.

Both the generator's losses and the student's loss compare teacher and student
predictions, so the divergences are defined once, here, and ``dfkd`` imports
them. Every function takes raw logits of shape ``[B, C]`` and returns a
per-sample tensor of shape ``[B]``; reduction is the caller's business, so
per-sample weighting (self-paced learning) and masking stay possible.

Everything is computed in float32 or wider, whatever the input dtype, so mixed
precision never makes a divergence overflow or lose its small values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kl_div", "js_div", "l1_logits", "upcast"]


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 if it is in a half-precision type, else unchanged (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _log_probs(logits: Tensor, temperature: float | Tensor) -> Tensor:
    return F.log_softmax(upcast(logits) / temperature, dim=-1)


def kl_div(p_logits: Tensor, q_logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """``KL(softmax(p/T) ‖ softmax(q/T))`` per sample, in nats.

    Args:
        p_logits: ``[B, C]`` logits of the reference distribution (the teacher in KD).
        q_logits: ``[B, C]`` logits of the approximating distribution (the student).
        temperature: a scalar, or a ``[B, 1]`` tensor for per-sample temperatures.

    Returns:
        ``[B]`` divergences, summed over classes. No ``T²`` factor: callers that
        want Hinton's gradient scaling multiply by it themselves.
    """
    log_p = _log_probs(p_logits, temperature)
    log_q = _log_probs(q_logits, temperature)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def js_div(
    p_logits: Tensor, q_logits: Tensor, temperature: float | Tensor = 1.0, base: float = math.e
) -> Tensor:
    """Textbook Jensen-Shannon divergence per sample: ``½KL(P‖M) + ½KL(Q‖M)``, ``M = (P+Q)/2``.

    This is not the ``jsdiv`` of the CMI / DataFree code, which computes
    ``KL(M‖P)`` and ``KL(M‖Q)`` on clamped, unnormalised probabilities (see
    DESIGN.md section 9). With ``base=2`` the value lies in ``[0, 1]``.

    Args:
        p_logits, q_logits: ``[B, C]`` logits.
        temperature: softmax temperature, scalar or ``[B, 1]``.
        base: logarithm base; ``math.e`` for nats, ``2`` for bits.

    Returns:
        ``[B]`` divergences.
    """
    log_p = _log_probs(p_logits, temperature)
    log_q = _log_probs(q_logits, temperature)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    js = 0.5 * (kl_pm + kl_qm)
    return js / math.log(base) if base != math.e else js


def l1_logits(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Mean absolute difference between logits per sample (DFAD's loss).

    Averaging the result over the batch equals ``F.l1_loss(p, q)``.

    Returns:
        ``[B]`` distances.
    """
    return (upcast(p_logits) - upcast(q_logits)).abs().mean(dim=-1)
