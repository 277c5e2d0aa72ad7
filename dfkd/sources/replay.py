"""Generative replay: a bounded pool of a generator's batches that the student trains on many times.

A generator trained alongside the student (DAFL, ZSKT, DFAD, DFQ, CuDFKD)
costs one forward and backward per update, about 50 to 200 times the student
step of a small network (DESIGN.md section 10). Replay lets the student take
``kd_steps`` steps per generator update without seeing the same batch
``kd_steps`` times: every update adds its batch to a pool, and every student
step reads a batch made of

- ``fresh × batch`` images of the newest batch (what the generator makes now), and
- the rest drawn uniformly, with replacement, from the whole pool (what it made before).

The pool keeps the images as the teacher saw them (normalised, ``float16``:
2 KiB per 32×32 grey image, 6 KiB in colour) and, with ``logits: true``, the
teacher's logits for each one, so a replayed read runs no teacher forward.
With ``augment: true`` every read goes through the dataset's training
augmentation (kornia, on the device); augmented images need the teacher's
logits on the augmented image, so the two options exclude each other.

Reads are seeded by (seed, process, step), as the pool source's are: a resumed
run reads the same images without any saved random state, and the pool itself
is part of the source's checkpointed state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dfkd.errors import CheckpointError
from generators.buffers import RingBuffer

__all__ = ["ReplayOptions", "ReplayPool", "SeededDraws"]

_SEED_STRIDE = 2**32  # draw seeds: (seed · 65537 + process) · 2^32 + step, distinct for any step < 2^32


@dataclass
class ReplayOptions:
    """The ``source.replay`` section of a generator source.

    Attributes:
        size: images kept over all processes (each keeps ``size / processes``);
            at least one student batch.
        fresh: share of every student batch taken from the newest generator batch, in ``[0, 1]``
            (1 trains on the newest batch only, as without replay; 0 reads the whole pool uniformly).
        augment: the dataset's training augmentation on every read (``data.augment``).
        logits: keep the teacher's logits with every image, so reads skip the teacher forward.
    """

    size: int = 16_384
    fresh: float = 0.25
    augment: bool = False
    logits: bool = False

    def check(self, batch_size: int) -> None:
        """Raise a ``ValueError`` naming the option (``replay.size``, ...) for a value out of its range."""
        if self.size < batch_size:
            raise ValueError(
                f"replay.size={self.size} cannot hold one student batch ({batch_size} images): use at least "
                "source.batch_size, typically 10 to 200 batches"
            )
        if not 0.0 <= self.fresh <= 1.0:
            raise ValueError(f"replay.fresh must lie in [0, 1] (a share of the batch), got {self.fresh}")
        if self.augment and self.logits:
            raise ValueError(
                "replay.logits keeps the teacher's logits of the stored images, which do not hold for augmented "
                "reads: set replay.augment=false or replay.logits=false"
            )


class SeededDraws:
    """A random generator reseeded for every step from ``(seed, process, step)``.

    Draws made with :meth:`at` depend on nothing but those three numbers, so a
    run resumed at any step draws what the uninterrupted run drew.
    """

    def __init__(self, seed: int, process: int, device: torch.device) -> None:
        self._base = (seed * 65_537 + process) * _SEED_STRIDE
        self._generator = torch.Generator(device=device)

    def at(self, step: int) -> torch.Generator:
        """The generator seeded for ``step``."""
        self._generator.manual_seed((self._base + step) % 2**63)
        return self._generator


class ReplayPool:
    """A bounded pool of normalised synthetic images and, optionally, their teacher logits.

    Args:
        capacity: images kept on this process.
        image_shape: ``(C, H, W)``.
        num_classes: the width of the stored logits, or ``None`` to store no logits.
        device: where the pool lives.
        draws: the seeded draws of this process.
    """

    def __init__(
        self,
        capacity: int,
        image_shape: Sequence[int],
        num_classes: int | None,
        device: torch.device,
        draws: SeededDraws,
    ) -> None:
        self.images = RingBuffer(capacity, image_shape, torch.float16, device)
        self.logits = None if num_classes is None else RingBuffer(capacity, (num_classes,), torch.float32, device)
        self.draws = draws
        self.newest_count = 0  # rows of the newest batch, the last ones appended

    def __len__(self) -> int:
        return len(self.images)

    @property
    def keeps_logits(self) -> bool:
        return self.logits is not None

    def add(self, x: Tensor, logits: Tensor | None) -> None:
        """Append a batch ``x [B, C, H, W]`` (normalised) and, when the pool keeps them, its logits ``[B, K]``."""
        if self.logits is not None:
            if logits is None:
                raise ValueError("this pool keeps logits; add() needs the teacher's logits of the batch")
            self.logits.append(logits.float())
        self.images.append(x)
        self.newest_count = min(len(x), self.images.capacity)

    def draw(self, n: int, fresh: float, step: int) -> tuple[Tensor, Tensor | None]:
        """``n`` images (float32) and their logits (or ``None``): ``round(fresh · n)`` from the newest batch
        without replacement, the rest uniformly from the whole pool with replacement, seeded by ``step``."""
        if not len(self):
            raise RuntimeError("the replay pool is empty: add() a batch before drawing")
        generator = self.draws.at(step)
        device = self.images.data.device
        n_fresh = min(round(fresh * n), self.newest_count)
        newest = torch.randperm(self.newest_count, generator=generator, device=device)[:n_fresh]
        newest = (newest + self.images.cursor - self.newest_count) % self.images.capacity  # storage rows
        pooled = torch.randint(len(self), (n - n_fresh,), generator=generator, device=device)
        index = torch.cat([newest, pooled])
        x = self.images.data[index].float()
        return x, None if self.logits is None else self.logits.data[index]

    def newest(self, n: int) -> Tensor:
        """The last ``min(n, len(self))`` images added, oldest first, as float32."""
        return self.images.newest(n).float()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"images": self.images.state_dict(), "newest_count": self.newest_count}
        if self.logits is not None:
            state["logits"] = self.logits.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a pool of the same capacity and kind; anything else is a :class:`CheckpointError`."""
        stored = state["images"]["data"].shape
        if stored != self.images.data.shape:
            raise CheckpointError(
                f"the checkpoint's replay pool holds {tuple(stored)} images per process, but this run's holds "
                f"{tuple(self.images.data.shape)}: source.replay.size (or the process count, or the image size) "
                "differs from the run that wrote it. Resume with the same settings, or start afresh."
            )
        if ("logits" in state) != (self.logits is not None):
            raise CheckpointError(
                "the checkpoint's replay pool was written with source.replay.logits="
                f"{str('logits' in state).lower()}, this run has {str(self.logits is not None).lower()}: "
                "resume with the same setting, or start afresh."
            )
        self.images.load_state_dict(state["images"])
        if self.logits is not None:
            self.logits.load_state_dict(state["logits"])
        self.newest_count = int(state["newest_count"])
