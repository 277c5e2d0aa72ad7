"""Exact resume: a run killed after any epoch's checkpoint and resumed with ``train.resume=auto``
ends exactly where an uninterrupted run ends.

Each method runs from its real recipe (``recipes/methods/*.yaml``), shrunk with overrides that
only make it tiny: the built-in procedural dataset, a random ResNet-8 teacher (BatchNorm layers for
the ``bn`` and ``contrastive`` terms), small batches, a few epochs of a few steps, a checkpoint
every epoch. The resumed run must reproduce, bit for bit, the uninterrupted run's

- final student and generator weights (``student.safetensors``, ``generator.safetensors``);
- evaluations (``metrics.jsonl``) and summary (``summary.json``: its metrics and counters);
- every scalar logged at every step to TensorBoard (the losses, CuDFKD's lambda(t) and
  alpha_adv(t), DCD's window), less the throughputs and memory readings;
- end state: the optimiser, the lr scheduler, the source's state (CMI's pool and memory bank,
  the synthesizer's optimiser, DCD's curriculum and active subset) and the torch RNG.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from dfkd.recipe import load_config
from dfkd.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = Path(__file__).resolve().parents[1] / "recipes" / "methods"
EPOCHS = 4
RESULTS = ("final_", "best_", "mean_", "var_")  # the summary's metrics; its clocks and memory peaks measure the machine
CLOCKS = ("wall_s", "synth_s", "eval_s", "elapsed_s")  # run-state clocks, and those of each evaluation
MACHINE = ("_per_s", "_mb")  # endings of the logged throughputs and memory readings

SHRINK = [
    "data.name=procedural", "data.test_samples=32", "data.num_workers=0", "eval.batch_size=32",
    "teacher.arch=resnet8", "student.arch=resnet8", f"train.epochs={EPOCHS}", "train.checkpoint_every=1",
    "train.log_every=1", "train.progress_bar=false",
]
RECIPES: dict[str, tuple[str, list[str]]] = {
    # generator source, self-paced log weights, piecewise alpha_adv: a synthesis step every other
    # student step, so a checkpoint after 3 steps falls between two synthesis steps
    "cudfkd": ("cudfkd.yaml", [
        "source.batch_size=8", "source.kd_steps=2", "train.steps_per_epoch=3",
        "synthesizer.generator={name: cudfkd, nz: 16, ngf: 4, depth: 2}",
    ]),
    # the same, with the student trained on each synthesis step's own batch (DAFL's and the quickstart's
    # sample_from: last): a checkpoint between two synthesis steps must carry that batch over
    "cudfkd_last": ("cudfkd.yaml", [
        "source.batch_size=8", "source.kd_steps=2", "train.steps_per_epoch=3", "synthesizer.sample_from=last",
        "synthesizer.generator={name: cudfkd, nz: 16, ngf: 4, depth: 2}",
    ]),
    # generative replay with self-paced weights and the masked adv term: the pool (20 images) wraps around,
    # and a checkpoint after 3 steps falls between two synthesis steps
    "cudfkd_replay": ("cudfkd.yaml", [
        "source.batch_size=8", "source.kd_steps=2", "train.steps_per_epoch=3",
        "source.replay={size: 20, fresh: 0.25, logits: true}",
        "synthesizer.generator={name: cudfkd, nz: 16, ngf: 4, depth: 2}",
    ]),
    # DFAD with the generator's rate stepped down with the student's at epoch 2, after the crash
    "dfad_lr_schedule": ("dfad.yaml", [
        "source.batch_size=8", "source.kd_steps=2", "train.steps_per_epoch=3",
        "synthesizer.generator={name: dcgan, nz: 16, ngf: 4}", "optim.schedule={name: multistep, milestones: [2]}",
        "synthesizer.lr_schedule=${optim.schedule}",
    ]),
    # Fast-DFKD: a warm-up round, then a round every 2 steps; the meta optimiser, the round count, the
    # BN moving average and the pool carry over a checkpoint
    "fast": ("fast5.yaml", [
        "source.batch_size=8", "source.rounds_every=2", "source.pool_size=40", "source.warmup_rounds=1",
        "train.steps_per_epoch=3", "synthesizer.g_steps=2", "synthesizer.reset_first_layer_at=3",
        "synthesizer.generator={name: dcgan, nz: 16, ngf: 4}",
    ]),
    # pool source, one inversion round per epoch; the pool (24 images) and the bank (16 rows) wrap around
    "cmi": ("cmi.yaml", [
        "source.batch_size=8", "source.pool_size=24", "train.steps_per_epoch=2",
        "synthesizer.g_steps=2", "synthesizer.generator={name: dcgan, nz: 16, ngf: 4}",
        "synthesizer.terms.contrastive.head_dim=16", "synthesizer.terms.contrastive.bank_size=16",
        "synthesizer.terms.contrastive.n_neg=8", "optim.schedule.milestones=[2, 3]",
    ]),
    # real data with DCD's curriculum; epochs of 3 steps are not passes over the active subset, so the
    # pass counter and the window (val_s, below, high) both carry over a checkpoint
    "dcd": ("dcd.yaml", [
        "data.train_samples=120", "source.batch_size=16", "source.num_workers=0", "source.score_batch_size=64",
        "train.steps_per_epoch=3",
    ]),
}


def _cfg(method: str, out: Path, teacher: Path, *extra: str) -> DictConfig:
    recipe, overrides = RECIPES[method]
    return load_config(METHODS / recipe, [
        f"output_dir={out}", f"teacher.checkpoint={teacher}", *SHRINK, *overrides, *extra,
    ])


@dataclass
class Finished:
    """A run's folder and its trainer's state when ``fit`` returned."""

    out: Path
    trainer: Trainer
    rng: torch.Tensor


def _fit(cfg: DictConfig) -> Finished:
    trainer = Trainer(cfg)
    trainer.fit()
    return Finished(Path(cfg.output_dir), trainer, torch.get_rng_state())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, resnet8_teacher: Path) -> Callable[[str], Finished]:
    """``uninterrupted(method)``: the method's run without a crash, run once per module."""
    runs: dict[str, Finished] = {}

    def run(method: str) -> Finished:
        if method not in runs:
            runs[method] = _fit(_cfg(method, tmp_path_factory.mktemp(f"{method}-straight"), resnet8_teacher))
        return runs[method]

    return run


