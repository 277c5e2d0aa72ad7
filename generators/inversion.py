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

:meth:`InversionSynthesizer.step` runs a whole round; :meth:`~InversionSynthesizer.begin_round`,
:meth:`~InversionSynthesizer.update` and :meth:`~InversionSynthesizer.finish_round` are its three parts,
for a caller that drives a round one inner iteration at a time (``benchmarks/speed.py`` times one).

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
from dataclasses import dataclass, field

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from generators.networks import reset_parameters_dcgan
from generators.parallel import average_gradients, broadcast_module
from generators.synthesizers import SYNTHESIZERS, Normalize, Synthesizer, eval_mode
from generators.terms import Term

__all__ = ["InversionSynthesizer", "InversionRound"]


@dataclass
class InversionRound:
    """One round in progress: what it optimises, how it renders its batch, and the batch it keeps so far."""

    variables: list[Tensor]  # re-initialised tensors this round's optimiser updates
    render: Callable[[], Tensor]  # the batch in [0, 1], [B, C, H, W], differentiable in `variables`
    project: Callable[[], None]  # after each update: bring the variables back to their valid set
    network: nn.Module | None = None  # the round's generator, one across processes (None for pixels)
    optimizer: torch.optim.Optimizer | None = None  # Adam over `variables` (by default), made anew for the round
    targets: Tensor | None = None  # [B] sampled classes, sorted, or None for the teacher's argmax
    updates: int = 0  # inner iterations taken
    best_loss: Tensor | None = None  # 0-dim, the kept batch's total loss
    best: Tensor | None = None  # [B, C, H, W] the kept batch in [0, 1], float32
    best_logs: dict[str, Tensor] = field(default_factory=dict)  # the kept batch's terms


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
        view: the augmentation of every inner iteration, ``crop_flip`` (the references' CIFAR
            view), ``crop`` (for digits and other images that a mirror changes) or ``none``.
    """

    VIEWS = ("crop_flip", "crop", "none")

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
        view: str = "crop_flip",
    ) -> None:
        super().__init__(terms, normalize, denormalize, num_classes, targets)
        if batch_size is None or batch_size < 1 or g_steps < 1:
            raise ValueError(f"batch_size and g_steps must be at least 1, got {batch_size} and {g_steps}")
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        if view not in self.VIEWS:
            raise ValueError(f"view must be one of {', '.join(self.VIEWS)}, got {view!r}")
        self.image_shape = tuple(int(v) for v in image_shape)
        self.generator = generator
        self.batch_size, self.g_steps = batch_size, g_steps
        self.lr, self.betas, self.term_betas = lr, tuple(betas), tuple(term_betas)
        height, width = self.image_shape[1:]
        crop = [K.RandomCrop((height, width), padding=4)] if view != "none" else []
        self.global_view = nn.Sequential(*crop, *([K.RandomHorizontalFlip()] if view == "crop_flip" else []))
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

    def _pixel_round(self, device: torch.device) -> InversionRound:
        pixels = torch.randn(self.batch_size, *self.image_shape, device=device, requires_grad=True)
        low, high = self._box(device)

        def project() -> None:
            with torch.no_grad():
                pixels.clamp_(low, high)

        return InversionRound([pixels], lambda: self._to_unit(pixels), project)

    def _generator_round(self, device: torch.device) -> InversionRound:
        reset_parameters_dcgan(self.generator)
        broadcast_module(self.generator)  # one generator per round across processes; the codes stay per shard
        z = torch.randn(self.batch_size, self.generator.nz, device=device, requires_grad=True)

        def render() -> Tensor:
            out = self.generator(z)
            return out if self.generator.output_range == "unit" else self._to_unit(out)

        return InversionRound([z, *self.generator.parameters()], render, lambda: None, network=self.generator)

    # -- one round

    def step(self, teacher: nn.Module, student: nn.Module | None, weights: Mapping[str, float]) -> dict[str, Tensor]:
        """One round; returns the kept batch's terms, raw and weighted, and its total ``loss``."""
        current = self.begin_round(next(teacher.parameters()).device)
        with eval_mode(teacher, student):
            for _ in range(self.g_steps):
                self.update(current, teacher, student, weights)
        return self.finish_round(current)

    def begin_round(self, device: torch.device) -> InversionRound:
        """Draw the round's targets, re-initialise what it optimises and make its optimiser."""
        targets = self.draw_targets(self.batch_size, device)
        if targets is not None:
            targets = targets.sort().values  # as the references do, so previews read class by class
        current = self._new_round(device)
        current.targets = targets
        if current.optimizer is None:
            current.optimizer = torch.optim.Adam(current.variables, lr=self.lr, betas=self.betas)
        if current.network is not None:
            current.network.train()
        return current

    def update(
        self, current: InversionRound, teacher: nn.Module, student: nn.Module | None, weights: Mapping[str, float]
    ) -> None:
        """One inner iteration of ``current``: render, augment, score, keep the batch if it is the best so
        far, and take one step. The caller holds ``teacher`` and ``student`` in eval mode (as :meth:`step` does)."""
        unit = current.render()
        x = self.normalize(self.global_view(unit))
        total, logs, _ = self.losses(x, teacher, student, weights, current.targets, unit=unit)
        if current.updates == 0:  # the first batch is kept whatever its loss (even a non-finite one)
            improved = torch.ones((), dtype=torch.bool, device=total.device)
            current.best_loss, current.best, current.best_logs = total.detach(), unit.detach().float(), logs
        else:  # then only a strictly lower loss replaces it
            improved = total.detach() < current.best_loss
            current.best_loss = torch.where(improved, total.detach(), current.best_loss)
            current.best = torch.where(improved, unit.detach().float(), current.best)
            current.best_logs = {
                name: torch.where(improved, value, current.best_logs[name]) for name, value in logs.items()
            }
        for term in self.terms.values():
            term.keep(improved)
        current.optimizer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward(inputs=[*current.variables, *self.term_parameters])
        network = [current.network] if current.network is not None else []
        average_gradients([p for m in network for p in m.parameters()] + self.term_parameters, network)
        current.optimizer.step()
        self.optimizer.step()
        current.project()
        current.updates += 1

    def finish_round(self, current: InversionRound) -> dict[str, Tensor]:
        """End ``current``: its kept batch becomes :meth:`best_images`; returns that batch's terms."""
        if current.updates == 0:
            raise RuntimeError("an inversion round needs at least one update before it ends")
        for term in self.terms.values():
            term.end_round()
        self._best = current.best
        return current.best_logs

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
