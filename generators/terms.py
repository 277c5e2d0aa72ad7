"""The loss terms that train a generator (or the pixels of an inversion), each defined once.

A term maps one synthetic batch, as the teacher (and, for the adversarial
term, the student) saw it, to a scalar. Synthesizers weigh the terms with
weights that arrive from outside on every step (DESIGN.md sections 2 and 3):

====  ============================================================================
bn    ``Σ_l m_l (‖mu_l(x) - running_mean_l‖₂ + ‖sigma²_l(x) - running_var_l‖₂)`` over
      the teacher's BN layers; mu, sigma² are the per-channel mean and *biased*
      variance of each BN layer's **input** over (N, H, W). Unsquared norms, as in
      DeepInversion; ``m_0`` is ``first_multiplier``, the others 1.
oh    ``CE(t(x), argmax t(x))``, or ``CE(t(x), y)`` when the synthesizer samples targets y.
adv   ``-mean_i[m_i · D(p_t(x_i) ‖ p_s(x_i))]`` with ``m_i = 1[argmax t = argmax s]``
      when masked; D is KL at a temperature, textbook JS in bits, or L1 between logits.
      The masked mean runs over the whole batch, not over the kept rows (as in CMI).
act   ``-mean |f_t(x)|``, f_t the teacher's penultimate feature (DAFL).
balance  ``Σ_c pbar_c log pbar_c``, ``pbar = mean_i softmax(t(x_i))``: the negative
      entropy of the batch's mean prediction (natural log; DAFL's log10 form
      with weight 5 equals this with weight 5/ln 10 ≈ 2.17).
tv    total variation of x: DeepInversion's four-neighbour differences, as the
      sum of their L2 norms (``l2``) or the mean of their absolute values (``l1``).
====  ============================================================================

DeepInversion's "competition" term ``1 - JS`` and ``adv`` with ``divergence=js``
differ by the constant 1, so they have the same gradient; both assume JS in
``[0, 1]``, which the base-2 JS guarantees.

Terms that read the teacher's internals (``bn``, ``act``) attach forward hooks
when the synthesizer attaches them, record only inside :meth:`Term.capturing`
(so the student step's and evaluation's teacher forwards cost nothing extra),
and remove their hooks on :meth:`Term.close`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generators.divergences import js_div, kl_div, l1_logits, upcast
from generators.registry import Registry

__all__ = [
    "SynthBatch",
    "Term",
    "TERMS",
    "BNStatistics",
    "OneHot",
    "Adversarial",
    "Activation",
    "Balance",
    "TotalVariation",
    "channel_moments",
]


@dataclass
class SynthBatch:
    """A synthetic batch as the terms see it.

    Attributes:
        x: ``[B, C, H, W]`` images as fed to the teacher (normalised).
        teacher: ``[B, K]`` teacher logits on ``x``.
        student: ``[B, K]`` student logits on ``x``, when a term needs them.
        targets: ``[B]`` sampled class targets, when the synthesizer draws them.
        unit: ``[B, C, H, W]`` the images in ``[0, 1]`` before the synthesizer's
            augmentation and normalisation, when it has them (a term that makes
            its own views of the batch, such as ``contrastive``, starts from these).
        normalize: maps images in ``[0, 1]`` to the teacher's input space.
    """

    x: Tensor
    teacher: Tensor
    student: Tensor | None = None
    targets: Tensor | None = None
    unit: Tensor | None = None
    normalize: Callable[[Tensor], Tensor] | None = None


class Term(nn.Module):
    """A generator loss term. Subclasses implement :meth:`forward` and, if they hook the teacher, the rest."""

    needs_student: ClassVar[bool] = False

    def attach(self, teacher: nn.Module, *, feature_module: nn.Module | None = None) -> None:
        """Hook into ``teacher``; ``feature_module`` is the layer whose input is the penultimate feature."""

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Record what the hooks see during the teacher forward inside this block."""
        yield

    def close(self) -> None:
        """Remove every hook this term placed."""

    def keep(self, improved: Tensor) -> None:
        """Inversion rounds: after each forward, ``improved`` (a 0-dim bool on the device) says whether
        that batch is now the round's kept (lowest-loss) batch. Terms with per-round state track it here."""

    def end_round(self) -> None:
        """Inversion rounds: called once when a round ends, after its kept batch is final."""

    def forward(self, batch: SynthBatch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


TERMS: Registry[type[Term]] = Registry("generator loss terms", plugins=("generators.contrastive",))


class _HookedTerm(Term):
    """A term that records tensors from teacher forward hooks while capturing."""

    def __init__(self) -> None:
        super().__init__()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active = False
        self._records: list[Tensor] = []

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        self._records = []
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def _take(self) -> list[Tensor]:
        records, self._records = self._records, []
        if not records:
            raise RuntimeError(f"{type(self).__name__}: no teacher forward was captured; call it inside capturing()")
        return records

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)


