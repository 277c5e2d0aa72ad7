"""Mixed precision is a recipe switch: data-free runs under bf16 autocast on the CPU stay finite.

The engine stops a run at the first log whose means hold a NaN or an infinity, so
with ``train.log_every=1`` a run that completes had finite terms at every step.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from dfkd.build import make_accelerator
from dfkd.recipe import load_config
from dfkd.teacher import train_missing_teacher
from dfkd.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SHRINK = [
    "teacher.arch=resnet8", "student.arch=lenet5_half", "data.name=procedural", "data.test_samples=32",
    "data.num_workers=0", "train.epochs=2", "train.steps_per_epoch=2", "train.log_every=1",
    "train.progress_bar=false", "eval.batch_size=32", "synthesizer.generator.nz=16", "synthesizer.generator.ngf=8",
]
METHODS = {
    "cudfkd": ["recipes/procedural/cudfkd_resnet20_resnet8.yaml", "teacher.recipe=null", "source.batch_size=16"],
    "cmi": ["recipes/methods/cmi.yaml", "source.batch_size=16", "source.pool_size=64", "synthesizer.g_steps=2",
            "synthesizer.terms.contrastive.bank_size=64", "synthesizer.terms.contrastive.n_neg=16",
            "synthesizer.terms.contrastive.head_dim=16"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_bf16_run_autocasts_and_stays_finite(tmp_path, resnet8_teacher, method):
    recipe, *options = METHODS[method]
    cfg = load_config(recipe, [*SHRINK, *options, f"teacher.checkpoint={resnet8_teacher}", "train.mixed_precision=bf16",
                               f"output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    dtypes: set[torch.dtype] = set()
    trainer.loop.teacher.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    summary = trainer.fit()
    assert torch.bfloat16 in dtypes, "the teacher ran under bf16 autocast"
    assert summary["steps"] == 4
    for key in ("final_acc1", "final_agree1", "final_loyalty"):
        assert math.isfinite(summary[key]), key
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["final_loyalty"] == summary["final_loyalty"]


def test_a_bf16_run_trains_its_missing_teacher_in_the_teacher_recipes_own_precision(tmp_path):
    # One process, two recipes in turn: the teacher's (fp32), then the student's (bf16).
    recipe = tmp_path / "teacher.yaml"
    recipe.write_text(
        "student: {arch: resnet8}\n"
        "data: {name: procedural, train_samples: 64, test_samples: 32, num_workers: 0}\n"
        "source: {batch_size: 32}\n"
        "train: {epochs: 1, progress_bar: false}\n"
    )
    checkpoint = tmp_path / "teacher" / "student.safetensors"
    cfg = load_config(METHODS["cudfkd"][0], [
        *SHRINK, *METHODS["cudfkd"][2:], f"teacher.recipe={recipe}", f"teacher.checkpoint={checkpoint}",
        "train.mixed_precision=bf16", f"output_dir={tmp_path / 'run'}",
    ])
    assert train_missing_teacher(cfg)
    trainer = Trainer(cfg)
    assert checkpoint.is_file()
    assert json.loads((tmp_path / "teacher" / "summary.json").read_text())["steps"] == 2
    assert trainer.accelerator.mixed_precision == "bf16"
    assert trainer.fit()["steps"] == 4


def test_fp16_on_a_cpu_warns_that_it_computes_in_float32(tmp_path):
    with pytest.warns(UserWarning, match="fp16 has no effect on cpu"):
        make_accelerator(load_config(None, ["student.arch=resnet8", "train.mixed_precision=fp16"]))
