"""Model inversion in rounds: DeepInversion (the pixels) and CMI (a re-initialised generator and its codes).

Each :meth:`InversionSynthesizer.step` is one **round**:

1. re-initialise what is optimised: a fresh ``[B, C, H, W]`` pixel tensor drawn
   from N(0, 1) in the teacher's input space (DeepInversion), or the generator,
   re-initialised with :func:`reset_parameters_dcgan`, and fresh latent codes
   ``z ~ N(0, I)`` that are optimised with it (CMI);
2. take ``g_steps`` Adam steps on the weighted terms, with an optimiser made
   anew for the round (as both references do). Every step renders the batch in
   ``[0, 1]``, applies the **global view** (random crop with 4-pixel zero
   padding, then a horizontal flip, per sample, with kornia), normalises, and
   feeds the teacher (and the student, for ``adv``);
3. keep the batch with the lowest total loss of the round (the batch as it was
   rendered for that step, before the update), tracked on the device with
   ``torch.where``, so the loop never waits for the device.

Trainable parameters of the terms (CMI's projection head) are updated with
every step by a second Adam optimiser that persists across rounds, as CMI's
``optimizer_head`` does. Terms with per-round state (CMI's memory bank) follow
the kept batch through :meth:`Term.keep` and :meth:`Term.end_round`.

The pixels follow DeepInversion as the CMI code base runs it (``DeepInvSyntheiszer``):
they live in the teacher's input space and are clipped back to the image of
``[0, 1]`` after every update. Two differences from that code are deliberate:

- its "best" batch is ``inputs.data``, which shares storage with the pixels the
  optimiser then updates in place, so it always keeps the *last* iterate; here
  the lowest-loss batch is kept, as its code intends;
- it augments by ``torch.roll`` jitter (up to 1/8 of the side, wrapping
  around) and one flip for the whole batch; here the global view of
  ``CMISynthesizer`` (zero-padded crop and per-sample flip) serves both methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from generators.networks import reset_parameters_dcgan
from generators.parallel import average_gradients, broadcast_module
from generators.synthesizers import SYNTHESIZERS, Normalize, Synthesizer, eval_mode
from generators.terms import Term

__all__ = ["InversionSynthesizer"]


@dataclass
class _Round:
    """What one round optimises and how it renders its batch."""

    variables: list[Tensor]  # re-initialised tensors this round's optimiser updates
    render: Callable[[], Tensor]  # the batch in [0, 1], [B, C, H, W], differentiable in `variables`
    project: Callable[[], None]  # after each update: bring the variables back to their valid set


@SYNTHESIZERS.register("inversion")
class InversionSynthesizer(Synthesizer):
    """Inversion by rounds, each keeping its lowest-loss batch (DeepInversion without a generator, CMI with one).

    Args:
        terms, normalize, denormalize, num_classes: see :class:`Synthesizer`.
        image_shape: ``(C, H, W)`` of the teacher's inputs (the engine fills it in).
        generator: maps ``[B, nz]`` codes to images (``output_range`` ``unit`` or
            ``normalized``); re-initialised every round. ``None`` optimises the pixels.
        batch_size: images per round on this process (the engine fills it in).
        g_steps: Adam steps per round (CMI's CIFAR scripts: 200 with a generator,
            1000 for DeepInversion).
        lr, betas: Adam for the round's variables (CMI: 1e-3 and (0.5, 0.999);
            DeepInversion in the CMI code: 0.1 and (0.5, 0.99)).
        term_betas: Adam betas for the terms' trainable parameters, whose optimiser
            persists across rounds (CMI's head optimiser: Adam's defaults, lr as ``lr``).
        targets: ``random`` (DeepInversion and CMI: uniformly drawn, sorted) or ``argmax``.
    """

    def __init__(
        self,
        terms: Mapping[str, Term],
        normalize: Normalize,
        denormalize: Normalize,
        num_classes: int,
        image_shape: Sequence[int],
        generator: nn.Module | None = None,
        *,
        batch_size: int | None = None,
        g_steps: int = 200,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        term_betas: tuple[float, float] = (0.9, 0.999),
        targets: str = "random",
    ) -> None:
        super().__init__(terms, normalize, denormalize, num_classes, targets)
        if batch_size is None or batch_size < 1 or g_steps < 1:
            raise ValueError(f"batch_size and g_steps must be at least 1, got {batch_size} and {g_steps}")
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        self.image_shape = tuple(int(v) for v in image_shape)
        self.generator = generator
        self.batch_size, self.g_steps = batch_size, g_steps
        self.lr, self.betas, self.term_betas = lr, tuple(betas), tuple(term_betas)
        height, width = self.image_shape[1:]
        self.global_view = nn.Sequential(K.RandomCrop((height, width), padding=4), K.RandomHorizontalFlip())
        self._new_round = self._pixel_round if generator is None else self._generator_round
        self.optimizer = self._term_optimizer()
        self._best: Tensor | None = None

    # -- what a round optimises

    def _term_optimizer(self) -> torch.optim.Adam:
        self.term_parameters = [p for p in self.terms.parameters() if p.requires_grad]
        return torch.optim.Adam([{"params": self.term_parameters}], lr=self.lr, betas=self.term_betas)

    def attach(self, teacher: nn.Module, *, feature_module: nn.Module | None = None) -> None:
        """Place the terms' hooks; terms may build trainable parts now, so the term optimiser is made here."""
        super().attach(teacher, feature_module=feature_module)
        self.optimizer = self._term_optimizer()

    def _box(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``[1, C, 1, 1]`` twice: the teacher-space images of 0 and 1, the box that pixels are clipped to."""
        zeros = torch.zeros(1, self.image_shape[0], 1, 1, device=device)
        return self.normalize(zeros), self.normalize(zeros + 1)

    def _to_unit(self, x: Tensor) -> Tensor:
        """Teacher-space images ``[B, C, H, W]`` to ``[0, 1]`` (affine, unclamped, differentiable)."""
        low, high = self._box(x.device)
        return (x - low) / (high - low)

    def _pixel_round(self, device: torch.device) -> _Round:
        pixels = torch.randn(self.batch_size, *self.image_shape, device=device, requires_grad=True)
        low, high = self._box(device)

        def project() -> None:
            with torch.no_grad():
                pixels.clamp_(low, high)

        return _Round([pixels], lambda: self._to_unit(pixels), project)

    def _generator_round(self, device: torch.device) -> _Round:
        reset_parameters_dcgan(self.generator)
        broadcast_module(self.generator)  # one generator per round across processes; the codes stay per shard
        z = torch.randn(self.batch_size, self.generator.nz, device=device, requires_grad=True)

        def render() -> Tensor:
            out = self.generator(z)
            return out if self.generator.output_range == "unit" else self._to_unit(out)

        return _Round([z, *self.generator.parameters()], render, lambda: None)

    # -- one round

    def step(self, teacher: nn.Module, student: nn.Module | None, weights: Mapping[str, float]) -> dict[str, Tensor]:
        """One round; returns the kept batch's terms, raw and weighted, and its total ``loss``."""
        device = next(teacher.parameters()).device
        targets = self.draw_targets(self.batch_size, device)
        if targets is not None:
            targets = targets.sort().values  # as the references do, so previews read class by class
        current = self._new_round(device)
        optimizer = torch.optim.Adam(current.variables, lr=self.lr, betas=self.betas)
        trainable = [*current.variables, *self.term_parameters]
        shared = [*(self.generator.parameters() if self.generator is not None else ()), *self.term_parameters]
        replicated = [self.generator] if self.generator is not None else []
        if self.generator is not None:
            self.generator.train()
        with eval_mode(teacher, student):
            for i in range(self.g_steps):
                unit = current.render()
                x = self.normalize(self.global_view(unit))
                total, logs, _ = self.losses(x, teacher, student, weights, targets, unit=unit)
                if i == 0:  # the first batch is kept whatever its loss (even a non-finite one)
                    improved = torch.ones((), dtype=torch.bool, device=device)
                    best_loss, best, best_logs = total.detach(), unit.detach().float(), logs
                else:  # then only a strictly lower loss replaces it
                    improved = total.detach() < best_loss
                    best_loss = torch.where(improved, total.detach(), best_loss)
                    best = torch.where(improved, unit.detach().float(), best)
                    best_logs = {name: torch.where(improved, value, best_logs[name]) for name, value in logs.items()}
                for term in self.terms.values():
                    term.keep(improved)
                optimizer.zero_grad(set_to_none=True)
                self.optimizer.zero_grad(set_to_none=True)
                total.backward(inputs=trainable)
                average_gradients(shared, replicated)
                optimizer.step()
                self.optimizer.step()
                current.project()
        for term in self.terms.values():
            term.end_round()
        self._best = best
        return best_logs

    # -- the kept batch

    def best_images(self) -> Tensor:
        """The last round's kept batch in ``[0, 1]``, ``[B, C, H, W]`` (float32, detached)."""
        if self._best is None:
            raise RuntimeError("the inversion synthesizer has no batch yet: run step() first")
        return self._best

    @torch.no_grad()
    def sample(self, n: int) -> tuple[Tensor, Tensor | None]:
        """The first ``n`` images of the last round's kept batch, normalised (no teacher logits)."""
        best = self.best_images()
        if n > len(best):
            raise ValueError(f"a round keeps {len(best)} images; cannot sample {n} from it")
        return self.normalize(best[:n]), None

    def preview(self, n: int) -> Tensor:
        return self.best_images()[:n]