def _crash_and_resume(method: str, out: Path, teacher: Path, crash, epoch: int) -> Finished:
    crash(_cfg(method, out, teacher), epoch=epoch)
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, epoch + 1)
    ), "the crash left the run after its checkpoint of that epoch"
    return _fit(_cfg(method, out, teacher, "train.resume=auto"))


# --------------------------------------------------------------------------- comparisons


def _assert_same(a: Any, b: Any, where: str) -> None:
    """``a`` and ``b`` are equal, tensors bit for bit, through nested dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), f"{where}: keys differ"
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _evaluations(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the clocks each evaluation records."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in CLOCKS} for line in lines]


def _scalars(run: Path) -> dict[str, dict[int, list[float]]]:
    """Every scalar the run logged to TensorBoard, over all its event files: ``{tag: {step: [values]}}``."""
    found: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted((run / "tb").glob("events.out.tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars" and not value.tag.endswith(MACHINE):
                    found[value.tag][event.step].append(float(value.tensor.float_val[0]))
    return {tag: dict(by_step) for tag, by_step in found.items()}


def _state(trainer: Trainer) -> dict[str, Any]:
    """What must match at the end; the source's clock (synth_seconds) measures the machine."""
    source = {k: v for k, v in trainer.loop.source.state_dict().items() if k != "synth_seconds"}
    run = {k: v for k, v in trainer.loop.state.state_dict().items() if k not in CLOCKS}
    run["history"] = [{k: v for k, v in h.items() if k not in CLOCKS} for h in run["history"]]
    return {
        "optimizer": trainer.loop.optimizer.state_dict(), "scheduler": trainer.loop.scheduler.state_dict(),
        "source": source, "run": run,
    }


