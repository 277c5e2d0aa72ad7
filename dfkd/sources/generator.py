"""``GeneratorSource``: synthetic samples from a generator trained alongside the student.

Every ``kd_steps`` student steps the source runs one synthesis step (the
synthesizer's ``g_steps`` generator updates) with the term weights of the
recipe's schedules at the current progress (and the generator's learning rate,
when ``synthesizer.lr_schedule`` sets one), then serves a synthetic batch per
student step. This is the loop of DAFL, ZSKT, DFAD, DFQ and CuDFKD. The source
never touches the training data.

Without ``replay`` every student step gets the synthesizer's sample (fresh
noise, or the last update's batch: ``synthesizer.sample_from``). With
``replay`` every synthesis step adds that sample to a bounded pool, and the
student steps read from the pool (:mod:`dfkd.sources.replay`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Optional

import torch
from torch import Tensor, nn

from dfkd.errors import CheckpointError, ConfigError
from dfkd.models import penultimate_module
from dfkd.sources.base import SOURCES, Batch, Context, SourceEnv, per_process
from dfkd.sources.replay import ReplayOptions, ReplayPool, SeededDraws
from dfkd.synthesis import build_synthesizer
from dfkd.tracking import Stopwatch

__all__ = ["GeneratorSource", "SynthesisMixin"]


class SynthesisMixin:
    """What the generator and pool sources share: building the synthesizer and running its steps."""

    def _setup_synthesis(self, env: SourceEnv, batch_size: int) -> None:
        cfg = env.cfg
        if cfg.synthesizer is None:
            raise ConfigError(f"source {cfg.source.name!r} needs a 'synthesizer' section in the recipe.")
        if env.teacher is None:
            raise ConfigError(f"source {cfg.source.name!r} synthesises from a teacher: add a 'teacher' section.")
        self.accelerator = env.accelerator
        world = env.accelerator.num_processes
        self.local_batch = per_process(batch_size, world, "source.batch_size")
        synth_batch = cfg.synthesizer.get("batch_size")
        local_synth_batch = per_process(synth_batch, world, "synthesizer.batch_size") if synth_batch else self.local_batch
        self.built = build_synthesizer(
            cfg.synthesizer,
            image_size=env.spec.image_size,
            channels=env.spec.in_channels,
            num_classes=env.spec.num_classes,
            normalize=env.normalize,
            denormalize=env.normalize.inverse,
            teacher=env.teacher,
            feature_module=penultimate_module(env.teacher),
            device=env.accelerator.device,
            batch_size=local_synth_batch,
        )
        self.synthesizer = self.built.synthesizer
        if cfg.train.channels_last and self.built.generator is not None:
            self.built.generator.to(memory_format=torch.channels_last)
        self.stopwatch = Stopwatch(env.accelerator.device)
        self.synth_images = 0

    def _synthesize(self, ctx: Context, *, warmup: bool = False) -> dict[str, Tensor]:
        """One synthesis step at the current progress; returns the scalars to log.

        A ``warmup`` step comes before the student's first step, so the terms that
        compare with the student (``adv``) are left out of it: an untrained student
        has nothing to disagree about yet.
        """
        progress = ctx.step / ctx.steps_per_epoch
        weights = self.built.weights(progress, ctx.epochs)
        lr_factor = None if self.built.lr_schedule is None else self.built.lr_schedule(progress, ctx.epochs)
        if lr_factor is not None:
            self.synthesizer.scale_lr(lr_factor)
        if warmup:
            weights = {name: 0.0 if self.synthesizer.terms[name].needs_student else w for name, w in weights.items()}
        student = self.accelerator.unwrap_model(ctx.student) if self.synthesizer.needs_student else None
        with self.stopwatch, self.accelerator.autocast():
            logs = self.synthesizer.step(ctx.teacher, student, weights)
        self.synth_images += getattr(self.synthesizer, "batch_size", 0) * getattr(self.synthesizer, "g_steps", 1)
        metrics = {f"synth/{name}": value for name, value in logs.items()}
        metrics.update({f"synth/weight/{name}": torch.tensor(w) for name, w in weights.items()})  # host values
        if lr_factor is not None:
            metrics["synth/lr"] = torch.tensor(self.synthesizer.lr * lr_factor)
        return metrics

    @property
    def synth_seconds(self) -> float:
        """Time spent synthesising (generator updates and sampling), over the whole run."""
        return self.stopwatch.seconds

    def preview(self, n: int) -> Tensor:
        """``n`` synthetic images in ``[0, 1]`` for an image grid."""
        with self.accelerator.autocast():
            return self.synthesizer.preview(n).float()

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Networks saved as their own safetensors files in checkpoints and outputs."""
        return {"generator": self.built.generator} if self.built.generator is not None else {}

    def _synthesis_state(self) -> dict[str, Any]:
        return {
            "terms": self.synthesizer.terms.state_dict(),
            "optimizer": self.synthesizer.optimizer.state_dict(),
            "carried": self.synthesizer.carried_state(),
            "synth_seconds": self.synth_seconds,
            "synth_images": self.synth_images,
        }

    def _load_synthesis_state(self, state: dict[str, Any]) -> None:
        self.synthesizer.terms.load_state_dict(state["terms"])
        self.synthesizer.optimizer.load_state_dict(state["optimizer"])
        self.synthesizer.load_carried_state(state["carried"])
        self.stopwatch = Stopwatch(self.accelerator.device, seconds=float(state["synth_seconds"]))
        self.synth_images = int(state["synth_images"])


