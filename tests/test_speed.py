"""benchmarks/speed.py: the engine's overhead per synthesis step and per student step, on tiny CPU runs.

The entries are the procedural CuDFKD recipe (a generative data-free run whose student batch
carries the teacher's logits), real-data KD and DeepInversion (an inversion
synthesizer, timed per inner iteration), shrunk to a random ResNet-8 teacher, a
LeNet-5-half student and batches of 8.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dfkd.bench import SuiteEntry, load_suite
from dfkd.recipe import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    """``benchmarks/<name>.py`` as the module ``name``, as ``python benchmarks/speed.py`` imports it."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up; speed.py imports timing by this name
    spec.loader.exec_module(module)
    return module


timing = _load_script("timing")
speed = _load_script("speed")

TINY = [
    "data.train_samples=32", "data.test_samples=16", "data.num_workers=0", "teacher.arch=resnet8",
    "teacher.recipe=null", "student.arch=lenet5_half", "source.batch_size=8",
]
GENERATOR = ["synthesizer.generator.nz=16", "synthesizer.generator.ngf=8"]


def _suite(tmp_path: Path, teacher: Path) -> Path:
    """A suite of a generative data-free entry (the quickstart) and a real-data one (KD), both tiny."""
    suite = {
        "overrides": [*TINY, f"teacher.checkpoint={teacher}"],
        "entries": [
            {"name": "cudfkd", "recipe": str(ROOT / "recipes/procedural/cudfkd_resnet20_resnet8.yaml"), "overrides": GENERATOR},
            {"name": "kd", "recipe": str(ROOT / "recipes/methods/kd.yaml")},
        ],
    }
    path = tmp_path / "suite.yaml"
    OmegaConf.save(OmegaConf.create(suite), path)
    return path


def test_the_table_has_a_finite_positive_ratio_for_every_phase_of_every_entry(tmp_path, resnet8_teacher, capsys):
    out = tmp_path / "speed.md"
    rows = speed.main([str(_suite(tmp_path, resnet8_teacher)), "--steps", "1", "--repeats", "1", "--out", str(out)])

    expected = [("cudfkd", "synthesis"), ("cudfkd", "student"), ("kd", "student")]
    assert [(row.entry, row.phase) for row in rows] == expected
    assert [row.images for row in rows] == [8, 8, 8]
    for row in rows:
        assert math.isfinite(row.ratio) and row.ratio > 0, row
        assert row.bare_s > 0 and row.engine_s > 0 and row.images_per_s > 0, row

    written = out.read_text()
    assert written in capsys.readouterr().out, "the table is printed as well as written"
    lines = [line for line in written.splitlines() if line.startswith("|")]
    assert lines[0] == "| " + " | ".join(timing.COLUMNS) + " |"
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(c[0], c[1]) for c in cells] == [(row.entry, row.phase) for row in rows]
    assert all(len(c) == len(timing.COLUMNS) for c in cells)
    for c, row in zip(cells, rows):
        assert float(c[5]) == pytest.approx(row.ratio, abs=6e-4) and float(c[5]) > 0


def test_the_bare_student_step_runs_the_teacher_only_where_train_step_does(tmp_path, resnet8_teacher, monkeypatch):
    """With sample_from: last the batch carries the teacher's logits, so neither side runs the teacher on it."""
    calls: list[str] = []
    original = speed.bare_teacher

    def counting_teacher(loop):
        teacher = original(loop)
        teacher.register_forward_hook(lambda *_: calls.append(loop.cfg.source.name))
        return teacher

    monkeypatch.setattr(speed, "bare_teacher", counting_teacher)
    for entry in speed.entries_of([str(_suite(tmp_path, resnet8_teacher))]):
        loop = speed.build_run(entry, [], tmp_path / "runs")
        cases = {case.phase: case for case in speed.entry_cases(loop)}
        calls.clear()
        cases["student"].bare()
        assert calls == ([] if entry.name == "cudfkd" else ["real"]), entry.name
        if "synthesis" in cases:
            cases["synthesis"].bare()
            assert calls == ["generator"], "the synthesis step does run the teacher"


def test_an_inversion_synthesizer_is_timed_per_inner_iteration(tmp_path, resnet8_teacher, monkeypatch):
    entry = SuiteEntry("deepinversion", str(ROOT / "recipes/methods/deepinversion.yaml"), (
        *TINY, f"teacher.checkpoint={resnet8_teacher}", "synthesizer.g_steps=2", "source.pool_size=64",
    ))
    loop = speed.build_run(entry, [], tmp_path)
    updates: list[int] = []
    original = type(loop.source.synthesizer).update

    def update(self, current, *args):
        original(self, current, *args)
        updates.append(current.updates)

    monkeypatch.setattr(type(loop.source.synthesizer), "update", update)
    cases = speed.entry_cases(loop)
    assert [case.phase for case in cases] == ["synthesis, per inner iteration", "student"]
    assert updates == [1, 2], "the round run before timing"
    rows = timing.measure("deepinversion", cases, timing.Clock(torch.device("cpu")), steps=2, repeats=1)
    assert updates[2:] == [1, 2, 3], "one update per timed call (after a warm-up), in one round that goes on"
    assert all(math.isfinite(row.ratio) and row.ratio > 0 for row in rows)


def test_cuda_events_without_cuda_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        speed.main(["--cuda-events"])
    assert exit_info.value.code == 2
    assert "--cuda-events needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        speed.main(["--device", "cuda"])
    assert "finds no CUDA device" in capsys.readouterr().err


def test_the_speed_suite_is_a_valid_suite_of_valid_runs_of_every_data_free_method(tmp_path):
    suite = load_suite(ROOT / "benchmarks/suites/speed.yaml")
    names = {entry.name for entry in suite.entries}
    assert {"quickstart", "dafl", "zskt", "dfad", "dfq", "deepinversion", "cmi", "cudfkd", "kd"} <= names
    for entry in speed.entries_of([str(ROOT / "benchmarks/suites/speed.yaml")]):
        cfg = load_config(str(ROOT / entry.recipe), [*entry.overrides, f"output_dir={tmp_path}"])
        assert cfg.train.progress_bar is False, entry.name  # the suite's own overrides come first
