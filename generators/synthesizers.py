"""Synthesizers: turn a teacher (and a student) into training samples.

A synthesizer owns the thing being optimised (a generator network, or pixels)
and the loss terms. ``step(teacher, student, weights)`` performs its updates
with the term weights handed in for this step (schedules are the engine's
business; the synthesizer knows nothing about time) and returns every term,
raw and weighted. ``sample(n)`` draws ``n`` normalised samples without
gradients; ``preview(n)`` draws them in ``[0, 1]`` for image grids.

Only the optimised parameters receive gradients: the backward pass is
restricted to them (``backward(inputs=...)``), so the teacher's and the
student's weights get no stray gradients during synthesis and no time is
spent computing them.

Under data parallelism each process synthesises its shard of the batch with
one shared generator: replicas start equal and average their gradients before
every update (:mod:`generators.parallel`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from generators.parallel import average_gradients, broadcast_module, mean_over_processes
from generators.registry import Registry
from generators.terms import SynthBatch, Term

__all__ = ["Synthesizer", "SYNTHESIZERS", "GenerativeSynthesizer", "eval_mode", "COLLAPSED_SPREAD"]

SYNTHESIZERS: Registry[type[Synthesizer]] = Registry("synthesizers", plugins=("generators.inversion", "generators.meta"))

Normalize = Callable[[Tensor], Tensor]

# Below this spread (a synthetic batch's per-pixel standard deviation across images, in the
# teacher's normalised units, where real images are near 1) a synthesizer has collapsed to one image.
COLLAPSED_SPREAD = 1e-3


class Synthesizer(nn.Module):
    """What every synthesizer shares: the terms, their hooks, and the weighted loss of one batch.

    Args:
        terms: term name → term; a state-holding term (a projection head, a
            memory bank) is a submodule, so it is checkpointed with the synthesizer.
        normalize: maps images in ``[0, 1]`` to the teacher's input space.
        denormalize: the inverse, for previews.
        num_classes: the teacher's class count, for sampled targets.
        targets: ``argmax`` (the ``oh`` term uses the teacher's own argmax) or
            ``random`` (uniformly sampled targets, DeepInversion and CMI).
    """

    TARGETS = ("argmax", "random")
    # What the engine may ask of a synthesizer beyond step and sample; a subclass that can says so.
    conditions_generator: ClassVar[bool] = False  # it passes class labels to a conditional generator
    schedules_lr: ClassVar[bool] = False  # it has one learning rate, which scale_lr() sets

    def __init__(
        self, terms: Mapping[str, Term], normalize: Normalize, denormalize: Normalize, num_classes: int, targets: str
    ) -> None:
        super().__init__()
        if targets not in self.TARGETS:
            raise ValueError(f"targets must be one of {', '.join(self.TARGETS)}, got {targets!r}")
        self.terms = nn.ModuleDict(dict(terms))
        self.normalize = normalize
        self.denormalize = denormalize
        self.num_classes = num_classes
        self.targets = targets

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Raise a ``ValueError`` naming the first option out of its range, e.g. ``"g_steps must be at
        least 1, got 0"``. The engine calls it on a recipe's options before anything is built."""
        if options.get("g_steps", 1) < 1:
            raise ValueError(f"g_steps must be at least 1, got {options['g_steps']}")
        if options.get("lr", 0.0) < 0:
            raise ValueError(f"lr must be at least 0 (0 freezes what the synthesizer trains), got {options['lr']}")

    @property
    def needs_student(self) -> bool:
        return any(term.needs_student for term in self.terms.values())

    def attach(self, teacher: nn.Module, *, feature_module: nn.Module | None = None) -> None:
        """Place the terms' hooks on ``teacher``; then every process holds rank 0's weights of what is trained."""
        for term in self.terms.values():
            term.attach(teacher, feature_module=feature_module)
        broadcast_module(self)  # after the terms built their trainable parts (a projection head)

    def close(self) -> None:
        """Remove every hook; the teacher is left as it was found."""
        for term in self.terms.values():
            term.close()

    def draw_targets(self, n: int, device: torch.device) -> Tensor | None:
        if self.targets == "random":
            return torch.randint(0, self.num_classes, (n,), device=device)
        return None

    def losses(
        self,
        x: Tensor,
        teacher: nn.Module,
        student: nn.Module | None,
        weights: Mapping[str, float],
        targets: Tensor | None = None,
        *,
        unit: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], SynthBatch]:
        """The weighted total and every term raw and weighted, for normalised images ``x [B, C, H, W]``.

        ``unit`` is the batch in ``[0, 1]`` before augmentation and normalisation, for
        terms that make their own views of it (see :class:`SynthBatch`).

        Returns:
            ``(total, logs, batch)``: ``total`` is a differentiable scalar; ``logs``
            holds detached scalars ``<term>`` and ``<term>_weighted`` for every term
            with a nonzero weight (the others are not computed), and ``spread``, the
            images' standard deviation across the batch averaged over pixels (0 when
            the synthesizer has collapsed to a single image); ``batch`` is what the
            terms saw (images and logits).
        """
        missing = [name for name in self.terms if name not in weights]
        if missing:
            raise KeyError(f"no weight given for the terms {missing}")
        # A term whose weight is exactly zero now (adv before its ramp starts) is not computed:
        # that skips its hooks' work and, for adv, the student's forward and backward.
        active = {name: term for name, term in self.terms.items() if weights[name] != 0}
        with contextlib.ExitStack() as stack:
            for term in active.values():
                stack.enter_context(term.capturing())
            t_logits = teacher(x)
        needs_student = any(term.needs_student for term in active.values())
        s_logits = student(x) if needs_student and student is not None else None
        batch = SynthBatch(
            x=x, teacher=t_logits, student=s_logits, targets=targets, unit=unit, normalize=self.normalize
        )
        total = torch.zeros((), device=x.device)
        logs: dict[str, Tensor] = {}
        for name, term in active.items():
            raw = term(batch)
            weighted = weights[name] * raw
            total = total + weighted
            logs[name], logs[f"{name}_weighted"] = raw.detach(), weighted.detach()
        logs["loss"] = total.detach()
        if len(x) > 1:
            logs["spread"] = x.detach().float().std(dim=0).mean()
        return total, logs, batch

    def step(self, teacher: nn.Module, student: nn.Module | None, weights: Mapping[str, float]) -> dict[str, Tensor]:
        raise NotImplementedError

    def carried_state(self) -> dict[str, Any]:
        """What is kept from one step to the next outside any module (tensors, numbers, optimiser
        states), for checkpoints; none by default."""
        return {}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`carried_state` returned."""

    def sample(self, n: int) -> tuple[Tensor, Tensor | None]:
        """``n`` normalised samples ``[n, C, H, W]`` without gradients, and the teacher's logits on
        exactly those samples when the synthesizer already has them (else ``None``)."""
        raise NotImplementedError

    def preview(self, n: int) -> Tensor:
        """``n`` samples in ``[0, 1]``, ``[n, C, H, W]``, for image grids."""
        return self.denormalize(self.sample(n)[0]).clamp(0, 1)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None):
    """Put modules in eval mode for the block, then restore each one's mode."""
    present = [m for m in modules if m is not None]
    modes = [m.training for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(present, modes):
            m.train(mode)


@SYNTHESIZERS.register("generative")
class GenerativeSynthesizer(Synthesizer):
    """One generator trained jointly with the student (DAFL, ZSKT, DFAD, DFQ, CuDFKD).

    Each :meth:`step` takes ``g_steps`` Adam steps on the generator, each on a
    fresh batch ``x = G(z)``, ``z ~ N(0, I)``. The teacher and the student stay
    in eval mode meanwhile, so synthetic batches never move their BN statistics.

    Where the student's samples come from is ``sample_from``:

    - ``eval``: fresh noise through the generator in eval mode (the CMI and CuDFKD code);
    - ``train``: fresh noise, generator in train mode (batch statistics; DFAD, ZSKT);
    - ``last``: the batch of the last generator update, with the teacher's
      logits from that update, so the teacher is not run on it twice (DAFL
      trains the student on the generator's own batch).

    A class-conditional generator (``generator.conditional``) is given the
    targets drawn for each batch (``targets='random'``, which it requires), in
    its updates and whenever it samples for the student, so every class is asked
    for in every batch.

    Args:
        generator: maps ``[B, nz]`` noise (and, when conditional, ``[B]`` labels) to
            images; its ``output_range`` says whether they are in ``[0, 1]``
            (normalised here) or already normalised.
        terms, normalize, denormalize, num_classes, targets: see :class:`Synthesizer`.
        batch_size: synthesis batch of this process (the engine fills it in from the
            recipe's global batch; ``None`` is not valid at construction).
        g_steps: generator updates per :meth:`step`.
        lr, betas: Adam's learning rate and betas for the generator (and any
            trainable term, such as a projection head).
        sample_from: ``eval``, ``train`` or ``last``, see above.
        reset_on_collapse: re-initialise the generator (and forget its Adam state)
            when an update's batch has collapsed to one image (``spread`` below
            :data:`COLLAPSED_SPREAD`). Such a generator is dead, not stuck: its
            output saturates (DAFL's tanh pinned at ±1, which the affine-free output
            BN maps to zeros), every gradient through it is zero, and it makes the
            same image for the rest of the run. A fresh one, drawn from the run's
            seeded RNG, starts learning again while the student keeps what it has.
            Off by default, so the papers' settings run as published; ``resets``
            counts the re-initialisations so far.
    """

    SAMPLE_FROM = ("eval", "train", "last")
    conditions_generator: ClassVar[bool] = True
    schedules_lr: ClassVar[bool] = True

    def __init__(
        self,
        generator: nn.Module,
        terms: Mapping[str, Term],
        normalize: Normalize,
        denormalize: Normalize,
        num_classes: int,
        *,
        batch_size: int | None = None,
        g_steps: int = 1,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        targets: str = "argmax",
        sample_from: str = "eval",
        reset_on_collapse: bool = False,
    ) -> None:
        super().__init__(terms, normalize, denormalize, num_classes, targets)
        if sample_from not in self.SAMPLE_FROM:
            raise ValueError(f"sample_from must be one of {', '.join(self.SAMPLE_FROM)}, got {sample_from!r}")
        if batch_size is None or batch_size < 1 or g_steps < 1:
            raise ValueError(f"batch_size and g_steps must be at least 1, got {batch_size} and {g_steps}")
        self.generator = generator  # possibly wrapped for data parallelism
        self.net = getattr(generator, "module", generator)  # the generator itself, for its attributes
        if self.conditional and targets != "random":
            raise ValueError("a conditional generator needs targets='random': each image is asked for a class")
        self.batch_size = batch_size
        self.g_steps = g_steps
        self.sample_from = sample_from
        self.lr, self.betas = lr, tuple(betas)
        self.reset_on_collapse = reset_on_collapse
        self.resets = 0
        self._make_optimizer()
        self._last: tuple[Tensor, Tensor] | None = None

    def _make_optimizer(self) -> None:
        self.trainable = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.trainable, lr=self.lr, betas=self.betas)

    def attach(self, teacher: nn.Module, *, feature_module: nn.Module | None = None) -> None:
        """Place the hooks; a term may build trainable parts now (a projection head), so the optimiser follows."""
        super().attach(teacher, feature_module=feature_module)
        self._make_optimizer()

    def scale_lr(self, factor: float) -> None:
        """Set the generator's learning rate to ``factor · lr`` from the next update on.

        The engine calls it before every :meth:`step` with the value of the recipe's
        ``synthesizer.lr_schedule`` at that moment (DFAD's code decays the generator's
        rate with the student's). The factor is a function of progress alone, so a
        resumed run sets the same rate again.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * factor

    @property
    def conditional(self) -> bool:
        """Whether the generator takes class labels (then every batch it makes is asked for classes)."""
        return bool(getattr(self.net, "conditional", False))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def render(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Normalised images ``[B, C, H, W]`` from noise ``z [B, nz]`` (and labels ``y [B]``, when conditional)."""
        out = self.generator(z) if y is None else self.generator(z, y)
        return out if self.net.output_range == "normalized" else self.normalize(out)

    def step(self, teacher: nn.Module, student: nn.Module | None, weights: Mapping[str, float]) -> dict[str, Tensor]:
        self.generator.train()
        with eval_mode(teacher, student):
            for _ in range(self.g_steps):
                z = torch.randn(self.batch_size, self.net.nz, device=self.device)
                targets = self.draw_targets(len(z), z.device)
                x = self.render(z, targets if self.conditional else None)
                total, logs, batch = self.losses(x, teacher, student, weights, targets)
                self.optimizer.zero_grad(set_to_none=True)
                total.backward(inputs=self.trainable)
                average_gradients(self.trainable, [self.generator])
                self.optimizer.step()
                if self.reset_on_collapse and "spread" in logs:
                    self._reset_if_collapsed(logs["spread"])
        self._last = (batch.x.detach(), batch.teacher.detach())
        if self.reset_on_collapse:
            logs["resets"] = torch.tensor(float(self.resets))
        return logs

    def _reset_if_collapsed(self, spread: Tensor) -> None:
        """Re-initialise the generator when the batch it just made was one image (every process decides alike)."""
        if mean_over_processes(spread) >= COLLAPSED_SPREAD:
            return
        for module in self.net.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()  # BatchNorm's also resets its running statistics
        for p in self.net.parameters():
            self.optimizer.state.pop(p, None)
        broadcast_module(self.net)
        self.resets += 1

    def carried_state(self) -> dict[str, Tensor]:
        """The last update's batch and its teacher logits: ``sample_from='last'`` serves them until the next update."""
        return {} if self._last is None else {"x": self._last[0], "teacher": self._last[1]}

    def load_carried_state(self, state: Mapping[str, Tensor]) -> None:
        self._last = (state["x"].to(self.device), state["teacher"].to(self.device)) if state else None

    @torch.no_grad()
    def sample(self, n: int) -> tuple[Tensor, Tensor | None]:
        if self.sample_from == "last":
            if self._last is None or len(self._last[0]) != n:
                raise RuntimeError(f"sample_from='last' needs a preceding step() with batch size {n}")
            return self._last
        z = torch.randn(n, self.net.nz, device=self.device)
        y = self.draw_targets(n, z.device) if self.conditional else None
        if self.sample_from == "train":
            return self.render(z, y), None
        with eval_mode(self.generator):
            return self.render(z, y), None

    def preview(self, n: int) -> Tensor:
        """Fresh eval-mode samples; for train-mode sampling, the last update's batch (a train-mode
        forward just for a preview would move the generator's BN statistics)."""
        if self.sample_from == "eval" or self._last is None:
            return super().preview(n)
        return self.denormalize(self._last[0][:n]).clamp(0, 1)
