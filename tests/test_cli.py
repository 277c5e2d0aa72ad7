"""The command line as a user meets it: exit codes, one-paragraph errors, JSON output, accelerate launch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfkd.cli import main
from dfkd.models import create_model
from dfkd.weights import save_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TINY = [
    "student.arch=lenet5_half", "data.train_samples=128", "data.test_samples=64", "data.num_workers=0",
    "source.batch_size=64", "train.epochs=1", "train.progress_bar=false", "eval.batch_size=64",
]


def _run(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "dfkd", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("dfkd: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_bad_key_exits_with_the_suggestion(tmp_path):
    _assert_clean_error(_run("train", "recipes/procedural/teacher_resnet20.yaml", "train.epoch=3", f"output_dir={tmp_path}"),
                        "'train.epoch'", "Did you mean 'train.epochs'")


def test_a_misspelt_key_is_reported_before_torch_is_imported(tmp_path):
    code = (
        "import sys; from dfkd.cli import main; "
        f"status = main(['train', 'recipes/quickstart.yaml', 'train.epoch=3', 'output_dir={tmp_path}']); "
        "print(status, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert "Did you mean 'train.epochs'" in proc.stderr and "Traceback" not in proc.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_failed_run_leaves_no_folder_behind(tmp_path):
    run = tmp_path / "runs" / "deep" / "run"
    proc = _run("train", "recipes/mnist/teacher_lenet5.yaml", f"data.root={tmp_path / 'nowhere'}", f"output_dir={run}")
    _assert_clean_error(proc, "t10k-images-idx3-ubyte")
    assert not (tmp_path / "runs").exists(), "neither the run's folder nor the parents it made"


def test_a_finished_run_is_not_trained_again_unless_told_to_start_over(tmp_path, capsys):
    args = ["train", "recipes/procedural/teacher_resnet20.yaml", *TINY, f"output_dir={tmp_path / 'run'}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "finished in" in printed and f"tensorboard --logdir {tmp_path / 'run' / 'tb'}" in printed
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and str(tmp_path / "run" / "summary.json") in err and "--overwrite" in err
    assert (tmp_path / "run" / "summary.json").read_text() == summary, "the finished run is untouched"
    (tmp_path / "run" / "stale.txt").write_text("from the old run")
    assert main([*args, "--overwrite"]) == 0
    assert not (tmp_path / "run" / "stale.txt").exists() and (tmp_path / "run" / "summary.json").is_file()


def test_wrong_type_exits_naming_key_type_and_value(tmp_path):
    _assert_clean_error(_run("train", "recipes/procedural/teacher_resnet20.yaml", "optim.lr=fast", f"output_dir={tmp_path}"),
                        "'optim.lr'", "float", "'fast'")


def test_missing_dataset_says_where_it_looked(tmp_path):
    proc = _run("train", "recipes/mnist/teacher_lenet5.yaml", f"data.root={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'run'}")
    _assert_clean_error(proc, str(tmp_path / "nowhere"), "t10k-images-idx3-ubyte", "data.download=true")


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    save_model(create_model("resnet8", num_classes=10), tmp_path / "wrong.safetensors")
    proc = _run("train", "recipes/procedural/teacher_resnet20.yaml", *TINY, "teacher.arch=resnet20",
                f"teacher.checkpoint={tmp_path / 'wrong.safetensors'}", "loss.terms={kd: 1.0}", f"output_dir={tmp_path / 'run'}")
    _assert_clean_error(proc, "teacher checkpoint", "missing keys", "layer1.1.conv1.weight")


def test_a_teacher_for_another_class_count_is_named(tmp_path):
    torch.save({"state_dict": create_model("lenet5_half", num_classes=100).state_dict()}, tmp_path / "t100.pth")
    proc = _run("eval", "student.arch=lenet5_half", f"student.checkpoint={tmp_path / 't100.pth'}", "data.test_samples=8")
    _assert_clean_error(proc, "fc.2.weight: file (100, 42) vs model (10, 42)", "trained for 100 classes", "built for 10")


def _main_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run the CLI in this process; it must exit 2 with a one-paragraph error, which is returned."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("dfkd: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_generator_that_cannot_make_the_dataset_image_size_is_named(tmp_path, capsys, resnet8_teacher):
    err = _main_error(
        capsys, "train", "recipes/procedural/cudfkd_resnet20_resnet8.yaml", "teacher.recipe=null", "teacher.arch=resnet8",
        f"teacher.checkpoint={resnet8_teacher}", "data.image_size=30", "data.test_samples=8", f"output_dir={tmp_path}",
    )
    assert "'dcgan' cannot make 3x30x30 images" in err and "multiple of 4" in err and "data.image_size" in err


def test_a_generator_that_cannot_make_the_images_fails_before_the_teacher_is_trained(tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"  # missing: the recipe would train it first, for minutes
    err = _main_error(
        capsys, "train", "recipes/procedural/cudfkd_resnet20_resnet8.yaml", f"teacher.checkpoint={teacher_dir / 'student.safetensors'}",
        "data.image_size=30", f"output_dir={tmp_path / 'run'}",
    )
    assert "'dcgan' cannot make 3x30x30 images" in err
    assert not teacher_dir.exists() and not (tmp_path / "run").exists(), "nothing may run before the error"


def test_the_generator_image_size_is_not_a_recipe_option(tmp_path, capsys):
    err = _main_error(capsys, "train", "recipes/procedural/cudfkd_resnet20_resnet8.yaml", "synthesizer.generator.image_size=28")
    assert "synthesizer.generator.image_size is not a recipe option" in err and "data.image_size" in err


def test_an_output_dir_that_cannot_be_written_is_named(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _main_error(capsys, "train", "recipes/procedural/teacher_resnet20.yaml", *TINY, f"output_dir={blocker / 'run'}")
    assert f"cannot write to output_dir '{blocker / 'run'}'" in err and "output_dir=PATH" in err


def test_resuming_a_checkpoint_of_another_architecture_names_the_keys(tmp_path, capsys):
    assert main(["train", "recipes/procedural/teacher_resnet20.yaml", *TINY, f"output_dir={tmp_path / 'a'}"]) == 0
    checkpoint = next((tmp_path / "a" / "checkpoints").glob("step_*"))
    err = _main_error(
        capsys, "train", "recipes/procedural/teacher_resnet20.yaml", *TINY, "student.arch=resnet8",
        f"train.resume={checkpoint}", f"output_dir={tmp_path / 'b'}",
    )
    assert f"the student in checkpoint '{checkpoint}' does not fit ResNet" in err and "missing keys" in err


def test_train_then_eval_prints_json(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "recipes/procedural/teacher_resnet20.yaml", *TINY, f"output_dir={run}"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["output_dir"] == str(run) and "final_acc1" in trained

    assert main(["eval", str(run / "config.yaml")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["acc1"] == pytest.approx(trained["final_acc1"])
    assert set(result) >= {"acc1", "acc5"} and "agree1" not in result

    ckpt = run / "student.safetensors"
    assert main(["eval", "student.arch=lenet5_half", f"student.checkpoint={ckpt}", "teacher.arch=lenet5_half",
                 f"teacher.checkpoint={ckpt}", "data.test_samples=64"]) == 0
    against_itself = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert against_itself["agree1"] == 100.0
    assert against_itself["loyalty"] == pytest.approx(1.0, abs=1e-6)
    assert 0.99 < against_itself["loyalty_ref"] <= 1.0

    distilled = tmp_path / "distilled"  # a run with a teacher: its summary also holds the loyalty histogram
    assert main(["train", "recipes/procedural/teacher_resnet20.yaml", *TINY, f"output_dir={distilled}",
                 "teacher.arch=lenet5_half", f"teacher.checkpoint={ckpt}", "loss.terms={kd: 1.0}"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["final_teacher_acc1"] == pytest.approx(trained["final_acc1"], abs=1e-4)
    assert {"final_agree1", "final_loyalty"} <= set(printed) and "final_loyalty_hist" not in printed


def test_list_models(capsys):
    assert main(["list", "models"]) == 0
    names = capsys.readouterr().out.split()
    assert {"resnet20_a", "wrn_40_2", "lenet5_half", "tv_resnet18"} <= set(names)


def test_accelerate_launch_runs_the_same_cli(tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [str(launcher), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "dfkd", "train", "recipes/procedural/teacher_resnet20.yaml", *TINY, f"output_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["output_dir"] == str(tmp_path / "run")
    assert (tmp_path / "run" / "student.safetensors").is_file()


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "teachers" / "cifar10-akamaster").is_dir(), reason="needs ../shared (the real CIFAR-10-JPEG copy and akamaster teachers)")
@pytest.mark.parametrize("depth,expected", [(20, 81.03), (56, 83.20)])
def test_akamaster_teachers_score_their_measured_accuracy(depth, expected, persistent_cache, capsys):
    """The measured facts of ../shared/datasets/README.md: architecture, loading, class order and normalisation."""
    checkpoint = next((SHARED / "teachers" / "cifar10-akamaster").glob(f"resnet{depth}-*.th"))
    code = main([
        "eval", "data.name=cifar10_jpeg", f"data.root={SHARED / 'datasets'}",
        "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]", "eval.batch_size=500",
        f"student.arch=resnet{depth}_a", f"student.checkpoint={checkpoint}",
    ])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples"] == 10_000
    assert result["acc1"] == pytest.approx(expected, abs=0.2)
