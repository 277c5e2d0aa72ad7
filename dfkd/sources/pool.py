"""``PoolSource``: the student learns from a pool of every round's kept batch (DeepInversion, CMI).

Every ``rounds_every`` student steps the source runs one synthesis round (the
inversion synthesizer's ``g_steps`` updates, see :mod:`generators.inversion`)
and appends the round's kept batch to an in-memory pool. Every student step
then reads ``batch_size / processes`` images drawn uniformly from the whole
pool, augments them with the dataset's training augmentation (kornia, on the
device) and normalises them.

This is the loop of CMI's ``datafree_kd.py`` without its detours: the reference
writes each batch to disk as PNG files and rebuilds a ``DataLoader`` over the
folder after every round; here the pool stays on the device and is bounded.

The pool is a :class:`~generators.buffers.RingBuffer` of ``uint8`` images (the
``[0, 1]`` images rounded to 1/255; CMI's PNGs truncate), allocated when the
source is built: ``pool_size × C × H × W`` bytes, 150 MiB for the default
51,200 CIFAR images (3×32×32), 7.2 GiB at 3×224×224. Once full, each round
overwrites the oldest batch.

Differences from the reference, by choice:

- reads draw indices uniformly *with* replacement from a generator seeded by
  (seed, process, step), so a resumed run reads the same images without any
  saved RNG state; CMI's loader shuffles the pool without replacement and
  starts a new permutation after each round;
- in a multi-process run each process synthesises and pools its own shard, but
  a checkpoint holds the main process's source state, so after a resume every
  process continues from the main process's pool (its reads stay distinct).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dfkd.data.transforms import to_unit
from dfkd.errors import ConfigError
from dfkd.sources.base import SOURCES, Batch, Context, SourceEnv
from dfkd.sources.generator import SynthesisMixin
from dfkd.sources.replay import SeededDraws
from generators.buffers import RingBuffer

__all__ = ["PoolSource"]


@SOURCES.register("pool")
class PoolSource(SynthesisMixin):
    """Synthetic batches read, with augmentation, from a bounded in-memory pool of synthesis rounds.

    Args:
        env: the engine's build environment.
        batch_size: global student batch, split evenly across processes (CMI's
            CIFAR scripts: 256, or 128 in its reproduction scripts).
        rounds_every: student steps per synthesis round. ``None`` runs one round
            per epoch (``train.steps_per_epoch``), CMI's cadence: its scripts set
            ``kd_steps = ep_steps`` (400, or 2000 in its reproduction scripts).
        pool_size: images kept over all processes (each keeps ``pool_size / processes``).
            The default holds 200 rounds of 256 images, all that CMI's 200-epoch
            CIFAR-10 scripts ever synthesise, so those runs never evict.
        warmup_rounds: rounds synthesised into the pool before the student's first step, without
            the terms that compare with the student (Fast-DFKD's ``warmup``: 20 rounds, during
            which its code trains no student and leaves ``adv`` out).
    """

    def __init__(
        self,
        env: SourceEnv,
        *,
        batch_size: int = 256,
        rounds_every: int | None = None,
        pool_size: int = 51_200,
        warmup_rounds: int = 0,
    ) -> None:
        try:
            self.check_options({"rounds_every": rounds_every, "pool_size": pool_size, "warmup_rounds": warmup_rounds})
        except ValueError as exc:
            raise ConfigError(f"source.{exc}.") from None
        world = env.accelerator.num_processes
        if pool_size < world:
            raise ConfigError(f"source.pool_size={pool_size} must hold at least one image per process ({world}).")
        self._setup_synthesis(env, batch_size)
        if not callable(getattr(self.synthesizer, "best_images", None)):
            raise ConfigError(
                f"source 'pool' stores each round's kept batch, which the {env.cfg.synthesizer.name!r} synthesizer "
                "does not keep: use a synthesizer with best_images(), such as 'inversion'."
            )
        self.rounds_every = rounds_every
        self.warmup_rounds = warmup_rounds
        self.normalize = env.normalize
        self.augment = env.augment
        device = env.accelerator.device
        image_shape = (env.spec.in_channels, env.spec.image_size, env.spec.image_size)
        self.pool = RingBuffer(pool_size // world, image_shape, torch.uint8, device)
        self._reads = SeededDraws(env.seed, env.accelerator.process_index, device)
        self._served = 0  # student batches served so far

    @staticmethod
    def check_options(options: Mapping[str, Any]) -> None:
        """Raise a ``ValueError`` naming the option that is out of its range."""
        if options["rounds_every"] is not None and options["rounds_every"] < 1:
            raise ValueError(f"rounds_every must be at least 1 (or null for once per epoch), got {options['rounds_every']}")
        if options["pool_size"] < 1:
            raise ValueError(f"pool_size must be at least 1, got {options['pool_size']}")
        if options["warmup_rounds"] < 0:
            raise ValueError(f"warmup_rounds must be at least 0, got {options['warmup_rounds']}")

    def steps_per_epoch(self) -> None:
        return None  # synthetic data has no natural epoch: the recipe sets train.steps_per_epoch

    def next_batch(self, ctx: Context) -> Batch:
        metrics: dict[str, Tensor] = {}
        if self._served == 0:
            for _ in range(self.warmup_rounds):
                self._round(ctx, warmup=True)
        if self._served % (self.rounds_every or ctx.steps_per_epoch) == 0:
            metrics = self._round(ctx)
            metrics["pool/images"] = torch.tensor(float(len(self.pool)))  # a host value
        x = self.normalize(self.augment(to_unit(self.read(self.local_batch, self._served))))
        self._served += 1
        return Batch(x=x, metrics=metrics)

    def _round(self, ctx: Context, *, warmup: bool = False) -> dict[str, Tensor]:
        """One synthesis round, its kept batch added to the pool; returns the scalars to log."""
        metrics = self._synthesize(ctx, warmup=warmup)
        with self.stopwatch:
            self.pool.append(quantize(self.synthesizer.best_images()))
        return metrics

    def read(self, n: int, step: int) -> Tensor:
        """``[n, C, H, W]`` uint8 images drawn uniformly from the pool with the read seed of ``step``."""
        stored = self.pool.stored()
        index = torch.randint(len(stored), (n,), generator=self._reads.at(step), device=stored.device)
        return stored[index]

    def preview(self, n: int) -> Tensor:
        """The last ``n`` images added to the pool, in ``[0, 1]``: the end of the last round's kept batch.

        Read from the pool rather than the synthesizer, so a resumed run has them before its next round.
        """
        return to_unit(self.pool.newest(n))

    def on_epoch_start(self, ctx: Context) -> None:
        pass

    def on_epoch_end(self, ctx: Context) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"served": self._served, "pool": self.pool.state_dict(), **self._synthesis_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._served = int(state["served"])
        self.pool.load_state_dict(state["pool"])
        self._load_synthesis_state(state)


def quantize(images: Tensor) -> Tensor:
    """Images in ``[0, 1]`` (any float type) to ``uint8``, rounding to the nearest of the 256 levels."""
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
