"""The quickstart recipe, reduced by overrides: data-free distillation on the built-in digits, end to end.

The full recipe trains (or reuses) a LeNet-5 teacher on the digits; here a tiny
random LeNet-5 checkpoint stands in for it, so the test exercises the recipe's
generator source, replay pool, loss terms and reports in seconds rather than minutes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dfkd.data.catalog as catalog
from dfkd.cli import main
from dfkd.data import build_dataset
from dfkd.models import create_model
from dfkd.recipe import load_config
from dfkd.trainer import Trainer
from dfkd.weights import save_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


@pytest.fixture
def tiny_teacher(tmp_path: Path) -> Path:
    path = tmp_path / "teacher.safetensors"
    save_model(create_model("lenet5", num_classes=10, in_channels=1), path, {"arch": "lenet5"})
    return path


REDUCED = [
    "data.test_samples=40", "data.num_workers=0", "source.batch_size=8", "synthesizer.batch_size=8", "source.replay.size=64",
    "train.epochs=2", "train.steps_per_epoch=3", "train.log_every=1", "train.progress_bar=false", "eval.batch_size=40",
]


def _reduced(tmp_path: Path, teacher: Path, *extra: str):
    return load_config(QUICKSTART, [
        f"output_dir={tmp_path / 'run'}", f"teacher.checkpoint={teacher}", "teacher.recipe=null", *REDUCED, *extra,
    ])


def test_the_quickstart_distils_on_the_digits_without_touching_their_training_split(tmp_path, tiny_teacher, monkeypatch):
    seeds: list[int] = []  # each split of the digits is rendered from its own seed
    render = catalog.render_digits

    def recording(num_images, image_size, seed):
        seeds.append(seed)
        return render(num_images, image_size, seed)

    monkeypatch.setattr(catalog, "render_digits", recording)
    summary = Trainer(_reduced(tmp_path, tiny_teacher)).fit()

    split_of = {seed: split for split, seed in catalog._DIGITS_SEEDS.items()}
    assert [split_of[seed] for seed in seeds] == ["test"], "a data-free run may read the held-out split only"
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["steps"] == 6 and on_disk == json.loads(json.dumps(summary))
    for key in ("final_acc1", "final_agree1", "final_loyalty", "final_teacher_acc1"):
        assert 0.0 <= on_disk[key] <= (1.0 if key == "final_loyalty" else 100.0), key
    assert on_disk["synth_s"] > 0.0 and on_disk["macs_per_image"]["generator"] > on_disk["macs_per_image"]["teacher"]
    assert (run / "generator.safetensors").is_file()
    assert (run / "synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the last grid, as a file"


def test_the_quickstart_writes_its_curves_and_grids(tmp_path, tiny_teacher):
    Trainer(_reduced(tmp_path, tiny_teacher)).fit()
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    recipe = load_config(QUICKSTART)
    for term in recipe.synthesizer.terms:  # every generator term, raw and weighted, and its weight
        assert {f"synth/{term}", f"synth/{term}_weighted", f"synth/weight/{term}"} <= scalars, term
    for tag in ("replay/images", "synth/images_per_s", "synth/spread", "eval/agree1", "student/kd"):
        assert tag in scalars, tag
    assert "per_sample/loss" in set(events.Tags()["histograms"])
    assert len(events.Images("synthetic")) == 2, "one grid of synthetic samples per epoch"


def test_the_quickstart_names_each_phase_and_ends_with_what_to_look_at(tmp_path, capsys):
    teacher = tmp_path / "teacher" / "student.safetensors"  # missing: the quickstart trains it first
    recipe = tmp_path / "tiny_teacher.yaml"  # the quickstart's teacher recipe on 64 images
    recipe.write_text(f"base: {ROOT / 'recipes/digits/teacher_lenet5.yaml'}\n"
                      "data: {train_samples: 64, test_samples: 40, num_workers: 0}\n"
                      "source: {batch_size: 32}\ntrain: {epochs: 1, progress_bar: false}\n")
    code = main([
        "train", str(QUICKSTART), f"teacher.checkpoint={teacher}", f"teacher.recipe={recipe}",
        f"output_dir={tmp_path / 'run'}", *REDUCED,
    ])
    assert code == 0
    out = capsys.readouterr().out
    first, second = out.index("no teacher checkpoint at"), out.index("distil without data:")
    assert first < second and "training the teacher first" in out and teacher.is_file()
    for fragment in ("teacher Acc@1", "Agree@1 with the teacher", "loyalty", "synthetic images:",
                     f"tensorboard --logdir {tmp_path / 'run' / 'tb'}"):
        assert fragment in out, fragment


def _kill(trainer: Trainer) -> None:
    """tanh(0) then an affine-free batch norm: every pixel of every image is 0."""
    to_image = trainer.loop.source.built.generator.to_image
    to_image.weight.data.zero_()
    to_image.bias.data.zero_()


def test_a_collapsed_generator_is_replaced_by_a_fresh_one(tmp_path, tiny_teacher, capsys):
    """The quickstart's synthesizer.reset_on_collapse: a dead generator is drawn afresh, and the run goes on."""
    trainer = Trainer(_reduced(tmp_path, tiny_teacher, "synthesizer.lr=0"))  # lr 0: only a reset can change it
    _kill(trainer)
    trainer.fit()
    err = capsys.readouterr().err
    assert err.count("re-initialised") == 1 and "learns nothing" not in err
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("synth/resets")] == [1.0, 1.0], "one reset, at the first update"
    first, second = (e.value for e in events.Scalars("synth/spread"))
    assert first == 0.0 and second > 0.05, "the first update's batch was one image; the next ones differ again"


def test_a_generator_that_collapses_to_one_image_is_reported_once(tmp_path, tiny_teacher, capsys):
    trainer = Trainer(_reduced(tmp_path, tiny_teacher, "synthesizer.lr=0", "synthesizer.reset_on_collapse=false"))
    _kill(trainer)
    trainer.fit()
    err = capsys.readouterr().err
    assert err.count("collapsed to one image") == 1 and "at step 1:" in err and "synthesizer.lr" in err
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("synth/spread")] == [0.0] * 2, "one generator update per 4 steps"


def test_a_healthy_generator_logs_its_spread_without_a_warning(tmp_path, tiny_teacher, capsys):
    Trainer(_reduced(tmp_path, tiny_teacher)).fit()
    assert "collapsed" not in capsys.readouterr().err
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert min(e.value for e in events.Scalars("synth/spread")) > 0.05


def test_the_readme_figure_sets_held_out_digits_beside_the_synthetic_grid(tmp_path, tiny_teacher):
    Trainer(_reduced(tmp_path, tiny_teacher)).fit()
    spec = importlib.util.spec_from_file_location("real_vs_synthetic", ROOT / "benchmarks" / "real_vs_synthetic.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "figure.png"
    script.main([str(tmp_path / "run"), str(out), "--rows", "2", "--scale", "1"])

    figure = np.asarray(Image.open(out).convert("L"))
    cell = 32 + 1  # a 32-pixel digit and the grid's 1-pixel padding
    panel = 8 * cell + 1
    assert figure.shape == (2 * cell + 1, 2 * panel + 16)
    _, test = build_dataset("digits", "unused", "test", num_samples=40)
    first = test[0][0][0].numpy()  # the first held-out digit, top left
    assert np.array_equal(figure[1:33, 1:33], first)
    synthetic = np.asarray(Image.open(tmp_path / "run" / "synthetic.png").convert("L"))
    assert np.array_equal(figure[:, panel + 16:], synthetic[: 2 * cell + 1]), "the grid's top rows, unscaled"
