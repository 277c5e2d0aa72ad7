"""The teacher phase: a distillation recipe's teacher, trained first when its checkpoint is missing.

A recipe may name the recipe that makes its teacher (``teacher.recipe``) beside
the checkpoint it reads (``teacher.checkpoint``). ``dfkd train`` and ``dfkd
bench`` then run that recipe as a run of its own, into the checkpoint's folder,
before the distillation run, and say so; later runs find the checkpoint and
reuse it. The distillation run itself (:class:`dfkd.trainer.Trainer`) never
trains anything but its student.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from dfkd.errors import ConfigError
from dfkd.recipe import load_config
from dfkd.synthesis import check_generator_fits
from dfkd.trainer import Trainer

__all__ = ["teacher_run", "train_missing_teacher"]


def teacher_run(cfg: DictConfig) -> DictConfig | None:
    """The config of the run that makes ``cfg``'s missing teacher, or ``None`` when there is nothing to train.

    The teacher recipe runs with ``output_dir`` set to the checkpoint's folder (whose
    file must be that run's ``student.safetensors``), resuming what an interrupted
    teacher run left. On the same dataset it reads the data from ``cfg``'s ``data.root``.

    Raises:
        ConfigError: the checkpoint could not be what the teacher recipe writes, or that
            recipe trains another architecture than ``teacher.arch``.
    """
    teacher = cfg.teacher
    if teacher is None or not teacher.recipe:
        return None
    if not teacher.checkpoint:
        raise ConfigError("teacher.recipe needs teacher.checkpoint: the path the teacher run will write.")
    checkpoint = Path(teacher.checkpoint)
    if checkpoint.is_file():
        return None
    if checkpoint.name != "student.safetensors":
        raise ConfigError(
            f"teacher.checkpoint {str(checkpoint)!r} is missing and would be produced by teacher.recipe, which "
            "writes <output_dir>/student.safetensors: point teacher.checkpoint at such a file."
        )
    teacher_cfg = load_config(teacher.recipe, [f"output_dir={checkpoint.parent}", "train.resume=auto"])
    if teacher_cfg.data.name == cfg.data.name:  # the same dataset is where this run was told it is
        teacher_cfg.data.root = cfg.data.root
    if teacher_cfg.student.arch != teacher.arch:
        raise ConfigError(f"teacher.recipe trains {teacher_cfg.student.arch!r} but teacher.arch is {teacher.arch!r}.")
    return teacher_cfg


def train_missing_teacher(cfg: DictConfig, echo: Callable[[str], None] | None = None) -> bool:
    """Run the teacher phase of ``cfg`` when its teacher is missing; return whether it ran.

    A generator that cannot make the dataset's images is reported first, before the
    teacher's training rather than after it. The phase runs before the distillation
    run is built (and seeded), so a reused and a freshly trained teacher give the same
    distillation run.
    """
    check_generator_fits(cfg)
    teacher_cfg = teacher_run(cfg)
    if teacher_cfg is None:
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        (echo or _say)(
            f"no teacher checkpoint at {cfg.teacher.checkpoint}: training the teacher first "
            f"({teacher_cfg.student.arch} on {teacher_cfg.data.name}, {cfg.teacher.recipe}); later runs reuse it"
        )
    Trainer(teacher_cfg, phase="teacher").fit()
    return True


def _say(line: str) -> None:
    print(line, flush=True)
