"""The one loop end to end on the built-in procedural dataset, with tiny models and few steps."""

import json
from pathlib import Path
import math

import pytest
import torch
from safetensors.torch import load_file

from dfkd.errors import ConfigError
from dfkd.evaluate import evaluate
from dfkd.metrics import HISTOGRAM_BINS
from dfkd.recipe import load_config
from dfkd.trainer import Trainer
from dfkd.weights import read_model_metadata

TINY = [
    "student.arch=lenet5_half",
    "data.name=procedural",
    "data.train_samples=256",
    "data.test_samples=128",
    "data.num_workers=0",
    "source.batch_size=64",
    "optim.lr=0.05",
    "train.epochs=3",
    "train.log_every=2",
    "train.progress_bar=false",
    "eval.batch_size=64",
]


def _cfg(tmp_path, *extra):
    return load_config(None, [*TINY, f"output_dir={tmp_path / 'run'}", *extra])


def test_a_run_writes_exactly_the_documented_run_directory(tmp_path):
    summary = Trainer(_cfg(tmp_path)).fit()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock", "checkpoints", "config.yaml", "metrics.jsonl", "student.safetensors", "summary.json", "tb",
    ]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in lines] == [1, 2, 3]
    assert [entry["step"] for entry in lines] == [4, 8, 12]  # 256 samples / 64 = 4 steps per epoch
    assert all(0.0 <= entry["acc1"] <= 100.0 for entry in lines)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["steps"] == 12 and on_disk["epochs"] == 3
    for key in ("final_acc1", "final_acc5", "best_acc1", "mean_acc1", "var_acc1", "wall_s", "synth_s", "peak_mem_mb", "git_commit", "seed"):
        assert key in on_disk, key
    assert on_disk == json.loads(json.dumps(summary))
    assert read_model_metadata(run / "student.safetensors")["arch"] == "lenet5_half"
    assert list((run / "tb").glob("events.out.tfevents*"))
    saved = load_config(run / "config.yaml")
    assert saved.train.epochs == 3 and saved.optim.schedule.name == "cosine"


def test_teacher_training_learns_something(tmp_path):
    summary = Trainer(_cfg(
        tmp_path, "student.arch=resnet8", "data.train_samples=2048", "data.test_samples=500", "optim.lr=0.1",
    )).fit()
    assert summary["final_acc1"] > 20.0, "ten classes: chance is 10% (96 steps reach about 30%)"


def test_a_kd_run_reports_teacher_agreement(tmp_path):
    teacher_run = Trainer(_cfg(tmp_path, "output_dir=" + str(tmp_path / "t"), "train.epochs=1")).fit()
    assert teacher_run["steps"] == 4
    summary = Trainer(_cfg(
        tmp_path, "train.epochs=1", "teacher.arch=lenet5_half", f"teacher.checkpoint={tmp_path / 't' / 'student.safetensors'}",
        "loss.terms={kd: 0.9, ce: 0.1}",
    )).fit()
    for key in ("final_agree1", "final_loyalty", "final_loyalty_ref", "final_teacher_acc1", "best_agree1", "best_loyalty"):
        assert key in summary
    assert summary["final_teacher_acc1"] == pytest.approx(teacher_run["final_acc1"])  # same model, same test split
    assert "no GPU" in summary["machine"] and torch.__version__ in summary["machine"]
    hist = summary["final_loyalty_hist"]  # the final evaluation's per-sample loyalty, one count per test image
    assert len(hist) == HISTOGRAM_BINS and sum(hist) == 128
    centres = [(i + 0.5) / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS)]
    assert sum(c * n for c, n in zip(centres, hist)) / 128 == pytest.approx(summary["final_loyalty"], abs=0.5 / HISTOGRAM_BINS)
    assert 0.0 <= summary["final_loyalty"] <= 1.0


def test_evaluation_runs_the_frozen_teacher_once_and_reuses_its_logits(tmp_path):
    teacher_dir = tmp_path / "t"
    Trainer(_cfg(tmp_path, f"output_dir={teacher_dir}", "train.epochs=1")).fit()
    trainer = Trainer(_cfg(
        tmp_path, "train.epochs=1", "teacher.arch=lenet5_half", f"teacher.checkpoint={teacher_dir / 'student.safetensors'}",
        "loss.terms={kd: 1.0}",
    ))
    calls = []
    trainer.loop.teacher.register_forward_hook(lambda module, args, out: calls.append(len(out)))
    cache: list[torch.Tensor] = []
    args = (trainer.loop.student, trainer.loop.eval_loader, trainer.loop.normalize, trainer.accelerator, trainer.loop.teacher)
    first = evaluate(*args, teacher_cache=cache)
    assert calls == [64, 64] and len(cache) == 2  # 128 test images in batches of 64
    second = evaluate(*args, teacher_cache=cache)
    assert calls == [64, 64], "the second evaluation must read the cache, not run the teacher"
    assert second == first == evaluate(*args)  # and agree with an uncached evaluation


