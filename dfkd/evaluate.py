"""Metrics on a test split: :func:`evaluate` for a run's evaluations, and ``dfkd eval`` for a checkpoint."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dfkd.build import build_eval_loader, build_model, build_normalize, make_accelerator
from dfkd.data import build_dataset
from dfkd.data.transforms import to_unit
from dfkd.errors import ConfigError
from dfkd.metrics import per_sample_metrics, summarize
from dfkd.recipe import load_config

__all__ = ["evaluate", "run_eval"]


@torch.no_grad()
def evaluate(
    student: nn.Module,
    loader: DataLoader,
    normalize: nn.Module,
    accelerator: Accelerator,
    teacher: nn.Module | None = None,
    *,
    per_sample: bool = False,
    teacher_cache: list[Tensor] | None = None,
) -> dict[str, Any]:
    """Acc@1/5, and against a teacher Agree@1, loyalty and loyalty_ref, over every test sample once.

    Args:
        loader: a loader prepared by ``accelerator`` yielding ``(uint8 images, labels)``.
        per_sample: also return the gathered per-sample values under ``"per_sample"``.
        teacher_cache: the frozen teacher's logits per batch of ``loader``, which must yield the
            same batches in the same order every time. An empty list is filled on the first call
            and later calls read it instead of running the teacher again.
    """
    was_training = student.training
    student.eval()
    chunks: dict[str, list[Tensor]] = defaultdict(list)
    cached = len(teacher_cache) if teacher_cache is not None else 0
    for index, (images, labels) in enumerate(loader):
        x = normalize(to_unit(images))
        with accelerator.autocast():
            s_logits = student(x)
            if teacher is None:
                t_logits = None
            elif index < cached:
                t_logits = teacher_cache[index]
            else:
                t_logits = teacher(x)
                if teacher_cache is not None:
                    teacher_cache.append(t_logits)
        values = per_sample_metrics(s_logits.float(), labels, None if t_logits is None else t_logits.float())
        for name, value in accelerator.gather_for_metrics(values).items():
            chunks[name].append(value)
    student.train(was_training)
    gathered = {name: torch.cat(parts) for name, parts in chunks.items()}
    result: dict[str, Any] = summarize(gathered)
    if per_sample:
        result["per_sample"] = {k: v.cpu() for k, v in gathered.items()}
    return result


def run_eval(recipe: str | None, overrides: Sequence[str]) -> tuple[dict[str, Any], bool]:
    """Evaluate ``student.checkpoint`` (default: the run's ``student.safetensors``).

    Returns:
        ``(metrics, is_main_process)``; metrics has acc1 and acc5 in percent and,
        with a teacher, agree1 (percent), loyalty and loyalty_ref (in [0, 1]).
    """
    cfg = load_config(recipe, overrides)
    if not cfg.student.checkpoint:
        produced = Path(cfg.output_dir) / "student.safetensors"
        if recipe is None or not produced.is_file():
            raise ConfigError(
                "dfkd eval needs student.checkpoint=PATH (or a run's config.yaml whose output_dir holds "
                f"student.safetensors; looked for {produced.resolve()})."
            )
        cfg.student.checkpoint = str(produced)
    accelerator = make_accelerator(cfg)
    spec, test_set = build_dataset(
        cfg.data.name, cfg.data.root, "test", download=cfg.data.download, image_size=cfg.data.image_size,
        num_samples=cfg.data.test_samples, seed=cfg.seed,
    )
    normalize = build_normalize(cfg, spec).to(accelerator.device)
    student = build_model(cfg.student, spec, "student").to(accelerator.device)
    teacher = None
    if cfg.teacher is not None:
        teacher = build_model(cfg.teacher, spec, "teacher").to(accelerator.device).eval()
    loader = accelerator.prepare(build_eval_loader(test_set, cfg.eval.batch_size, cfg.data.num_workers))
    metrics = evaluate(student, loader, normalize, accelerator, teacher)
    result = {"checkpoint": str(cfg.student.checkpoint), "dataset": spec.name, "samples": len(test_set), **metrics}
    return result, accelerator.is_main_process