def assert_resumed_exactly(
    resumed: Finished, straight: Finished, networks: tuple[str, ...]
) -> dict[str, dict[int, list[float]]]:
    """Everything the runs leave must match; returns the resumed run's scalars for method-specific checks.

    ``networks`` names the ``<name>.safetensors`` files the runs write (the student, and the generator).
    """
    for name in networks:
        a, b = (load_file(run.out / f"{name}.safetensors") for run in (straight, resumed))
        assert sorted(a) == sorted(b)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs after the resume"
    summaries = [json.loads((run.out / "summary.json").read_text()) for run in (straight, resumed)]
    a, b = ({k: v for k, v in s.items() if k.startswith(RESULTS) or k in ("steps", "epochs")} for s in summaries)
    assert a == b
    assert {"final_acc1", "final_agree1", "final_loyalty", "best_agree1", "mean_acc1", "steps"} <= set(a)
    assert _evaluations(resumed.out) == _evaluations(straight.out)
    scalars = _scalars(resumed.out)
    assert scalars == _scalars(straight.out), "every scalar at every step, as in the uninterrupted run"
    assert all(len(values) == 1 for by_step in scalars.values() for values in by_step.values()), (
        "no step is logged twice"
    )
    _assert_same(_state(resumed.trainer), _state(straight.trainer), "state")
    assert torch.equal(resumed.rng, straight.rng), "the torch RNG ends in the same state"
    return scalars


# --------------------------------------------------------------------------- the methods


@pytest.mark.parametrize("epoch", [1, 2, 3])
def test_cudfkd_resumes_exactly(epoch, tmp_path, resnet8_teacher, uninterrupted, crash_after_checkpoint):
    straight = uninterrupted("cudfkd")
    resumed = _crash_and_resume("cudfkd", tmp_path / "crashy", resnet8_teacher, crash_after_checkpoint, epoch)
    scalars = assert_resumed_exactly(resumed, straight, ("student", "generator"))

    lam, adv = scalars["weighting/lambda"], scalars["synth/weight/adv"]
    per_epoch = straight.trainer.loop.steps_per_epoch
    steps = EPOCHS * per_epoch
    assert sorted(lam) == list(range(1, steps + 1)), "lambda(t) is logged at every step"
    assert lam[steps][0] == pytest.approx(2.0 + 0.04 * (steps - 1) / per_epoch), "the last step's lambda (t in epochs)"
    assert min(v for values in adv.values() for v in values) == 0.0, "alpha_adv starts flat at 0"
    after = [v for step, values in adv.items() if step > epoch * per_epoch for v in values]
    assert after and max(after) > 0.0, "and ramps up after the resume"
    assert resumed.trainer.loop.source.state_dict()["served"] == steps


def test_a_batch_served_across_a_checkpoint_resumes_exactly(tmp_path, resnet8_teacher, uninterrupted, crash_after_checkpoint):
    straight = uninterrupted("cudfkd_last")
    resumed = _crash_and_resume("cudfkd_last", tmp_path / "crashy", resnet8_teacher, crash_after_checkpoint, 1)
    assert_resumed_exactly(resumed, straight, ("student", "generator"))


@pytest.mark.parametrize("epoch", [1, 2])
def test_generative_replay_resumes_exactly_with_its_pool(epoch, tmp_path, resnet8_teacher, uninterrupted, crash_after_checkpoint):
    straight = uninterrupted("cudfkd_replay")
    resumed = _crash_and_resume("cudfkd_replay", tmp_path / "crashy", resnet8_teacher, crash_after_checkpoint, epoch)
    scalars = assert_resumed_exactly(resumed, straight, ("student", "generator"))

    pools = [run.trainer.loop.source.pool for run in (straight, resumed)]
    assert len(pools[1]) == 20 and pools[1].images.cursor == pools[0].images.cursor == (6 * 8) % 20
    assert torch.equal(pools[1].images.data, pools[0].images.data)
    assert torch.equal(pools[1].logits.data, pools[0].logits.data)
    # the self-paced weights and the masked adversarial term work on pooled samples
    assert sorted(scalars["weighting/lambda"]) == list(range(1, EPOCHS * 3 + 1))
    assert any(v > 0 for values in scalars["synth/weight/adv"].values() for v in values)
    assert all(0 <= v <= 1 for values in scalars["weighting/v_mean"].values() for v in values)


