"""``dfkd bench``: a suite runs end to end, resumes where it stopped, tabulates seeds, and fails early on typos.

The runs are benchmarks/suites/tiny.yaml (2 steps each on the procedural
dataset); its teacher (2 steps, through teacher.recipe) is trained once for
the module, into a temporary folder passed as a command-line override.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import pytest

from dfkd.bench import format_table, load_suite, plan_runs
from dfkd.config import load_config
from dfkd.cli import main
from dfkd.engine import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

ENTRIES = ["kd", "cudfkd"]


@pytest.fixture(scope="module")
def teacher_override(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"teacher.checkpoint={tmp_path_factory.mktemp('teacher') / 'run' / 'student.safetensors'}"


def _bench(out: Path, teacher_override: str, *extra: str) -> int:
    return main(["bench", "tiny", teacher_override, *extra, "--output-dir", str(out)])


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, teacher_override: str) -> tuple[Path, str]:
    """The tiny suite, run once: its folder and what it printed."""
    out = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _bench(out, teacher_override) == 0
    return out, printed.getvalue()


def _records(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


def _counting_fit(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patch Trainer.fit to record each run's folder before running it."""
    calls: list[str] = []
    original = Trainer.fit

    def fit(self):
        calls.append(Path(self.cfg.output_dir).parent.name)
        return original(self)

    monkeypatch.setattr(Trainer, "fit", fit)
    return calls


def test_the_tiny_suite_runs_end_to_end_and_writes_one_record_per_run(finished):
    out, printed = finished
    records = _records(out)
    assert [(r["entry"], r["seed"]) for r in records] == [("kd", 0), ("cudfkd", 0)]
    for record in records:
        assert (record["dataset"], record["teacher"], record["student"]) == ("procedural", "resnet8", "lenet5_half")
        assert record["steps"] == 2 and record["processes"] == 1
        for key in ("final_acc1", "final_agree1", "final_loyalty", "best_acc1", "wall_s", "peak_mem_mb"):
            assert math.isfinite(record[key]), key
        summary = json.loads((out / record["entry"] / "seed0" / "summary.json").read_text())
        assert record["final_acc1"] == summary["final_acc1"]
    assert records[0]["recipe"] == "recipes/methods/kd.yaml" and records[1]["synth_s"] > 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["entry"], r["seed"], r["steps"]) for r in rows] == [("kd", "0", "2"), ("cudfkd", "0", "2")]
    table = (out / "results.md").read_text()
    assert table.endswith(format_table(records))
    assert "| kd | resnet8 → lenet5_half | procedural | 0 |" in table
    lines = printed.strip().splitlines()
    assert [line.split(" seed ")[0] for line in lines if " seed 0: " in line] == ENTRIES
    assert lines[-1] == str(out / "results.md")


def test_a_finished_suite_reruns_nothing_and_still_writes_its_results(finished, teacher_override, monkeypatch):
    out, _ = finished
    before = _records(out)
    for name in ("results.json", "results.csv", "results.md"):
        (out / name).unlink()
    monkeypatch.setattr(Trainer, "__init__", lambda self, cfg: pytest.fail("a finished run was started again"))
    assert _bench(out, teacher_override) == 0
    assert _records(out) == before
    assert (out / "results.csv").is_file() and (out / "results.md").is_file()


def test_an_interrupted_suite_resumes_with_only_the_unfinished_entry(tmp_path, teacher_override, monkeypatch, capsys):
    # cudfkd is killed right after its (only) checkpoint: its folder holds checkpoints but no summary.json.
    original = Trainer._save_checkpoint

    def save_then_die(self):
        path = original(self)
        if Path(self.cfg.output_dir).parent.name == "cudfkd":
            raise KeyboardInterrupt("simulated interruption")
        return path

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path, teacher_override)
    assert (tmp_path / "kd" / "seed0" / "summary.json").is_file()
    assert not (tmp_path / "cudfkd" / "seed0" / "summary.json").exists()
    assert not (tmp_path / "results.json").exists()

    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    calls = _counting_fit(monkeypatch)
    capsys.readouterr()
    assert _bench(tmp_path, teacher_override) == 0
    assert calls == ["cudfkd"], "only the unfinished entry runs again"
    assert "resumed from" in capsys.readouterr().out, "it continues from its own checkpoint (train.resume=auto)"
    assert [(r["entry"], r["steps"]) for r in _records(tmp_path)] == [("kd", 2), ("cudfkd", 2)]