class _ChannelMoments(torch.autograd.Function):
    """Mean and biased variance of ``x`` over ``dims``, with the backward in one fused pass.

    With ``c = x - mean``, the gradient is ``(g_mean + 2 g_var c) / n`` (``n``
    elements per channel): the variance's dependence through the mean vanishes,
    since ``Σ c = 0``. Autograd through the same forward takes some seven passes
    over the activations for what :func:`torch.addcmul` does in one.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        mean = x.mean(dim=dims, keepdim=True)
        centered = x - mean
        ctx.save_for_backward(centered)
        ctx.shape, ctx.n = mean.shape, x.numel() // mean.numel()
        return mean.flatten(), (centered * centered).mean(dim=dims)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean: Tensor, grad_var: Tensor) -> tuple[Tensor, None]:
        (centered,) = ctx.saved_tensors
        scale = grad_mean.view(ctx.shape) / ctx.n
        return torch.addcmul(scale, centered, grad_var.view(ctx.shape), value=2.0 / ctx.n), None


def channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance ``([C], [C])`` of ``x [N, C, H, W]`` over (N, H, W).

    The values of ``x.mean(dim=(0, 2, 3))`` and ``x.var(dim=(0, 2, 3), unbiased=False)``
    (two passes: the mean, then the mean squared deviation from it), computed in the
    tensor's own memory layout (a channels-last ``x`` as its ``[N·H·W, C]`` view,
    without a copy) and with a fused backward. Forward and backward take about a
    third of the time of those two calls on a CPU, where ``torch.var`` computes the
    mean again and autograd's backward makes several passes over the activations.
    """
    if x.is_contiguous(memory_format=torch.channels_last):
        return _ChannelMoments.apply(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), (0,))
    return _ChannelMoments.apply(x, (0, 2, 3))