def test_a_scheduled_generator_rate_resumes_exactly(tmp_path, resnet8_teacher, uninterrupted, crash_after_checkpoint):
    straight = uninterrupted("dfad_lr_schedule")
    resumed = _crash_and_resume("dfad_lr_schedule", tmp_path / "crashy", resnet8_teacher, crash_after_checkpoint, 1)
    scalars = assert_resumed_exactly(resumed, straight, ("student", "generator"))
    rates = sorted({v for values in scalars["synth/lr"].values() for v in values})
    assert rates == pytest.approx([1e-4, 1e-3]), "the generator's rate, stepped down at epoch 2"


def test_fast_resumes_exactly_with_its_meta_optimiser_and_bn_average(tmp_path, resnet8_teacher, uninterrupted, crash_after_checkpoint):
    straight = uninterrupted("fast")
    resumed = _crash_and_resume("fast", tmp_path / "crashy", resnet8_teacher, crash_after_checkpoint, 2)
    assert_resumed_exactly(resumed, straight, ("student", "generator"))
    synths = [run.trainer.loop.source.synthesizer for run in (straight, resumed)]
    assert synths[1].rounds == synths[0].rounds == 1 + 6  # the warm-up round, then one every 2 of 12 steps
    _assert_same(synths[1].terms["bn"].get_extra_state(), synths[0].terms["bn"].get_extra_state(), "bn average")


def test_cmi_resumes_exactly_with_its_pool_and_memory_bank(tmp_path, resnet8_teacher, uninterrupted, crash_after_checkpoint):
    straight = uninterrupted("cmi")
    resumed = _crash_and_resume("cmi", tmp_path / "crashy", resnet8_teacher, crash_after_checkpoint, 2)
    scalars = assert_resumed_exactly(resumed, straight, ("student", "generator"))

    pools = [run.trainer.loop.source.pool for run in (straight, resumed)]
    assert len(pools[1]) == 24 and pools[1].cursor == pools[0].cursor == 32 % 24, "four rounds of 8 wrapped the pool"
    assert torch.equal(pools[1].data, pools[0].data)
    banks = [run.trainer.loop.source.synthesizer.terms["contrastive"].bank for run in (straight, resumed)]
    assert len(banks[1]) == 16 and banks[1].cursor == banks[0].cursor
    assert torch.equal(banks[1].data, banks[0].data)
    heads = [run.trainer.loop.source.synthesizer.terms["contrastive"].head.state_dict() for run in (straight, resumed)]
    _assert_same(heads[1], heads[0], "head")
    assert "synth/contrastive" in scalars


def test_dcd_resumes_exactly_with_its_curriculum(tmp_path, resnet8_teacher, uninterrupted, crash_after_checkpoint):
    straight = uninterrupted("dcd")
    resumed = _crash_and_resume("dcd", tmp_path / "crashy", resnet8_teacher, crash_after_checkpoint, 2)
    scalars = assert_resumed_exactly(resumed, straight, ("student",))

    curricula = [run.trainer.loop.source.curriculum for run in (straight, resumed)]
    _assert_same(curricula[1].state_dict(), curricula[0].state_dict(), "curriculum")
    assert curricula[1].stage >= 2, "the curriculum re-selected after the resume"
    assert torch.equal(resumed.trainer.loop.source.active, straight.trainer.loop.source.active)
    epoch_starts = [straight.trainer.loop.steps_per_epoch * e for e in range(EPOCHS)]
    assert sorted(scalars["curriculum/window_high"]) == epoch_starts, "one decision per epoch, none twice"
