"""The quickstart recipe, reduced by overrides: a data-free CuDFKD run end to end on the CPU.

The full recipe trains (or reuses) a ResNet-20 teacher; here a tiny random
teacher checkpoint stands in for it, so the test exercises the recipe's
generator source, loss terms and policies in seconds rather than minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dfkd.data.catalog as catalog
from dfkd.checkpoint import save_model
from dfkd.config import load_config
from dfkd.engine import Trainer
from dfkd.models import create_model

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


@pytest.fixture
def tiny_teacher(tmp_path: Path) -> Path:
    path = tmp_path / "teacher.safetensors"
    save_model(create_model("resnet8", num_classes=10), path, {"arch": "resnet8"})
    return path


def _reduced(tmp_path: Path, teacher: Path, *extra: str):
    return load_config(QUICKSTART, [
        f"output_dir={tmp_path / 'run'}",
        "teacher.arch=resnet8", f"teacher.checkpoint={teacher}", "teacher.recipe=null",
        "data.test_samples=40", "data.num_workers=0",
        "source.batch_size=8", "train.epochs=2", "train.steps_per_epoch=3", "train.log_every=1",
        "train.progress_bar=false", "eval.batch_size=40", *extra,
    ])


def test_the_quickstart_distils_without_touching_the_training_split(tmp_path, tiny_teacher, monkeypatch):
    seeds: list[int] = []  # each split of the procedural dataset is rendered from its own seed
    render = catalog.render_procedural

    def recording(num_images, image_size, seed):
        seeds.append(seed)
        return render(num_images, image_size, seed)

    monkeypatch.setattr(catalog, "render_procedural", recording)
    summary = Trainer(_reduced(tmp_path, tiny_teacher)).fit()

    split_of = {seed: split for split, seed in catalog._PROCEDURAL_SEEDS.items()}
    assert [split_of[seed] for seed in seeds] == ["test"], "a data-free run may read the held-out split only"
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["steps"] == 6 and on_disk == json.loads(json.dumps(summary))
    for key in ("final_acc1", "final_agree1", "final_loyalty"):
        assert 0.0 <= on_disk[key] <= (1.0 if key == "final_loyalty" else 100.0), key
    assert on_disk["synth_s"] > 0.0
    assert (run / "generator.safetensors").is_file()


def test_the_quickstart_writes_every_curve_the_issue_lists(tmp_path, tiny_teacher):
    Trainer(_reduced(tmp_path, tiny_teacher)).fit()
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    recipe = load_config(QUICKSTART)
    for term in recipe.synthesizer.terms:  # every generator term, raw and weighted, and its weight (alpha_adv for adv)
        assert f"synth/weight/{term}" in scalars, term
        if term != "adv":  # adv is not computed while its weight is still 0 (the warm-up of alpha_adv)
            assert {f"synth/{term}", f"synth/{term}_weighted"} <= scalars, term
    for tag in ("weighting/lambda", "weighting/v_mean", "weighting/v_above_half", "synth/images_per_s", "eval/agree1"):
        assert tag in scalars, tag
    assert {"per_sample/loss", "per_sample/weight"} <= set(events.Tags()["histograms"])
    grids = events.Images("synthetic")
    assert len(grids) == 2, "one grid of synthetic samples per epoch"


def test_a_generator_that_collapses_to_one_image_is_reported_once(tmp_path, tiny_teacher, capsys):
    trainer = Trainer(_reduced(tmp_path, tiny_teacher, "synthesizer.lr=0"))  # lr 0: it stays as set below
    to_image = trainer.source.built.generator.to_image
    to_image.weight.data.zero_()
    to_image.bias.data.zero_()  # sigmoid(0): every pixel of every image is 0.5
    trainer.fit()
    err = capsys.readouterr().err
    assert err.count("collapsed to one image") == 1 and "at step 1:" in err and "synthesizer.lr" in err
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("synth/spread")] == [0.0] * 6


def test_a_healthy_generator_logs_its_spread_without_a_warning(tmp_path, tiny_teacher, capsys):
    Trainer(_reduced(tmp_path, tiny_teacher)).fit()
    assert "collapsed" not in capsys.readouterr().err
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert min(e.value for e in events.Scalars("synth/spread")) > 0.05
