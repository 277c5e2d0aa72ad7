"""``dfkd eval``: metrics of a checkpoint on a dataset's test split, optionally against a teacher."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfkd.config import load_config
from dfkd.data import build_dataset
from dfkd.engine import build_eval_loader, build_model, build_normalize, evaluate, make_accelerator
from dfkd.errors import ConfigError

__all__ = ["run_eval"]


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
