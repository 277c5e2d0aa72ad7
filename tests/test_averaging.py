"""The moving average of the student's weights (``train.ema_decay``, :mod:`dfkd.averaging`):
its update against the closed form, and a run that evaluates, ships and resumes it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dfkd.averaging import build_student_ema, warmed_decay
from dfkd.checkpoint import CheckpointManager, verify_checkpoint
from dfkd.errors import CheckpointError, ConfigError
from dfkd.recipe import load_config
from dfkd.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "student.arch=lenet5_half", "data.name=procedural", "data.train_samples=256", "data.test_samples=128",
    "data.num_workers=0", "source.batch_size=64", "optim.lr=0.05", "train.epochs=3", "train.log_every=2",
    "train.progress_bar=false", "eval.batch_size=64",
]


def _cfg(tmp_path, *extra):
    return load_config(None, [*TINY, f"output_dir={tmp_path / 'run'}", *extra])


@pytest.mark.parametrize("n, expected", [(0, 0.1), (1, 2 / 11), (90, 0.91), (10_000, 0.99)])
def test_the_decay_warms_up_to_its_value(n, expected):
    assert warmed_decay(0.99, torch.tensor(n)).item() == pytest.approx(expected)


def test_each_update_moves_the_average_by_the_warmed_decay_and_copies_counters():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = build_student_ema(student, decay=0.5)
    expected = None
    for n in range(6):
        with torch.no_grad():
            for p in student.parameters():
                p.copy_(torch.randn_like(p))
        student(torch.randn(4, 3))  # moves the batch norm's running statistics and its counter
        current = {k: v.clone() for k, v in student.state_dict().items()}
        ema.update_parameters(student)
        if expected is None:  # the first update copies the student
            expected = current
        else:  # the n-th update after the copy averages with min(0.5, (1 + n) / (10 + n))
            decay = min(0.5, (1 + n) / (10 + n))
            expected = {
                k: v if not v.is_floating_point() else decay * expected[k] + (1 - decay) * v for k, v in current.items()
            }
        averaged = ema.module.state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(averaged[key], value, msg=f"{key} after update {n + 1}")
    assert averaged["1.num_batches_tracked"].item() == 6, "the counter is the student's, not an average"
    assert ema.n_averaged.item() == 6


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1])
def test_a_decay_outside_the_open_unit_interval_is_refused(tmp_path, decay):
    with pytest.raises(ConfigError, match=r"train\.ema_decay must be in \(0, 1\)"):
        _cfg(tmp_path, f"train.ema_decay={decay}")


def test_a_run_evaluates_and_ships_the_average_and_keeps_the_trained_student_beside_it(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "train.ema_decay=0.9"))
    summary = trainer.fit()
    run, loop = tmp_path / "run", trainer.loop
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"acc1", "online_acc1"} <= set(entry) for entry in entries)
    assert {"final_acc1", "final_online_acc1"} <= set(summary)

    shipped, online = load_file(run / "student.safetensors"), load_file(run / "student_online.safetensors")
    averaged, trained = loop.ema.module.state_dict(), loop.unwrapped_student.state_dict()
    assert sorted(shipped) == sorted(online) == sorted(trained)
    for key in trained:
        assert torch.equal(shipped[key], averaged[key].cpu()), key
        assert torch.equal(online[key], trained[key].cpu()), key
    assert any(not torch.equal(shipped[k], online[k]) for k in shipped), "12 steps at 0.9: the average lags the student"
    assert loop.ema.n_averaged.item() == summary["steps"] == 12, "one update per optimiser step"


def test_the_average_resumes_exactly(tmp_path, crash_after_checkpoint):
    straight = Trainer(_cfg(tmp_path / "straight", "train.ema_decay=0.9"))
    straight.fit()
    crash_after_checkpoint(_cfg(tmp_path / "crashy", "train.ema_decay=0.9"), epoch=1)
    resumed = Trainer(_cfg(tmp_path / "crashy", "train.ema_decay=0.9", "train.resume=auto"))
    resumed.fit()
    for name in ("student", "student_online"):
        a, b = (load_file(base / "run" / f"{name}.safetensors") for base in (tmp_path / "straight", tmp_path / "crashy"))
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
    a, b = (t.loop.ema.state_dict() for t in (straight, resumed))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = [(base / "run" / "metrics.jsonl").read_text().splitlines() for base in (tmp_path / "straight", tmp_path / "crashy")]
    strip = lambda line: {k: v for k, v in json.loads(line).items() if not k.endswith("_s")}  # noqa: E731 (clocks)
    assert [strip(x) for x in lines[0]] == [strip(x) for x in lines[1]]


@pytest.mark.parametrize("before, after", [(None, "0.9"), ("0.9", None), ("0.9", "0.99")])
def test_resuming_with_another_average_is_refused_and_the_checkpoint_kept(tmp_path, crash_after_checkpoint, before, after):
    flag = lambda decay: [] if decay is None else [f"train.ema_decay={decay}"]  # noqa: E731
    crash_after_checkpoint(_cfg(tmp_path, *flag(before)), epoch=1)
    checkpoint = CheckpointManager(tmp_path / "run" / "checkpoints").latest()
    with pytest.raises(CheckpointError, match=rf"train\.ema_decay={before}, and this run has train\.ema_decay={after}"):
        Trainer(_cfg(tmp_path, *flag(after), "train.resume=auto")).fit()
    assert verify_checkpoint(checkpoint) is None