@SOURCES.register("generator")
class GeneratorSource(SynthesisMixin):
    """Synthetic batches from a generator trained jointly with the student.

    Args:
        env: the engine's build environment.
        batch_size: global student batch, split evenly across processes.
        kd_steps: student steps per synthesis step (DFAD uses 5; ZSKT about 10).
        warmup_steps: synthesis steps before the student's first step, without the terms that compare
            with the student: the generator learns the teacher's priors (its BN statistics) before the
            student sees its images. Their batches are not replayed.
        replay: a pool of past samples the student reads from (:class:`~dfkd.sources.replay.ReplayOptions`);
            ``None`` serves the synthesizer's sample directly.
    """

    def __init__(
        self,
        env: SourceEnv,
        *,
        batch_size: int = 256,
        kd_steps: int = 1,
        warmup_steps: int = 0,
        replay: Optional[ReplayOptions] = None,
    ) -> None:
        if replay is not None and not isinstance(replay, ReplayOptions):
            replay = ReplayOptions(**replay)
        try:
            self.check_options(
                {"batch_size": batch_size, "kd_steps": kd_steps, "warmup_steps": warmup_steps, "replay": replay}
            )
        except ValueError as exc:
            raise ConfigError(f"source.{exc}.") from None
        self.kd_steps, self.warmup_steps = kd_steps, warmup_steps
        self._setup_synthesis(env, batch_size)
        self._served = 0  # student batches served so far
        self.replay, self.pool = replay, None
        if replay is not None:
            self.pool = self._make_pool(env)

    @staticmethod
    def check_options(options: Mapping[str, Any]) -> None:
        """Raise a ``ValueError`` naming the option that is out of its range."""
        if options["kd_steps"] < 1:
            raise ValueError(f"kd_steps must be at least 1, got {options['kd_steps']}")
        if options["warmup_steps"] < 0:
            raise ValueError(f"warmup_steps must be at least 0, got {options['warmup_steps']}")
        replay = options.get("replay")
        if replay is not None:
            (replay if isinstance(replay, ReplayOptions) else ReplayOptions(**replay)).check(options["batch_size"])

    def _make_pool(self, env: SourceEnv) -> ReplayPool:
        world = env.accelerator.num_processes
        if self.replay.augment and (env.cfg.data.augment or env.spec.augment) == "none":
            raise ConfigError(
                f"source.replay.augment=true, but the augmentation of {env.spec.name} is 'none': name one with "
                "data.augment (crop, crop_flip, ...), or set source.replay.augment=false."
            )
        self.normalize, self.augment = env.normalize, env.augment
        image_shape = (env.spec.in_channels, env.spec.image_size, env.spec.image_size)
        return ReplayPool(
            self.replay.size // world, image_shape, env.spec.num_classes if self.replay.logits else None,
            env.accelerator.device, SeededDraws(env.seed, env.accelerator.process_index, env.accelerator.device),
        )

    def steps_per_epoch(self) -> None:
        return None  # synthetic data has no natural epoch: the recipe sets train.steps_per_epoch

    def next_batch(self, ctx: Context) -> Batch:
        if self._served == 0:
            for _ in range(self.warmup_steps):
                self._synthesize(ctx, warmup=True)
        metrics = self._synthesize(ctx) if self._served % self.kd_steps == 0 else {}
        if self.pool is not None and metrics:
            self._add_to_pool(ctx)
            metrics["replay/images"] = torch.tensor(float(len(self.pool)))  # a host value
        step, self._served = self._served, self._served + 1
        if self.pool is not None:
            x, teacher_logits = self._read_pool(step)
            return Batch(x=x, teacher_logits=teacher_logits, metrics=metrics)
        with self.stopwatch, self.accelerator.autocast():
            x, teacher_logits = self.synthesizer.sample(self.local_batch)
        return Batch(x=x.float(), teacher_logits=teacher_logits, metrics=metrics)

    def _add_to_pool(self, ctx: Context) -> None:
        """The synthesizer's sample of this synthesis step, and its teacher logits if the pool keeps them."""
        with self.stopwatch, self.accelerator.autocast(), torch.no_grad():
            x, logits = self.synthesizer.sample(self.local_batch)
            if self.pool.keeps_logits and logits is None:
                logits = ctx.teacher(x)
        self.pool.add(x, logits if self.pool.keeps_logits else None)

    def _read_pool(self, step: int) -> tuple[Tensor, Tensor | None]:
        """The student batch of ``step``, and its teacher logits when the pool keeps them."""
        x, logits = self.pool.draw(self.local_batch, self.replay.fresh, step)
        if self.replay.augment:  # the pool holds normalised images; the dataset's augmentation works in [0, 1]
            x = self.normalize(self.augment(x * self.normalize.std + self.normalize.mean))
        return x, logits

    def preview(self, n: int) -> Tensor:
        """With replay, the newest images of the pool (what the student reads); else the synthesizer's preview."""
        if self.pool is not None and len(self.pool):
            return self.normalize.inverse(self.pool.newest(n))
        return super().preview(n)

    def on_epoch_start(self, ctx: Context) -> None:
        pass

    def on_epoch_end(self, ctx: Context) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        state = {"served": self._served, **self._synthesis_state()}
        if self.pool is not None:
            state["replay"] = {"options": asdict(self.replay), "pool": self.pool.state_dict()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if ("replay" in state) != (self.pool is not None):
            had = "with" if "replay" in state else "without"
            raise CheckpointError(
                f"the checkpoint was written by a run {had} source.replay, and this run differs: resume with the "
                "same source settings, or start afresh."
            )
        self._load_synthesis_state(state)
        if self.pool is not None:
            self.pool.load_state_dict(state["replay"]["pool"])
        self._served = int(state["served"])
