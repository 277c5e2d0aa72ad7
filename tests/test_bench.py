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

from dfkd.bench import load_suite, plan_runs
from dfkd.errors import ConfigError
from dfkd.tables import accuracy_table, load_paper_numbers, stability_table
from dfkd.time_to_accuracy import time_to, time_to_accuracy_table
from dfkd.cli import main
from dfkd.recipe import load_config
from dfkd.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

ENTRIES = ["kd", "cudfkd"]
SHIPPED_SUITES = sorted(path.stem for path in (Path(__file__).parents[1] / "benchmarks" / "suites").glob("*.yaml"))


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
    assert "| kd | kd | resnet8 → lenet5_half | 0 | 2 |" in table
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
    assert [r["entry"] for r in _records(tmp_path)] == ["kd"], "the results so far are written after each run"

    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    calls = _counting_fit(monkeypatch)
    capsys.readouterr()
    assert _bench(tmp_path, teacher_override) == 0
    assert calls == ["cudfkd"], "only the unfinished entry runs again"
    assert "resumed from" in capsys.readouterr().out, "it continues from its own checkpoint (train.resume=auto)"
    assert [(r["entry"], r["steps"]) for r in _records(tmp_path)] == [("kd", 2), ("cudfkd", 2)]


PAPERS = """\
accuracy:
  - source: Table X
    dataset: cifar10
    teacher: resnet34
    student: resnet18
    rows:
      T.Scratch: [95.70, 100.00, 1.0000]
      CuDFKD: [95.28, 98.20, 0.8915]
      PRE-DFKD: [94.10, null, null]
stability:
  - source: Table Y
    dataset: cifar10
    teacher: resnet34
    student: resnet18
    rows:
      CuDFKD: [94.1, 2.88, 95.0, 6.84, 5.48]
"""


def _record(entry, seed, best, agree, loyalty, *, method=None, student="resnet18", teacher="resnet34", **more):
    return {
        "entry": entry, "method": method or entry, "seed": seed, "dataset": "cifar10", "teacher": teacher,
        "student": student, "best_acc1": best, "best_agree1": agree, "best_loyalty": loyalty, **more,
    }


def test_the_accuracy_table_has_a_column_group_per_pair_and_the_papers_numbers_in_brackets(tmp_path):
    (tmp_path / "papers.yaml").write_text(PAPERS)
    papers = load_paper_numbers(tmp_path / "papers.yaml")
    records = [
        _record("cudfkd", 0, 90.0, 80.0, 0.5, method="CuDFKD", final_teacher_acc1=94.0),
        _record("cudfkd", 1, 92.0, 84.0, 0.7, method="CuDFKD", final_teacher_acc1=94.0),
        _record("scratch", 0, 93.125, 91.0, 0.8, method="S.Scratch", final_teacher_acc1=94.5),  # another test subset
        _record("dafl_small", 0, 50.0, 52.0, 0.4, method="DAFL", student="resnet8"),  # a second pair, no teacher_acc1
        _record("alone", 0, 70.0, None, None, teacher=None),  # no teacher: not in this table
    ]
    expected = (
        "| method | resnet34 → resnet18 (cifar10): Acc@1 | Agree@1 | loyalty "
        "| resnet34 → resnet8 (cifar10): Acc@1 | Agree@1 | loyalty |\n"
        "|---|---|---|---|---|---|---|\n"
        "| T.Scratch | 94.00 / 94.50 [95.70] | 100.00 [100.00] | 1.0000 [1.0000] | - | - | - |\n"
        "| S.Scratch | 93.12 | 91.00 | 0.8000 | - | - | - |\n"
        "| CuDFKD | 91.00 ± 1.00 [95.28] | 82.00 ± 2.00 [98.20] | 0.6000 ± 0.1000 [0.8915] | - | - | - |\n"
        "| DAFL | - | - | - | 50.00 | 52.00 | 0.4000 |\n"
    )
    assert accuracy_table(records, papers) == expected
    assert "[" not in accuracy_table(records)  # without a papers file: ours alone
    assert papers.sources_for([("cifar10", "resnet34", "resnet18")]) == ["Table X", "Table Y"]
    assert papers.sources_for([("mnist", "lenet5", "lenet5_half")]) == []