def test_resume_continues_where_it_stopped_and_matches_an_uninterrupted_run(tmp_path, crash_after_checkpoint):
    straight = Trainer(_cfg(tmp_path, f"output_dir={tmp_path / 'straight'}")).fit()
    crash_after_checkpoint(_cfg(tmp_path, f"output_dir={tmp_path / 'crashy'}"), epoch=2)

    resumed = Trainer(_cfg(tmp_path, f"output_dir={tmp_path / 'crashy'}", "train.resume=auto"))
    summary = resumed.fit()
    assert summary["steps"] == straight["steps"] == 12
    assert summary["final_acc1"] == straight["final_acc1"]
    a = load_file(tmp_path / "straight" / "student.safetensors")
    b = load_file(tmp_path / "crashy" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run must end with the same weights"
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "crashy" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3], "the resumed run continues at epoch 3, it does not restart"


def _epochs_logged(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_holds_exactly_the_evaluations_of_the_checkpointed_run(tmp_path, monkeypatch):
    """A crash between an evaluation and its checkpoint re-runs that epoch; its line is not doubled."""
    original = Trainer._save_checkpoint
    def crash_before_the_last_checkpoint(self):
        if self.loop.state.epoch == 3:
            raise KeyboardInterrupt("simulated crash")
        return original(self)
    monkeypatch.setattr(Trainer, "_save_checkpoint", crash_before_the_last_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(tmp_path)).fit()
    assert _epochs_logged(tmp_path / "run") == [1, 2, 3]  # epoch 3 was evaluated, then the run died
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    Trainer(_cfg(tmp_path, "train.resume=auto")).fit()
    assert _epochs_logged(tmp_path / "run") == [1, 2, 3]
    Trainer(_cfg(tmp_path, "train.epochs=2")).fit()  # a fresh run in the same folder starts a fresh log
    assert _epochs_logged(tmp_path / "run") == [1, 2]


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    summary = Trainer(_cfg(tmp_path, "train.epochs=1", "train.resume=auto")).fit()
    assert summary["steps"] == 4


def test_lr_follows_the_schedule(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "optim.schedule={name: multistep, milestones: [1, 2]}", "optim.lr=1.0"))
    trainer.fit()
    # 12 steps taken: epoch 3 (steps 8-11) ran at lr 1.0 * 0.1^2; the scheduler now sits at step 12.
    assert math.isclose(trainer.loop.scheduler.get_last_lr()[0], 0.01, rel_tol=1e-9)


@pytest.mark.parametrize("source", [
    [],  # real data: its shuffling and augmentation
    ["source={name: generator, batch_size: 32}", "synthesizer={name: generative, generator: {name: dcgan, nz: 16, ngf: 4}, "
     "terms: {oh: 1.0}}", "loss.terms={kd: 1.0}", "train.steps_per_epoch=2"],  # a generator's noise
])
def test_how_often_a_run_evaluates_does_not_change_the_student_it_trains(tmp_path, source):
    """An evaluation draws nothing from the training's random streams."""
    teacher = []
    if source:  # a data-free run needs a teacher: the student of a one-epoch run
        Trainer(_cfg(tmp_path, f"output_dir={tmp_path / 't'}", "train.epochs=1")).fit()
        teacher = ["teacher.arch=lenet5_half", f"teacher.checkpoint={tmp_path / 't' / 'student.safetensors'}"]
    students = []
    for every in (1, 3):
        Trainer(_cfg(tmp_path, f"output_dir={tmp_path / str(every)}", f"train.eval_every={every}", *teacher, *source)).fit()
        students.append(load_file(tmp_path / str(every) / "student.safetensors"))
    assert [len((tmp_path / str(every) / "metrics.jsonl").read_text().splitlines()) for every in (1, 3)] == [3, 1]
    for key in students[0]:
        assert torch.equal(students[0][key], students[1][key]), key


