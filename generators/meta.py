"""Fast-DFKD: a meta-learned generator that needs only a few updates per synthesis round.

Fang et al., "Up to 100× Faster Data-free Knowledge Distillation" (AAAI 2022),
code zju-vipa/Fast-Datafree (``datafree/synthesis/fast_meta.py``). Inversion
methods (DeepInversion, CMI) start every round from scratch and need hundreds
or thousands of updates to reach a good batch. Fast-DFKD keeps a *meta
generator* ``G_θ`` whose weights are a good starting point for any round:

1. clone it, ``θ' ← θ``, and draw fresh latent codes ``z ~ N(0, I)`` that are
   learnt with the clone (Adam, ``lr`` for θ', ``lr_z`` for z);
2. adapt the clone and z for ``g_steps`` updates (2, 5 or 10 in the paper) on
   the weighted terms, exactly as an inversion round does (the batch through
   the view, normalised, into the teacher; the lowest-loss batch is kept);
3. move the meta generator towards what the round learnt, a first-order
   meta-gradient ``g`` taken by the meta optimiser (Adam, ``meta_lr``):

   - ``fomaml`` (the code's ``is_maml=1``, used by all its scripts): the sum of the
     clone's gradients over the round, ``g = Σ_k ∇_θ' L(θ'_k)``;
   - ``reptile`` (the code's ``is_maml=0``): the displacement ``g = θ - θ'_K``
     (the code scales it by 67, which Adam's scale invariance makes irrelevant).

The round's kept batch goes to the pool (``source: {name: pool}``), from which
the student learns with the dataset's augmentation, as for CMI. Two options
of the code are kept: BN statistics against a moving average of past rounds'
(the ``bn`` term's ``momentum``, the code's ``bn_mmt``), and a one-off reset of
the generator's first layer (``reset_first_layer_at``, the code's ``reset_l0``
at round 120 + warm-up).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from generators.inversion import InversionRound, InversionSynthesizer
from generators.parallel import broadcast_module
from generators.synthesizers import SYNTHESIZERS, Normalize
from generators.terms import Term

__all__ = ["FastMetaSynthesizer", "FastRound", "reset_first_layer"]


@dataclass
class FastRound(InversionRound):
    """An inversion round whose network is a clone of the meta generator."""

    meta_grads: list[Tensor] = field(default_factory=list)  # fomaml: the clone's gradients, summed over the round


def reset_first_layer(generator: nn.Module) -> None:
    """Re-draw the latent projection and the batch norm after it as the Fast-DFKD code's ``reset_l0`` does.

    That code re-draws both weights from N(0, 0.02²), the batch norm's scale
    included (not N(1, 0.02²) as a DCGAN initialisation would), and zeroes the biases.
    """
    for module in (generator.project, generator.stages[0]):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)


@SYNTHESIZERS.register("fast")
class FastMetaSynthesizer(InversionSynthesizer):
    """Rounds that adapt a clone of a meta generator, then update the meta generator (Fast-DFKD).

    Args:
        generator: the meta generator, ``[B, nz]`` codes to images (``output_range``
            ``unit`` or ``normalized``); it is never trained directly, only by the meta step.
        terms, normalize, denormalize, num_classes: see :class:`~generators.synthesizers.Synthesizer`.
        image_shape: ``(C, H, W)`` of the teacher's inputs (the engine fills it in).
        batch_size: images per round on this process (the engine fills it in).
        g_steps: adaptation updates per round (the paper's Fast-2, -5 and -10).
        lr: Adam's learning rate for the clone (the code's ``lr_g``: 5e-3, 3e-3, 2e-3 for 2, 5, 10 steps).
        lr_z: Adam's learning rate for the codes (0.015 for 2 steps, 0.01 otherwise).
        betas: Adam's betas for the clone, the codes and the meta step (the code: 0.5, 0.999).
        meta: ``fomaml`` or ``reptile``, the first-order meta-gradient (see the module).
        meta_lr: the meta optimiser's learning rate; ``None`` takes the code's ``lr · g_steps``.
        reset_first_layer_at: the round (1-based) at which :func:`reset_first_layer` re-draws the meta
            generator's first layer once; 0 never does.
        term_betas, targets, view: see :class:`~generators.inversion.InversionSynthesizer`.
    """

    META = ("fomaml", "reptile")

    def __init__(
        self,
        generator: nn.Module,
        terms: Mapping[str, Term],
        normalize: Normalize,
        denormalize: Normalize,
        num_classes: int,
        image_shape: Sequence[int],
        *,
        batch_size: int | None = None,
        g_steps: int = 2,
        lr: float = 5e-3,
        lr_z: float = 0.015,
        betas: tuple[float, float] = (0.5, 0.999),
        meta: str = "fomaml",
        meta_lr: Optional[float] = None,
        reset_first_layer_at: int = 0,
        term_betas: tuple[float, float] = (0.9, 0.999),
        targets: str = "random",
        view: str = "crop_flip",
    ) -> None:
        super().__init__(
            terms, normalize, denormalize, num_classes, image_shape, generator, batch_size=batch_size,
            g_steps=g_steps, lr=lr, betas=betas, term_betas=term_betas, targets=targets, view=view,
        )
        self.check_options(
            {"lr": lr, "lr_z": lr_z, "meta": meta, "meta_lr": meta_lr, "reset_first_layer_at": reset_first_layer_at}
        )
        self.lr_z, self.meta = lr_z, meta
        self.meta_lr = lr * g_steps if meta_lr is None else meta_lr
        self.reset_first_layer_at = reset_first_layer_at
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.meta_lr, betas=self.betas)
        self.rounds = 0  # rounds finished

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        if options.get("lr_z", 1.0) <= 0:
            raise ValueError(f"lr_z must be positive (> 0), got {options['lr_z']}")
        if options.get("meta", "fomaml") not in cls.META:
            raise ValueError(f"meta must be one of {', '.join(cls.META)}, got {options['meta']!r}")
        if (options.get("meta_lr") or 0.0) < 0:
            raise ValueError(f"meta_lr must be at least 0 (or null for lr · g_steps), got {options['meta_lr']}")
        if options.get("reset_first_layer_at", 0) < 0:
            raise ValueError(f"reset_first_layer_at must be at least 0 (0: never), got {options['reset_first_layer_at']}")

    def _generator_round(self, device: torch.device) -> FastRound:
        """The round adapts a clone of the meta generator and fresh codes, with a learning rate for each."""
        if self.rounds + 1 == self.reset_first_layer_at:
            reset_first_layer(self.generator)
            broadcast_module(self.generator)
        clone = copy.deepcopy(self.generator)
        z = torch.randn(self.batch_size, clone.nz, device=device, requires_grad=True)

        def render() -> Tensor:
            out = clone(z)
            return out if clone.output_range == "unit" else self._to_unit(out)

        optimizer = torch.optim.Adam(
            [{"params": list(clone.parameters())}, {"params": [z], "lr": self.lr_z}], lr=self.lr, betas=self.betas
        )
        meta_grads = [torch.zeros_like(p) for p in self.generator.parameters()]
        return FastRound([z, *clone.parameters()], render, lambda: None, clone, optimizer, meta_grads=meta_grads)

    def update(
        self, current: FastRound, teacher: nn.Module, student: nn.Module | None, weights: Mapping[str, float]
    ) -> None:
        """One adaptation update; for ``fomaml`` the clone's gradient (averaged over processes) is summed."""
        super().update(current, teacher, student, weights)
        if self.meta == "fomaml":
            for total, p in zip(current.meta_grads, current.network.parameters()):
                if p.grad is not None:
                    total.add_(p.grad)

    def finish_round(self, current: FastRound) -> dict[str, Tensor]:
        """End the round (its kept batch becomes :meth:`best_images`), then take the meta step."""
        logs = super().finish_round(current)
        with torch.no_grad():
            if self.meta == "reptile":
                grads = [p - adapted for p, adapted in zip(self.generator.parameters(), current.network.parameters())]
            else:
                grads = current.meta_grads
            for p, grad in zip(self.generator.parameters(), grads):
                p.grad = grad
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.rounds += 1
        return logs

    def carried_state(self) -> dict[str, Any]:
        """The meta optimiser and the round count (the generator itself is checkpointed as a network)."""
        return {"meta_optimizer": self.meta_optimizer.state_dict(), "rounds": self.rounds}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.rounds = int(state["rounds"])