def test_the_stability_table_aggregates_seeds_and_converts_units(tmp_path):
    (tmp_path / "papers.yaml").write_text(PAPERS)
    papers = load_paper_numbers(tmp_path / "papers.yaml")
    cost = {"steps": 100, "peak_mem_mb": 1024.0, "wall_s": 3600.0, "synth_s": 1800.0}
    records = [
        _record("cudfkd", 0, 91.0, 0, 0, method="CuDFKD", final_acc1=90.0, mean_acc1=85.0, var_acc1=2.0, **cost),
        _record("cudfkd", 1, 93.0, 0, 0, method="CuDFKD", final_acc1=92.0, mean_acc1=87.0, var_acc1=4.0,
                **{**cost, "peak_mem_mb": 3072.0, "wall_s": 7200.0}),
        _record("scratch", 0, 71.0, 0, 0, teacher=None, final_acc1=70.125, mean_acc1=69.0, var_acc1=float("nan"), **cost),
    ]
    expected = (
        "| entry | method | teacher → student | seeds | steps | final Acc@1 | μ Acc@1 | σ² Acc@1 | best Acc@1 "
        "| peak mem (GB) | wall (h) | synthesis (h) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| cudfkd | CuDFKD | resnet34 → resnet18 | 0, 1 | 100 | 91.00 ± 1.00 | 86.00 ± 1.00 [94.10] "
        "| 3.00 ± 1.00 [2.88] | 92.00 ± 1.00 [95.00] | 2.00 ± 1.00 [6.84] | 1.500 ± 0.500 [5.480] | 0.500 ± 0.000 |\n"
        "| scratch | scratch | resnet18 | 0 | 100 | 70.12 | 69.00 | - | 71.00 | 1.00 | 1.000 | 0.500 |\n"
    )
    assert stability_table(records, papers) == expected


def test_a_malformed_papers_file_is_named_with_the_bad_table(tmp_path):
    bad = tmp_path / "papers.yaml"
    bad.write_text(PAPERS.replace("[95.28, 98.20, 0.8915]", "[95.28, 98.20]"))
    with pytest.raises(ConfigError, match=r"accuracy\[0\], method 'CuDFKD': expected a list of 3"):
        load_paper_numbers(bad)
    bad.write_text("acuracy: []\n")
    with pytest.raises(ConfigError, match="acuracy"):
        load_paper_numbers(bad)
    with pytest.raises(ConfigError, match="no papers file"):
        load_paper_numbers(tmp_path / "missing.yaml")


def test_the_shipped_papers_file_holds_the_cudfkd_tables():
    papers = load_paper_numbers("benchmarks/papers.yaml")
    assert papers.accuracy[("cifar10", "resnet34", "resnet18")]["CuDFKD"] == (95.28, 98.20, 0.8915)
    assert papers.accuracy[("cifar100", "wrn_40_2", "wrn_16_2")]["S.Scratch"] == (66.61, 67.85, 0.5394)
    assert papers.accuracy[("mnist", "lenet5", "lenet5_half")]["DAFL"] == (98.20, None, None)
    assert papers.stability[("cifar100", "resnet34", "resnet18")]["CuDFKD"] == (71.7, 4.37, 75.2, 6.84, 7.50)
    for pair, rows in papers.accuracy.items():
        for method, (acc1, agree1, loyalty) in rows.items():
            assert acc1 is None or 0 < acc1 <= 100, (pair, method)
            assert loyalty is None or 0 < loyalty <= 1, (pair, method)


def test_the_tiny_suite_writes_both_tables_and_its_plots(finished):
    out, _ = finished
    text = (out / "results.md").read_text()
    records = _records(out)
    assert accuracy_table(records) in text and stability_table(records) in text
    assert "commit `" in text and "no GPU" in text
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == [
        "curves_procedural_resnet8_lenet5_half.png", "loyalty_procedural_resnet8_lenet5_half.png", "schedules_cudfkd.png",
        "time_procedural_resnet8_lenet5_half.png",
    ], "kd logs no self-paced lambda, so only cudfkd gets a schedules plot"
    assert time_to_accuracy_table(records) in text and "| kd | " in time_to_accuracy_table(records)
    assert all(r["train_s"] > 0 and r["eval_s"] > 0 and r["stopped_at_budget"] is False for r in records)
    assert all(run.cfg.train.time_budget_s == 600 for run in plan_runs(load_suite("tiny"), [], out))
    for name in plots:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000, name
        assert f"![{name}]({name})" in text
    assert sum(records[0]["final_loyalty_hist"]) == 32  # every test image once


def test_results_fill_the_readme_section_and_copy_the_plots(finished, tmp_path, capsys):
    out, _ = finished
    readme = tmp_path / "README.md"
    readme.write_text("# dfkd\n\n## Results\n<!-- results: start -->\nold\n<!-- results: end -->\n\n## Next\n")
    assert main(["results", str(out), "--readme", str(readme), "--images", str(tmp_path / "docs" / "results")]) == 0
    text = readme.read_text()
    assert text.startswith("# dfkd\n\n## Results\n<!-- results: start -->\n") and text.endswith("<!-- results: end -->\n\n## Next\n")
    assert "old" not in text and f"### {out.name}" in text and "| T.Scratch |" in text
    link = f"docs/results/{out.name}/schedules_cudfkd.png"
    assert f"]({link})" in text and (tmp_path / link).is_file()
    assert main(["results", str(out), "--readme", str(readme), "--images", str(tmp_path / "docs" / "results")]) == 0
    assert readme.read_text() == text, "filling it again changes nothing"

    readme.write_text("# no markers\n")
    assert main(["results", str(out), "--readme", str(readme)]) == 2
    assert "<!-- results: start -->" in capsys.readouterr().err


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