def test_a_run_over_files_resumes_exactly_from_the_middle_of_a_pass(tmp_path, monkeypatch, crash_after_checkpoint):
    """A dataset read from its files gets a loader per pass: the one a resume starts in the middle of a pass
    must not shift the random stream that the augmentation draws from."""
    from test_data import write_class_tree

    write_class_tree(tmp_path / "data" / "train", ("a", "b"), per_class=16)
    write_class_tree(tmp_path / "data" / "val", ("a", "b"), per_class=2)
    monkeypatch.setattr("dfkd.data.catalog.IN_MEMORY_BYTES", 0)  # every split read from its files
    files = [
        "data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.augment=crop", "source.batch_size=8",
        "train.steps_per_epoch=3", "train.epochs=2",  # 4 steps a pass: the checkpoint of epoch 1 falls in a pass
    ]
    Trainer(_cfg(tmp_path, f"output_dir={tmp_path / 'straight'}", *files)).fit()
    crash_after_checkpoint(_cfg(tmp_path, f"output_dir={tmp_path / 'crashy'}", *files), epoch=1)
    Trainer(_cfg(tmp_path, f"output_dir={tmp_path / 'crashy'}", *files, "train.resume=auto")).fit()
    students = [load_file(tmp_path / run / "student.safetensors") for run in ("straight", "crashy")]
    for key in students[0]:
        assert torch.equal(students[0][key], students[1][key]), key


def test_a_missing_teacher_is_trained_on_this_runs_data_root(tmp_path):
    from dfkd.teacher import teacher_run

    recipe = tmp_path / "teacher.yaml"
    recipe.write_text("student: {arch: lenet5}\ndata: {name: mnist, root: data}\n")
    for run_dataset, expected_root in (("mnist", "../shared/datasets"), ("fashion_mnist", "data")):
        cfg = load_config(None, [
            f"data.name={run_dataset}", "data.root=../shared/datasets", "student.arch=lenet5_half", "teacher.arch=lenet5",
            f"teacher.checkpoint={tmp_path / run_dataset / 'student.safetensors'}", f"teacher.recipe={recipe}",
        ])
        teacher_cfg = teacher_run(cfg)
        assert teacher_cfg.data.root == expected_root, "another dataset keeps the teacher recipe's own root"
        assert teacher_cfg.output_dir == str(tmp_path / run_dataset)
        assert teacher_cfg.train.resume == "auto", "an interrupted teacher run resumes"


def test_building_a_run_never_trains_its_missing_teacher(tmp_path):
    """The teacher phase is the caller's (dfkd train, dfkd bench): a Trainer only says what to run."""
    recipe = tmp_path / "teacher.yaml"
    recipe.write_text("student: {arch: lenet5}\ndata: {name: mnist, root: data}\n")
    checkpoint = tmp_path / "teacher" / "student.safetensors"
    cfg = _cfg(tmp_path, "teacher.arch=resnet8", f"teacher.checkpoint={checkpoint}", f"teacher.recipe={recipe}")
    with pytest.raises(ConfigError, match="train_missing_teacher") as error:
        Trainer(cfg)
    assert str(checkpoint) in str(error.value) and str(recipe) in str(error.value)
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "run").exists(), "nothing was trained or made"


def test_a_second_process_training_into_the_same_folder_is_refused(tmp_path):
    import multiprocessing

    from dfkd.lock import run_lock
    from dfkd.errors import RunLockedError

    folder = tmp_path / "run"
    with run_lock(folder):
        with pytest.raises(RunLockedError, match=r"process \d+ on .* is training into"):
            Trainer(_cfg(tmp_path)).fit()  # another open file description: refused, like another process
        assert not (folder / "checkpoints").exists(), "the refused run wrote nothing"
        child = multiprocessing.get_context("spawn").Process(target=_try_lock, args=(str(folder),))
        child.start()
        child.join(60)
        assert child.exitcode == 3, "another process is refused while the lock is held"
    assert Trainer(_cfg(tmp_path, "train.epochs=1")).fit()["steps"] == 4, "released when its holder ends"


def _try_lock(folder: str) -> None:
    from dfkd.lock import run_lock
    from dfkd.errors import RunLockedError

    try:
        with run_lock(Path(folder)):
            raise SystemExit(0)
    except RunLockedError:
        raise SystemExit(3) from None


def test_every_evaluation_records_its_training_time_apart_from_evaluation_time(tmp_path):
    summary = Trainer(_cfg(tmp_path)).fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    elapsed, evals = [e["elapsed_s"] for e in lines], [e["eval_s"] for e in lines]
    assert all(b > a for a, b in zip(elapsed, elapsed[1:])) and all(b > a for a, b in zip(evals, evals[1:]))
    assert 0 < elapsed[0] and 0 < evals[0]
    assert summary["train_s"] + summary["eval_s"] == pytest.approx(summary["wall_s"])
    assert elapsed[-1] <= summary["train_s"] and summary["stopped_at_budget"] is False
    assert "final_elapsed_s" not in summary


def test_a_time_budget_stops_the_run_with_a_last_evaluation_and_checkpoint(tmp_path):
    summary = Trainer(_cfg(tmp_path, "train.time_budget_s=1e-6")).fit()
    assert summary["stopped_at_budget"] is True and summary["steps"] == 1, "the budget ends the run after its first step"
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["step"]) for e in lines] == [(1, 1)]
    assert (tmp_path / "run" / "student.safetensors").is_file()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000001"]
