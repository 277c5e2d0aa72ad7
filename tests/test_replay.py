"""Generative replay: the pool a generator source keeps, what each student step reads from it, its
options and their errors, and resuming a run with it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch import nn

from dfkd.data import DATASETS
from dfkd.data.transforms import Normalize, build_augmentation
from dfkd.errors import CheckpointError, ConfigError
from dfkd.recipe import load_config
from dfkd.sources import Context, GeneratorSource, SourceEnv
from dfkd.sources.replay import ReplayPool, SeededDraws
from dfkd.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 4, 4)


def pool(capacity: int = 20, classes: int | None = None, seed: int = 0) -> ReplayPool:
    return ReplayPool(capacity, SHAPE, classes, torch.device("cpu"), SeededDraws(seed, 0, torch.device("cpu")))


def batch(label: float, n: int = 8) -> torch.Tensor:
    """``n`` images whose every pixel holds ``label + i / 100``: each row says which batch and row it is."""
    return (label + torch.arange(n, dtype=torch.float32) / 100).view(n, 1, 1, 1).expand(n, *SHAPE).clone()


def rows(x: torch.Tensor) -> list[float]:
    return [round(v, 2) for v in x[:, 0, 0, 0].tolist()]


def test_a_read_takes_its_fresh_share_from_the_newest_batch_and_the_rest_from_the_whole_pool():
    p = pool()
    for label in (1, 2, 3):
        p.add(batch(label), None)  # 24 images into 20 rows: batch 1 is partly overwritten
    assert len(p) == 20
    seen: set[float] = set()
    for step in range(50):
        x, logits = p.draw(8, fresh=0.25, step=step)
        assert logits is None and x.dtype == torch.float32 and x.shape == (8, *SHAPE)
        fresh, rest = rows(x[:2]), rows(x[2:])
        assert all(3 <= v < 4 for v in fresh) and len(set(fresh)) == 2, "two distinct images of the newest batch"
        seen.update(rest)
    stored = set(rows(p.images.stored().float()))
    assert seen <= stored and len(seen) > 12, "the rest come from anywhere in the pool"
    assert {1.0, 1.01, 1.02, 1.03} & stored == set(), "the oldest four were overwritten"


def test_reads_depend_only_on_the_seed_and_the_step():
    a, b = pool(seed=3), pool(seed=3)
    for p in (a, b):
        p.add(batch(1), None)
        p.add(batch(2), None)
    assert torch.equal(a.draw(6, 0.5, step=10)[0], b.draw(6, 0.5, step=10)[0])
    assert torch.equal(a.draw(6, 0.5, step=10)[0], a.draw(6, 0.5, step=10)[0]), "no hidden random state"
    assert not torch.equal(a.draw(6, 0.5, step=10)[0], a.draw(6, 0.5, step=11)[0])


def test_fresh_one_reads_the_newest_batch_only_and_zero_the_pool_uniformly():
    p = pool(capacity=64)
    for label in range(1, 6):
        p.add(batch(label), None)
    assert all(5 <= v < 6 for v in rows(p.draw(8, fresh=1.0, step=0)[0]))
    older = [v for step in range(20) for v in rows(p.draw(8, fresh=0.0, step=step)[0]) if v < 5]
    assert len(older) > 100, "with fresh 0 most reads are older batches"


def test_the_pool_keeps_the_teacher_logits_of_each_image_with_it():
    p = pool(classes=3)
    x = batch(1)
    logits = torch.randn(8, 3)
    p.add(x, logits)
    read, read_logits = p.draw(8, 0.0, step=4)
    for image, row in zip(read, read_logits):
        i = round((image[0, 0, 0].item() - 1) * 100)
        assert torch.equal(row, logits[i])
    with pytest.raises(ValueError, match="logits"):
        p.add(x, None)


def test_the_pool_state_round_trips_and_refuses_another_size():
    p = pool(classes=3)
    p.add(batch(1), torch.randn(8, 3))
    restored = pool(classes=3)
    restored.load_state_dict(p.state_dict())
    assert torch.equal(restored.draw(8, 0.5, 2)[0], p.draw(8, 0.5, 2)[0])
    with pytest.raises(CheckpointError, match="replay.size"):
        pool(capacity=30, classes=3).load_state_dict(p.state_dict())
    with pytest.raises(CheckpointError, match="replay.logits"):
        pool().load_state_dict(p.state_dict())


DAFL = ROOT / "recipes/mnist/dafl/lenet5_lenet5_half.yaml"


@pytest.mark.parametrize(("override", "message"), [
    ("source.kd_steps=0", r"source\.kd_steps must be at least 1"),
    ("source.replay={size: 100}", r"source\.replay\.size=100 cannot hold one student batch \(512"),
    ("source.replay={fresh: 1.5}", r"source\.replay\.fresh must lie in \[0, 1\]"),
    ("source.replay={augment: true, logits: true}", r"source\.replay\.logits"),
    ("source.replay={sise: 4096}", r"source\.replay\.sise.*size"),
    ("synthesizer.generator.width=0", r"synthesizer\.generator\.width must be even and at least 2"),
    ("synthesizer.g_steps=0", r"synthesizer\.g_steps must be at least 1"),
])
def test_out_of_range_options_name_their_key_before_anything_runs(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DAFL, [override])


def _source(tmp_path: Path, *extra: str, augment: str = "crop") -> tuple[GeneratorSource, nn.Module]:
    cfg = load_config(DAFL, [
        f"output_dir={tmp_path}", "source.batch_size=8", "synthesizer.generator={name: dafl, nz: 8, width: 4}",
        "synthesizer.sample_from=last", f"data.augment={augment}", *extra,
    ])
    spec = DATASETS.get("mnist")
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10)).eval().requires_grad_(False)
    env = SourceEnv(
        cfg=cfg, spec=spec, train_set=lambda: None, normalize=Normalize(spec.mean, spec.std),
        augment=build_augmentation(augment, spec.image_size), accelerator=Accelerator(), seed=0, teacher=teacher,
    )
    options = OmegaConf.to_container(cfg.source)
    options.pop("name")
    return GeneratorSource(env, **options), teacher


def _ctx(teacher: nn.Module, step: int) -> Context:
    student = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10))
    return Context(teacher=teacher, student=student, epoch=0, step=step, epochs=1, steps_per_epoch=100)


def test_each_synthesis_step_adds_its_batch_and_the_student_reads_from_the_pool(tmp_path):
    source, teacher = _source(tmp_path, "source.kd_steps=3", "source.replay={size: 32, fresh: 0.5, logits: true}")
    batches = [source.next_batch(_ctx(teacher, step)) for step in range(7)]  # synthesis at steps 0, 3 and 6
    assert len(source.pool) == 24
    assert [float(b.metrics["replay/images"]) for b in batches if "replay/images" in b.metrics] == [8, 16, 24]
    last_update = source.synthesizer.sample(8)[0]  # sample_from: last, so the pool's newest batch is this
    assert torch.equal(source.pool.newest(8), last_update.half().float())
    for b in batches:
        assert b.teacher_logits is not None and b.x.shape == (8, 1, 32, 32)
        torch.testing.assert_close(b.teacher_logits, teacher(b.x), atol=2e-2, rtol=0)  # stored vs float16 image


def test_replay_augments_reads_and_then_needs_the_teacher(tmp_path):
    source, teacher = _source(tmp_path, "source.replay={size: 16, fresh: 1.0, augment: true}")
    x = source.next_batch(_ctx(teacher, 0))
    assert x.teacher_logits is None
    assert not torch.equal(x.x, source.pool.newest(8)), "a random crop moved the images"
    with pytest.raises(ConfigError, match="augmentation of mnist is 'none'"):
        _source(tmp_path, "source.replay={augment: true}", augment="none")


# --------------------------------------------------------------------------- resume

SHRINK = [
    "data.name=procedural", "data.test_samples=32", "data.num_workers=0", "eval.batch_size=32",
    "teacher.arch=resnet8", "student.arch=resnet8", "train.epochs=2", "train.steps_per_epoch=3",
    "train.progress_bar=false", "source.batch_size=8", "source.kd_steps=2",
    "synthesizer.generator={name: cudfkd, nz: 16, ngf: 4, depth: 2}",
]


def _replay_cfg(out: Path, teacher: Path, *extra: str):
    return load_config(ROOT / "recipes/methods/cudfkd.yaml", [
        f"output_dir={out}", f"teacher.checkpoint={teacher}", *SHRINK, "source.replay={size: 32, fresh: 0.25}",
        *extra,
    ])


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_resume_with_another_pool_size_or_synthesizer_is_refused_and_the_checkpoint_kept(
    tmp_path, resnet8_teacher, crash_after_checkpoint
):
    out = tmp_path / "run"
    crash_after_checkpoint(_replay_cfg(out, resnet8_teacher), epoch=1)
    before = _digest(out / "checkpoints")
    with pytest.raises(CheckpointError, match="replay.size"):
        Trainer(_replay_cfg(out, resnet8_teacher, "train.resume=auto", "source.replay.size=64")).fit()
    with pytest.raises(CheckpointError, match="without source.replay|with source.replay"):
        Trainer(_replay_cfg(out, resnet8_teacher, "train.resume=auto", "source.replay=null")).fit()
    as_fast = load_config(ROOT / "recipes/methods/cudfkd.yaml", [
        f"output_dir={out}", f"teacher.checkpoint={resnet8_teacher}", "train.resume=auto",
        *(o for o in SHRINK if not o.startswith(("source.", "synthesizer."))), "source={name: pool, batch_size: 8}",
        "synthesizer={name: fast, generator: {name: cudfkd, nz: 16, ngf: 4, depth: 2}, terms: {bn: 1, oh: 1}}",
    ])
    with pytest.raises(CheckpointError, match="source.name=generator"):
        Trainer(as_fast).fit()
    assert _digest(out / "checkpoints") == before, "the refused resumes left the checkpoint as it was"
    summary = Trainer(_replay_cfg(out, resnet8_teacher, "train.resume=auto")).fit()
    assert summary["steps"] == 6


def test_warmup_steps_train_the_generator_without_the_student_terms_before_the_first_step(tmp_path, monkeypatch):
    source, teacher = _source(
        tmp_path, "source.warmup_steps=3", "source.kd_steps=2", "source.replay={size: 32}",
        "synthesizer.terms.adv={weight: 0.5, divergence: kl}",
    )
    seen: list[dict[str, float]] = []
    step = source.synthesizer.step
    monkeypatch.setattr(source.synthesizer, "step", lambda t, s, weights: (seen.append(dict(weights)), step(t, s, weights))[1])
    for k in range(3):
        source.next_batch(_ctx(teacher, k))
    assert [w["adv"] for w in seen] == [0.0, 0.0, 0.0, 0.5, 0.5], "three warm-up steps without adv, then steps 0 and 2"
    assert all(w["oh"] == 1.0 for w in seen)
    assert len(source.pool) == 16, "only the two steps after the warm-up fill the pool"