def test_format_table_aggregates_seeds_as_mean_and_population_std():
    def record(entry, seed, acc1, agree1, loyalty, best, wall, synth, mem, teacher="resnet34"):
        return {
            "entry": entry, "seed": seed, "dataset": "cifar10", "teacher": teacher, "student": "resnet18",
            "final_acc1": acc1, "final_agree1": agree1, "final_loyalty": loyalty, "best_acc1": best,
            "wall_s": wall, "synth_s": synth, "peak_mem_mb": mem,
        }

    records = [
        record("cudfkd", 0, 90.0, 80.0, 0.5, 91.0, 10.0, 2.0, 100.0),
        record("scratch", 0, 70.125, None, None, 71.0, 5.0, 0.0, 50.0, teacher=None),
        record("cudfkd", 1, 92.0, 84.0, 0.7, 93.0, 20.0, 4.0, 300.0),
    ]
    expected = (
        "| entry | teacher → student | dataset | seeds | Acc@1 | Agree@1 | loyalty | best Acc@1 | wall | synthesis | peak mem |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| cudfkd | resnet34 → resnet18 | cifar10 | 0, 1 | 91.00 ± 1.00 | 82.00 ± 2.00 | 0.6000 ± 0.1000 | 92.00 ± 1.00 "
        "| 15.0 s | 3.0 s | 200 MB |\n"
        "| scratch | resnet18 (scratch) | cifar10 | 0 | 70.12 | - | - | 71.00 | 5.0 s | 0.0 s | 50 MB |\n"
    )
    assert format_table(records) == expected


def _never_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Trainer, "__init__", lambda self, cfg: pytest.fail("a run started before validation ended"))


def test_an_unknown_suite_key_fails_before_any_run_naming_the_key(tmp_path, monkeypatch, capsys):
    _never_run(monkeypatch)
    suite = tmp_path / "typo.yaml"
    suite.write_text("seeds: [0]\nentires:\n  - {name: kd, recipe: recipes/methods/kd.yaml}\n")
    assert main(["bench", str(suite), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "unknown key 'entires'" in error and "Did you mean 'entries'?" in error and "\n" not in error

    suite.write_text("entries:\n  - {name: kd, recipy: recipes/methods/kd.yaml}\n")
    assert main(["bench", str(suite)]) == 2
    error = capsys.readouterr().err
    assert "entries[0]" in error and "'recipy'" in error and "Did you mean 'recipe'?" in error

    assert main(["bench", "no_such_suite"]) == 2
    error = capsys.readouterr().err
    assert "no suite 'no_such_suite'" in error and str(Path("benchmarks/suites/no_such_suite.yaml").resolve()) in error


def test_a_bad_override_in_a_later_entry_fails_before_the_first_run(tmp_path, teacher_override, monkeypatch, capsys):
    _never_run(monkeypatch)
    suite = tmp_path / "bad.yaml"
    suite.write_text(
        "seeds: [0, 1]\n"
        "entries:\n"
        "  - {name: kd, recipe: recipes/methods/kd.yaml, overrides: [student.arch=resnet8]}\n"
        "  - {name: late, recipe: recipes/methods/kd.yaml, overrides: [train.epoch=1]}\n"
    )
    assert main(["bench", str(suite), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "entry 'late'" in error and "'train.epoch'" in error and "Did you mean 'train.epochs'?" in error
    assert "\n" not in error
    assert not (tmp_path / "out").exists()

    assert main(["bench", "tiny", teacher_override, "optim.lrr=0.1", "--output-dir", str(tmp_path / "out")]) == 2
    assert "'optim.lrr'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny", "mnist", "cifar10_jpeg_cpu"])
def test_every_shipped_suite_validates(name, tmp_path):
    suite = load_suite(name)
    runs = plan_runs(suite, [], tmp_path)
    assert len(runs) == len(suite.entries) * len(suite.seeds)
    assert all(run.cfg.train.resume == "auto" for run in runs)
    assert load_config("benchmarks/suites/teachers/tiny.yaml").student.arch == "resnet8"  # tiny's teacher recipe
