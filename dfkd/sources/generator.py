"""``GeneratorSource``: fresh synthetic samples from a generator trained alongside the student.

Every ``kd_steps`` student steps the source runs one synthesis step (the
synthesizer's ``g_steps`` generator updates) with the term weights of the
recipe's schedules at the current progress, then serves a synthetic batch per
student step. This is the loop of DAFL, ZSKT, DFAD, DFQ and CuDFKD. The source
never touches the training data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dfkd.errors import ConfigError
from dfkd.models import penultimate_module
from dfkd.sources.base import SOURCES, Batch, Context, SourceEnv, per_process
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

    def _synthesize(self, ctx: Context) -> dict[str, Tensor]:
        """One synthesis step at the current progress; returns the scalars to log."""
        weights = self.built.weights(ctx.step / ctx.steps_per_epoch, ctx.epochs)
        student = self.accelerator.unwrap_model(ctx.student) if self.synthesizer.needs_student else None
        with self.stopwatch, self.accelerator.autocast():
            logs = self.synthesizer.step(ctx.teacher, student, weights)
        self.synth_images += getattr(self.synthesizer, "batch_size", 0) * getattr(self.synthesizer, "g_steps", 1)
        metrics = {f"synth/{name}": value for name, value in logs.items()}
        metrics.update({f"synth/weight/{name}": torch.tensor(w) for name, w in weights.items()})  # host values
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
    """

    def __init__(self, env: SourceEnv, *, batch_size: int = 256, kd_steps: int = 1) -> None:
        if kd_steps < 1:
            raise ConfigError(f"source.kd_steps must be at least 1, got {kd_steps}.")
        self.kd_steps = kd_steps
        self._setup_synthesis(env, batch_size)
        self._served = 0  # student batches served so far

    def steps_per_epoch(self) -> None:
        return None  # synthetic data has no natural epoch: the recipe sets train.steps_per_epoch

    def next_batch(self, ctx: Context) -> Batch:
        metrics = self._synthesize(ctx) if self._served % self.kd_steps == 0 else {}
        self._served += 1
        with self.stopwatch, self.accelerator.autocast():
            x, teacher_logits = self.synthesizer.sample(self.local_batch)
        return Batch(x=x.float(), teacher_logits=teacher_logits, metrics=metrics)

    def on_epoch_start(self, ctx: Context) -> None:
        pass

    def on_epoch_end(self, ctx: Context) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"served": self._served, **self._synthesis_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._served = int(state["served"])
        self._load_synthesis_state(state)
