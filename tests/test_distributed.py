"""Several processes on the CPU over gloo: the runs `accelerate launch` starts, checked against one process.

The launches go through ``recipes/accelerate/cpu.yaml``, the documented way to
start several CPU processes, on a free port. Each takes about ten seconds to
start, so the file launches four runs in all.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dfkd.data.transforms import Normalize
from dfkd.evaluate import evaluate
from dfkd.models import create_model, penultimate_module
from dfkd.recipe import load_config
from dfkd.synthesis import build_synthesizer
from dfkd.trainer import Trainer
from generators.parallel import world_size

ROOT = Path(__file__).resolve().parents[1]

# A BN-free student, no augmentation: with the same global batch, two shards and averaged gradients
# are the same computation as one process, up to the order of floating-point sums.
TINY = [
    "student.arch=lenet5_half",
    "data.name=procedural",
    "data.train_samples=256",
    "data.test_samples=101",  # odd, so the last evaluation batch of a shard is padded
    "data.num_workers=0",
    "data.augment=none",
    "source.batch_size=64",
    "optim.lr=0.05",
    "train.epochs=2",
    "train.log_every=2",
    "train.progress_bar=false",
    "eval.batch_size=16",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(recipe: str, *overrides: str, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file recipes/accelerate/cpu.yaml -m dfkd train ...`` on a free port."""
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(launcher), "launch", "--config_file", "recipes/accelerate/cpu.yaml", "--num_processes", str(processes),
        "--main_process_port", str(_free_port()), "-m", "dfkd", "train", recipe, *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 or not check, proc.stderr[-4000:]
    return proc


def _recipe(tmp_path: Path) -> str:
    """An empty recipe: the runs below are the schema's defaults plus overrides."""
    path = tmp_path / "recipe.yaml"
    path.write_text("{}\n")
    return str(path)


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- the engine under two processes


def test_two_processes_train_and_evaluate_like_one(tmp_path, resnet8_teacher):
    kd = [*TINY, "teacher.arch=resnet8", f"teacher.checkpoint={resnet8_teacher}", "loss.terms={ce: 0.5, kd: 0.5}"]
    one = Trainer(load_config(None, [*kd, f"output_dir={tmp_path / 'one'}"])).fit()
    _launch(_recipe(tmp_path), *kd, f"output_dir={tmp_path / 'two'}")
    two = _summary(tmp_path / "two")
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["steps"] == two["steps"] == 8, "the global batch is the same, so the epoch is too"

    a, b = load_file(tmp_path / "one" / "student.safetensors"), load_file(tmp_path / "two" / "student.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"student weight {key}")

    # Every one of the 101 test images counted once: one process evaluating the two-process student
    # reproduces the two-process metrics exactly (a padded duplicate would shift acc1 by 1/101).
    cfg = load_config(None, [*kd, f"output_dir={tmp_path / 'check'}", f"student.checkpoint={tmp_path / 'two' / 'student.safetensors'}"])
    trainer = Trainer(cfg)
    again = evaluate(trainer.loop.student, trainer.loop.eval_loader, trainer.loop.normalize, trainer.accelerator, trainer.loop.teacher)
    for name in ("acc1", "acc5", "agree1", "loyalty"):
        assert again[name] == pytest.approx(two[f"final_{name}"], abs=1e-6), name
    for name in ("acc1", "agree1"):
        assert two[f"final_{name}"] == pytest.approx(one[f"final_{name}"], abs=100 / 101 + 1e-6), name
    assert [h["epoch"] for h in _history(tmp_path / "two")] == [1, 2]


def test_cudfkd_runs_under_two_processes(tmp_path, resnet8_teacher):
    run = tmp_path / "cudfkd"
    _launch(
        "recipes/procedural/cudfkd_resnet20_resnet8.yaml", "teacher.recipe=null", "teacher.arch=resnet8", f"teacher.checkpoint={resnet8_teacher}",
        "student.arch=lenet5_half", "data.test_samples=50", "data.num_workers=0", "source.batch_size=16",
        "synthesizer.generator.nz=16", "synthesizer.generator.ngf=8", "train.epochs=2", "train.steps_per_epoch=2",
        "train.log_every=1", "train.progress_bar=false", "eval.batch_size=16", f"output_dir={run}",
    )
    summary = _summary(run)
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert all(torch.isfinite(torch.tensor(summary[k])) for k in ("final_acc1", "final_agree1", "final_loyalty"))
    assert (run / "generator.safetensors").is_file()
    assert summary["synth_s"] > 0


def test_dcd_runs_under_two_processes_with_one_selection(tmp_path, resnet8_teacher):
    # RealDataSource checks every epoch that both processes chose the same subset, and fails otherwise.
    run = tmp_path / "dcd"
    _launch(
        "recipes/methods/dcd.yaml", *TINY, "train.epochs=3", "teacher.arch=resnet8", f"teacher.checkpoint={resnet8_teacher}",
        f"output_dir={run}",
    )
    summary = _summary(run)
    assert summary["processes"] == 2 and summary["epochs"] == 3
    assert (run / "checkpoints").is_dir()


def test_a_batch_smaller_than_the_process_count_is_refused_by_name(tmp_path):
    proc = _launch(_recipe(tmp_path), *TINY, "source.batch_size=1", f"output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0
    assert "dfkd: error: source.batch_size=1 is smaller than the 2 processes launched" in proc.stderr, proc.stderr[-3000:]


# -- the synthesizers' replicas, in two spawned processes


def _replicas(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        teacher = create_model("resnet8", num_classes=10, in_channels=3).eval().requires_grad_(False)
        student = create_model("lenet5_half", num_classes=10, in_channels=3)
        normalize = Normalize([0.5] * 3, [0.25] * 3)
        specs = {
            "generative": {"name": "generative", "generator": {"name": "dcgan", "nz": 16, "ngf": 8},
                           "terms": {"bn": 1.0, "oh": 1.0, "adv": 1.0}},
            "inversion": {"name": "inversion", "generator": {"name": "dcgan", "nz": 16, "ngf": 8}, "g_steps": 3,
                          "terms": {"bn": 1.0, "contrastive": {"weight": 1.0, "head_dim": 8, "bank_size": 32, "n_neg": 8}}},
        }
        for name, spec in specs.items():
            torch.manual_seed(100 + rank)  # as set_seed(device_specific=True) does: every process its own stream
            built = build_synthesizer(
                spec, image_size=32, channels=3, num_classes=10, normalize=normalize, denormalize=normalize.inverse,
                teacher=teacher, feature_module=penultimate_module(teacher), device="cpu", batch_size=8,
            )
            synthesizer = built.synthesizer
            weights = built.weights(0.0, 1.0)
            for _ in range(2):
                synthesizer.step(teacher, student, weights)
            shared = torch.cat([t.detach().reshape(-1).float() for t in [*synthesizer.parameters(), *built.generator.buffers()]
                                if t.is_floating_point()])
            samples = synthesizer.sample(8)[0].reshape(-1)
            everyone = [torch.empty_like(shared) for _ in range(world)]
            dist.all_gather(everyone, shared)
            shards = [torch.empty_like(samples) for _ in range(world)]
            dist.all_gather(shards, samples)
            assert world_size() == world
            assert torch.equal(everyone[0], everyone[1]), f"{name}: the generator and head replicas must stay equal"
            assert not torch.equal(shards[0], shards[1]), f"{name}: each process synthesises its own shard"
            synthesizer.close()
    finally:
        dist.destroy_process_group()


def test_synthesis_keeps_one_generator_across_processes(tmp_path):
    mp.start_processes(_replicas, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True, start_method="spawn")
