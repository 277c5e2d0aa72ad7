"""``synthesizer.lr_schedule``: the generator's learning rate over the run, as DFAD's code decays it with the student's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dfkd.errors import ConfigError
from dfkd.recipe import load_config
from dfkd.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = Path(__file__).resolve().parents[1] / "recipes" / "methods"
TINY = [
    "data.name=procedural", "data.test_samples=16", "data.num_workers=0", "eval.batch_size=16",
    "teacher.arch=resnet8", "student.arch=resnet8", "source.batch_size=8", "source.kd_steps=1",
    "synthesizer.generator={name: dcgan, nz: 16, ngf: 4}", "train.epochs=3", "train.steps_per_epoch=2",
    "train.log_every=1", "train.progress_bar=false",
]


def _dfad(tmp_path: Path, teacher: Path, *extra: str):
    return load_config(METHODS / "dfad.yaml", [
        f"output_dir={tmp_path / 'run'}", f"teacher.checkpoint={teacher}", *TINY, *extra,
    ])


def _logged(run: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_the_generators_lr_follows_its_schedule_at_every_update(tmp_path, resnet8_teacher):
    cfg = _dfad(tmp_path, resnet8_teacher, "synthesizer.lr_schedule={name: multistep, milestones: [1, 2], gamma: 0.5}")
    trainer = Trainer(cfg)
    trainer.fit()
    # one update per student step; the meter logs step s's value at step s + 1
    expected = {1: 1e-3, 2: 1e-3, 3: 5e-4, 4: 5e-4, 5: 2.5e-4, 6: 2.5e-4}
    logged = _logged(tmp_path / "run", "synth/lr")
    assert logged.keys() == expected.keys()
    for step, lr in expected.items():
        assert math.isclose(logged[step], lr, rel_tol=1e-6), (step, logged[step])
    optimizer = trainer.loop.source.synthesizer.optimizer
    assert [group["lr"] for group in optimizer.param_groups] == [pytest.approx(2.5e-4)], "the rate of the last update"


def test_without_a_schedule_the_generators_lr_stays_constant_and_is_not_logged(tmp_path, resnet8_teacher):
    trainer = Trainer(_dfad(tmp_path, resnet8_teacher))
    trainer.fit()
    assert trainer.loop.source.synthesizer.optimizer.param_groups[0]["lr"] == 1e-3
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert "synth/lr" not in events.Tags()["scalars"]


def test_the_students_schedule_can_be_named_for_the_generator(tmp_path, resnet8_teacher):
    """``lr_schedule: ${optim.schedule}``: DFAD's own code, which steps both optimisers' rates together."""
    cfg = _dfad(tmp_path, resnet8_teacher, "optim.schedule={name: cosine}", "synthesizer.lr_schedule=${optim.schedule}")
    assert OmegaConf.to_container(cfg.synthesizer.lr_schedule) == {"name": "cosine", "start": 1.0, "end": 0.0}
    Trainer(cfg).fit()
    generator, student = _logged(tmp_path / "run", "synth/lr"), _logged(tmp_path / "run", "lr")
    # the student's logged lr is the one of its next step, the generator's the one of its update at that step
    for step in range(1, 6):
        assert math.isclose(generator[step + 1] / 1e-3, student[step] / cfg.optim.lr, rel_tol=1e-6), step
    assert generator[2] < generator[1] and student[6] == 0.0


@pytest.mark.parametrize(("override", "match"), [
    ("synthesizer.lr_schedule=0.5", r"synthesizer\.lr_schedule must be a schedule"),
    ("synthesizer.lr_schedule={name: cosin}", r"synthesizer\.lr_schedule.*cosine"),
    ("synthesizer.lr_schedule={name: cosine, stop: 0.1}", r"synthesizer\.lr_schedule.*stop"),
])
def test_a_bad_generator_lr_schedule_is_named(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(METHODS / "dfad.yaml", [f"output_dir={tmp_path}", "teacher.checkpoint=t.safetensors", *TINY, override])


def test_a_synthesizer_without_one_learning_rate_refuses_a_schedule(tmp_path):
    with pytest.raises(ConfigError, match=r"synthesizer\.lr_schedule: the 'inversion' synthesizer .*'generative'"):
        load_config(METHODS / "deepinversion.yaml", [
            f"output_dir={tmp_path}", "teacher.checkpoint=t.safetensors", "student.arch=resnet8", "teacher.arch=resnet8",
            "data.name=procedural", "synthesizer.lr_schedule={name: cosine}",
        ])
