"""Class-conditional generators from a recipe: what is refused before anything runs, and a run with one.

The networks' and the synthesizer's side are tested in test_generator_networks.py
and test_terms.py; here, the recipe key ``synthesizer.generator.conditional``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dfkd.cost import multiply_adds
from dfkd.errors import ConfigError
from dfkd.recipe import load_config
from dfkd.trainer import Trainer
from generators.networks import DAFLGenerator

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
DAFL = ROOT / "recipes/mnist/dafl/lenet5_lenet5_half.yaml"
FAST = ROOT / "recipes/mnist/fast2/lenet5_lenet5_half.yaml"
CONDITIONAL = ["synthesizer.generator.conditional=true", "synthesizer.targets=random"]


def test_a_conditional_generator_needs_random_targets_and_says_so_before_anything_runs():
    with pytest.raises(ConfigError, match=r"synthesizer\.targets must be 'random' with a conditional generator"):
        load_config(DAFL, ["synthesizer.generator.conditional=true"])
    assert load_config(DAFL, CONDITIONAL).synthesizer.generator.conditional


def test_a_synthesizer_that_gives_its_generator_no_labels_refuses_a_conditional_one():
    with pytest.raises(ConfigError, match=r"the 'fast' synthesizer cannot drive a class-conditional generator"):
        load_config(FAST, CONDITIONAL)


def test_the_class_count_comes_from_the_dataset_not_the_recipe():
    with pytest.raises(ConfigError, match=r"synthesizer\.generator\.num_classes"):
        load_config(DAFL, [*CONDITIONAL, "synthesizer.generator.num_classes=10"])


def test_a_run_with_a_conditional_generator_trains_from_the_replay_pool_and_counts_its_cost(tmp_path, resnet8_teacher):
    cfg = load_config(ROOT / "recipes/methods/dafl.yaml", [
        f"output_dir={tmp_path / 'run'}", f"teacher.checkpoint={resnet8_teacher}", "teacher.arch=resnet8",
        "student.arch=resnet8", "data.name=procedural", "data.test_samples=32", "data.num_workers=0",
        "eval.batch_size=32", "train.epochs=1", "train.steps_per_epoch=4", "train.progress_bar=false",
        "source.batch_size=8", "source.kd_steps=2", "source.replay={size: 32, fresh: 0.25}",
        "synthesizer.generator={name: dafl, nz: 8, width: 4, conditional: true}", "synthesizer.targets=random",
    ])
    summary = Trainer(cfg).fit()
    assert summary["steps"] == 4 and summary["reloads"] == 0
    plain = DAFLGenerator(image_size=32, channels=3, nz=8, width=4)
    # the one-hot of the 10 classes joins z in the projection to the 4 x 8 x 8 seed; the rest costs the same
    assert summary["macs_per_image"]["generator"] == multiply_adds(plain, (8,)) + 10 * 4 * 8 * 8
