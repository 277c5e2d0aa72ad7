"""The parts every command builds from a recipe: the accelerator, a model, the normalisation, the test loader.

``dfkd train`` (:mod:`dfkd.engine`) and ``dfkd eval`` (:mod:`dfkd.evaluate`)
build these the same way, so a checkpoint is evaluated exactly as its run
evaluated it.
"""

from __future__ import annotations

import os
import warnings

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dfkd.data import DatasetSpec
from dfkd.data.transforms import Normalize
from dfkd.errors import ConfigError
from dfkd.models import create_model
from dfkd.weights import load_weights

__all__ = ["make_accelerator", "build_model", "build_normalize", "build_eval_loader"]


def make_accelerator(cfg: DictConfig) -> Accelerator:
    """The accelerator for a run; launch topology comes from ``accelerate launch``, not the recipe.

    On a machine with no accelerator, a multi-process launch runs on the CPU over
    gloo. accelerate 1.x starts several CPU processes itself only through mpirun;
    its torchrun path (``--multi_gpu``, or ``recipes/accelerate/cpu.yaml``) starts
    them without MPI, but would leave each process alone unless told to use the
    CPU, which is what ``cpu=True`` does here.
    """
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != cfg.train.mixed_precision:
        # accelerate keeps one state per process and refuses a second precision. One process runs several
        # recipes in turn when a command trains the teacher first (each with its own precision), so start the
        # precision state afresh; the process group, which belongs to PartialState, is kept. (accelerate's
        # own test harness resets it the same way.)
        AcceleratorState._reset_state(reset_partial_state=False)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=distributed and not torch.accelerator.is_available())
    if cfg.train.mixed_precision == "fp16" and not accelerator.native_amp:
        warnings.warn(
            f"train.mixed_precision=fp16 has no effect on {accelerator.device.type}: accelerate enables fp16 "
            "autocast only on GPUs, so this run computes in float32. For mixed precision on a CPU use bf16.",
            stacklevel=2,
        )
    return accelerator


def build_model(cfg: DictConfig, spec: DatasetSpec, role: str) -> nn.Module:
    """A zoo model sized for ``spec``, loaded from ``cfg.checkpoint`` when one is given."""
    model = create_model(cfg.arch, num_classes=spec.num_classes, in_channels=spec.in_channels)
    if cfg.checkpoint:
        load_weights(model, cfg.checkpoint, what=f"{role} checkpoint")
    return model


def build_normalize(cfg: DictConfig, spec: DatasetSpec) -> Normalize:
    """The dataset's normalisation, or the recipe's override of it."""
    mean = list(cfg.data.mean) if cfg.data.mean is not None else list(spec.mean)
    std = list(cfg.data.std) if cfg.data.std is not None else list(spec.std)
    for key, values in (("data.mean", mean), ("data.std", std)):
        if len(values) != spec.in_channels:
            raise ConfigError(f"{key} has {len(values)} values but {spec.name} images have {spec.in_channels} channels.")
    if min(std) <= 0:
        raise ConfigError(f"data.std must be positive, got {std}.")
    return Normalize(mean, std)


def build_eval_loader(test_set: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """An in-order loader over the test split; in-memory datasets need no worker processes.

    It draws its workers' seeds from a generator of its own: a DataLoader otherwise draws one
    from the global RNG every time it is iterated, so each evaluation would shift the training's
    random stream, and how often a run evaluates would change the student it trains.
    """
    in_memory = isinstance(getattr(test_set, "images", None), Tensor)
    return DataLoader(
        test_set, batch_size=batch_size, shuffle=False, num_workers=0 if in_memory else num_workers,
        generator=torch.Generator(),
    )
