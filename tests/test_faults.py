"""Numerical faults: a NaN stops the run with a precise error, or is survived by reloading a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dfkd.engine import Loop
from dfkd.errors import NonFiniteLossError
from dfkd.recipe import load_config
from dfkd.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "student.arch=lenet5_half",
    "data.name=procedural",
    "data.train_samples=256",
    "data.test_samples=64",
    "data.num_workers=0",
    "source.batch_size=64",  # 4 steps per epoch
    "optim.lr=0.05",
    "train.epochs=3",
    "train.log_every=2",
    "train.progress_bar=false",
    "eval.batch_size=64",
]


def _cfg(tmp_path: Path, *extra: str):
    return load_config(None, [*TINY, f"output_dir={tmp_path / 'run'}", *extra])


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch):
    """``poison(at, times)``: after the student step with index ``at``, set a student weight to NaN,
    the first ``times`` times the loop gets there (a transient blow-up, or a persistent one)."""
    original = Loop.train_step

    def arm(at: int, times: int) -> list[int]:
        hits: list[int] = []

        def train_step(self, batch):
            terms = original(self, batch)
            if self.state.step == at and len(hits) < times:
                hits.append(at)
                with torch.no_grad():
                    next(self.unwrapped_student.parameters()).fill_(float("nan"))
            return terms

        monkeypatch.setattr(Loop, "train_step", train_step)
        return hits

    return arm


def test_a_nan_stops_the_run_naming_the_term_the_step_and_the_last_good_checkpoint(tmp_path, poison):
    poison(at=5, times=1)  # the sixth step's update; the next step's loss is NaN, seen at the log of step 8
    with pytest.raises(NonFiniteLossError) as error:
        Trainer(_cfg(tmp_path)).fit()
    message = str(error.value)
    assert "student/ce" in message and "loss" in message
    assert "step 8" in message
    assert str(tmp_path / "run" / "checkpoints" / "step_00000004") in message, "epoch 1 is the last good state"
    assert "train.nonfinite=reload" in message
    assert not (tmp_path / "run" / "summary.json").exists()


def test_the_reload_policy_survives_a_transient_fault(tmp_path, poison):
    hits = poison(at=5, times=1)
    summary = Trainer(_cfg(tmp_path, "train.nonfinite=reload")).fit()
    assert hits == [5] and summary["reloads"] == 1
    assert summary["steps"] == 12 and math.isfinite(summary["final_acc1"])
    run = tmp_path / "run"
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3], "the abandoned stretch leaves no evaluation behind"
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("faults/reloads")] == [1.0]


def test_a_fault_before_the_first_checkpoint_goes_back_to_the_start(tmp_path, poison):
    hits = poison(at=0, times=1)
    summary = Trainer(_cfg(tmp_path, "train.nonfinite=reload")).fit()
    assert hits == [0] and summary["reloads"] == 1 and summary["steps"] == 12


def test_reloads_are_limited(tmp_path, poison):
    hits = poison(at=5, times=100)  # every time the run gets past step 5 again
    with pytest.raises(NonFiniteLossError, match="train.max_reloads=2 reloads are spent"):
        Trainer(_cfg(tmp_path, "train.nonfinite=reload", "train.max_reloads=2")).fit()
    assert len(hits) == 3, "two reloads, then the third fault stops the run"