@pytest.mark.parametrize("name", SHIPPED_SUITES)
def test_every_shipped_suite_validates(name, tmp_path):
    suite = load_suite(name)
    runs = plan_runs(suite, [], tmp_path)
    assert len(runs) == len(suite.entries) * len(suite.seeds)
    assert all(run.cfg.train.resume == "auto" for run in runs)
    assert load_config("benchmarks/suites/teachers/tiny.yaml").student.arch == "resnet8"  # tiny's teacher recipe


def test_a_run_locked_by_another_bench_is_left_to_it(tmp_path, teacher_override, capsys):
    from dfkd.lock import run_lock

    with run_lock(tmp_path / "kd" / "seed0"):  # as a second `dfkd bench` of the suite holds it while it trains
        assert _bench(tmp_path, teacher_override) == 0
    printed = capsys.readouterr().out
    assert "kd seed 0: running in another process, skipped" in printed
    assert [r["entry"] for r in _records(tmp_path)] == ["cudfkd"]
    assert not (tmp_path / "kd" / "seed0" / "checkpoints").exists()

    assert _bench(tmp_path, teacher_override) == 0
    assert [r["entry"] for r in _records(tmp_path)] == ["kd", "cudfkd"], "the suite's order, once both are done"


def test_only_trains_the_named_entries_and_still_tabulates_every_finished_run(tmp_path, teacher_override, monkeypatch):
    calls = _counting_fit(monkeypatch)
    assert _bench(tmp_path, teacher_override, "--only", "cudfkd") == 0
    assert calls == ["cudfkd"]
    assert not (tmp_path / "kd").exists(), "an entry left out is not started"
    assert [r["entry"] for r in _records(tmp_path)] == ["cudfkd"]

    assert _bench(tmp_path, teacher_override, "--only", "kd") == 0
    assert calls == ["cudfkd", "kd"], "the finished cudfkd run is not trained again"
    assert [r["entry"] for r in _records(tmp_path)] == ["kd", "cudfkd"], "the tables hold both, in the suite's order"


def test_an_unknown_only_entry_fails_before_any_run_naming_it_and_the_close_match(tmp_path, monkeypatch, capsys):
    _never_run(monkeypatch)
    assert main(["bench", "tiny", "--only", "kd,cudfdk", "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "no entry 'cudfdk'" in error and "Did you mean 'cudfkd'?" in error and "kd, cudfkd" in error
    assert not (tmp_path / "out").exists()


def _timed_run(folder: Path, points: list[tuple[float, float]], **summary) -> dict:
    folder.mkdir(parents=True)
    lines = [{"epoch": i + 1, "elapsed_s": t, "agree1": a, "acc1": a - 1, "eval_s": 0.5 * (i + 1)} for i, (t, a) in enumerate(points)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"run_dir": str(folder), "entry": folder.parent.name, "seed": 0, "steps": 100, "train_s": points[-1][0],
            "eval_s": 0.5 * len(points), "dataset": "mnist", "teacher": "lenet5", "student": "lenet5_half", **summary}


def test_the_time_to_accuracy_table_takes_the_first_evaluation_at_each_threshold(tmp_path):
    fast = [_timed_run(tmp_path / "fast" / f"s{i}", pts, method="Fast") for i, pts in enumerate((
        [(10.0, 60.0), (20.0, 85.0), (30.0, 96.0)], [(12.0, 40.0), (22.0, 91.0), (32.0, 94.0)],
    ))]
    slow = [_timed_run(tmp_path / "slow" / "s0", [(50.0, 30.0), (100.0, 55.0)], method="Slow")]
    assert time_to([(10.0, 60.0, 0), (20.0, 85.0, 0)], 80) == 20.0 and time_to([(10.0, 60.0, 0)], 80) is None
    table = time_to_accuracy_table([*fast, *slow])
    assert table.splitlines()[2] == (
        "| Fast | 16 s | 21 s | 26 s | 30 s (1/2) | — | 95.00 | 94.00 | 100 | 31 | 2 |"
    ), "means over the seeds that reached a threshold; (k/n) when only some did"
    assert table.splitlines()[3] == "| Slow | 100 s | — | — | — | — | 55.00 | 54.00 | 100 | 100 | 1 |"


def test_a_suite_budget_must_be_a_positive_number(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text("budget_s: -5\nentries: [{name: a, recipe: recipes/methods/kd.yaml}]\n")
    with pytest.raises(ConfigError, match="budget_s"):
        load_suite(suite)