@TERMS.register("bn")
class BNStatistics(_HookedTerm):
    """Distance between the batch statistics at each teacher BN layer's input and its running statistics.

    With ``momentum`` m > 0 (Fast-DFKD's ``bn_mmt``, 0.9 in its scripts) a batch is
    not asked to match the running statistics alone: its statistics are first
    blended with an exponential moving average of earlier rounds',
    ``(1 - m)·stat + m·ema``, so each round's batch needs only to cover what earlier
    rounds missed. The average is updated at :meth:`end_round` from the round's
    last forward (as the Fast-DFKD code's ``update_mmt`` does) and starts at the
    first round's statistics; the first round uses its own statistics alone.

    Args:
        first_multiplier: weight of the first BN layer's distance (DeepInversion's
            ``first_bn_multiplier``, 10 in its code); the others weigh 1.
        momentum: m in ``[0, 1)``; 0 compares every batch with the running statistics alone.
    """

    def __init__(self, *, first_multiplier: float = 1.0, momentum: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"bn momentum must lie in [0, 1), got {momentum}")
        self.first_multiplier = first_multiplier
        self.momentum = momentum
        self._ema: list[tuple[Tensor, Tensor]] = []  # per BN layer: (mean, var) averaged over rounds
        self._last: list[tuple[Tensor, Tensor]] = []  # per BN layer: the last forward's (mean, var), detached

    def attach(self, teacher: nn.Module, *, feature_module: nn.Module | None = None) -> None:
        layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        if not layers:
            raise ValueError(
                "the bn term needs a teacher with BatchNorm2d layers, and this teacher has none: drop the term "
                "(synthesizer.terms.bn=null) or use a teacher with batch norm"
            )
        self._handles = [layer.register_forward_hook(self._record) for layer in layers]

    def _record(self, module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not self._active:
            return
        mean, var = channel_moments(upcast(inputs[0]))
        if self.momentum:
            layer = len(self._records)
            if len(self._last) <= layer:
                self._last.append((mean, var))
            self._last[layer] = (mean.detach(), var.detach())
            if self._ema:
                ema_mean, ema_var = self._ema[layer]
                mean = (1 - self.momentum) * mean + self.momentum * ema_mean
                var = (1 - self.momentum) * var + self.momentum * ema_var
        distance = torch.linalg.vector_norm(mean - module.running_mean.to(mean.dtype)) + torch.linalg.vector_norm(
            var - module.running_var.to(var.dtype)
        )
        self._records.append(distance)

    def end_round(self) -> None:
        """Fold the round's last statistics into the moving average (with momentum > 0)."""
        if not self.momentum or not self._last:
            return
        if not self._ema:
            self._ema = list(self._last)
        else:
            m = self.momentum
            self._ema = [
                (m * ema_mean + (1 - m) * mean, m * ema_var + (1 - m) * var)
                for (ema_mean, ema_var), (mean, var) in zip(self._ema, self._last)
            ]

    def get_extra_state(self) -> dict[str, list[Tensor]]:
        return {"ema_mean": [mean for mean, _ in self._ema], "ema_var": [var for _, var in self._ema]}

    def set_extra_state(self, state: dict[str, list[Tensor]]) -> None:
        self._ema = list(zip(state["ema_mean"], state["ema_var"]))

    def forward(self, batch: SynthBatch) -> Tensor:
        distances = self._take()
        return self.first_multiplier * distances[0] + sum(distances[1:], torch.zeros_like(distances[0]))


@TERMS.register("oh")
class OneHot(Term):
    """Cross-entropy of the teacher against its own argmax, or against sampled targets."""

    def forward(self, batch: SynthBatch) -> Tensor:
        targets = batch.targets if batch.targets is not None else batch.teacher.argmax(dim=1)
        return F.cross_entropy(upcast(batch.teacher), targets)


@TERMS.register("adv")
class Adversarial(Term):
    """The negative teacher-student divergence: the generator seeks samples the student gets wrong.

    Args:
        divergence: ``kl`` (KL(p_t ‖ p_s) at ``temperature``), ``js`` (textbook JS
            in bits at ``temperature``) or ``l1`` (mean absolute logit difference, DFAD).
        temperature: softmax temperature of ``kl`` and ``js``.
        mask: keep only samples where teacher and student agree on the top class
            (CMI, CuDFKD), averaging over the whole batch.
        t_squared: multiply KL by ``T²`` (the CuDFKD code's ``kldiv``).
    """

    needs_student = True
    DIVERGENCES: ClassVar[tuple[str, ...]] = ("kl", "js", "l1")

    def __init__(self, *, divergence: str = "kl", temperature: float = 1.0, mask: bool = False, t_squared: bool = False) -> None:
        super().__init__()
        if divergence not in self.DIVERGENCES:
            raise ValueError(f"adv divergence must be one of {', '.join(self.DIVERGENCES)}, got {divergence!r}")
        if temperature <= 0:
            raise ValueError(f"adv temperature must be positive, got {temperature}")
        self.divergence, self.temperature, self.mask, self.t_squared = divergence, temperature, mask, t_squared

    def per_sample(self, teacher: Tensor, student: Tensor) -> Tensor:
        """``[B]`` divergences, before masking and sign."""
        if self.divergence == "kl":
            d = kl_div(teacher, student, self.temperature)
            return d * self.temperature**2 if self.t_squared else d
        if self.divergence == "js":
            return js_div(teacher, student, self.temperature, base=2)
        return l1_logits(teacher, student)

    def forward(self, batch: SynthBatch) -> Tensor:
        if batch.student is None:
            raise ValueError("the adv term needs the student's logits")
        d = self.per_sample(batch.teacher, batch.student)
        if self.mask:
            d = d * (batch.teacher.argmax(dim=1) == batch.student.argmax(dim=1)).to(d.dtype)
        return -d.mean()


@TERMS.register("act")
class Activation(_HookedTerm):
    """DAFL's activation loss ``-mean |f_t(x)|`` on the teacher's penultimate feature."""

    def attach(self, teacher: nn.Module, *, feature_module: nn.Module | None = None) -> None:
        if feature_module is None:
            raise ValueError("the act term needs the teacher's penultimate layer (feature_module)")
        self._handles = [feature_module.register_forward_hook(self._record)]

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self._active:
            self._records.append(upcast(inputs[0]))

    def forward(self, batch: SynthBatch) -> Tensor:
        return -self._take()[-1].abs().mean()


@TERMS.register("balance")
class Balance(Term):
    """Negative entropy of the batch-mean teacher prediction; minimising it spreads the classes.

    Args:
        temperature: T of ``softmax(t(x) / T)``. DAFL, DFQ and CMI take the entropy at T = 1; the
            CuDFKD code takes it at its KD temperature (T = 20 in its CIFAR scripts), where every
            prediction is nearly uniform and the term is far weaker (DESIGN.md section 9).
    """

    def __init__(self, *, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"balance temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, batch: SynthBatch) -> Tensor:
        mean_p = F.softmax(upcast(batch.teacher) / self.temperature, dim=1).mean(dim=0)
        return (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()


@TERMS.register("tv")
class TotalVariation(Term):
    """Total variation over horizontal, vertical and both diagonal neighbours (DeepInversion's image prior).

    Args:
        norm: ``l2`` sums the Frobenius norms of the four difference images
            (DeepInversion's ``loss_var_l2``); ``l1`` averages their absolute values.
    """

    def __init__(self, *, norm: str = "l2") -> None:
        super().__init__()
        if norm not in ("l1", "l2"):
            raise ValueError(f"tv norm must be 'l1' or 'l2', got {norm!r}")
        self.norm = norm

    def forward(self, batch: SynthBatch) -> Tensor:
        x = upcast(batch.x)
        diffs = (
            x[..., :, :-1] - x[..., :, 1:],
            x[..., :-1, :] - x[..., 1:, :],
            x[..., 1:, :-1] - x[..., :-1, 1:],
            x[..., :-1, :-1] - x[..., 1:, 1:],
        )
        if self.norm == "l2":
            return sum((torch.linalg.vector_norm(d) for d in diffs), torch.zeros((), device=x.device, dtype=x.dtype))
        return sum((d.abs().mean() for d in diffs), torch.zeros((), device=x.device, dtype=x.dtype))
