"""The sample-source contract: whatever feeds the student, real or synthetic.

The training loop asks its source for one :class:`Batch` per student step and
calls the epoch hooks; it never asks what kind of source it has. A source is
built by name from the recipe's ``source`` spec: the registered factory gets a
:class:`SourceEnv` positionally and the spec's options as keyword arguments
(its keyword-only parameters are its recipe schema).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor, nn

from dfkd.errors import ConfigError
from dfkd.registry import Registry

if TYPE_CHECKING:
    from accelerate import Accelerator
    from omegaconf import DictConfig

    from dfkd.data import DatasetSpec, ImageDataset
    from dfkd.data.transforms import Normalize

__all__ = ["Batch", "Context", "SourceEnv", "SampleSource", "SOURCES", "per_process"]


@dataclass
class Batch:
    """One student step's inputs, on the device.

    Attributes:
        x: ``[B, C, H, W]`` normalised inputs (this process's shard).
        y: ``[B]`` labels, for real data.
        index: ``[B]`` dataset indices, for real data.
        teacher_logits: ``[B, K]`` teacher outputs on exactly ``x``, when the
            source already computed them, so the loop does not run the teacher twice.
        metrics: device scalars the source wants logged with this step (synthesis terms).
    """

    x: Tensor
    y: Tensor | None = None
    index: Tensor | None = None
    teacher_logits: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Context:
    """The run's state as the hooks see it."""

    teacher: nn.Module | None
    student: nn.Module
    epoch: int  # 0-based index of the current epoch
    step: int  # optimizer steps taken so far
    epochs: int
    steps_per_epoch: int
    metrics: dict[str, float] = field(default_factory=dict)  # the latest evaluation
    log: Callable[[str, float], None] = lambda name, value: None  # scalar logger (main process only)
    histogram: Callable[[str, Tensor], None] = lambda name, values: None  # histogram logger (main process only)


@dataclass
class SourceEnv:
    """What the engine hands a source when it builds one."""

    cfg: DictConfig
    spec: DatasetSpec
    train_set: Callable[[], ImageDataset]  # lazy: data-free sources never load the training data
    normalize: Normalize
    augment: nn.Module
    accelerator: Accelerator
    seed: int
    teacher: nn.Module | None = None  # frozen, in eval mode, never wrapped for data parallelism


@runtime_checkable
class SampleSource(Protocol):
    """Feeds the student. ``state_dict`` holds everything needed to resume exactly.

    Optional extras the loop uses when a source has them: ``preview(n)`` (images
    in [0, 1] for the per-epoch grid), ``synth_seconds`` (time spent
    synthesising) and ``checkpoint_modules()`` (networks saved as safetensors).
    """

    def steps_per_epoch(self) -> int | None:
        """The natural epoch length in steps (one pass over the data), or ``None`` if there is none."""

    def on_epoch_start(self, ctx: Context) -> None: ...

    def on_epoch_end(self, ctx: Context) -> None: ...

    def next_batch(self, ctx: Context) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


SOURCES: Registry[Callable[..., SampleSource]] = Registry("sources")


def per_process(batch_size: int, processes: int, key: str) -> int:
    """Each process's share of the global ``batch_size`` set by the recipe key ``key``.

    Raises:
        ConfigError: the batch is smaller than the process count, or does not split evenly.
    """
    if batch_size < processes:
        raise ConfigError(
            f"{key}={batch_size} is smaller than the {processes} processes launched: each process needs at least "
            f"one sample of every batch. Use a batch that is a multiple of {processes}, or launch fewer processes "
            "(accelerate launch --num_processes)."
        )
    if batch_size % processes:
        raise ConfigError(
            f"{key}={batch_size} does not split evenly over {processes} processes; use a multiple of the process count."
        )
    return batch_size // processes
